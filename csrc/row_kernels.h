// Raw-pointer interface of the row kernels.
//
// row_kernels.cpp is compiled once per CPU capability (DEFAULT, AVX2, AVX512), each copy in its
// own namespace named after the capability; bindings.cpp picks one table at run time. Nothing
// here touches at::Tensor, so the capability-specific objects stay free of tensor code.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace hpt {

// One [rows, cols] block of logits; rows are `ld` elements apart, columns are contiguous.
struct Block {
  const void* data;
  c10::ScalarType dtype;
  int64_t rows;
  int64_t cols;
  int64_t ld;
};

// Columns of a row's running state (hpt_fast/backends/row_state.py's WIDTH).
constexpr int64_t kStateWidth = 6;

// Merges `logits`, a slab of vocabulary columns [col_offset, col_offset + cols) of the rows (all
// of them when col_offset = 0 and cols = V), into each row's running softmax state; see
// hpt_fast/backends/row_state.py for its layout.
struct RowStatsArgs {
  Block logits;
  int64_t col_offset;
  const int64_t* targets;
  float inv_temp;
  float softcap;  // 0: none; > 0: z = softcap * tanh(x / softcap) * inv_temp instead of x * inv_temp
  bool with_entropy;
  bool with_sums;  // keep s2 and sz (row_state.logit_sums)
  double* state;  // [rows, kStateWidth], contiguous: m, s, s1, z_t, s2, sz; updated in place
};

// `logits` may be a slab of vocabulary columns [col_offset, col_offset + cols) of the full rows;
// the log-sum-exp (m + log_s) and entropy are those of the full rows, and a row's one-hot term is
// written only when its target lies inside the slab.
struct GradArgs {
  Block logits;
  int64_t col_offset;
  const int64_t* targets;
  // the log-sum-exp in two parts, so that log p = (z - m) - log_s near 0 keeps its own precision
  // (m + log_s as one float is resolved only to float32's spacing at m)
  const float* m;
  const float* log_s;
  const float* entropy;  // read only when g_ent is set
  const float* g_logp;
  const float* g_ent;  // nullptr: no entropy term
  float inv_temp;
  float softcap;  // as in RowStatsArgs; the gradient then has the factor 1 - tanh(x / softcap)^2
  void* out;  // same shape as logits, may alias it exactly
  c10::ScalarType out_dtype;
  int64_t out_ld;
};

// The row kernels return the index of a row with a negative target, or -1 (larger ones may
// belong to another slab; they never index with a target outside their own columns).
struct KernelTable {
  int64_t (*row_stats)(const RowStatsArgs&);
  int64_t (*grad_logits)(const GradArgs&);
  void (*accumulate)(float* acc, const void* x, c10::ScalarType x_dtype, int64_t n);
};

#define HPT_DECLARE_KERNELS(cap) \
  namespace cap {                \
  KernelTable kernel_table();    \
  }

HPT_DECLARE_KERNELS(DEFAULT)
HPT_DECLARE_KERNELS(AVX2)
HPT_DECLARE_KERNELS(AVX512)

#undef HPT_DECLARE_KERNELS

}  // namespace hpt
