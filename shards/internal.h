// Internal helpers shared by the dispatcher and the backends (not part of the C API).
#pragma once

#include "expertmesh/ops.h"

namespace em {

// Records a printf-style detail for em_last_error() on this thread; returns `status`.
em_status fail(em_status status, const char* fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

}  // namespace em
