// Python module hpt_fast._C: argument checks and the choice of kernel set for this CPU.
//
// The semantics are those of hpt_fast/backends/torch_backend.py. Kernels run with the GIL
// released.
#include <ATen/Version.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>

#include "row_kernels.h"

// ATen's oneDNN matmul (aten/src/ATen/native/mkldnn/Matmul.cpp): result = beta * result + alpha *
// mat1 @ mat2. Not in torch's installed headers, so declared here, weak: a torch that lacks it
// with this exact signature leaves the address null (the op then multiplies with torch.mm), and
// the module still loads.
#if defined(__GNUC__) && defined(__linux__)
namespace at {
namespace native {
// default visibility: the module builds with hidden symbols, which could not bind to libtorch's
__attribute__((weak, visibility("default"))) void mkldnn_matmul(
    const at::Tensor& mat1,
    const at::Tensor& mat2,
    const at::Tensor& result,
    float beta,
    float alpha);
}  // namespace native
}  // namespace at
#define HPT_HAVE_MKLDNN_MATMUL_DECL 1
#endif

namespace hpt {
namespace {

struct KernelSet {
  KernelTable table;
  const char* name;
};

// Follows ATen's own choice (at::get_cpu_capability honours ATEN_CPU_CAPABILITY), limited to the
// variants this build contains.
KernelSet pick_kernels() {
  const std::string cap = at::get_cpu_capability();
#ifdef HPT_HAVE_AVX512
  if (cap == "AVX512") {
    return {AVX512::kernel_table(), "AVX512"};
  }
#endif
#ifdef HPT_HAVE_AVX2
  if (cap == "AVX512" || cap == "AVX2") {
    return {AVX2::kernel_table(), "AVX2"};
  }
#endif
  return {DEFAULT::kernel_table(), "DEFAULT"};
}

const KernelSet& kernels() {
  static const KernelSet set = pick_kernels();
  return set;
}

bool is_supported_float(c10::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// A [C, V] CPU tensor of a supported float dtype whose rows are contiguous.
Block block_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [C, V], got shape ", t.sizes());
  TORCH_CHECK(
      is_supported_float(t.scalar_type()),
      name,
      " must be float32, bfloat16 or float16, got ",
      t.scalar_type());
  const int64_t rows = t.size(0);
  const int64_t cols = t.size(1);
  TORCH_CHECK(
      cols <= 1 || t.stride(1) == 1,
      name,
      " must have contiguous rows (stride 1 along V), got strides ",
      t.strides());
  TORCH_CHECK(
      rows <= 1 || t.stride(0) >= cols,
      name,
      " rows must not overlap (stride(0) >= V), got strides ",
      t.strides());
  TORCH_CHECK(rows == 0 || cols > 0, name, " has V = 0: no target can be valid");
  return Block{t.data_ptr(), t.scalar_type(), rows, cols, rows > 1 ? t.stride(0) : cols};
}

void check_vector(const at::Tensor& t, const char* name, int64_t rows, c10::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(
      t.dim() == 1 && t.size(0) == rows, name, " must have shape [", rows, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(rows <= 1 || t.stride(0) == 1, name, " must be contiguous");
}

void check_inv_temp(double inv_temp) {
  TORCH_CHECK(
      std::isfinite(inv_temp) && inv_temp > 0.0,
      "inv_temp must be finite and > 0, got ",
      inv_temp);
}

// The kernels' soft cap: 0 for none, else the checked value.
float softcap_arg(const std::optional<double>& softcap) {
  if (!softcap.has_value()) {
    return 0.f;
  }
  TORCH_CHECK(
      std::isfinite(*softcap) && *softcap > 0.0, "softcap must be finite and > 0, got ", *softcap);
  return static_cast<float>(*softcap);
}

// `problem` says what is wrong with the reported target, e.g. "is outside the vocabulary [0, 9)".
void check_targets_result(int64_t bad_row, const at::Tensor& targets, const std::string& problem) {
  TORCH_CHECK(
      bad_row < 0,
      "targets[",
      bad_row,
      "] = ",
      bad_row < 0 ? 0 : targets.data_ptr<int64_t>()[bad_row],
      " ",
      problem);
}

// Bytes spanned by a block, for overlap checks.
struct Span {
  uintptr_t begin;
  uintptr_t end;
};

Span span_of(const at::Tensor& t) {
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  if (t.numel() == 0) {
    return {begin, begin};
  }
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    last += (t.size(d) - 1) * t.stride(d);
  }
  return {begin, begin + static_cast<uintptr_t>(last + 1) * t.element_size()};
}

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const Span x = span_of(a);
  const Span y = span_of(b);
  return x.begin < y.end && y.begin < x.end;
}

// `dst` is written while `src` is read: either exactly the same elements, or disjoint memory.
void check_alias(const at::Tensor& dst, const at::Tensor& src, const char* dst_name, const char* src_name) {
  if (!overlaps(dst, src)) {
    return;
  }
  TORCH_CHECK(
      dst.data_ptr() == src.data_ptr() && dst.scalar_type() == src.scalar_type() &&
          dst.strides() == src.strides(),
      dst_name,
      " overlaps ",
      src_name,
      " without being the same tensor (same storage offset, dtype and strides)");
}

at::Tensor row_stats(
    const at::Tensor& logits,
    const at::Tensor& targets,
    double inv_temp,
    bool with_entropy,
    at::Tensor state,
    int64_t col_offset,
    const std::optional<double>& softcap,
    bool with_sums) {
  const Block block = block_of(logits, "logits");
  TORCH_CHECK(col_offset >= 0, "col_offset must be >= 0, got ", col_offset);
  check_vector(targets, "targets", block.rows, at::kLong);
  check_inv_temp(inv_temp);
  TORCH_CHECK(state.device().is_cpu(), "state must be a CPU tensor, got device ", state.device());
  TORCH_CHECK(
      state.dim() == 2 && state.size(0) == block.rows && state.size(1) == kStateWidth,
      "state must have shape [",
      block.rows,
      ", ",
      kStateWidth,
      "], got ",
      state.sizes());
  TORCH_CHECK(state.scalar_type() == at::kDouble, "state must be float64, got ", state.scalar_type());
  TORCH_CHECK(state.is_contiguous(), "state must be contiguous");
  TORCH_CHECK(!overlaps(state, logits), "state overlaps logits");

  const RowStatsArgs args{
      block,
      col_offset,
      targets.data_ptr<int64_t>(),
      static_cast<float>(inv_temp),
      softcap_arg(softcap),
      with_entropy,
      with_sums,
      state.data_ptr<double>(),
  };
  // ids past this block's columns are valid: they belong to later slabs of the vocabulary
  check_targets_result(kernels().table.row_stats(args), targets, "is negative");
  return state;
}

at::Tensor grad_logits(
    const at::Tensor& logits,
    const at::Tensor& targets,
    const at::Tensor& m,
    const at::Tensor& log_s,
    const std::optional<at::Tensor>& entropy,
    const at::Tensor& g_logp,
    const std::optional<at::Tensor>& g_ent,
    double inv_temp,
    at::Tensor out,
    int64_t col_offset,
    const std::optional<double>& softcap) {
  const Block block = block_of(logits, "logits");
  TORCH_CHECK(col_offset >= 0, "col_offset must be >= 0, got ", col_offset);
  const Block out_block = block_of(out, "out");
  TORCH_CHECK(
      out.sizes() == logits.sizes(),
      "out must have the shape of logits ",
      logits.sizes(),
      ", got ",
      out.sizes());
  check_alias(out, logits, "out", "logits");
  check_vector(targets, "targets", block.rows, at::kLong);
  check_vector(m, "m", block.rows, at::kFloat);
  check_vector(log_s, "log_s", block.rows, at::kFloat);
  check_vector(g_logp, "g_logp", block.rows, at::kFloat);
  const float* g_ent_ptr = nullptr;
  const float* entropy_ptr = nullptr;
  if (g_ent.has_value()) {
    TORCH_CHECK(entropy.has_value(), "entropy is required when g_ent is given");
    check_vector(*g_ent, "g_ent", block.rows, at::kFloat);
    check_vector(*entropy, "entropy", block.rows, at::kFloat);
    g_ent_ptr = g_ent->data_ptr<float>();
    entropy_ptr = entropy->data_ptr<float>();
  }
  check_inv_temp(inv_temp);

  const GradArgs args{
      block,
      col_offset,
      targets.data_ptr<int64_t>(),
      m.data_ptr<float>(),
      log_s.data_ptr<float>(),
      entropy_ptr,
      g_logp.data_ptr<float>(),
      g_ent_ptr,
      static_cast<float>(inv_temp),
      softcap_arg(softcap),
      out.data_ptr(),
      out_block.dtype,
      out_block.ld,
  };
  // ids past this block's columns are valid: they belong to later slabs of the vocabulary
  check_targets_result(kernels().table.grad_logits(args), targets, "is negative");
  return out;
}

at::Tensor accumulate_(at::Tensor acc, const at::Tensor& x) {
  TORCH_CHECK(acc.device().is_cpu() && x.device().is_cpu(), "acc and x must be CPU tensors");
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "acc must be float32, got ", acc.scalar_type());
  TORCH_CHECK(
      is_supported_float(x.scalar_type()),
      "x must be float32, bfloat16 or float16, got ",
      x.scalar_type());
  TORCH_CHECK(
      acc.sizes() == x.sizes(), "acc and x shapes differ: ", acc.sizes(), " vs ", x.sizes());
  TORCH_CHECK(acc.is_contiguous() && x.is_contiguous(), "acc and x must be contiguous");
  check_alias(acc, x, "acc", "x");
  kernels().table.accumulate(acc.data_ptr<float>(), x.data_ptr(), x.scalar_type(), acc.numel());
  return acc;
}

bool has_onednn_matmul() {
#ifdef HPT_HAVE_MKLDNN_MATMUL_DECL
  return &at::native::mkldnn_matmul != nullptr;
#else
  return false;
#endif
}

// out = a @ b, or out += a @ b with add: float32 [M, K] x [K, N] -> contiguous [M, N], through
// oneDNN. Callers check has_onednn_matmul() and trust it only after a trial (cpu_backend.py).
at::Tensor onednn_matmul(const at::Tensor& a, const at::Tensor& b, at::Tensor out, bool add) {
  TORCH_CHECK(has_onednn_matmul(), "this torch build has no at::native::mkldnn_matmul");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&a, &b, &out}) {
    TORCH_CHECK(t->device().is_cpu(), "onednn_matmul takes CPU tensors");
    TORCH_CHECK(t->scalar_type() == at::kFloat, "onednn_matmul takes float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 2, "onednn_matmul takes 2-D tensors, got shape ", t->sizes());
  }
  TORCH_CHECK(
      a.size(1) == b.size(0) && out.size(0) == a.size(0) && out.size(1) == b.size(1),
      "onednn_matmul shapes do not chain: ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "onednn_matmul writes a contiguous out");
  check_alias(out, a, "out", "a");
  check_alias(out, b, "out", "b");
#ifdef HPT_HAVE_MKLDNN_MATMUL_DECL
  at::native::mkldnn_matmul(a, b, out, add ? 1.0f : 0.0f, 1.0f);
#endif
  return out;
}

}  // namespace
}  // namespace hpt

PYBIND11_MODULE(_C, m) {
  namespace py = pybind11;
  // the Tensor type casters need torch's Python module initialised
  py::module_::import("torch");
  m.doc() = "hpt_fast CPU row kernels (see hpt_fast/backends/torch_backend.py for semantics)";
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "row_stats",
      &hpt::row_stats,
      py::arg("logits"),
      py::arg("targets"),
      py::arg("inv_temp"),
      py::arg("with_entropy"),
      py::arg("state"),
      py::arg("col_offset") = 0,
      py::arg("softcap") = py::none(),
      py::arg("with_sums") = false,
      nogil);
  m.def(
      "grad_logits",
      &hpt::grad_logits,
      py::arg("logits"),
      py::arg("targets"),
      py::arg("m"),
      py::arg("log_s"),
      py::arg("entropy"),
      py::arg("g_logp"),
      py::arg("g_ent"),
      py::arg("inv_temp"),
      py::arg("out"),
      py::arg("col_offset") = 0,
      py::arg("softcap") = py::none(),
      nogil);
  m.def("accumulate_", &hpt::accumulate_, py::arg("acc"), py::arg("x"), nogil);
  m.def("has_onednn_matmul", &hpt::has_onednn_matmul);
  m.def(
      "onednn_matmul",
      &hpt::onednn_matmul,
      py::arg("a"),
      py::arg("b"),
      py::arg("out"),
      py::arg("add"),
      nogil);
  m.def(
      "kernel_set",
      [] { return std::string(hpt::kernels().name); },
      "Kernel variant in use on this CPU: 'AVX512', 'AVX2' or 'DEFAULT'.");
}
