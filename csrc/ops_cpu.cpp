// CPU kernels of the mlsys ops (OpenMP). Semantics: mlsys/ops.py (candidates_ref, score_ref).
//
// Both ops work on fixed tiles of contiguous fp32 values: plain loops over the tile that
// the compiler vectorises, with the element type converted on the way in or out.
// Reductions use a fixed tile size and a fixed summation order, so scores do not depend
// on the number of threads. On x86-64 with GCC the fp32 loops are also compiled for
// AVX2+FMA (x86-64-v3) and picked at load time (target_clones).

#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MLSYS_NO_CLONES)
#define MLSYS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MLSYS_CLONES
#endif

namespace mlsys {
namespace {

constexpr int64_t kTile = 4096;  // candidate elements per task
constexpr int64_t kPix = 512;    // score pixels per task (C rows of kPix floats in L1)
// Below these sizes one thread is faster than waking the OpenMP team (about 10 us each
// on 2 cores; far more when the machine is oversubscribed).
constexpr int64_t kSerialCandidates = 1 << 18;  // output elements
constexpr int64_t kSerialScore = 1 << 16;       // logits

int threads_for(int64_t work, int64_t serial) { return work < serial ? 1 : at::get_num_threads(); }

// ---------------------------------------------------------------------------------------
// Vectorisable exp and log (Cephes-style, ~1 ulp in fp32): the loops calling them stay
// SIMD without -ffast-math. NaN propagates; exp(x) is 0 below -87.3 (fp32 denormals).

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

inline int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

inline float exp_f32(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (valid for |x / ln 2| < 2^22)
  const float fn = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r2 + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(fn) + 127) << 23);
  float out = y * scale;
  out = x < -87.3f ? 0.0f : out;
  return x != x ? x : out;
}

// log for positive normal x (here x = sum of exps >= 1)
inline float log_f32(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1 : e;
  const float t = (m - 1.0f) / (m + 1.0f);  // |t| <= 0.1716
  const float t2 = t * t;
  float p = 1.0f / 9.0f;
  p = p * t2 + 1.0f / 7.0f;
  p = p * t2 + 1.0f / 5.0f;
  p = p * t2 + 1.0f / 3.0f;
  p = p * t2 + 1.0f;
  const float out = static_cast<float>(e) * 0.693147180559945f + 2.0f * t * p;
  return x != x ? x : out;
}

// ---------------------------------------------------------------------------------------
// candidates

// out[j] = clip(x[j] + sum_k s[k] * d[k][j], lo, hi) for j < n (only the non-zero signs).
MLSYS_CLONES void combine_tile(const float* x, const float* const* d, const float* s, int nd,
                               float lo, float hi, int64_t n, float* out) {
  if (nd == 0) {
    for (int64_t j = 0; j < n; ++j) out[j] = 0.0f;
  } else {
    const float* d0 = d[0];
    const float s0 = s[0];
    for (int64_t j = 0; j < n; ++j) out[j] = s0 * d0[j];
    for (int k = 1; k < nd; ++k) {
      const float* dk = d[k];
      const float sk = s[k];
      for (int64_t j = 0; j < n; ++j) out[j] += sk * dk[j];
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    float v = x[j] + out[j];
    v = v < lo ? lo : v;
    out[j] = v > hi ? hi : v;
  }
}

template <typename scalar_t>
void convert_tile(const float* src, int64_t n, scalar_t* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

template <typename scalar_t>
void candidates_kernel(const CandidateArgs& a, int64_t start, float lo, float hi) {
  constexpr bool kDirect = std::is_same_v<scalar_t, float>;
  const int64_t P = a.numel, C = a.n_dirs, count = a.out.size(0);
  const int64_t tiles = (P + kTile - 1) / kTile;
  const int64_t tasks = count * tiles;
  const float* x = a.x.data_ptr<float>();
  const float* dirs = a.dirs.data_ptr<float>();
  scalar_t* out = a.out.data_ptr<scalar_t>();
#pragma omp parallel num_threads(threads_for(count * P, kSerialCandidates))
  {
    std::vector<float> buf(kDirect ? 0 : kTile);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / tiles, j0 = (task % tiles) * kTile;
      const int64_t len = P - j0 < kTile ? P - j0 : kTile;
      float s[kMaxDirections];
      const float* d[kMaxDirections];
      int nd = 0;
      int64_t index = start + n;
      for (int64_t c = 0; c < C; ++c, index /= 3) {
        const int64_t digit = index % 3;
        if (digit == 0) continue;
        s[nd] = digit == 1 ? 1.0f : -1.0f;
        d[nd++] = dirs + c * P + j0;
      }
      scalar_t* dst = out + n * P + j0;
      if constexpr (kDirect) {
        combine_tile(x + j0, d, s, nd, lo, hi, len, dst);
      } else {
        combine_tile(x + j0, d, s, nd, lo, hi, len, buf.data());
        convert_tile(buf.data(), len, dst);
      }
    }
  }
}

at::Tensor candidates_cpu(const at::Tensor& x, const at::Tensor& dirs, int64_t start,
                          int64_t count, double lo, double hi, at::ScalarType dtype,
                          bool channels_last) {
  CandidateArgs a = prepare_candidates(x, dirs, start, count, lo, hi, dtype, channels_last);
  if (a.out.numel() == 0) return a.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "mlsys_candidates_cpu", [&] {
    candidates_kernel<scalar_t>(a, start, static_cast<float>(lo), static_cast<float>(hi));
  });
  return a.out;
}

// ---------------------------------------------------------------------------------------
// score

// Sum over the pixels j < n of one tile of the per-pixel loss. buf holds C rows (stride ld)
// of fp32 logits and is overwritten; m, s, zt, loss are scratch rows of n floats.
MLSYS_CLONES float tile_loss(float* buf, int64_t ld, int C, int64_t n, const int32_t* t, bool ce,
                             float* m, float* s, float* zt, float* loss) {
  for (int64_t j = 0; j < n; ++j) m[j] = buf[j];
  for (int c = 1; c < C; ++c) {
    const float* row = buf + c * ld;
    for (int64_t j = 0; j < n; ++j) m[j] = row[j] > m[j] ? row[j] : m[j];
  }
  for (int64_t j = 0; j < n; ++j) {
    s[j] = 0.0f;
    zt[j] = 0.0f;
  }
  for (int c = 0; c < C; ++c) {
    float* row = buf + c * ld;
    if (ce) {
      for (int64_t j = 0; j < n; ++j) {
        const float z = row[j];
        zt[j] += t[j] == c ? z : 0.0f;
        s[j] += exp_f32(z - m[j]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j) {
        const float e = exp_f32(row[j] - m[j]);
        row[j] = e;
        s[j] += e;
      }
    }
  }
  if (ce) {
    // -log softmax_t = log(sum_c exp(z_c - m)) + m - z_t
    for (int64_t j = 0; j < n; ++j) loss[j] = log_f32(s[j]) + m[j] - zt[j];
  } else {
    // sum_c |softmax_c - onehot_c|
    for (int64_t j = 0; j < n; ++j) {
      s[j] = 1.0f / s[j];
      loss[j] = 0.0f;
    }
    for (int c = 0; c < C; ++c) {
      const float* row = buf + c * ld;
      for (int64_t j = 0; j < n; ++j) {
        loss[j] += std::fabs(row[j] * s[j] - (t[j] == c ? 1.0f : 0.0f));
      }
    }
  }
  // eight fixed lanes: the same order whatever the vector width
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int u = 0; u < 8; ++u) lanes[u] += loss[j + u];
  }
  for (int u = 0; j < n; ++j, ++u) lanes[u] += loss[j];
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

template <typename scalar_t>
void score_kernel(const ScoreArgs& a, float* partial, int64_t tiles) {
  const int64_t N = a.n, C = a.classes, P = a.pixels;
  const int64_t tasks = N * tiles;
  const scalar_t* logits = a.logits.data_ptr<scalar_t>();
  const int32_t* target = a.target.data_ptr<int32_t>();
  const bool ce = a.mode == ScoreMode::CE, cl = a.channels_last;
#pragma omp parallel num_threads(threads_for(N * C * P, kSerialScore))
  {
    std::vector<float> buf((C + 4) * kPix);
    float* rows = buf.data();
    float* scratch = rows + C * kPix;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / tiles, p0 = (task % tiles) * kPix;
      const int64_t len = P - p0 < kPix ? P - p0 : kPix;
      if (cl) {  // NHWC: transpose the tile's pixels into class rows
        const scalar_t* src = logits + (n * P + p0) * C;
        for (int64_t j = 0; j < len; ++j) {
          for (int64_t c = 0; c < C; ++c) rows[c * kPix + j] = static_cast<float>(src[j * C + c]);
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* src = logits + (n * C + c) * P + p0;
          float* row = rows + c * kPix;
          for (int64_t j = 0; j < len; ++j) row[j] = static_cast<float>(src[j]);
        }
      }
      partial[task] = tile_loss(rows, kPix, static_cast<int>(C), len, target + p0, ce, scratch,
                                scratch + kPix, scratch + 2 * kPix, scratch + 3 * kPix);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> score_cpu(const at::Tensor& logits, const at::Tensor& mask,
                                             c10::string_view mode, c10::string_view select) {
  ScoreArgs a = prepare_score(logits, mask, mode, select);
  const int64_t tiles = (a.pixels + kPix - 1) / kPix;
  std::vector<float> partial(a.n * tiles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.logits.scalar_type(),
                                  "mlsys_score_cpu",
                                  [&] { score_kernel<scalar_t>(a, partial.data(), tiles); });

  at::Tensor scores = at::empty({a.n}, logits.options().dtype(at::kFloat));
  float* sc = scores.data_ptr<float>();
  const double denom = static_cast<double>(a.pixels) * (a.mode == ScoreMode::L1 ? a.classes : 1);
  for (int64_t n = 0; n < a.n; ++n) {
    double sum = 0.0;
    for (int64_t k = 0; k < tiles; ++k) sum += partial[n * tiles + k];
    sc[n] = static_cast<float>(sum / denom);
  }
  // first argmin / argmax; a NaN wins (as torch.argmin / argmax)
  int64_t best = 0;
  for (int64_t n = 1; n < a.n && !std::isnan(sc[best]); ++n) {
    if (std::isnan(sc[n]) || (a.argmax ? sc[n] > sc[best] : sc[n] < sc[best])) best = n;
  }
  at::Tensor best_t = at::empty({}, logits.options().dtype(at::kLong));
  *best_t.data_ptr<int64_t>() = best;
  return {scores, best_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(mlsys, CPU, m) {
  m.impl("candidates", &candidates_cpu);
  m.impl("score", &score_cpu);
}

}  // namespace mlsys
