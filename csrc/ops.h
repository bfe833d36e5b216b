// Shared argument checks and preparation for the mlsys ops (see ops.cpp for the schemas
// and mlsys/ops.py for the reference semantics). Included by the CPU and the CUDA files,
// so it stays light: ATen only, no pybind11, no torch/extension.h.
#pragma once

#include <ATen/ATen.h>

namespace mlsys {

// Candidates decode up to 8 signed directions (3^8 = 6561 candidates per image).
constexpr int64_t kMaxDirections = 8;

enum class ScoreMode { L1, CE };

// Validated, device-ready inputs of `candidates`: fp32 copies of x and dirs in the
// memory order of the output (NCHW, or NHWC when channels_last), and the empty output.
struct CandidateArgs {
  at::Tensor x;    // (P,) float32 contiguous, P = K*H*W, in output order
  at::Tensor dirs; // (C, P) float32 contiguous, in output order
  at::Tensor out;  // (count, K, H, W) in the requested dtype and memory format
  int64_t n_dirs;  // C
  int64_t numel;   // P
};

// Validated inputs of `score`: logits kept in their dtype, NCHW or NHWC.
struct ScoreArgs {
  at::Tensor logits;   // (N, C, H, W), contiguous or channels-last contiguous
  at::Tensor target;   // (H*W,) int32 class ids
  bool channels_last;  // logits are NHWC in memory
  ScoreMode mode;
  bool argmax;         // select == "argmax"
  int64_t n, classes, pixels;
};

CandidateArgs prepare_candidates(const at::Tensor& x, const at::Tensor& dirs, int64_t start,
                                 int64_t count, double lo, double hi, at::ScalarType dtype,
                                 bool channels_last);

ScoreArgs prepare_score(const at::Tensor& logits, const at::Tensor& mask,
                        c10::string_view mode, c10::string_view select);

}  // namespace mlsys
