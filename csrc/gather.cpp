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
// With several, a chunk of items [i0, i1) reads only positions >= src(i0) = i0 + gap(i0), so
// once gap(i0) >= i1 - i0 its reads and writes are disjoint and all threads copy it at once
// ("direct" chunk, split by bytes, so a few huge items are shared too). The gap only grows,
// so the chunks grow geometrically. Before the gap is large enough, items are moved on one
// thread in short steps; if the gap stays small over a large remainder (keeping almost every
// channel), chunks are read into a bounded bounce buffer by all threads and written back.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "ops.h"

namespace adapt_engine {
namespace {

inline int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Bounce buffer budget: fits the L2 cache of one core, so the round trip stays on chip.
constexpr int64_t kTempBytes = 512 * 1024;
// Below this many bytes a copy runs on one thread: a fork/join costs about as much as
// copying this much from cache.
constexpr int64_t kParallelMinBytes = 64 * 1024;
// Items at least this wide may be split between threads (at cache-line units).
constexpr int64_t kSliceMinBytes = 1024;
// A small-gap remainder smaller than this finishes in single-thread steps instead of bouncing.
constexpr int64_t kBounceMinBytes = 4 << 20;
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
// word of keep bits) per step. Each 64-byte vector is compressed by its keep mask and stored
// whole while a full vector still fits before out_end: the lanes past the kept count land on
// output positions that later stores of this call overwrite, and never on unread sources,
// because an item's output position never exceeds its source position (so out <= from). Near
// out_end, loads and stores are masked to exactly the valid and kept items, so nothing outside
// [c0, c1) is read and nothing past the output is written (the bytes beyond may belong to
// another thread). The vectors of a step are independent; only the output offset (a popcount
// sum) chains them.
#if defined(__AVX512F__)
template <int kBytes>
inline __m512i compress_lanes(uint64_t keep, __m512i v) {
  if constexpr (kBytes == 4) return _mm512_maskz_compress_epi32(static_cast<__mmask16>(keep), v);
  if constexpr (kBytes == 8) return _mm512_maskz_compress_epi64(static_cast<__mmask8>(keep), v);
#if defined(__AVX512VBMI2__)
  if constexpr (kBytes == 2) return _mm512_maskz_compress_epi16(static_cast<__mmask32>(keep), v);
  if constexpr (kBytes == 1) return _mm512_maskz_compress_epi8(static_cast<__mmask64>(keep), v);
#endif
}

// One vector at the edge: masked load of the `valid` lanes, masked store of the kept count.
template <int kBytes>
inline void compress_masked(const char* from, uint64_t valid, uint64_t keep, char* out) {
  const int cnt = __builtin_popcountll(keep);
  const uint64_t wrote = cnt == 64 ? ~0ull : ((1ull << cnt) - 1);
  __m512i v;
  if constexpr (kBytes == 4) v = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(valid), from);
  if constexpr (kBytes == 8) v = _mm512_maskz_loadu_epi64(static_cast<__mmask8>(valid), from);
#if defined(__AVX512VBMI2__)
  if constexpr (kBytes == 2) v = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(valid), from);
  if constexpr (kBytes == 1) v = _mm512_maskz_loadu_epi8(static_cast<__mmask64>(valid), from);
#endif
  const __m512i packed = compress_lanes<kBytes>(keep, v);
  if constexpr (kBytes == 4) _mm512_mask_storeu_epi32(out, static_cast<__mmask16>(wrote), packed);
  if constexpr (kBytes == 8) _mm512_mask_storeu_epi64(out, static_cast<__mmask8>(wrote), packed);
#if defined(__AVX512VBMI2__)
  if constexpr (kBytes == 2) _mm512_mask_storeu_epi16(out, static_cast<__mmask32>(wrote), packed);
  if constexpr (kBytes == 1) _mm512_mask_storeu_epi8(out, static_cast<__mmask64>(wrote), packed);
#endif
}

template <int kBytes>
void compress_items(const char* slab, const uint64_t* bits, int64_t c0, int64_t c1, char* out,
                    const char* out_end) {
  constexpr int kLanes = 64 / kBytes;  // items per 64-byte vector
  constexpr int kVectors = 64 / kLanes;  // vectors per word of keep bits
  constexpr uint64_t kLaneMask = kLanes == 64 ? ~0ull : ((1ull << kLanes) - 1);
  int64_t c = c0;
  // Whole words whose full-vector stores all end before out_end (each ends <= out + 64 items).
  for (; c + 64 <= c1 && out + 64 * kBytes <= out_end; c += 64) {
    const uint64_t keep = bits_at(bits, c);
    const char* from = slab + c * kBytes;
    for (int v = 0; v < kVectors; ++v) {
      const uint64_t sub = (keep >> (v * kLanes)) & kLaneMask;
      _mm512_storeu_si512(out, compress_lanes<kBytes>(sub, _mm512_loadu_si512(from + v * 64)));
      out += static_cast<int64_t>(__builtin_popcountll(sub)) * kBytes;
    }
  }
  for (; c < c1; c += 64) {
    const int64_t len = std::min<int64_t>(64, c1 - c);
    const uint64_t valid = len == 64 ? ~0ull : ((1ull << len) - 1);
    const uint64_t keep = bits_at(bits, c) & valid;
    const char* from = slab + c * kBytes;
    for (int v = 0; v < kVectors; ++v) {
      const uint64_t sub_keep = (keep >> (v * kLanes)) & kLaneMask;
      const uint64_t sub_valid = (valid >> (v * kLanes)) & kLaneMask;
      if (sub_valid == 0) break;
      compress_masked<kBytes>(from + v * 64, sub_valid, sub_keep, out);
      out += static_cast<int64_t>(__builtin_popcountll(sub_keep)) * kBytes;
    }
  }
}
#endif

// Kept channels [k0, k1) of slab a, packed into out (which may be written up to out_end).
void compress_segment(const Layout& p, int64_t a, int64_t k0, int64_t k1, char* out, const char* out_end) {
#if defined(__AVX512F__)
  const char* slab = p.base + a * p.N * p.item_bytes;
  const int64_t c0 = p.idx[k0], c1 = p.idx[k1 - 1] + 1;
  const uint64_t* bits = p.keep_bits.data();
  switch (p.item_bytes) {
    case 4: return compress_items<4>(slab, bits, c0, c1, out, out_end);
    case 8: return compress_items<8>(slab, bits, c0, c1, out, out_end);
#if defined(__AVX512VBMI2__)
    case 2: return compress_items<2>(slab, bits, c0, c1, out, out_end);
    case 1: return compress_items<1>(slab, bits, c0, c1, out, out_end);
#endif
    default: break;
  }
#endif
  (void)p, (void)a, (void)k0, (void)k1, (void)out, (void)out_end;
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
  const char* out_end = out + (i1 - i0) * ib;
  int64_t i = i0;
  while (i < i1) {
    const int64_t a = i / p.K;
    const int64_t k0 = i - a * p.K;
    const int64_t k1 = std::min(p.K, k0 + (i1 - i));
    if (p.mode == CopyMode::kCompress) {
      compress_segment(p, a, k0, k1, out, out_end);
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

// Copies the bytes [x0, x1) of the compacted tensor (offsets from its start) to out: whole
// items through copy_items, a partial item at either end byte-wise.
void copy_bytes(const Layout& p, int64_t x0, int64_t x1, char* out) {
  const int64_t ib = p.item_bytes;
  while (x0 < x1) {
    const int64_t i = x0 / ib, o = x0 - i * ib;
    int64_t n;
    if (o == 0 && x1 - x0 >= ib) {
      const int64_t i1 = x1 / ib;
      copy_items(p, out, i, i1);
      n = (i1 - i) * ib;
    } else {
      const int64_t a = i / p.K;
      n = std::min(ib - o, x1 - x0);
      std::memmove(out, p.src(a, i - a * p.K) + o, n);
    }
    out += n;
    x0 += n;
  }
}

// Builds the layout of one contiguous tensor; false when nothing has to move.
bool make_layout(const at::Tensor& tensor, const at::Tensor& index, int64_t dim, Layout& p) {
  p.A = 1;
  for (int64_t d = 0; d < dim; ++d) p.A *= tensor.size(d);
  p.N = tensor.size(dim);
  int64_t B = 1;
  for (int64_t d = dim + 1; d < tensor.dim(); ++d) B *= tensor.size(d);
  p.K = index.numel();
  p.item_bytes = B * static_cast<int64_t>(tensor.element_size());
  p.idx = index.const_data_ptr<int64_t>();
  if (p.K == p.N || p.K == 0 || p.A == 0 || p.item_bytes == 0) return false;  // identity or empty
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
  return true;
}

// The schedule of one compaction: chunks of items run in this order, each finished by every
// thread before the next starts.
struct Chunk {
  enum Kind { kSerial, kDirect, kBounce } kind;
  int64_t i0, i1;
};

std::vector<Chunk> plan_chunks(const Layout& p, int64_t i, int64_t bounce_items) {
  const int64_t total = p.A * p.K, ib = p.item_bytes;
  const int64_t step_items = std::max<int64_t>(1, kParallelMinBytes / ib);
  std::vector<Chunk> plan;
  while (i < total) {
    const int64_t a = i / p.K;
    const int64_t gap = a * p.N + p.idx[i - a * p.K] - i;
    Chunk c{Chunk::kSerial, i, 0};
    if (gap * ib >= kParallelMinBytes) {
      // Direct: the chunk reads only positions >= i + gap, all past its own writes.
      c = {Chunk::kDirect, i, std::min(total, i + gap)};
    } else if ((total - i) * ib >= kBounceMinBytes) {
      // The gap stays small over a large remainder: read a chunk into the buffer, then write it.
      c = {Chunk::kBounce, i, std::min(total, i + bounce_items)};
    } else {
      // One thread, ascending, in place: safe for any gap; the gap grows as items move.
      c.i1 = std::min(total, i + step_items);
    }
    if (c.kind == Chunk::kSerial && !plan.empty() && plan.back().kind == Chunk::kSerial) {
      plan.back().i1 = c.i1;
    } else {
      plan.push_back(c);
    }
    i = c.i1;
  }
  return plan;
}

// Thread tid's share of copying items [i0, i1) to out (cache-line units for wide items,
// whole items for narrow ones, which the compress and element paths never split).
// Thread tid's byte range [b0, b1) of `bytes`, split into nth parts at multiples of unit.
std::pair<int64_t, int64_t> share_of(int64_t bytes, int64_t unit, int64_t tid, int64_t nth) {
  const int64_t per = divup(divup(bytes, unit), nth) * unit;
  const int64_t b0 = std::min(bytes, tid * per);
  return {b0, std::min(bytes, b0 + per)};
}

void copy_share(const Layout& p, char* out, int64_t i0, int64_t i1, int64_t tid, int64_t nth) {
  const int64_t ib = p.item_bytes;
  const auto [b0, b1] = share_of((i1 - i0) * ib, ib < kSliceMinBytes ? ib : 64, tid, nth);
  if (b0 < b1) copy_bytes(p, i0 * ib + b0, i0 * ib + b1, out + b0);
}

void memcpy_share(char* dst, const char* src, int64_t bytes, int64_t tid, int64_t nth) {
  const auto [b0, b1] = share_of(bytes, 64, tid, nth);
  if (b0 < b1) std::memcpy(dst + b0, src + b0, b1 - b0);
}

// Runs chunk c as thread tid of nth; barrier() must synchronise all nth threads.
template <typename Barrier>
void run_chunk(const Layout& p, const Chunk& c, char* bounce, int64_t tid, int64_t nth, Barrier&& barrier) {
  char* dst = p.base + c.i0 * p.item_bytes;
  switch (c.kind) {
    case Chunk::kSerial:
      if (tid == 0) copy_items(p, dst, c.i0, c.i1);
      break;
    case Chunk::kDirect:
      copy_share(p, dst, c.i0, c.i1, tid, nth);
      break;
    case Chunk::kBounce:
      copy_share(p, bounce, c.i0, c.i1, tid, nth);
      barrier();
      memcpy_share(dst, bounce, (c.i1 - c.i0) * p.item_bytes, tid, nth);
      break;
  }
  barrier();
}

// Moves every kept item of p to its place; returns the bounce-buffer bytes used.
int64_t compact(const Layout& p) {
  // Items already in place (idx[k] == k in the first slab) need no copy.
  int64_t i = 0;
  while (i < p.K && p.idx[i] == i) ++i;
  if (i == p.K && p.A == 1) return 0;  // only the tail was dropped: a shape change, no data moves

  const int64_t total = p.A * p.K;
  const int64_t ib = p.item_bytes;
  const int64_t nt = at::get_num_threads();
  if (nt == 1 || at::in_parallel_region() || (total - i) * ib < kParallelMinBytes) {
    copy_items(p, p.base + i * ib, i, total);
    return 0;
  }
  const int64_t bounce_items = std::max<int64_t>(1, kTempBytes / ib);
  const std::vector<Chunk> plan = plan_chunks(p, i, bounce_items);
  if (plan.size() == 1 && plan[0].kind == Chunk::kSerial) {
    copy_items(p, p.base + i * ib, i, total);
    return 0;
  }
  std::unique_ptr<char[]> bounce;
  int64_t temp_bytes = 0;
  for (const Chunk& c : plan) {
    if (c.kind == Chunk::kBounce && !bounce) {
      temp_bytes = bounce_items * ib;
      bounce.reset(new char[temp_bytes]);
    }
  }
#if defined(_OPENMP)
  // One parallel region for the whole plan, chunks separated by barriers: a fork/join per
  // chunk costs more than copying a small chunk.
#pragma omp parallel num_threads(static_cast<int>(nt))
  {
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    for (const Chunk& c : plan) {
      run_chunk(p, c, bounce.get(), tid, nth, [] {
#pragma omp barrier
      });
    }
  }
#else
  // Without OpenMP: the same plan, one at::parallel_for per step (each is a barrier).
  auto each_thread = [nt](auto&& fn) {
    at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) fn(t);
    });
  };
  for (const Chunk& c : plan) {
    char* dst = p.base + c.i0 * ib;
    if (c.kind == Chunk::kSerial) {
      copy_items(p, dst, c.i0, c.i1);
    } else if (c.kind == Chunk::kDirect) {
      each_thread([&](int64_t t) { copy_share(p, dst, c.i0, c.i1, t, nt); });
    } else {
      each_thread([&](int64_t t) { copy_share(p, bounce.get(), c.i0, c.i1, t, nt); });
      each_thread([&](int64_t t) { memcpy_share(dst, bounce.get(), (c.i1 - c.i0) * ib, t, nt); });
    }
  }
#endif
  return temp_bytes;
}

}  // namespace

int64_t gather_temp_budget_bytes() { return kTempBytes; }

int64_t gather_inplace_cpu(at::Tensor& tensor, const at::Tensor& index, int64_t dim) {
  TORCH_CHECK(tensor.is_contiguous(), "gather_inplace_cpu expects a contiguous tensor");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 1,
              "gather_inplace_cpu expects a contiguous int64 index");
  TORCH_CHECK(dim >= 0 && dim < tensor.dim(), "dim out of range");
  Layout p;
  return make_layout(tensor, index, dim, p) ? compact(p) : 0;
}

int64_t gather_channels_cpu(at::TensorList tensors, const at::Tensor& index, at::IntArrayRef dims) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 1 &&
                  index.device().is_cpu(),
              "gather_channels_cpu expects a contiguous int64 CPU index");
  TORCH_CHECK(static_cast<int64_t>(dims.size()) == static_cast<int64_t>(tensors.size()),
              "gather_channels_cpu: one dim per tensor");
  // Validate everything before the first byte moves; the caller explains a rejection.
  const int64_t* idx = index.const_data_ptr<int64_t>();
  const int64_t K = index.numel();
  if (K > 0 && idx[0] < 0) return kBadIndex;
  for (int64_t k = 1; k < K; ++k) {
    if (idx[k] <= idx[k - 1]) return kBadIndex;
  }
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const at::Tensor& x = tensors[t];
    const int64_t d = dims[t];
    if (!x.device().is_cpu() || !x.is_contiguous() || d < 0 || d >= x.dim()) return kBadTensor;
    if (K > 0 && idx[K - 1] >= x.size(d)) return kOutOfRange;
    if (x.numel() == 0) continue;
    const auto lo = reinterpret_cast<uintptr_t>(x.const_data_ptr());
    const uintptr_t hi = lo + static_cast<uintptr_t>(x.numel() * x.element_size());
    for (const auto& s : spans) {
      if (lo < s.second && s.first < hi) return kOverlap;
    }
    spans.emplace_back(lo, hi);
  }
  for (size_t t = 0; t < tensors.size(); ++t) {
    Layout p;
    if (make_layout(tensors[t], index, dims[t], p)) compact(p);
  }
  return kGatherOk;
}

}  // namespace adapt_engine
