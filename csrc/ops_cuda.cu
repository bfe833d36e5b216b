// CUDA kernels of the mlsys ops. Semantics: mlsys/ops.py (candidates_ref, score_ref);
// argument checks: ops.cpp (prepare_candidates, prepare_score).
//
// candidates: grid (pixel chunks, candidates); each thread decodes its candidate's signs
//   from the base-3 index into registers, then writes VEC consecutive output elements
//   (16-byte fp32 loads of x and dirs, one vector store in the output dtype). The output
//   order is NCHW or NHWC; x and dirs were permuted to that order, so both are one loop.
// score: grid (pixel splits, candidates); per pixel the softmax over the C classes is
//   computed in registers (max, sum of exp, then L1 or CE), accumulated in fp32 per
//   thread, reduced per block in a fixed order into partial sums; a second one-block
//   kernel sums the partials in a fixed order and picks the first argmin/argmax.
//   The result depends only on the device's SM count and the shapes, not on timing.
// Out-of-range mask ids (clamped to -1 or C by prepare_score) give NaN scores: checking
// them on the host would need a device sync.

#include "ops.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace mlsys {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 65535;

template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

bool aligned(const void* p, size_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

// ---------------------------------------------------------------------------------------
// candidates

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    candidates_kernel(const float* __restrict__ x, const float* __restrict__ dirs, int64_t P,
                      int C, int64_t start, int64_t count, float lo, float hi,
                      scalar_t* __restrict__ out) {
  for (int64_t n = blockIdx.y; n < count; n += gridDim.y) {
    // signs of candidate start + n: digit c of the index, 0 -> 0, 1 -> +1, 2 -> -1
    float s[kMaxDirections];
    int64_t index = start + n;
#pragma unroll
    for (int c = 0; c < kMaxDirections; ++c) {
      const int digit = static_cast<int>(index % 3);
      index /= 3;
      s[c] = c < C ? (digit == 1 ? 1.0f : (digit == 2 ? -1.0f : 0.0f)) : 0.0f;
    }
    scalar_t* dst = out + n * P;
    const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * VEC;
    // VEC > 1 only when P % VEC == 0, so a pack never crosses the end
    for (int64_t p = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; p < P;
         p += step) {
      float acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = 0.0f;
#pragma unroll
      for (int c = 0; c < kMaxDirections; ++c) {
        if (s[c] != 0.0f) {  // uniform over the block: no divergence
          const Pack<float, VEC> d = *reinterpret_cast<const Pack<float, VEC>*>(dirs + c * P + p);
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += s[c] * d.v[k];
        }
      }
      const Pack<float, VEC> xv = *reinterpret_cast<const Pack<float, VEC>*>(x + p);
      Pack<scalar_t, VEC> o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        float v = xv.v[k] + acc[k];
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        o.v[k] = static_cast<scalar_t>(v);
      }
      *reinterpret_cast<Pack<scalar_t, VEC>*>(dst + p) = o;
    }
  }
}

at::Tensor candidates_cuda(const at::Tensor& x, const at::Tensor& dirs, int64_t start,
                           int64_t count, double lo, double hi, at::ScalarType dtype,
                           bool channels_last) {
  CandidateArgs a = prepare_candidates(x, dirs, start, count, lo, hi, dtype, channels_last);
  const c10::cuda::CUDAGuard guard(a.out.device());  // after the checks: x may be on the CPU
  const int64_t P = a.numel;
  if (count == 0 || P == 0) return a.out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mlsys_candidates_cuda", [&] {
    const float* xp = a.x.data_ptr<float>();
    const float* dp = a.dirs.data_ptr<float>();
    scalar_t* op = a.out.data_ptr<scalar_t>();
    const bool vec = P % 4 == 0 && aligned(xp, alignof(Pack<float, 4>)) &&
                     aligned(dp, alignof(Pack<float, 4>)) &&
                     aligned(op, alignof(Pack<scalar_t, 4>));
    const int64_t per_block = static_cast<int64_t>(kThreads) * (vec ? 4 : 1);
    const dim3 grid(static_cast<unsigned>(std::min((P + per_block - 1) / per_block, kMaxGrid)),
                    static_cast<unsigned>(std::min(count, kMaxGrid)));
    const int C = static_cast<int>(a.n_dirs);
    const float flo = static_cast<float>(lo), fhi = static_cast<float>(hi);
    if (vec) {
      candidates_kernel<scalar_t, 4>
          <<<grid, kThreads, 0, stream>>>(xp, dp, P, C, start, count, flo, fhi, op);
    } else {
      candidates_kernel<scalar_t, 1>
          <<<grid, kThreads, 0, stream>>>(xp, dp, P, C, start, count, flo, fhi, op);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return a.out;
}

// ---------------------------------------------------------------------------------------
// score

// Sum of v over the block, valid in thread 0; a fixed reduction tree (deterministic).
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  __syncthreads();  // the previous call's readers are done with warp_sums
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename scalar_t, bool CL, bool CE>
__global__ void __launch_bounds__(kThreads)
    score_partial_kernel(const scalar_t* __restrict__ logits, const int32_t* __restrict__ target,
                         int64_t N, int C, int64_t P, float* __restrict__ partial) {
  const int splits = gridDim.x;
  const float nan = __int_as_float(0x7fc00000);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const scalar_t* base = logits + n * C * P;
    float acc = 0.0f;
    for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < P;
         p += static_cast<int64_t>(splits) * blockDim.x) {
      // logit of class c at pixel p: NHWC base[p * C + c], NCHW base[c * P + p]
      const scalar_t* z = CL ? base + p * C : base + p;
      const int64_t cs = CL ? 1 : P;
      const int t = target[p];
      float m = static_cast<float>(z[0]);
      for (int c = 1; c < C; ++c) {
        const float v = static_cast<float>(z[c * cs]);
        m = v > m ? v : m;
      }
      float sum = 0.0f, zt = 0.0f;
      for (int c = 0; c < C; ++c) {
        const float v = static_cast<float>(z[c * cs]);
        sum += expf(v - m);
        zt = c == t ? v : zt;
      }
      float loss;
      if (CE) {
        loss = logf(sum) + m - zt;  // -log softmax_t
      } else {
        const float inv = 1.0f / sum;
        loss = 0.0f;
        for (int c = 0; c < C; ++c) {
          const float prob = expf(static_cast<float>(z[c * cs]) - m) * inv;
          loss += fabsf(prob - (c == t ? 1.0f : 0.0f));
        }
      }
      acc += (t < 0 || t >= C) ? nan : loss;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[n * splits + blockIdx.x] = acc;
  }
}

// Is (a, ia) a better pick than (b, ib)? NaN wins (as torch.argmin/argmax), then the
// smaller (argmin) or larger (argmax) score, then the lower index; ib < 0 means none.
__device__ bool better(float a, int64_t ia, float b, int64_t ib, bool argmax) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  const bool an = a != a, bn = b != b;  // NaN
  if (an || bn) return an && bn ? ia < ib : an;
  if (a == b) return ia < ib;
  return argmax ? a > b : a < b;
}

// One block: scores[n] = sum of the splits' partials / denom (fixed order), then the pick.
__global__ void __launch_bounds__(kThreads)
    score_final_kernel(const float* __restrict__ partial, int64_t N, int splits, double denom,
                       bool argmax, float* __restrict__ scores, int64_t* __restrict__ best) {
  __shared__ float sv[kThreads];
  __shared__ int64_t si[kThreads];
  float bv = 0.0f;
  int64_t bi = -1;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    double sum = 0.0;
    for (int k = 0; k < splits; ++k) sum += partial[n * splits + k];
    const float v = static_cast<float>(sum / denom);
    scores[n] = v;
    if (better(v, n, bv, bi, argmax)) {
      bv = v;
      bi = n;
    }
  }
  sv[threadIdx.x] = bv;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (threadIdx.x < half) {
      const int other = threadIdx.x + half;
      if (better(sv[other], si[other], sv[threadIdx.x], si[threadIdx.x], argmax)) {
        sv[threadIdx.x] = sv[other];
        si[threadIdx.x] = si[other];
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *best = si[0];
}

template <typename scalar_t, bool CE>
void launch_score_partial(const ScoreArgs& a, dim3 grid, cudaStream_t stream, float* partial) {
  const scalar_t* logits = a.logits.data_ptr<scalar_t>();
  const int32_t* target = a.target.data_ptr<int32_t>();
  const int C = static_cast<int>(a.classes);
  if (a.channels_last) {
    score_partial_kernel<scalar_t, true, CE>
        <<<grid, kThreads, 0, stream>>>(logits, target, a.n, C, a.pixels, partial);
  } else {
    score_partial_kernel<scalar_t, false, CE>
        <<<grid, kThreads, 0, stream>>>(logits, target, a.n, C, a.pixels, partial);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> score_cuda(const at::Tensor& logits, const at::Tensor& mask,
                                              c10::string_view mode, c10::string_view select) {
  ScoreArgs a = prepare_score(logits, mask, mode, select);
  const c10::cuda::CUDAGuard guard(a.logits.device());  // after the checks
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // enough blocks for ~4 waves over the SMs, each with at least one pixel per thread
  int sms = 0;  // of the guarded device (ATen/cuda/CUDAContext.h would pull the cuBLAS headers)
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        a.logits.device().index()));
  const int64_t max_splits = (a.pixels + kThreads - 1) / kThreads;
  const int64_t splits = std::max<int64_t>(1, std::min((4 * sms + a.n - 1) / a.n, max_splits));
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor partial = at::empty({a.n * splits}, f32);
  at::Tensor scores = at::empty({a.n}, f32);
  at::Tensor best = at::empty({}, logits.options().dtype(at::kLong));
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(std::min(a.n, kMaxGrid)));
  float* pp = partial.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.logits.scalar_type(),
                                  "mlsys_score_cuda", [&] {
    if (a.mode == ScoreMode::CE) {
      launch_score_partial<scalar_t, true>(a, grid, stream, pp);
    } else {
      launch_score_partial<scalar_t, false>(a, grid, stream, pp);
    }
  });
  const double denom = static_cast<double>(a.pixels) * (a.mode == ScoreMode::L1 ? a.classes : 1);
  score_final_kernel<<<1, kThreads, 0, stream>>>(pp, a.n, static_cast<int>(splits), denom,
                                                  a.argmax, scores.data_ptr<float>(),
                                                  best.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {scores, best};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlsys, CUDA, m) {
  m.impl("candidates", &candidates_cuda);
  m.impl("score", &score_cuda);
}

}  // namespace mlsys
