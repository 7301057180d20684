// In-place channel gathering for CPU tensors.
//
// A contiguous tensor is viewed as (A, N, B): A outer slabs, N channels along dim, B trailing
// elements per channel. Keeping K channels (sorted, unique) turns it into (A, K, B) in the same
// storage. Number the kept "items" (slab a, kept channel k) as i = a*K + k, each B elements:
// item i moves from position src(i) = a*N + idx[k] to position i (in units of B elements).
//
// Why this is safe in place: gap(i) = src(i) - i is >= 0 and non-decreasing in i, so moving
// items in ascending order never overwrites a source that is still to be read (runs of items
// that overlap their own destination use memmove). With one thread that is the whole story.
// For several threads:
//   * wide items (rows of a row gather, >= kSliceMinBytes): every byte offset inside an item
//     obeys the same ascending rule on its own, so threads take disjoint byte ranges of every
//     item and each walks all items in ascending order. No buffer, one pass.
//   * narrow items (a column gather: one element per item): a chunk of items [i0, i1) reads
//     only positions >= src(i0) = i0 + gap(i0), so when gap(i0) >= i1 - i0 its reads and
//     writes are disjoint and the chunk is copied by all threads at once ("direct" chunk).
//     While the gap is still small (the first rows, or keeping almost everything) a large
//     tensor's chunks are gathered into a bounded bounce buffer and written back; a small
//     remainder is simply finished on one thread.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "ops.h"

namespace adapt_engine {
namespace {

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bounce buffer budget: fits the L2 cache of one core, so the round trip stays on chip.
constexpr int64_t kTempBytes = 512 * 1024;
// Below this many bytes a copy runs on one thread.
constexpr int64_t kParallelMinBytes = 256 * 1024;
// Items at least this wide are split across threads by byte range (no bounce buffer).
constexpr int64_t kSliceMinBytes = 1024;
// A narrow-item remainder smaller than this finishes on one thread instead of bouncing.
constexpr int64_t kBounceMinBytes = 4 << 20;
// Bytes handed to one thread at a time.
constexpr int64_t kGrainBytes = 64 * 1024;
// Runs of consecutive kept channels shorter than this (in bytes) are not copied run by run but
// with a vector compress by keep mask (AVX-512), else element by element.
constexpr int64_t kMinRunBytes = 64;

enum class CopyMode { kRuns, kCompress, kElements };

struct Layout {
  char* base;
  int64_t A, N, K, item_bytes;
  const int64_t* idx;
  std::vector<int64_t> run_end;  // run_end[k]: one past the last k' such that idx[k..k') is consecutive
  std::vector<uint64_t> keep_bits;  // bit c set when channel c is kept (plus one padding word)
  CopyMode mode;

  const char* src(int64_t a, int64_t k) const { return base + (a * N + idx[k]) * item_bytes; }
};

// 64 keep bits starting at channel c.
inline uint64_t bits_at(const uint64_t* bits, int64_t c) {
  const int64_t w = c >> 6;
  const int s = static_cast<int>(c & 63);
  return s == 0 ? bits[w] : (bits[w] >> s) | (bits[w + 1] << (64 - s));
}

// Whether this build has a vector compress for items of this size (AVX-512: vpcompress{b,w,d,q}).
bool has_compress(int64_t item_bytes) {
#if defined(__AVX512F__)
  if (item_bytes == 4 || item_bytes == 8) return true;
#endif
#if defined(__AVX512VBMI2__)
  if (item_bytes == 1 || item_bytes == 2) return true;
#endif
  (void)item_bytes;
  return false;
}

// Packs the kept items among channels [c0, c1) of one slab into out, 64 source channels (one
// word of keep bits) per step: each 64-byte vector is loaded (masked at the tail, so nothing
// past c1 is read), compressed by its keep mask and stored with a mask of exactly the kept
// count (nothing past them is written). The vectors of a step are independent; only the output
// offset (a popcount sum) chains them.
#if defined(__AVX512F__)
template <int kBytes>
inline void compress_vector(const char* from, uint64_t valid, uint64_t keep, char* out) {
  const int cnt = __builtin_popcountll(keep);
  const uint64_t wrote = cnt == 64 ? ~0ull : ((1ull << cnt) - 1);
  if constexpr (kBytes == 4) {
    const __m512i v = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(valid), from);
    const __m512i p = _mm512_maskz_compress_epi32(static_cast<__mmask16>(keep), v);
    _mm512_mask_storeu_epi32(out, static_cast<__mmask16>(wrote), p);
  } else if constexpr (kBytes == 8) {
    const __m512i v = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid), from);
    const __m512i p = _mm512_maskz_compress_epi64(static_cast<__mmask8>(keep), v);
    _mm512_mask_storeu_epi64(out, static_cast<__mmask8>(wrote), p);
  }
#if defined(__AVX512VBMI2__)
  else if constexpr (kBytes == 2) {
    const __m512i v = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(valid), from);
    const __m512i p = _mm512_maskz_compress_epi16(static_cast<__mmask32>(keep), v);
    _mm512_mask_storeu_epi16(out, static_cast<__mmask32>(wrote), p);
  } else if constexpr (kBytes == 1) {
    const __m512i v = _mm512_maskz_loadu_epi8(static_cast<__mmask64>(valid), from);
    const __m512i p = _mm512_maskz_compress_epi8(static_cast<__mmask64>(keep), v);
    _mm512_mask_storeu_epi8(out, static_cast<__mmask64>(wrote), p);
  }
#endif
}

template <int kBytes>
void compress_items(const char* slab, const uint64_t* bits, int64_t c0, int64_t c1, char* out) {
  constexpr int kLanes = 64 / kBytes;  // items per 64-byte vector
  constexpr uint64_t kLaneMask = kLanes == 64 ? ~0ull : ((1ull << kLanes) - 1);
  for (int64_t c = c0; c < c1; c += 64) {
    const int64_t len = std::min<int64_t>(64, c1 - c);
    const uint64_t valid = len == 64 ? ~0ull : ((1ull << len) - 1);
    const uint64_t keep = bits_at(bits, c) & valid;
    const char* from = slab + c * kBytes;
    for (int v = 0; v < 64 / kLanes; ++v) {
      const uint64_t sub_keep = (keep >> (v * kLanes)) & kLaneMask;
      const uint64_t sub_valid = (valid >> (v * kLanes)) & kLaneMask;
      if (sub_valid == 0) break;
      compress_vector<kBytes>(from + v * 64, sub_valid, sub_keep, out);
      out += static_cast<int64_t>(__builtin_popcountll(sub_keep)) * kBytes;
    }
  }
}
#endif

void compress_segment(const Layout& p, int64_t a, int64_t k0, int64_t k1, char* out) {
#if defined(__AVX512F__)
  const char* slab = p.base + a * p.N * p.item_bytes;
  const int64_t c0 = p.idx[k0], c1 = p.idx[k1 - 1] + 1;
  const uint64_t* bits = p.keep_bits.data();
  switch (p.item_bytes) {
    case 4: return compress_items<4>(slab, bits, c0, c1, out);
    case 8: return compress_items<8>(slab, bits, c0, c1, out);
#if defined(__AVX512VBMI2__)
    case 2: return compress_items<2>(slab, bits, c0, c1, out);
    case 1: return compress_items<1>(slab, bits, c0, c1, out);
#endif
    default: break;
  }
#endif
  (void)p, (void)a, (void)k0, (void)k1, (void)out;
  TORCH_CHECK(false, "gather_inplace_cpu: no vector compress for this item size");
}

// Copies items of one slab, kept channels [k0, k1), one element (= one fixed-size item) at a time.
template <int64_t kBytes>
void copy_elements(const Layout& p, int64_t a, int64_t k0, int64_t k1, char* out) {
  const char* slab = p.base + a * p.N * kBytes;
  for (int64_t k = k0; k < k1; ++k, out += kBytes) std::memcpy(out, slab + p.idx[k] * kBytes, kBytes);
}

// Writes items [i0, i1) one after another into out: a separate buffer, or the items' own
// destination (in place, ascending: see the top of the file).
void copy_items(const Layout& p, char* out, int64_t i0, int64_t i1) {
  const int64_t ib = p.item_bytes;
  int64_t i = i0;
  while (i < i1) {
    const int64_t a = i / p.K;
    const int64_t k0 = i - a * p.K;
    const int64_t k1 = std::min(p.K, k0 + (i1 - i));
    if (p.mode == CopyMode::kCompress) {
      compress_segment(p, a, k0, k1, out);
      out += (k1 - k0) * ib;
    } else if (p.mode == CopyMode::kRuns) {
      for (int64_t k = k0; k < k1;) {
        const int64_t e = std::min(p.run_end[k], k1);
        std::memmove(out, p.src(a, k), (e - k) * ib);  // may overlap when copying in place
        out += (e - k) * ib;
        k = e;
      }
    } else {
      switch (ib) {
        case 1: copy_elements<1>(p, a, k0, k1, out); break;
        case 2: copy_elements<2>(p, a, k0, k1, out); break;
        case 4: copy_elements<4>(p, a, k0, k1, out); break;
        case 8: copy_elements<8>(p, a, k0, k1, out); break;
        case 16: copy_elements<16>(p, a, k0, k1, out); break;
        default:
          for (int64_t k = k0; k < k1; ++k) std::memcpy(out + (k - k0) * ib, p.src(a, k), ib);
      }
      out += (k1 - k0) * ib;
    }
    i += k1 - k0;
  }
}

// copy_items over threads (items [i0, i1) must not read what another thread writes).
void parallel_copy_items(const Layout& p, char* out, int64_t i0, int64_t i1) {
  const int64_t ib = p.item_bytes;
  if ((i1 - i0) * ib < kParallelMinBytes) {
    copy_items(p, out, i0, i1);
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainBytes / ib);
  at::parallel_for(i0, i1, grain, [&](int64_t b, int64_t e) { copy_items(p, out + (b - i0) * ib, b, e); });
}

// Moves items [i0, total) in place, threads splitting every item by byte range.
void sliced_inplace(const Layout& p, int64_t i0, int64_t total) {
  const int64_t ib = p.item_bytes;
  const int64_t nt = at::get_num_threads();
  const int64_t grain = std::max<int64_t>(kSliceMinBytes / 2, divup(ib, nt * 64) * 64);
  at::parallel_for(0, ib, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t i = i0; i < total; ++i) {
      const int64_t a = i / p.K;
      std::memmove(p.base + i * ib + b0, p.src(a, i - a * p.K) + b0, b1 - b0);
    }
  });
}

void parallel_memcpy(char* dst, const char* src, int64_t bytes) {
  if (bytes < kParallelMinBytes) {
    std::memcpy(dst, src, bytes);
    return;
  }
  at::parallel_for(0, bytes, kGrainBytes, [&](int64_t b, int64_t e) { std::memcpy(dst + b, src + b, e - b); });
}

}  // namespace

int64_t gather_temp_budget_bytes() { return kTempBytes; }

int64_t gather_inplace_cpu(at::Tensor& tensor, const at::Tensor& index, int64_t dim) {
  TORCH_CHECK(tensor.is_contiguous(), "gather_inplace_cpu expects a contiguous tensor");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 1,
              "gather_inplace_cpu expects a contiguous int64 index");
  TORCH_CHECK(dim >= 0 && dim < tensor.dim(), "dim out of range");
  Layout p;
  p.A = 1;
  for (int64_t d = 0; d < dim; ++d) p.A *= tensor.size(d);
  p.N = tensor.size(dim);
  int64_t B = 1;
  for (int64_t d = dim + 1; d < tensor.dim(); ++d) B *= tensor.size(d);
  p.K = index.numel();
  p.item_bytes = B * static_cast<int64_t>(tensor.element_size());
  p.idx = index.const_data_ptr<int64_t>();
  if (p.K == p.N || p.K == 0 || p.A == 0 || p.item_bytes == 0) return 0;  // identity or nothing to move
  p.base = static_cast<char*>(tensor.data_ptr());

  int64_t n_runs = 0;
  p.run_end.resize(p.K);
  for (int64_t k = p.K - 1; k >= 0; --k) {
    const bool joins_next = k + 1 < p.K && p.idx[k + 1] == p.idx[k] + 1;
    p.run_end[k] = joins_next ? p.run_end[k + 1] : k + 1;
    n_runs += joins_next ? 0 : 1;
  }
  if (p.item_bytes >= kMinRunBytes || (p.K * p.item_bytes) / n_runs >= kMinRunBytes) {
    p.mode = CopyMode::kRuns;
  } else if (has_compress(p.item_bytes)) {
    p.mode = CopyMode::kCompress;
    p.keep_bits.assign(p.N / 64 + 2, 0);
    for (int64_t k = 0; k < p.K; ++k) p.keep_bits[p.idx[k] >> 6] |= 1ull << (p.idx[k] & 63);
  } else {
    p.mode = CopyMode::kElements;
  }

  // Items already in place (idx[k] == k in the first slab) need no copy.
  int64_t i = 0;
  while (i < p.K && p.idx[i] == i) ++i;
  if (i == p.K && p.A == 1) return 0;  // only the tail was dropped: a shape change, no data moves

  const int64_t total = p.A * p.K;
  const int64_t ib = p.item_bytes;
  const int64_t nt = at::get_num_threads();
  if (nt == 1 || (total - i) * ib < kParallelMinBytes) {
    copy_items(p, p.base + i * ib, i, total);
    return 0;
  }
  if (ib >= kSliceMinBytes) {
    sliced_inplace(p, i, total);
    return 0;
  }
  const int64_t bounce_items = std::max<int64_t>(1, kTempBytes / ib);
  std::unique_ptr<char[]> bounce;
  int64_t temp_bytes = 0;
  while (i < total) {
    const int64_t a = i / p.K;
    const int64_t gap = a * p.N + p.idx[i - a * p.K] - i;
    if (gap * ib >= kParallelMinBytes) {  // direct: reads (>= i + gap) and writes (< end) are disjoint
      const int64_t end = std::min(total, i + gap);
      parallel_copy_items(p, p.base + i * ib, i, end);
      i = end;
    } else if ((total - i) * ib >= kBounceMinBytes) {
      const int64_t end = std::min(total, i + bounce_items);
      if (!bounce) {
        temp_bytes = bounce_items * ib;
        bounce.reset(new char[temp_bytes]);
      }
      parallel_copy_items(p, bounce.get(), i, end);
      parallel_memcpy(p.base + i * ib, bounce.get(), (end - i) * ib);
      i = end;
    } else {
      copy_items(p, p.base + i * ib, i, total);
      break;
    }
  }
  return temp_bytes;
}

}  // namespace adapt_engine
