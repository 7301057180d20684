// Fused group saliency for CPU tensors: one read pass over weight, grad (and the Fisher
// accumulator for param_mix), fp32 accumulation, any of fp32/bf16/fp16, arbitrary strides.
//
// Two vectorised layouts cover every parameter in practice:
//   * "reduce": the reduced axis is contiguous (row scores of a row-major matrix): each scored
//     index is a dot-like reduction over a contiguous run, parallel over scored indices;
//   * "accumulate": the scored axis is contiguous (column scores of a row-major matrix): rows
//     are streamed and added into a per-thread score vector, parallel over blocks of rows.
// Anything else (mixed weight/grad dtypes, sliced views with no unit stride) takes a scalar
// strided path that is correct but slower.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "ops.h"

namespace adapt_engine {
namespace {

// Below this many elements a call runs on one thread: forking costs more than it saves.
constexpr int64_t kParallelMinElems = 1 << 15;
// Work handed to one thread at a time, in elements.
constexpr int64_t kGrainElems = 1 << 14;

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Conversions on raw bits: c10's scalar conversions do not vectorise, these do.
inline float to_f32(float v) { return v; }
inline float to_f32(at::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_f32(at::Half v) {
  // Exponent rebias by a multiply: exact for normal and subnormal halves, branch-free so it
  // vectorises (a _Float16 cast does not without AVX512-FP16); inf/NaN get the full exponent.
  const uint32_t magnitude = static_cast<uint32_t>(v.x & 0x7fffu) << 13;
  float f;
  std::memcpy(&f, &magnitude, sizeof f);
  f *= 0x1.0p+112f;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  bits |= (v.x & 0x7c00u) == 0x7c00u ? 0x7f800000u : 0u;
  bits |= static_cast<uint32_t>(v.x & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// One element's contribution. g and f are only touched by the metrics that use them, so they
// may be null otherwise. param_mix also updates the running Fisher sum in place.
template <int M, typename T>
inline float term(const T* __restrict__ w, const T* __restrict__ g, float* __restrict__ f, int64_t i,
                  float half_scale) {
  const float wv = to_f32(w[i]);
  if constexpr (M == kMagnitude) {
    return std::fabs(wv);
  } else {
    const float gv = to_f32(g[i]);
    if constexpr (M == kTaylor) {
      return std::fabs(wv * gv);
    } else if constexpr (M == kVectorize) {
      return wv * gv;
    } else {
      const float fv = f[i] + gv * gv;
      f[i] = fv;
      return std::fabs(wv * gv - half_scale * wv * wv * fv);
    }
  }
}

// Half-precision inputs get explicit vector code (GCC/Clang vector extensions, lowered to
// AVX-512, AVX2 or NEON by the compiler): the scalar bit conversions above vectorise, but
// not into the shortest sequences. A "span" is the elements one load covers, converted to
// kParts float vectors. bf16 spans come out deinterleaved (part 0: even elements, part 1:
// odd), which reductions ignore and column accumulators undo once at the end.
#if defined(__GNUC__) && defined(__FLT16_MAX__)
#define ADAPT_SPAN_KERNELS 1
typedef float f32v __attribute__((vector_size(64)));
typedef uint32_t u32v __attribute__((vector_size(64)));
typedef _Float16 f16v __attribute__((vector_size(32)));
constexpr int kVecLanes = 16;  // floats per f32v

template <typename V>
inline V loadu(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32v vabs(f32v x) { return (f32v)((u32v)x & 0x7fffffffu); }

// kAbs loads |x|: for taylor, |w·g| = |w|·|g|, so the sign bits are cleared once per load
// (one AND covers two bf16 elements) and the products accumulate as fused multiply-adds.
template <typename T>
struct Span;
template <>
struct Span<at::BFloat16> {
  static constexpr int kElems = 32, kParts = 2;
  template <bool kAbs>
  static void load(const at::BFloat16* p, f32v* out) {
    u32v v = loadu<u32v>(p);  // element pairs: the even one in the low half
    if constexpr (kAbs) v &= 0x7fff7fffu;
    out[0] = (f32v)(v << 16);
    out[1] = (f32v)(v & 0xffff0000u);
  }
  static int element(int part, int lane) { return 2 * lane + part; }
};
template <>
struct Span<at::Half> {
  static constexpr int kElems = 16, kParts = 1;
  template <bool kAbs>
  static void load(const at::Half* p, f32v* out) {
#if defined(__AVX512F__)
    out[0] = (f32v)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(__F16C__)
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    std::memcpy(out, &lo, sizeof lo);
    std::memcpy(reinterpret_cast<char*>(out) + sizeof lo, &hi, sizeof hi);
#else
    for (int j = 0; j < kVecLanes; ++j) (*out)[j] = to_f32(p[j]);
#endif
    if constexpr (kAbs) out[0] = vabs(out[0]);
  }
  static int element(int, int lane) { return lane; }
};

template <typename T, int M>
constexpr bool use_span() {
  return (std::is_same_v<T, at::BFloat16> || std::is_same_v<T, at::Half>) && M != kParamMix;
}

// acc[p] += the terms of one span (g unused for magnitude).
template <int M, typename T>
inline void span_accumulate(const T* w, const T* g, f32v* acc) {
  using S = Span<T>;
  constexpr bool kAbs = M != kVectorize;
  f32v wv[S::kParts];
  S::template load<kAbs>(w, wv);
  if constexpr (M == kMagnitude) {
    for (int p = 0; p < S::kParts; ++p) acc[p] += wv[p];
  } else {
    f32v gv[S::kParts];
    S::template load<kAbs>(g, gv);
    for (int p = 0; p < S::kParts; ++p) acc[p] += wv[p] * gv[p];
  }
}

// Horizontal sum as a shuffle tree: a short row pays this once, so 15 dependent scalar adds
// would cost as much as the row itself.
inline float hsum(f32v v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps((__m512)v);
#else
  float t[kVecLanes];
  std::memcpy(t, &v, sizeof t);
  for (int width = kVecLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) t[j] += t[j + width];
  }
  return t[0];
#endif
}
#endif

template <typename P>
inline P* shift(P* p, int64_t offset) {
  return p == nullptr ? nullptr : p + offset;
}

// Sum of term() over a contiguous run; 64 independent lanes keep the vector adds pipelined.
template <int M, typename T>
float reduce_run(const T* __restrict__ w, const T* __restrict__ g, float* __restrict__ f, int64_t n,
                 float half_scale) {
#if defined(ADAPT_SPAN_KERNELS)
  if constexpr (use_span<T, M>()) {
    using S = Span<T>;
    constexpr int E = S::kElems, P = S::kParts;
    f32v acc[2 * P] = {};
    int64_t i = 0;
    for (; i + 2 * E <= n; i += 2 * E) {  // two spans per step: independent adds in flight
      span_accumulate<M>(w + i, shift(g, i), acc);
      span_accumulate<M>(w + i + E, shift(g, i + E), acc + P);
    }
    for (int p = 1; p < 2 * P; ++p) acc[0] += acc[p];
    float s = hsum(acc[0]);
    for (; i < n; ++i) s += term<M>(w, g, f, i, half_scale);
    return s;
  }
#endif
  constexpr int kLanes = 64;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += term<M>(w, g, f, i + j, half_scale);
  }
  float s = 0.f;
  for (; i < n; ++i) s += term<M>(w, g, f, i, half_scale);
  // Pairwise fold of the lanes: vector adds instead of 64 dependent scalar ones.
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] += acc[j + width];
  }
  return s + acc[0];
}

// Scored axis strided, reduced axis contiguous.
template <int M, typename T>
void reduce_layout(const T* w, int64_t wsk, const T* g, int64_t gsk, float* f, int64_t fsk, int64_t n_keep,
                   int64_t n_red, float half_scale, float* scores) {
  const int64_t nt = at::get_num_threads();
  // With fewer scored indices than threads each long run is split too, else a thread idles.
  const int64_t nsplit = (n_keep < 2 * nt && n_red >= kParallelMinElems) ? nt : 1;
  const int64_t chunk = divup(divup(n_red, nsplit), 64) * 64;
  std::vector<float> part(nsplit * n_keep, 0.f);
  const int64_t tasks = nsplit * n_keep;
  const int64_t grain = (n_keep * n_red < kParallelMinElems)
                            ? tasks
                            : std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, std::min(chunk, n_red)));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / n_keep, k = t - s * n_keep;
      const int64_t r0 = s * chunk, r1 = std::min(n_red, r0 + chunk);
      if (r0 < r1) {
        part[t] = reduce_run<M>(w + k * wsk + r0, shift(g, k * gsk + r0), shift(f, k * fsk + r0), r1 - r0,
                                half_scale);
      }
    }
  });
  for (int64_t s = 0; s < nsplit; ++s) {
    for (int64_t k = 0; k < n_keep; ++k) scores[k] += part[s * n_keep + k];
  }
}

// acc[k] += four rows' terms, k in [k0, k1). Restrict-qualified parameters tell the compiler
// that the Fisher rows and acc overlap nothing else (an fp32 store to f could otherwise alias
// w and g, which blocks vectorisation).
template <int M, typename T>
void sweep4(const T* __restrict__ w0, const T* __restrict__ w1, const T* __restrict__ w2,
            const T* __restrict__ w3, const T* __restrict__ g0, const T* __restrict__ g1,
            const T* __restrict__ g2, const T* __restrict__ g3, float* __restrict__ f0, float* __restrict__ f1,
            float* __restrict__ f2, float* __restrict__ f3, int64_t k0, int64_t k1, float* __restrict__ acc,
            float half_scale) {
  for (int64_t k = k0; k < k1; ++k) {
    acc[k] += (term<M>(w0, g0, f0, k, half_scale) + term<M>(w1, g1, f1, k, half_scale)) +
              (term<M>(w2, g2, f2, k, half_scale) + term<M>(w3, g3, f3, k, half_scale));
  }
}

template <int M, typename T>
void sweep1(const T* __restrict__ w, const T* __restrict__ g, float* __restrict__ f, int64_t k0, int64_t k1,
            float* __restrict__ acc, float half_scale) {
  for (int64_t k = k0; k < k1; ++k) acc[k] += term<M>(w, g, f, k, half_scale);
}

// acc[k] += term over rows [r0, r1) for scored indices [k0, k1); four rows per sweep of acc.
template <int M, typename T>
void accumulate_rows(const T* w, int64_t wsr, const T* g, int64_t gsr, float* f, int64_t fsr, int64_t r0,
                     int64_t r1, int64_t k0, int64_t k1, float* acc, float half_scale) {
  // param_mix streams three tensors per row already; GCC does not vectorise its four-row sweep.
  // The four rows of a sweep come from the four quarters of [r0, r1) (see accumulate_spans).
  const int64_t q = M == kParamMix ? 0 : (r1 - r0) / 4;
  for (int64_t r = r0; r < r0 + q; ++r) {
    sweep4<M, T>(w + r * wsr, w + (r + q) * wsr, w + (r + 2 * q) * wsr, w + (r + 3 * q) * wsr, shift(g, r * gsr),
                 shift(g, (r + q) * gsr), shift(g, (r + 2 * q) * gsr), shift(g, (r + 3 * q) * gsr),
                 shift(f, r * fsr), shift(f, (r + q) * fsr), shift(f, (r + 2 * q) * fsr),
                 shift(f, (r + 3 * q) * fsr), k0, k1, acc, half_scale);
  }
  for (int64_t r = r0 + 4 * q; r < r1; ++r) {
    sweep1<M, T>(w + r * wsr, shift(g, r * gsr), shift(f, r * fsr), k0, k1, acc, half_scale);
  }
}

// Column scores over threads: by blocks of rows, each into a private accumulator of `width`
// floats (rows(r0, r1, acc)); or, for a few very wide rows, by ranges of column units sharing
// one accumulator (cols(u0, u1, acc)). finish(acc) adds an accumulator into the scores.
template <typename Rows, typename Cols, typename Finish>
void split_column_scores(int64_t n_red, int64_t elems, int64_t width, int64_t units, int64_t unit_grain,
                         const Rows& rows, const Cols& cols, const Finish& finish) {
  const int64_t nt = at::get_num_threads();
  const bool small = elems < kParallelMinElems;
  if (small || n_red >= 4 * nt) {
    const int64_t nblk = small ? 1 : nt;
    const int64_t rows_per = divup(n_red, nblk);
    std::vector<float> part(nblk * width, 0.f);
    at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * rows_per, r1 = std::min(n_red, r0 + rows_per);
        if (r0 < r1) rows(r0, r1, part.data() + b * width);
      }
    });
    for (int64_t b = 0; b < nblk; ++b) finish(part.data() + b * width);
  } else {
    std::vector<float> part(width, 0.f);
    at::parallel_for(0, units, unit_grain, [&](int64_t u0, int64_t u1) { cols(u0, u1, part.data()); });
    finish(part.data());
  }
}

// Scored axis contiguous, reduced axis strided.
template <int M, typename T>
void accumulate_layout(const T* w, int64_t wsr, const T* g, int64_t gsr, float* f, int64_t fsr,
                       int64_t n_keep, int64_t n_red, float half_scale, float* scores) {
  split_column_scores(
      n_red, n_keep * n_red, n_keep, n_keep, std::max<int64_t>(16, kGrainElems / n_red),
      [&](int64_t r0, int64_t r1, float* acc) {
        accumulate_rows<M>(w, wsr, g, gsr, f, fsr, r0, r1, 0, n_keep, acc, half_scale);
      },
      [&](int64_t k0, int64_t k1, float* acc) {
        accumulate_rows<M>(w, wsr, g, gsr, f, fsr, 0, n_red, k0, k1, acc, half_scale);
      },
      [&](const float* acc) {
        for (int64_t k = 0; k < n_keep; ++k) scores[k] += acc[k];
      });
}

#if defined(ADAPT_SPAN_KERNELS)
// acc blocks [j0, full) += the terms of rows r, r + step, ..., r + (R-1)*step: one load/store
// of acc per R rows.
template <int M, int R, typename T>
inline void sweep_spans(const T* w, int64_t wsr, const T* g, int64_t gsr, int64_t r, int64_t step, int64_t j0,
                        int64_t full, float* acc) {
  using S = Span<T>;
  constexpr int E = S::kElems, P = S::kParts;
  for (int64_t j = j0; j < full; ++j) {
    f32v a[P];
    for (int p = 0; p < P; ++p) a[p] = loadu<f32v>(acc + j * E + p * kVecLanes);
    for (int q = 0; q < R; ++q) {
      const int64_t row = r + q * step;
      span_accumulate<M>(w + row * wsr + j * E, shift(g, row * gsr + j * E), a);
    }
    std::memcpy(acc + j * E, a, sizeof a);
  }
}

// acc (span layout, one kElems block per span of columns) += the terms of rows [r0, r1) for
// blocks [j0, j1); columns past the last whole block are kept in natural order.
template <int M, typename T>
void accumulate_spans(const T* w, int64_t wsr, const T* g, int64_t gsr, int64_t r0, int64_t r1, int64_t j0,
                      int64_t j1, int64_t n_keep, float* acc) {
  constexpr int E = Span<T>::kElems;
  const int64_t full = std::min(j1, n_keep / E);
  // The four rows of a sweep come from the four quarters of [r0, r1), so each of the eight
  // streams is long and contiguous, which keeps the hardware prefetcher ahead of DRAM.
  const int64_t quarter = (r1 - r0) / 4;
  for (int64_t r = r0; r < r0 + quarter; ++r) sweep_spans<M, 4>(w, wsr, g, gsr, r, quarter, j0, full, acc);
  for (int64_t r = r0 + 4 * quarter; r < r1; ++r) sweep_spans<M, 1>(w, wsr, g, gsr, r, 0, j0, full, acc);
  if (j1 * E > n_keep && full * E < n_keep) {  // the partial last block, element by element
    for (int64_t rr = r0; rr < r1; ++rr) {
      for (int64_t k = full * E; k < n_keep; ++k) acc[k] += term<M>(w + rr * wsr, shift(g, rr * gsr), nullptr, k, 0.f);
    }
  }
}

// scores[k] += acc in natural order.
template <typename T>
void add_spans(const float* acc, int64_t n_keep, float* scores) {
  using S = Span<T>;
  constexpr int E = S::kElems;
  const int64_t full = n_keep / E;
  for (int64_t j = 0; j < full; ++j) {
    for (int p = 0; p < S::kParts; ++p) {
      for (int l = 0; l < kVecLanes; ++l) scores[j * E + S::element(p, l)] += acc[j * E + p * kVecLanes + l];
    }
  }
  for (int64_t k = full * E; k < n_keep; ++k) scores[k] += acc[k];
}

// accumulate_layout for half-precision spans: the same two splits, over blocks of columns.
template <int M, typename T>
void accumulate_layout_spans(const T* w, int64_t wsr, const T* g, int64_t gsr, int64_t n_keep, int64_t n_red,
                             float* scores) {
  constexpr int E = Span<T>::kElems;
  const int64_t blocks = divup(n_keep, E);
  split_column_scores(
      n_red, n_keep * n_red, blocks * E, blocks, std::max<int64_t>(1, kGrainElems / (n_red * E)),
      [&](int64_t r0, int64_t r1, float* acc) { accumulate_spans<M>(w, wsr, g, gsr, r0, r1, 0, blocks, n_keep, acc); },
      [&](int64_t j0, int64_t j1, float* acc) { accumulate_spans<M>(w, wsr, g, gsr, 0, n_red, j0, j1, n_keep, acc); },
      [&](const float* acc) { add_spans<T>(acc, n_keep, scores); });
}
#endif

float load_any(const void* base, at::ScalarType dtype, int64_t offset) {
  switch (dtype) {
    case at::kFloat:
      return static_cast<const float*>(base)[offset];
    case at::kBFloat16:
      return to_f32(static_cast<const at::BFloat16*>(base)[offset]);
    case at::kHalf:
      return to_f32(static_cast<const at::Half*>(base)[offset]);
    default:
      TORCH_CHECK(false, "group_saliency: unsupported dtype ", dtype);
  }
}

// Any strides, any mix of dtypes: scalar loop, parallel over scored indices.
void strided_layout(const at::Tensor& weight, const at::Tensor* grad, const at::Tensor* fisher, int64_t dim,
                    int64_t metric, float half_scale, float* scores) {
  const int64_t n_keep = weight.size(dim), n_red = weight.size(1 - dim);
  const void* w = weight.const_data_ptr();
  const void* g = grad ? grad->const_data_ptr() : nullptr;
  float* f = fisher ? fisher->data_ptr<float>() : nullptr;
  const auto wt = weight.scalar_type();
  const auto gt = grad ? grad->scalar_type() : wt;
  const int64_t wsk = weight.stride(dim), wsr = weight.stride(1 - dim);
  const int64_t gsk = grad ? grad->stride(dim) : 0, gsr = grad ? grad->stride(1 - dim) : 0;
  const int64_t fsk = fisher ? fisher->stride(dim) : 0, fsr = fisher ? fisher->stride(1 - dim) : 0;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, n_red));
  at::parallel_for(0, n_keep, grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      float s = 0.f;
      for (int64_t r = 0; r < n_red; ++r) {
        const float wv = load_any(w, wt, k * wsk + r * wsr);
        if (metric == kMagnitude) {
          s += std::fabs(wv);
          continue;
        }
        const float gv = load_any(g, gt, k * gsk + r * gsr);
        if (metric == kTaylor) {
          s += std::fabs(wv * gv);
        } else if (metric == kVectorize) {
          s += wv * gv;
        } else {
          float& fv = f[k * fsk + r * fsr];
          fv += gv * gv;
          s += std::fabs(wv * gv - half_scale * wv * wv * fv);
        }
      }
      scores[k] += s;
    }
  });
}

template <typename T, int M>
void run_fast(bool reduce, const at::Tensor& weight, const at::Tensor* grad, const at::Tensor* fisher,
              int64_t dim, float half_scale, float* scores) {
  const int64_t n_keep = weight.size(dim), n_red = weight.size(1 - dim);
  const T* w = weight.const_data_ptr<T>();
  const T* g = grad ? grad->const_data_ptr<T>() : nullptr;
  float* f = fisher ? fisher->data_ptr<float>() : nullptr;
  const int axis = reduce ? static_cast<int>(dim) : static_cast<int>(1 - dim);  // the strided axis
  const int64_t ws = weight.stride(axis);
  const int64_t gs = grad ? grad->stride(axis) : 0;
  const int64_t fs = fisher ? fisher->stride(axis) : 0;
  if (reduce) {
    reduce_layout<M, T>(w, ws, g, gs, f, fs, n_keep, n_red, half_scale, scores);
  } else {
#if defined(ADAPT_SPAN_KERNELS)
    if constexpr (use_span<T, M>()) {
      accumulate_layout_spans<M, T>(w, ws, g, gs, n_keep, n_red, scores);
      return;
    }
#endif
    accumulate_layout<M, T>(w, ws, g, gs, f, fs, n_keep, n_red, half_scale, scores);
  }
}

template <typename T>
void run_fast_metric(int64_t metric, bool reduce, const at::Tensor& weight, const at::Tensor* grad,
                     const at::Tensor* fisher, int64_t dim, float half_scale, float* scores) {
  switch (metric) {
    case kTaylor:
      return run_fast<T, kTaylor>(reduce, weight, grad, fisher, dim, half_scale, scores);
    case kVectorize:
      return run_fast<T, kVectorize>(reduce, weight, grad, fisher, dim, half_scale, scores);
    case kMagnitude:
      return run_fast<T, kMagnitude>(reduce, weight, grad, fisher, dim, half_scale, scores);
    case kParamMix:
      return run_fast<T, kParamMix>(reduce, weight, grad, fisher, dim, half_scale, scores);
    default:
      TORCH_CHECK(false, "group_saliency: unknown metric id ", metric);
  }
}

// Stride of axis, reading a length-1 axis as contiguous (its stride is never used).
int64_t unit_stride(const at::Tensor& t, int64_t axis) { return t.size(axis) == 1 ? 1 : t.stride(axis); }

}  // namespace

void group_saliency_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& grad,
                        const std::optional<at::Tensor>& fisher, at::Tensor& out, int64_t dim,
                        int64_t group_size, int64_t metric, double fisher_scale) {
  TORCH_CHECK(weight.dim() == 2 && (dim == 0 || dim == 1), "group_saliency_cpu expects a 2-D weight");
  TORCH_CHECK(group_size >= 1 && weight.size(dim) % group_size == 0, "group size does not divide the axis");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.numel() == weight.size(dim) / group_size,
              "out must be a contiguous float32 vector of one score per group");
  const at::Tensor* g = (metric == kMagnitude || !grad.has_value()) ? nullptr : &grad.value();
  const at::Tensor* f = (metric == kParamMix && fisher.has_value()) ? &fisher.value() : nullptr;
  TORCH_CHECK(metric == kMagnitude || g != nullptr, "this metric needs a gradient");
  TORCH_CHECK(metric != kParamMix || (f != nullptr && f->scalar_type() == at::kFloat),
              "param_mix needs a float32 fisher tensor");

  const int64_t n_keep = weight.size(dim), n_red = weight.size(1 - dim);
  std::vector<float> scores(n_keep, 0.f);
  const float half_scale = static_cast<float>(0.5 * fisher_scale);
  if (n_keep > 0 && n_red > 0) {
    auto all_unit = [&](int64_t axis) {
      return unit_stride(weight, axis) == 1 && (g == nullptr || unit_stride(*g, axis) == 1) &&
             (f == nullptr || unit_stride(*f, axis) == 1);
    };
    const bool same_dtype = g == nullptr || g->scalar_type() == weight.scalar_type();
    const bool red_contig = all_unit(1 - dim), keep_contig = all_unit(dim);
    if (same_dtype && (red_contig || keep_contig)) {
      // Prefer streaming contiguous runs; a length-1 reduced axis is better read as one row.
      const bool reduce = red_contig && !(keep_contig && n_red == 1);
      switch (weight.scalar_type()) {
        case at::kFloat:
          run_fast_metric<float>(metric, reduce, weight, g, f, dim, half_scale, scores.data());
          break;
        case at::kBFloat16:
          run_fast_metric<at::BFloat16>(metric, reduce, weight, g, f, dim, half_scale, scores.data());
          break;
        case at::kHalf:
          run_fast_metric<at::Half>(metric, reduce, weight, g, f, dim, half_scale, scores.data());
          break;
        default:
          TORCH_CHECK(false, "group_saliency: unsupported dtype ", weight.scalar_type());
      }
    } else {
      strided_layout(weight, g, f, dim, metric, half_scale, scores.data());
    }
  }
  float* o = out.data_ptr<float>();
  for (int64_t k = 0; k < n_keep; ++k) o[k / group_size] += scores[k];
}

}  // namespace adapt_engine
