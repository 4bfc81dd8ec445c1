// The wgmma primitives of cuda/wgmma.cuh on their own (part of test_cuda_parity): one
// warpgroup computes C[64, N] = A[64, K] B[K, N] with A and B staged in shared memory in the
// no-swizzle core-matrix layout, B either K-major (stored [N][K], as the latent cache for
// S = Q K^T) or N-major (stored [K][N], as the cache for O = P V), the N-major strides also
// swapped. Against a double-precision host product of the same bf16 values: which layout
// the hardware reads as documented is what the MLA wgmma kernel relies on.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/wgmma.cuh"

namespace {

using em::cuda::cm_offset;

constexpr int kM = 64, kK = 64;

// variant 0: B K-major; 1: B N-major (LBO along K, SBO along N, as documented); 2: N-major
// with the two strides swapped (faults on an H200: an illegal address; test_cuda_parity no
// longer runs it).
template <int N>
__global__ void probe_kernel(const uint16_t* a, const uint16_t* b, int variant, float* c, int* ran) {
#ifdef EM_WGMMA
  __shared__ __align__(128) unsigned char as[kM * kK * 2];
  __shared__ __align__(128) unsigned char bs[N * kK * 2];
  const int t = threadIdx.x;
  for (int e = t; e < kM * kK; e += 128) {
    const int r = e / kK, k = e % kK;
    *reinterpret_cast<uint16_t*>(as + cm_offset(r, k, kK)) = a[e];
  }
  for (int e = t; e < kK * N; e += 128) {  // b is [K][N] row-major
    const int k = e / N, n = e % N;
    if (variant == 0) *reinterpret_cast<uint16_t*>(bs + cm_offset(n, k, kK)) = b[e];  // rows n, columns k
    else *reinterpret_cast<uint16_t*>(bs + cm_offset(k, n, N)) = b[e];                 // rows k, columns n
  }
  em::cuda::fence_proxy_async();
  __syncthreads();
  float d[N / 2];
  for (float& v : d) v = 0.0f;
  em::cuda::wgmma_fence_operands(d);
  em::cuda::wgmma_fence();
  for (int s = 0; s < kK / 16; ++s) {
    const uint64_t da = em::cuda::wg_desc(as + 256 * s, 128, (kK / 8) * 128);
    uint64_t db;
    if (variant == 0) db = em::cuda::wg_desc(bs + 256 * s, 128, (kK / 8) * 128);
    else if (variant == 1) db = em::cuda::wg_desc(bs + s * 2 * (N / 8) * 128, (N / 8) * 128, 128);
    else db = em::cuda::wg_desc(bs + s * 2 * (N / 8) * 128, 128, (N / 8) * 128);
    if constexpr (N == 32) {
      if (variant == 0) em::cuda::wgmma_m64n32k16<0>(d, da, db, s > 0);
      else em::cuda::wgmma_m64n32k16<1>(d, da, db, s > 0);
    } else {
      if (variant == 0) em::cuda::wgmma_m64n256k16<0>(d, da, db, s > 0);
      else em::cuda::wgmma_m64n256k16<1>(d, da, db, s > 0);
    }
  }
  em::cuda::wgmma_commit();
  em::cuda::wgmma_wait<0>();
  em::cuda::wgmma_fence_operands(d);
  const int w = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int i = 0; i < N / 2; ++i) {
    const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * q + (i & 1);
    c[row * N + col] = d[i];
  }
  if (t == 0) *ran = 1;
#else
  (void)a, (void)b, (void)variant, (void)c, (void)ran;
#endif
}

float bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace

// Runs one probe; returns 0 and max |c - ref| / max |ref| in *rel_err, 1 when this build or
// device has no wgmma (not sm_90a), or -1 on a CUDA error (message in *what).
int wgmma_probe(int n, int variant, double* rel_err, const char** what) {
  std::mt19937 gen(static_cast<unsigned>(1000 * n + variant));
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  auto bf16 = [&] {
    const float f = uni(gen);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);
  };
  std::vector<uint16_t> a(kM * kK), b(static_cast<size_t>(kK) * n);
  for (auto& v : a) v = bf16();
  for (auto& v : b) v = bf16();
  uint16_t *da = nullptr, *db = nullptr;
  float* dc = nullptr;
  int* dran = nullptr;
  std::vector<float> c(static_cast<size_t>(kM) * n, NAN);
  int ran = 0;
  cudaError_t e = cudaMalloc(&da, a.size() * 2);
  if (e == cudaSuccess) e = cudaMalloc(&db, b.size() * 2);
  if (e == cudaSuccess) e = cudaMalloc(&dc, c.size() * 4);
  if (e == cudaSuccess) e = cudaMalloc(&dran, sizeof(int));
  if (e == cudaSuccess) e = cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = cudaMemset(dc, 0xff, c.size() * 4);  // NaN: unwritten outputs show
  if (e == cudaSuccess) e = cudaMemset(dran, 0, sizeof(int));
  if (e == cudaSuccess) {
    if (n == 32) probe_kernel<32><<<1, 128>>>(da, db, variant, dc, dran);
    else probe_kernel<256><<<1, 128>>>(da, db, variant, dc, dran);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e == cudaSuccess) e = cudaMemcpy(c.data(), dc, c.size() * 4, cudaMemcpyDeviceToHost);
  if (e == cudaSuccess) e = cudaMemcpy(&ran, dran, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(da);
  cudaFree(db);
  cudaFree(dc);
  cudaFree(dran);
  if (e != cudaSuccess) {
    *what = cudaGetErrorString(e);
    cudaGetLastError();
    return -1;
  }
  if (!ran) return 1;
  double err = 0.0, mx = 0.0;
  for (int i = 0; i < kM; ++i)
    for (int j = 0; j < n; ++j) {
      double ref = 0.0;
      for (int k = 0; k < kK; ++k) ref += static_cast<double>(bf16_value(a[i * kK + k])) * bf16_value(b[k * n + j]);
      const double got = c[static_cast<size_t>(i) * n + j];
      mx = std::fmax(mx, std::fabs(ref));
      err = std::isnan(got) ? INFINITY : std::fmax(err, std::fabs(got - ref));
    }
  *rel_err = err / (mx > 0 ? mx : 1.0);
  return 0;
}
