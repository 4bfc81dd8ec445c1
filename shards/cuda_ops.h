// The ops the CUDA backend implements, by the dtype supports_op is asked about (a weight's,
// or the activations' for the element-wise ops). One table for the two backends that answer
// with it: cuda/cuda_backend.cu, and the sim device (sim/sim_backend.cpp), which must fall
// back to the CPU backend exactly where CUDA does. Host code only.
#pragma once

#include "expertmesh/ops.h"

namespace em {

inline int cuda_supports_op(em_op op, em_dtype dtype) {
  const bool gemm = dtype == EM_F32 || dtype == EM_BF16 || dtype == EM_F16;
  switch (op) {
    case EM_OP_MATMUL:
    case EM_OP_MOE_FFN:
    case EM_OP_GATE:  // fp8 weights: cuda/fp8.cu
    case EM_OP_CONVERT:
    case EM_OP_MLA_ATTENTION: return gemm || dtype == EM_F8_E4M3;  // wkv_b's dtype; cuda/attention.cu
    case EM_OP_RMSNORM: return gemm;
    case EM_OP_SILU_MUL:
    case EM_OP_ROPE: return dtype == EM_F32;
    default: return 0;  // sample, logprobs, wire_pack, wire_unpack: not yet
  }
}

}  // namespace em
