// mlsys native ops: schemas (once), argument checks shared by every device, and the
// Python module `mlsys._C`. The kernels live in ops_cpu.cpp and ops_cuda.cu; the
// plain-PyTorch references that define the results are in mlsys/ops.py.
//
//   candidates(x (K,H,W), dirs (C,K,H,W), start, count, lo, hi, dtype, channels_last)
//       -> (count, K, H, W): clip(x + sum_c s_c(i) * dirs[c], lo, hi) for the base-3
//       indices i in [start, start + count); digit c of i (least significant first)
//       gives s_c: 0 -> 0, 1 -> +1, 2 -> -1. Computed in fp32, written in `dtype`,
//       NCHW or (channels_last) NHWC memory order.
//   score(logits (N,C,H,W), mask (H,W), mode, select) -> (scores (N,) fp32, best () int64)
//       "l1": mean over (C,H,W) of |onehot(mask) - softmax(logits)|; "ce": mean over (H,W)
//       of the cross-entropy; best = first argmin ("argmin") or argmax ("argmax").

#include <pybind11/pybind11.h>  // first: it includes Python.h, which asks to come first

#include "ops.h"

#include <torch/library.h>

namespace mlsys {
namespace {

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

int64_t pow3(int64_t n) {
  int64_t p = 1;
  for (int64_t i = 0; i < n; ++i) p *= 3;
  return p;
}

}  // namespace

CandidateArgs prepare_candidates(const at::Tensor& x, const at::Tensor& dirs, int64_t start,
                                 int64_t count, double lo, double hi, at::ScalarType dtype,
                                 bool channels_last) {
  TORCH_CHECK(x.dim() == 3, "mlsys::candidates: x should be (K, H, W), got shape ", x.sizes());
  TORCH_CHECK(dirs.dim() == 4, "mlsys::candidates: dirs should be (C, K, H, W), got shape ",
              dirs.sizes());
  TORCH_CHECK(dirs.sizes().slice(1) == x.sizes(), "mlsys::candidates: dirs ", dirs.sizes(),
              " should be (C, K, H, W) with (K, H, W) = x's shape ", x.sizes());
  TORCH_CHECK(is_float(x.scalar_type()) && is_float(dirs.scalar_type()),
              "mlsys::candidates: x and dirs should be floating point, got ", x.scalar_type(),
              " and ", dirs.scalar_type());
  TORCH_CHECK(x.device() == dirs.device(), "mlsys::candidates: x and dirs should be on one ",
              "device, got ", x.device(), " and ", dirs.device());
  const int64_t n_dirs = dirs.size(0);
  TORCH_CHECK(n_dirs <= kMaxDirections, "mlsys::candidates: at most ", kMaxDirections,
              " directions (3^", kMaxDirections, " candidates), got ", n_dirs);
  const int64_t total = pow3(n_dirs);
  TORCH_CHECK(start >= 0 && count >= 0 && start <= total - count,
              "mlsys::candidates: candidate range [", start, ", ", start + count,
              ") outside [0, ", total, ")");
  TORCH_CHECK(lo <= hi, "mlsys::candidates: clip range needs lo <= hi, got lo=", lo, " hi=", hi);
  TORCH_CHECK(is_float(dtype), "mlsys::candidates: dtype should be float32, bfloat16, float16 ",
              "or float64, got ", dtype);

  // fp32 inputs in the output's memory order: then both layouts are one flat loop
  // out[n * P + p] over p. These are small (C+1 images); the output is the big tensor.
  at::Tensor xf = x.to(at::kFloat);
  at::Tensor df = dirs.to(at::kFloat);
  if (channels_last) {
    xf = xf.permute({1, 2, 0});
    df = df.permute({0, 2, 3, 1});
  }
  CandidateArgs a;
  a.x = xf.contiguous().reshape({-1});
  a.dirs = df.contiguous().reshape({n_dirs, a.x.numel()});
  a.n_dirs = n_dirs;
  a.numel = a.x.numel();
  a.out = at::empty({count, x.size(0), x.size(1), x.size(2)}, x.options().dtype(dtype),
                    channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  return a;
}

ScoreArgs prepare_score(const at::Tensor& logits, const at::Tensor& mask, c10::string_view mode,
                        c10::string_view select) {
  TORCH_CHECK(logits.dim() == 4, "mlsys::score: logits should be (N, C, H, W), got shape ",
              logits.sizes());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == logits.size(2) && mask.size(1) == logits.size(3),
              "mlsys::score: mask should be (H, W) = (", logits.size(2), ", ", logits.size(3),
              "), got shape ", mask.sizes());
  TORCH_CHECK(is_float(logits.scalar_type()), "mlsys::score: logits should be floating point, ",
              "got ", logits.scalar_type());
  TORCH_CHECK(at::isIntegralType(mask.scalar_type(), /*includeBool=*/true),
              "mlsys::score: mask should hold integer class ids, got ", mask.scalar_type());
  TORCH_CHECK(logits.device() == mask.device(), "mlsys::score: logits and mask should be on one ",
              "device, got ", logits.device(), " and ", mask.device());
  TORCH_CHECK(logits.numel() > 0, "mlsys::score: needs at least one candidate, class and pixel, ",
              "got logits of shape ", logits.sizes());
  ScoreArgs a;
  if (mode == "l1") {
    a.mode = ScoreMode::L1;
  } else if (mode == "ce") {
    a.mode = ScoreMode::CE;
  } else {
    TORCH_CHECK(false, "mlsys::score: mode should be 'l1' or 'ce', got '", std::string(mode), "'");
  }
  TORCH_CHECK(select == "argmin" || select == "argmax",
              "mlsys::score: select should be 'argmin' or 'argmax', got '", std::string(select), "'");
  a.argmax = select == "argmax";
  a.n = logits.size(0);
  a.classes = logits.size(1);
  a.pixels = logits.size(2) * logits.size(3);

  // Both NCHW and NHWC are read in place; any other stride pattern is copied to NCHW.
  if (logits.is_contiguous()) {
    a.logits = logits;
    a.channels_last = false;
  } else if (logits.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    a.logits = logits;
    a.channels_last = true;
  } else {
    a.logits = logits.contiguous();
    a.channels_last = false;
  }

  at::Tensor ids = mask.to(at::kLong).contiguous();
  if (ids.is_cpu()) {
    // Cheap on the host (H*W integers). On a GPU this would need a sync, so there
    // out-of-range ids are clamped to -1 or C and the kernel turns them into NaN scores.
    const int64_t* p = ids.data_ptr<int64_t>();
    int64_t lo = p[0], hi = p[0];
    for (int64_t i = 1; i < ids.numel(); ++i) {
      lo = p[i] < lo ? p[i] : lo;
      hi = p[i] > hi ? p[i] : hi;
    }
    TORCH_CHECK(lo >= 0 && hi < a.classes, "mlsys::score: mask values should be class ids in [0, ",
                a.classes, "), got values in [", lo, ", ", hi, "]");
  } else {
    ids = ids.clamp(-1, a.classes);
  }
  a.target = ids.to(at::kInt).reshape({-1});
  return a;
}

TORCH_LIBRARY(mlsys, m) {
  m.def("candidates(Tensor x, Tensor dirs, int start, int count, float lo, float hi, "
        "ScalarType dtype, bool channels_last) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("score(Tensor logits, Tensor mask, str mode, str select) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
}

}  // namespace mlsys

// Importing the module `mlsys._C` (after `import torch`) loads this library, whose static
// initialisers above register the ops as torch.ops.mlsys.*. The module itself (pybind11,
// plain pybind11 header only: torch/extension.h would double the compile time) carries one
// attribute, cuda_kernels: whether the CUDA kernels were compiled in.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mlsys native ops; use them through torch.ops.mlsys or mlsys.ops";
#ifdef MLSYS_WITH_CUDA
  m.attr("cuda_kernels") = true;
#else
  m.attr("cuda_kernels") = false;
#endif
#ifndef MLSYS_CSRC_DIGEST
#define MLSYS_CSRC_DIGEST "unknown"
#endif
  // sha256 prefix of csrc/ at build time (mlsys/_build.py); mlsys.ops refuses a stale build
  m.attr("csrc_digest") = MLSYS_CSRC_DIGEST;
}
