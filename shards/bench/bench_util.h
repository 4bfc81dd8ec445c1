// Helpers shared by the native benchmarks: exit on a failed engine call, median/min/max of
// samples, and comma-separated integer lists from the command line.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "expertmesh/ops.h"

#define TRY(expr)                                                                       \
  do {                                                                                  \
    const em_status s_ = (expr);                                                        \
    if (s_ != EM_OK) {                                                                  \
      std::fprintf(stderr, "%s: %s: %s\n", #expr, em_status_name(s_), em_last_error()); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

namespace bench {

struct Stats {
  double median, min, max;
};

inline Stats stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v[v.size() / 2], v.front(), v.back()};
}

// "8,64,512" -> {8, 64, 512}; stops at the first character that is neither a digit nor a comma.
inline std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> v;
  for (const char* p = s; *p;) {
    char* end = nullptr;
    const long long n = std::strtoll(p, &end, 10);
    if (end == p) break;
    v.push_back(n);
    p = end;
    if (*p == ',') ++p;
    else if (*p) break;
  }
  return v;
}

}  // namespace bench
