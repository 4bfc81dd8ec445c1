/*
 * expertmesh native engine: the "sim" device, a stand-in for a GPU where there is none.
 *
 * em_backend_create_device("sim") (or "sim:BYTES", a device of that many bytes) gives a
 * backend that runs the CPU backend's kernels but claims only the ops the CUDA backend
 * claims, and whose em_cuda_malloc / em_cuda_free / em_cuda_copy / em_cuda_copy_ranges work
 * on host memory it tracks: filled with 0xFF bytes (NaN) when allocated, bounds-checked on
 * every copy. What the addon does for a device (weights resident, KV pools mirrored, ops
 * split between device and CPU) thus runs, and is tested, without a GPU: a mirror that was
 * not brought up to date reads NaN or old rows, and the results show it. It says nothing about
 * a GPU's kernels or speed (test_cuda_parity and scripts/gpu-check.sh are for those).
 */
#ifndef EXPERTMESH_SIM_H
#define EXPERTMESH_SIM_H

#include <stddef.h>

#include "expertmesh/ops.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct em_sim_stats {
  size_t allocations;     /* live allocations */
  size_t bytes;           /* their bytes */
  size_t allocated_total; /* allocations ever made */
  size_t copies;          /* em_cuda_copy calls */
  size_t range_copies;    /* em_cuda_copy_ranges calls */
  size_t ranges;          /* ranges those carried */
  size_t copied_bytes;    /* bytes both carried */
} em_sim_stats;

/* The counters of a sim backend; EM_ERR_ARG for any other backend. */
em_status em_sim_get_stats(em_backend* b, em_sim_stats* out);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* EXPERTMESH_SIM_H */
