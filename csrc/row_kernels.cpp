// Row kernels for one CPU capability (see row_kernels.h).
//
// CMake compiles this file once per capability with CPU_CAPABILITY set to DEFAULT, AVX2 or AVX512
// and the matching -m flags, exactly like ATen's own kernels: at::vec::Vectorized<float> then
// maps to scalar arrays, 256-bit or 512-bit registers. Every pass streams its block once; all
// arithmetic is float32, the per-row sums are finished in double.
//
// The file must be built with -ffp-contract=off: the guarantee logp <= 0 relies on z = x * inv_temp
// being rounded to float before the max is subtracted, in the vector and the scalar code alike.
// With a soft cap, z = tanh(x / softcap) * softcap * inv_temp, and single values go through the
// same vector code as whole runs (Scale), so a row's z_t is still bit for bit one of its z.
#include "row_kernels.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace hpt {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
using c10::BFloat16;
using c10::Half;

constexpr int64_t kVec = Vec::size();
// Elements per step: two float vectors, which is one full vector of a 16-bit type.
constexpr int64_t kStep = 2 * kVec;
// row_stats works on chunks of this many scaled logits, kept in an 8 KiB buffer that stays in L1
// between the max pass and the exp pass, so memory is read once.
constexpr int64_t kChunk = 2048;
// Rows are split between threads only when there are fewer rows than threads, and never into
// pieces shorter than this.
constexpr int64_t kMinSplit = 16384;
// Fewer elements than this are not worth waking the thread pool for.
constexpr int64_t kGrain = 32768;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

static_assert(at::vec::Vectorized<BFloat16>::size() == kStep);
static_assert(at::vec::Vectorized<Half>::size() == kStep);
static_assert(kChunk % kStep == 0);

int64_t divup(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// 2^n for t = 1.5 * 2^23 + 127 + n (n integer): the low mantissa bits of t, shifted into the
// exponent field.
Vec exponent_to_pow2(const Vec& t) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23));
#else
  alignas(64) float lanes[kVec];
  t.store(lanes);
  for (int64_t i = 0; i < kVec; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &lanes[i], sizeof(bits));
    bits <<= 23;
    std::memcpy(&lanes[i], &bits, sizeof(bits));
  }
  return Vec::loadu(lanes);
#endif
}

// exp(x) = 2^n * exp(r) with n = round(x / ln 2) and |r| <= ln(2) / 2, as in XNNPACK's softmax
// kernels but with a degree-6 polynomial for exp(r) - 1 (minimax relative error 2e-9, fitted for
// this file): about 1 ulp and unbiased, where exp_u20 reaches 3.4e-7 with a bias and
// Vectorized::exp is an out-of-line Sleef call. x is clamped to [-88, 88]: at -88 the 2^n factor
// is exactly 0, so exp(-inf) == 0; exp(0) == 1 exactly; NaN propagates (clamp_min/clamp_max
// return their first argument when it is NaN).
Vec vexp(const Vec& x_in) {
  const Vec x = at::vec::clamp_max(at::vec::clamp_min(x_in, Vec(-88.f)), Vec(88.f));
  // adding 1.5 * 2^23 rounds to an integer; the + 127 biases it as a float exponent
  const Vec shifter(12582912.f + 127.f);
  const Vec t = at::vec::fmadd(x, Vec(0x1.715476p+0f), shifter);
  const Vec n = t - shifter;
  const Vec scale = exponent_to_pow2(t);
  // r = x - n * ln 2, with ln 2 split in two so that n * ln2_hi is exact
  Vec r = at::vec::fmadd(n, Vec(-0x1.62E400p-1f), x);
  r = at::vec::fmadd(n, Vec(-0x1.7F7D1Cp-20f), r);
  Vec p(0x1.6ae71ep-10f);
  p = at::vec::fmadd(p, r, Vec(0x1.126782p-7f));
  p = at::vec::fmadd(p, r, Vec(0x1.555822p-5f));
  p = at::vec::fmadd(p, r, Vec(0x1.55541ap-3f));
  p = at::vec::fmadd(p, r, Vec(0x1.fffffcp-2f));
  p = at::vec::fmadd(p, r, Vec(1.f));
  // scale * (1 + r * p), rounded once at the end
  return at::vec::fmadd(r * scale, p, scale);
}

// Loads and stores kStep elements of T as two float vectors; the counted forms move the first
// n <= kStep elements and read the others as zero.
template <typename T>
struct Io16 {
  using V16 = at::vec::Vectorized<T>;
  static void load(const T* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(V16::loadu(p));
  }
  static void load(const T* p, int64_t n, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(V16::loadu(p, n));
  }
  static void store(T* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static void store(T* p, int64_t n, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
};

template <typename T>
struct Io;
template <>
struct Io<BFloat16> : Io16<BFloat16> {};
template <>
struct Io<Half> : Io16<Half> {};
template <>
struct Io<float> {
  static void load(const float* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + kVec);
  }
  static void load(const float* p, int64_t n, Vec& a, Vec& b) {
    a = Vec::loadu(p, std::min(n, kVec));
    b = n > kVec ? Vec::loadu(p + kVec, n - kVec) : Vec(0.f);
  }
  static void store(float* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + kVec);
  }
  static void store(float* p, int64_t n, const Vec& a, const Vec& b) {
    a.store(p, std::min(n, kVec));
    if (n > kVec) {
      b.store(p + kVec, n - kVec);
    }
  }
};

// Calls f(T{}) with the C++ type of a (validated) dtype.
template <typename F>
decltype(auto) visit_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return f(float{});
    case c10::ScalarType::BFloat16:
      return f(BFloat16{});
    case c10::ScalarType::Half:
      return f(Half{});
    default:
      TORCH_INTERNAL_ASSERT(false, "hpt_fast row kernels: unexpected dtype ", dtype);
  }
}

double sum_lanes(const Vec& v) {
  alignas(64) float lanes[kVec];
  v.store(lanes);
  double total = 0.0;
  for (int64_t i = 0; i < kVec; ++i) {
    total += lanes[i];
  }
  return total;
}

float max_lanes(const Vec& v) {
  return at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
}

template <typename T>
const T* row_in(const Block& b, int64_t r) {
  return static_cast<const T*>(b.data) + r * b.ld;
}

// Items of work: `pieces` column ranges of `len` elements per row. Whole rows when there are
// enough rows for every thread, otherwise rows are cut (e.g. C = 1 with a large V).
struct Split {
  int64_t len;
  int64_t pieces;
};

Split split_rows(int64_t rows, int64_t cols, int64_t align) {
  const int64_t threads = at::get_num_threads();
  // no rows (every target ignored): nothing to split, and divup below would divide by zero
  if (rows == 0 || rows >= threads || cols < 2 * kMinSplit) {
    return {cols, 1};
  }
  const int64_t want = std::min(divup(threads, rows), cols / kMinSplit);
  const int64_t len = divup(divup(cols, want), align) * align;
  return {len, divup(cols, len)};
}

// z of raw logits x: x * inv_temp, or with kSoftcap tanh(x * inv_softcap) * cap_scale (cap_scale
// = softcap * inv_temp), and the soft cap's derivative 1 - tanh(x * inv_softcap)^2.
template <bool kSoftcap>
struct Scale {
  float inv_temp;
  float inv_softcap;
  float cap_scale;

  Scale(float inv_temp_, float softcap)
      : inv_temp(inv_temp_),
        inv_softcap(kSoftcap ? 1.f / softcap : 0.f),
        cap_scale(kSoftcap ? softcap * inv_temp_ : 0.f) {}

  Vec operator()(const Vec& x) const {
    if constexpr (kSoftcap) {
      return tanh(x * Vec(inv_softcap)) * Vec(cap_scale);
    } else {
      return x * Vec(inv_temp);
    }
  }

  // (z, slope) from one tanh; z bit for bit operator()'s.
  std::pair<Vec, Vec> with_slope(const Vec& x) const {
    const Vec t = tanh(x * Vec(inv_softcap));
    return {t * Vec(cap_scale), Vec(1.f) - t * t};
  }

  // tanh(u) = 1 - 2 / (exp(2u) + 1) through vexp: exactly +-1 where vexp saturates (2u beyond
  // +-88), NaN for NaN, an absolute error of a few ulps of 1 near 0; the same formula as the
  // Triton kernels', and faster than Sleef's tanh in Vectorized::tanh (a scratch timing).
  static Vec tanh(const Vec& u) {
    return Vec(1.f) - Vec(2.f) / (vexp(u + u) + Vec(1.f));
  }

  // One value through the vector code, so that it rounds as the vector lanes do.
  float operator()(float x) const {
    if constexpr (kSoftcap) {
      return first_lane((*this)(Vec(x)));
    } else {
      return x * inv_temp;
    }
  }

  float slope(float x) const {
    return first_lane(with_slope(Vec(x)).second);
  }

 private:
  static float first_lane(const Vec& v) {
    alignas(64) float lanes[kVec];
    v.store(lanes);
    return lanes[0];
  }
};

// Calls f(std::bool_constant<flag>{}).
template <typename F>
decltype(auto) visit_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// Calls f(std::bool_constant<...>{}) for a soft cap (softcap > 0) or none.
template <typename F>
decltype(auto) visit_softcap(float softcap, F&& f) {
  return visit_flag(softcap > 0.f, std::forward<F>(f));
}

// ---------------------------------------------------------------------------------------------
// row_stats

// Softmax sums of a run of scaled logits z relative to the shift m:
// s = sum exp(z - m), s1 = sum exp(z - m) * (z - m), s2 = sum exp(2 (z - m)), and sz = sum z
// (no shift).
struct SoftmaxSums {
  float m = kNegInf;
  double s = 0.0;
  double s1 = 0.0;
  double s2 = 0.0;
  double sz = 0.0;

  // Re-expresses the sums relative to a shift m_new >= m.
  void shift_to(float m_new) {
    if (s != 0.0 && m_new != m) {
      const double delta = static_cast<double>(m_new) - m;
      const double f = std::exp(-delta);
      s1 = f * (s1 - delta * s);
      s *= f;
      s2 *= f * f;
    }
    m = m_new;
  }

  void merge(SoftmaxSums other) {
    const float m_new = std::max(m, other.m);
    shift_to(m_new);
    other.shift_to(m_new);
    s += other.s;
    s1 += other.s1;
    s2 += other.s2;
    sz += other.sz;
  }
};

// z = scale(x) into the buffer; returns max(z).
template <typename T, bool kSoftcap>
float scale_and_max(const T* x, int64_t n, const Scale<kSoftcap>& scale, float* z) {
  Vec mx0(kNegInf), mx1(kNegInf);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec a, b;
    Io<T>::load(x + i, a, b);
    a = scale(a);
    b = scale(b);
    Io<float>::store(z + i, a, b);
    // plain max: a NaN may be dropped here, but it still reaches the sums through exp
    mx0 = at::vec::clamp_min(a, mx0);
    mx1 = at::vec::clamp_min(b, mx1);
  }
  if (i < n) {
    const int64_t rest = n - i;
    Vec a, b;
    Io<T>::load(x + i, rest, a, b);
    a = scale(a);
    b = scale(b);
    Io<float>::store(z + i, rest, a, b);
    mx0 = at::vec::maximum(mx0, Vec::set(Vec(kNegInf), a, std::min(rest, kVec)));
    if (rest > kVec) {
      mx1 = at::vec::maximum(mx1, Vec::set(Vec(kNegInf), b, rest - kVec));
    }
  }
  return max_lanes(at::vec::maximum(mx0, mx1));
}

// Adds exp(z - m), with kEntropy exp(z - m) * (z - m), and with kSums exp(2 (z - m)) and z of
// the buffer to the sums (shift m). With kAtMax (the buffer holds z equal to m) those z, each
// contributing exp(0) = 1, are counted apart and the count added in double: summed in float32 in
// a lane holding a 1, the others' terms would keep only float32's spacing at 1, and near p = 1
// (1 - p of 1e-7) they are all of log s.
template <bool kEntropy, bool kSums, bool kAtMax>
void add_exp_sums(const float* z, int64_t n, SoftmaxSums& sums) {
  // while every z seen is -inf (entries masked by a -inf bias), shift by 0: -inf - -inf is NaN
  const Vec shift(sums.m == kNegInf ? 0.f : sums.m);
  // e = 0 where d = -inf: the entropy term d is clamped to a finite value so that e * d is 0
  // rather than NaN (clamp_min keeps a NaN)
  const Vec lowest(std::numeric_limits<float>::lowest());
  const Vec zero(0.f);
  const Vec one(1.f);
  // e with kAtMax: 0 where d == 0, counted in c instead
  const auto terms = [&](const Vec& d, Vec& c) {
    const Vec e = vexp(d);
    if constexpr (kAtMax) {
      const Vec at = d == zero;
      c = c + (at & one);
      return Vec::blendv(e, zero, at);
    }
    return e;
  };
  Vec r0(0.f), r1(0.f), c0(0.f), c1(0.f), t0(0.f), t1(0.f), q0(0.f), q1(0.f), y0(0.f), y1(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    const Vec z0 = Vec::loadu(z + i);
    const Vec z1 = Vec::loadu(z + i + kVec);
    const Vec d0 = z0 - shift;
    const Vec d1 = z1 - shift;
    const Vec e0 = terms(d0, c0);
    const Vec e1 = terms(d1, c1);
    r0 = r0 + e0;
    r1 = r1 + e1;
    if constexpr (kEntropy) {
      t0 = at::vec::fmadd(e0, at::vec::clamp_min(d0, lowest), t0);
      t1 = at::vec::fmadd(e1, at::vec::clamp_min(d1, lowest), t1);
    }
    if constexpr (kSums) {
      q0 = at::vec::fmadd(e0, e0, q0);
      q1 = at::vec::fmadd(e1, e1, q1);
      y0 = y0 + z0;
      y1 = y1 + z1;
    }
  }
  for (; i < n; i += kVec) {
    const int64_t rest = std::min(kVec, n - i);
    const Vec zi = Vec::set(zero, Vec::loadu(z + i, rest), rest);
    const Vec d = Vec::set(zero, zi - shift, rest);
    // lanes past the end (d = 0) add nothing, neither a term nor a count
    Vec c(0.f);
    const Vec e = Vec::set(zero, terms(d, c), rest);
    c0 = c0 + Vec::set(zero, c, rest);
    r0 = r0 + e;
    if constexpr (kEntropy) {
      t0 = at::vec::fmadd(e, at::vec::clamp_min(d, lowest), t0);
    }
    if constexpr (kSums) {
      q0 = at::vec::fmadd(e, e, q0);
      y0 = y0 + zi;
    }
  }
  const double count = kAtMax ? sum_lanes(c0 + c1) : 0.0;
  sums.s += sum_lanes(r0 + r1) + count;
  if constexpr (kEntropy) {
    sums.s1 += sum_lanes(t0 + t1);
  }
  if constexpr (kSums) {
    sums.s2 += sum_lanes(q0 + q1) + count;
    sums.sz += sum_lanes(y0 + y1);
  }
}

// One streaming pass over n logits: a running max, the sums rescaled whenever it grows.
template <typename T, bool kEntropy, bool kSums, bool kSoftcap>
SoftmaxSums softmax_sums(const T* x, int64_t n, const Scale<kSoftcap>& scale) {
  alignas(64) float z[kChunk];
  SoftmaxSums sums;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t len = std::min(kChunk, n - begin);
    const float run_max = scale_and_max(x + begin, len, scale, z);
    sums.shift_to(std::max(sums.m, run_max));
    // only a run holding the maximum so far holds exp(0) = 1 terms
    if (run_max == sums.m) {
      add_exp_sums<kEntropy, kSums, true>(z, len, sums);
    } else {
      add_exp_sums<kEntropy, kSums, false>(z, len, sums);
    }
  }
  return sums;
}

// Merges a row's sums over this block into its running state (row_state.py), whose sums are
// double like the block's; m is a float value held in a double.
void update_state(const RowStatsArgs& a, int64_t r, const SoftmaxSums& block_sums) {
  double* st = a.state + kStateWidth * r;
  SoftmaxSums sums;
  sums.m = static_cast<float>(st[0]);
  sums.s = st[1];
  sums.s1 = st[2];
  sums.s2 = st[4];
  sums.sz = st[5];
  sums.merge(block_sums);
  st[0] = sums.m;
  st[1] = sums.s;
  st[2] = sums.s1;
  st[4] = sums.s2;
  st[5] = sums.sz;
}

template <typename T, bool kEntropy, bool kSums, bool kSoftcap>
int64_t row_stats_impl(const RowStatsArgs& a) {
  const Block& b = a.logits;
  const Scale<kSoftcap> scale(a.inv_temp, a.softcap);
  std::atomic<int64_t> bad_row{-1};
  // z_t with the arithmetic of scale_and_max, so that z_t <= m holds bit for bit
  auto merge_row = [&](int64_t r, const SoftmaxSums& sums) {
    const int64_t t = a.targets[r];
    if (t < 0) {
      bad_row.store(r, std::memory_order_relaxed);
      return;
    }
    update_state(a, r, sums);
    const int64_t local = t - a.col_offset;
    if (local >= 0 && local < b.cols) {
      a.state[kStateWidth * r + 3] = scale(static_cast<float>(row_in<T>(b, r)[local]));
    }
  };

  const Split split = split_rows(b.rows, b.cols, kChunk);
  if (split.pieces == 1) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(b.cols, 1));
    at::parallel_for(0, b.rows, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        merge_row(r, softmax_sums<T, kEntropy, kSums>(row_in<T>(b, r), b.cols, scale));
      }
    });
    return bad_row.load();
  }

  std::vector<SoftmaxSums> parts(b.rows * split.pieces);
  at::parallel_for(0, b.rows * split.pieces, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / split.pieces;
      const int64_t j = (i % split.pieces) * split.len;
      const int64_t len = std::min(split.len, b.cols - j);
      parts[i] = softmax_sums<T, kEntropy, kSums>(row_in<T>(b, r) + j, len, scale);
    }
  });
  // Fewer rows than threads here, so merging serially costs nothing.
  for (int64_t r = 0; r < b.rows; ++r) {
    SoftmaxSums sums;
    for (int64_t k = 0; k < split.pieces; ++k) {
      sums.merge(parts[r * split.pieces + k]);
    }
    merge_row(r, sums);
  }
  return bad_row.load();
}

int64_t row_stats(const RowStatsArgs& a) {
  return visit_dtype(a.logits.dtype, [&](auto tag) {
    using T = decltype(tag);
    return visit_softcap(a.softcap, [&](auto cap) {
      constexpr bool kCap = decltype(cap)::value;
      return visit_flag(a.with_entropy, [&](auto entropy) {
        return visit_flag(a.with_sums, [&](auto sums) {
          return row_stats_impl<T, decltype(entropy)::value, decltype(sums)::value, kCap>(a);
        });
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// grad_logits

// Per-row constants of d = inv_temp * (g_logp * (onehot - p) - g_ent * p * (log p + H)), written
// as d = p * (a + b * (log p + H)) off the target; a soft cap multiplies d by scale.slope(x).
template <bool kSoftcap>
struct GradRow {
  Scale<kSoftcap> scale;
  float m;  // log p = (z - m) - log_s: see GradArgs
  float log_s;
  float a;  // -g_logp * inv_temp
  float b;  // -g_ent * inv_temp
  float h;  // entropy

  // The target column's d. log p = (z - m) - log_s with z rounded first, as the statistics pass
  // rounded it: then p is exactly 1 for a one-column row, whose gradient is exactly 0 (an FMA left
  // it ~1e-6).
  float at_target(float x) const {
    const float log_p = (scale(x) - m) - log_s;
    const float p = std::exp(log_p);
    // g_logp * (1 - p) as -a * -expm1(log p): near p = 1, 1 - p in float32 keeps few of its digits.
    // p = 0 at a -inf logit, whose factor would be infinite: 0 * inf is NaN
    const float d = a * std::expm1(log_p) + (p == 0.f ? 0.f : p * b * (log_p + h));
    if constexpr (kSoftcap) {
      return d * scale.slope(x);
    } else {
      return d;
    }
  }
};

template <bool kEntropy, bool kSoftcap>
Vec grad_of(const Vec& x, const GradRow<kSoftcap>& g) {
  Vec z, slope;
  if constexpr (kSoftcap) {
    std::tie(z, slope) = g.scale.with_slope(x);
  } else {
    z = g.scale(x);
  }
  const Vec log_p = (z - Vec(g.m)) - Vec(g.log_s);  // no FMA: see GradRow::at_target
  const Vec p = vexp(log_p);
  Vec d;
  if constexpr (kEntropy) {
    // vexp gives exactly 0 from -88 down, so clamping log p there changes no p * factor except
    // at -inf logits, where it is 0 rather than 0 * inf = NaN (clamp_min keeps a NaN)
    d = p * at::vec::fmadd(Vec(g.b), at::vec::clamp_min(log_p, Vec(-88.f)) + Vec(g.h), Vec(g.a));
  } else {
    d = p * Vec(g.a);
  }
  if constexpr (kSoftcap) {
    return d * slope;
  } else {
    return d;
  }
}

// Reads each step before writing it, so `out` may be `x` itself.
template <typename T, typename O, bool kEntropy, bool kSoftcap>
void grad_run(const T* x, O* out, int64_t n, const GradRow<kSoftcap>& g) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec v0, v1;
    Io<T>::load(x + i, v0, v1);
    Io<O>::store(out + i, grad_of<kEntropy>(v0, g), grad_of<kEntropy>(v1, g));
  }
  if (i < n) {
    Vec v0, v1;
    Io<T>::load(x + i, n - i, v0, v1);
    Io<O>::store(out + i, n - i, grad_of<kEntropy>(v0, g), grad_of<kEntropy>(v1, g));
  }
}

template <typename O>
void zero_run(O* out, int64_t n) {
  const Vec zero(0.f);
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Io<O>::store(out + i, zero, zero);
  }
  if (i < n) {
    Io<O>::store(out + i, n - i, zero, zero);
  }
}

// Columns [j, j + n) of one row; t is the row's target column relative to the block (outside
// [0, cols) when the target belongs to another slab: then no piece contains it).
template <typename T, typename O, bool kSoftcap>
void grad_piece(const T* x, O* out, int64_t j, int64_t n, int64_t t, const GradRow<kSoftcap>& g) {
  if (g.a == 0.f && g.b == 0.f) {
    zero_run(out + j, n);
    return;
  }
  const bool has_target = t >= j && t < j + n;
  // read before the pass: in place, the pass overwrites it
  const float x_t = has_target ? static_cast<float>(x[t]) : 0.f;
  if (g.b != 0.f) {
    grad_run<T, O, true>(x + j, out + j, n, g);
  } else {
    grad_run<T, O, false>(x + j, out + j, n, g);
  }
  if (has_target) {
    out[t] = static_cast<O>(g.at_target(x_t));
  }
}

template <bool kSoftcap>
GradRow<kSoftcap> grad_row(const GradArgs& a, int64_t r) {
  const float g_logp = a.g_logp[r];
  const bool with_ent = a.g_ent != nullptr;
  return GradRow<kSoftcap>{
      Scale<kSoftcap>(a.inv_temp, a.softcap),
      a.m[r],
      a.log_s[r],
      -g_logp * a.inv_temp,
      with_ent ? -a.g_ent[r] * a.inv_temp : 0.f,
      with_ent ? a.entropy[r] : 0.f,
  };
}

template <typename T, typename O, bool kSoftcap>
int64_t grad_impl(const GradArgs& a) {
  const Block& b = a.logits;
  const Split split = split_rows(b.rows, b.cols, kStep);
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(split.len, 1));
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, b.rows * split.pieces, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = i / split.pieces;
      const int64_t j = (i % split.pieces) * split.len;
      const int64_t t = a.targets[r];
      if (t < 0) {
        bad_row.store(r, std::memory_order_relaxed);
        continue;
      }
      O* out = static_cast<O*>(a.out) + r * a.out_ld;
      grad_piece(
          row_in<T>(b, r), out, j, std::min(split.len, b.cols - j), t - a.col_offset, grad_row<kSoftcap>(a, r));
    }
  });
  return bad_row.load();
}

int64_t grad_logits(const GradArgs& a) {
  return visit_dtype(a.logits.dtype, [&](auto in_tag) {
    return visit_dtype(a.out_dtype, [&](auto out_tag) {
      return visit_softcap(a.softcap, [&](auto cap) {
        return grad_impl<decltype(in_tag), decltype(out_tag), decltype(cap)::value>(a);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------
// accumulate

template <typename T>
void accumulate_run(float* acc, const T* x, int64_t n) {
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    Vec a0, a1, x0, x1;
    Io<float>::load(acc + i, a0, a1);
    Io<T>::load(x + i, x0, x1);
    Io<float>::store(acc + i, a0 + x0, a1 + x1);
  }
  if (i < n) {
    Vec a0, a1, x0, x1;
    Io<float>::load(acc + i, n - i, a0, a1);
    Io<T>::load(x + i, n - i, x0, x1);
    Io<float>::store(acc + i, n - i, a0 + x0, a1 + x1);
  }
}

void accumulate(float* acc, const void* x, c10::ScalarType x_dtype, int64_t n) {
  visit_dtype(x_dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(x);
    // grain in whole steps keeps every thread's range vector-aligned
    at::parallel_for(0, divup(n, kStep), kGrain / kStep, [&](int64_t s0, int64_t s1) {
      const int64_t begin = s0 * kStep;
      accumulate_run(acc + begin, src + begin, std::min(s1 * kStep, n) - begin);
    });
  });
}

}  // namespace

KernelTable kernel_table() {
  return KernelTable{&row_stats, &grad_logits, &accumulate};
}

}  // namespace CPU_CAPABILITY
}  // namespace hpt
