// The sim device's entry points for device.cpp (see include/expertmesh/sim.h).
#pragma once

#include <cstddef>

#include "expertmesh/ops.h"

namespace em::sim {

struct Context;

// The sim context of `b`, or null when `b` is another backend.
Context* sim_ctx(em_backend* b);
// A sim backend with `capacity` bytes of device memory (0: no limit).
em_status create(size_t capacity, em_backend** out);
em_status alloc(Context& c, size_t bytes, void** out);
em_status release(Context& c, void* ptr);
em_status copy(Context& c, void* dst, const void* src, size_t bytes);
em_status copy_ranges(Context& c, void* dst, const void* src, const size_t* offsets, const size_t* lengths, size_t n);

}  // namespace em::sim
