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
#include <vector>

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

template <typename P>
inline P* shift(P* p, int64_t offset) {
  return p == nullptr ? nullptr : p + offset;
}

// Sum of term() over a contiguous run; 64 independent lanes keep the vector adds pipelined.
template <int M, typename T>
float reduce_run(const T* __restrict__ w, const T* __restrict__ g, float* __restrict__ f, int64_t n,
                 float half_scale) {
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
  int64_t r = r0;
  // param_mix streams three tensors per row already; GCC does not vectorise its four-row sweep.
  for (; M != kParamMix && r + 4 <= r1; r += 4) {
    sweep4<M, T>(w + r * wsr, w + (r + 1) * wsr, w + (r + 2) * wsr, w + (r + 3) * wsr, shift(g, r * gsr),
                 shift(g, (r + 1) * gsr), shift(g, (r + 2) * gsr), shift(g, (r + 3) * gsr), shift(f, r * fsr),
                 shift(f, (r + 1) * fsr), shift(f, (r + 2) * fsr), shift(f, (r + 3) * fsr), k0, k1, acc,
                 half_scale);
  }
  for (; r < r1; ++r) sweep1<M, T>(w + r * wsr, shift(g, r * gsr), shift(f, r * fsr), k0, k1, acc, half_scale);
}

// Scored axis contiguous, reduced axis strided.
template <int M, typename T>
void accumulate_layout(const T* w, int64_t wsr, const T* g, int64_t gsr, float* f, int64_t fsr,
                       int64_t n_keep, int64_t n_red, float half_scale, float* scores) {
  const int64_t nt = at::get_num_threads();
  const bool small = n_keep * n_red < kParallelMinElems;
  if (small || n_red >= 4 * nt) {
    // Blocks of rows, one private score vector each, summed at the end.
    const int64_t nblk = small ? 1 : nt;
    const int64_t rows_per = divup(n_red, nblk);
    std::vector<float> part(nblk * n_keep, 0.f);
    at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * rows_per, r1 = std::min(n_red, r0 + rows_per);
        if (r0 < r1) accumulate_rows<M>(w, wsr, g, gsr, f, fsr, r0, r1, 0, n_keep, part.data() + b * n_keep,
                                        half_scale);
      }
    });
    for (int64_t b = 0; b < nblk; ++b) {
      for (int64_t k = 0; k < n_keep; ++k) scores[k] += part[b * n_keep + k];
    }
  } else {
    // Few very wide rows: split the scored axis instead.
    const int64_t grain = std::max<int64_t>(16, kGrainElems / n_red);
    at::parallel_for(0, n_keep, grain, [&](int64_t begin, int64_t end) {
      accumulate_rows<M>(w, wsr, g, gsr, f, fsr, 0, n_red, begin, end, scores, half_scale);
    });
  }
}

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
