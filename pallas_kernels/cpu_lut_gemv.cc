// y = x @ W^T for a LUT-quantized W on the CPU, for the few rows of x of a
// decode step (docs/design.md §5). Built on first use by pallas_kernels/cpu.py
// with the machine's C++ compiler (-O3 -march=native) and called through the
// XLA FFI.
//
//   W[n, k] = lut[n, code[n, k]] * scales[n, g(k)] + zeros[n, g(k)]
//
// The codes stay packed (pallas_kernels/layout.py: 64-element blocks of 32
// bytes; byte j of a block holds element 32*h + 4*w + 2*p in its low nibble and
// the next element in its high nibble, w = j / 4, h = (j / 2) % 2, p = j % 2;
// 2- and 3-bit codes in blocks of 16 and 24 bytes, expanded to that 4-bit block
// a few rows at a time by Expand, the shifts and masks of layout.expand_codes).
// x is permuted into that order once per call, so the inner loop is: widen 16
// code bytes, look both nibbles up in the row's 16-entry LUT held in one
// register (AVX-512 vpermps; two 8-entry permutes and a blend on AVX2; scalar
// otherwise), multiply-add with x. Each group's sum is scaled once; the zero
// term is zeros @ group_sums(x). Rows of W are split over XLA's CPU thread pool.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 64;       // elements per packed block
constexpr int64_t kBlockBytes = 32;  // bytes per packed block of 4-bit codes
constexpr int64_t kMinParallelBytes = 1 << 20;  // rows of x times code bytes

float Half(uint16_t h) {  // IEEE half -> float
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else {
    bits = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Elements [start, start + count) of a LUT/scale/zero buffer as float32.
void Convert(const void* base, ffi::DataType type, int64_t start, int64_t count, float* out) {
  if (type == ffi::DataType::F32) {
    std::memcpy(out, static_cast<const float*>(base) + start, count * sizeof(float));
    return;
  }
  const uint16_t* h = static_cast<const uint16_t*>(base) + start;
  if (type == ffi::DataType::BF16) {
    for (int64_t i = 0; i < count; ++i) {
      const uint32_t bits = static_cast<uint32_t>(h[i]) << 16;
      std::memcpy(out + i, &bits, 4);
    }
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = Half(h[i]);
  }
}

struct Problem {
  const float *x_low, *x_high, *group_sums;  // (M, P), (M, P), (M, groups)
  const uint8_t* codes;                       // (N, row_bytes): bits-bit codes
  const void *lut, *scales, *zeros;
  ffi::DataType lut_type, scales_type, zeros_type;
  float* y;  // (M, N)
  int64_t m, n, p, levels, groups, group_bytes;  // p: bytes a row as 4-bit codes
  int64_t bits, row_bytes;
};

// Blocks of 2- or 3-bit codes (16 or 24 bytes) as 4-bit blocks (32 bytes): bytes
// j and j + 16 of the 4-bit block are bits 0-1, 4-5 and 2-3, 6-7 of the low
// plane's byte j; bit 2 of byte 8q + i's nibbles is bits q and 4 + q of the third
// plane's byte i; done on little-endian 64-bit words.
template <int BITS>
void ExpandBlocks(const uint8_t* __restrict src, int64_t blocks, uint8_t* __restrict dst) {
  constexpr uint64_t kTwo = 0x3333333333333333ull, kOne = 0x1111111111111111ull;
  for (int64_t b = 0; b < blocks; ++b, src += 8 * BITS, dst += kBlockBytes) {
    uint64_t l0, l1, out[4];
    std::memcpy(&l0, src, 8);
    std::memcpy(&l1, src + 8, 8);
    out[0] = l0 & kTwo;
    out[1] = l1 & kTwo;
    out[2] = (l0 >> 2) & kTwo;
    out[3] = (l1 >> 2) & kTwo;
    if constexpr (BITS == 3) {
      uint64_t third;
      std::memcpy(&third, src + 16, 8);
      for (int q = 0; q < 4; ++q) out[q] |= ((third >> q) & kOne) << 2;
    }
    std::memcpy(dst, out, kBlockBytes);
  }
}

#if defined(__AVX2__)
// The same with 128-bit vectors: a block's low plane masked and shifted in one
// register each, the third plane's four shifts two at a time.
template <int BITS>
void ExpandBlocksAvx2(const uint8_t* __restrict src, int64_t blocks, uint8_t* __restrict dst) {
  const __m128i two = _mm_set1_epi8(0x33), one = _mm_set1_epi8(0x11);
  const __m128i shift01 = _mm_set_epi64x(1, 0), shift23 = _mm_set_epi64x(3, 2);
  for (int64_t b = 0; b < blocks; ++b, src += 8 * BITS, dst += kBlockBytes) {
    const __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    __m128i first = _mm_and_si128(low, two), second = _mm_and_si128(_mm_srli_epi16(low, 2), two);
    if constexpr (BITS == 3) {
      long long bits3;
      std::memcpy(&bits3, src + 16, 8);
      const __m128i third = _mm_set1_epi64x(bits3);
      first = _mm_or_si128(first, _mm_slli_epi16(_mm_and_si128(_mm_srlv_epi64(third, shift01), one), 2));
      second = _mm_or_si128(second, _mm_slli_epi16(_mm_and_si128(_mm_srlv_epi64(third, shift23), one), 2));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), first);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), second);
  }
}
#endif

void Expand(const uint8_t* src, int64_t bits, int64_t blocks, uint8_t* dst) {
#if defined(__AVX2__)
  return bits == 3 ? ExpandBlocksAvx2<3>(src, blocks, dst) : ExpandBlocksAvx2<2>(src, blocks, dst);
#else
  return bits == 3 ? ExpandBlocks<3>(src, blocks, dst) : ExpandBlocks<2>(src, blocks, dst);
#endif
}

#if defined(__AVX512F__)
constexpr int kRowsW = 4, kRowsX = 4, kStep = 16;  // 16 accumulators of 32 registers
using Vec = __m512;
inline Vec Zero() { return _mm512_setzero_ps(); }
inline Vec LoadVec(const float* p) { return _mm512_loadu_ps(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
struct Table {  // a row's 16 LUT entries times the group's scale
  __m512 t;
  void Set(const float* lut, float scale) { t = _mm512_mul_ps(_mm512_load_ps(lut), _mm512_set1_ps(scale)); }
  // entries of the low and high nibbles of 16 code bytes
  void Lookup(const uint8_t* codes, Vec& lo, Vec& hi) const {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes)));
    lo = _mm512_permutexvar_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)), t);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), t);
  }
};
#elif defined(__AVX2__)
constexpr int kRowsW = 2, kRowsX = 2, kStep = 8;  // 16 registers
using Vec = __m256;
inline Vec Zero() { return _mm256_setzero_ps(); }
inline Vec LoadVec(const float* p) { return _mm256_loadu_ps(p); }
inline Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float Sum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
struct Table {  // entries 0-7 and 8-15, chosen by bit 3 of the code
  __m256 t0, t1;
  void Set(const float* lut, float scale) {
    const __m256 s = _mm256_set1_ps(scale);
    t0 = _mm256_mul_ps(_mm256_load_ps(lut), s);
    t1 = _mm256_mul_ps(_mm256_load_ps(lut + 8), s);
  }
  Vec One(__m256i c) const {
    const __m256i idx = _mm256_and_si256(c, _mm256_set1_epi32(7));
    const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(c, 28));  // bit 3 -> sign bit
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx), bit3);
  }
  void Lookup(const uint8_t* codes, Vec& lo, Vec& hi) const {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes)));
    lo = One(_mm256_and_si256(c, _mm256_set1_epi32(15)));
    hi = One(_mm256_srli_epi32(c, 4));
  }
};
#else
constexpr int kRowsW = 1, kRowsX = 4, kStep = 1;
using Vec = float;
inline Vec Zero() { return 0.f; }
inline Vec LoadVec(const float* p) { return *p; }
inline Vec Fma(Vec a, Vec b, Vec c) { return a * b + c; }
inline float Sum(Vec v) { return v; }
struct Table {
  float t[16];
  void Set(const float* lut, float scale) { for (int j = 0; j < 16; ++j) t[j] = lut[j] * scale; }
  void Lookup(const uint8_t* codes, Vec& lo, Vec& hi) const { lo = t[*codes & 15]; hi = t[*codes >> 4]; }
};
#endif

// Rows [n0, n0 + NB) of W's metadata as float32 (the LUT padded to 16 entries)
// and their codes as 4-bit blocks (rows of p bytes from `codes`).
struct Meta {
  alignas(64) float lut[kRowsW][16];
  std::vector<float> scales, zeros;  // (NB, groups)
  std::vector<uint8_t> expanded;     // (NB, p) for 2- and 3-bit codes
  const uint8_t* codes;
  void Read(const Problem& a, int64_t n0, int nb) {
    if (a.bits == 4) {
      codes = a.codes + n0 * a.p;
    } else {
      expanded.resize(nb * a.p);
      for (int r = 0; r < nb; ++r)
        Expand(a.codes + (n0 + r) * a.row_bytes, a.bits, a.p / kBlockBytes, expanded.data() + r * a.p);
      codes = expanded.data();
    }
    scales.resize(nb * a.groups);
    zeros.resize(nb * a.groups);
    std::memset(lut, 0, sizeof(lut));
    for (int r = 0; r < nb; ++r) Convert(a.lut, a.lut_type, (n0 + r) * a.levels, a.levels, lut[r]);
    Convert(a.scales, a.scales_type, n0 * a.groups, nb * a.groups, scales.data());
    Convert(a.zeros, a.zeros_type, n0 * a.groups, nb * a.groups, zeros.data());
  }
};

// y[m0 : m0 + MB, n0 : n0 + NB]: each code byte is looked up once per tile and
// used for MB rows of x; each load of x is used for NB rows of W.
template <int NB, int MB>
void Tile(const Problem& a, const Meta& meta, int64_t n0, int64_t m0) {
  Vec acc[NB][MB];
  float zero_terms[NB][MB] = {};
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) acc[r][i] = Zero();
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t b0 = g * a.group_bytes, b1 = std::min(a.p, b0 + a.group_bytes);
    Table tables[NB];
    for (int r = 0; r < NB; ++r) tables[r].Set(meta.lut[r], meta.scales[r * a.groups + g]);
    for (int64_t b = b0; b < b1; b += kStep) {
      Vec lo[NB], hi[NB];
      for (int r = 0; r < NB; ++r) tables[r].Lookup(meta.codes + r * a.p + b, lo[r], hi[r]);
      for (int i = 0; i < MB; ++i) {
        const Vec xl = LoadVec(a.x_low + (m0 + i) * a.p + b), xh = LoadVec(a.x_high + (m0 + i) * a.p + b);
        for (int r = 0; r < NB; ++r) acc[r][i] = Fma(hi[r], xh, Fma(lo[r], xl, acc[r][i]));
      }
    }
    for (int r = 0; r < NB; ++r)
      for (int i = 0; i < MB; ++i) zero_terms[r][i] += meta.zeros[r * a.groups + g] * a.group_sums[(m0 + i) * a.groups + g];
  }
  for (int r = 0; r < NB; ++r)
    for (int i = 0; i < MB; ++i) a.y[(m0 + i) * a.n + n0 + r] = Sum(acc[r][i]) + zero_terms[r][i];
}

template <int NB, int MB = kRowsX>
void TileUpTo(const Problem& a, const Meta& meta, int64_t n0, int64_t m0, int64_t rows) {
  if constexpr (MB > 1) {
    if (rows < MB) return TileUpTo<NB, MB - 1>(a, meta, n0, m0, rows);
  }
  Tile<NB, MB>(a, meta, n0, m0);
}

// Rows [n0, n1) of W against all rows of x.
void Block(const Problem& a, int64_t n0, int64_t n1) {
  Meta meta;
  for (int64_t n = n0; n < n1;) {
    const int nb = n + kRowsW <= n1 ? kRowsW : 1;
    meta.Read(a, n, nb);
    for (int64_t m0 = 0; m0 < a.m; m0 += kRowsX) {
      const int64_t rows = std::min<int64_t>(kRowsX, a.m - m0);
      if (nb == kRowsW) {
        TileUpTo<kRowsW>(a, meta, n, m0, rows);
      } else {
        TileUpTo<1>(a, meta, n, m0, rows);
      }
    }
    n += nb;
  }
}

using Floats = ffi::Buffer<ffi::F32, 2>;  // aliases: a comma cannot go in the macro below
using Bytes = ffi::Buffer<ffi::U8, 2>;

ffi::Error LutGemv(ffi::ThreadPool pool, Floats x, Bytes codes, ffi::AnyBuffer lut, ffi::AnyBuffer scales,
                   ffi::AnyBuffer zeros, ffi::Result<Floats> y, int64_t group_size, int64_t use_pool) {
  const int64_t m = x.dimensions()[0], k = x.dimensions()[1];
  const int64_t n = codes.dimensions()[0], row_bytes = codes.dimensions()[1];
  const int64_t levels = lut.dimensions()[1], groups = scales.dimensions()[1];
  const int64_t bits = levels == 16 ? 4 : levels == 8 ? 3 : levels == 4 ? 2 : 0;
  const int64_t blocks = (k + kBlock - 1) / kBlock, p = blocks * kBlockBytes;
  for (ffi::DataType t : {lut.element_type(), scales.element_type(), zeros.element_type()}) {
    if (t != ffi::DataType::F32 && t != ffi::DataType::BF16 && t != ffi::DataType::F16)
      return ffi::Error::InvalidArgument("lut, scales and zeros must be float32, bfloat16 or float16");
  }
  if (bits == 0 || lut.dimensions()[0] != n)
    return ffi::Error::InvalidArgument("lut must be (N, 4 | 8 | 16): 2-, 3- or 4-bit codes");
  if (row_bytes != blocks * bits * 8)
    return ffi::Error::InvalidArgument("codes must be (N, packed columns of K at the LUT's bits)");
  int64_t group_bytes;
  if (group_size % kBlock == 0) {
    group_bytes = group_size / 2;
  } else if (groups == 1) {
    group_bytes = p;
  } else {
    return ffi::Error::InvalidArgument("group_size must be a multiple of 64, or one group a row");
  }
  if ((p + group_bytes - 1) / group_bytes != groups)
    return ffi::Error::InvalidArgument("scales have the wrong number of groups for K and group_size");

  // x in the codes' order, zero past K, and each row's group sums.
  std::vector<float> x_low(m * p, 0.f), x_high(m * p, 0.f), group_sums(m * groups, 0.f);
  const float* xd = x.typed_data();
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < p; ++j) {
      const int64_t w = (j % kBlockBytes) / 4, h = (j / 2) % 2, q = j % 2;
      const int64_t e = (j / kBlockBytes) * kBlock + 32 * h + 4 * w + 2 * q;
      const float lo = e < k ? xd[i * k + e] : 0.f, hi = e + 1 < k ? xd[i * k + e + 1] : 0.f;
      x_low[i * p + j] = lo;
      x_high[i * p + j] = hi;
      group_sums[i * groups + j / group_bytes] += lo + hi;
    }
  }
  const Problem a{x_low.data(), x_high.data(), group_sums.data(), codes.typed_data(),
                  lut.untyped_data(), scales.untyped_data(), zeros.untyped_data(),
                  lut.element_type(), scales.element_type(), zeros.element_type(),
                  y->typed_data(), m, n, p, levels, groups, group_bytes, bits, row_bytes};

  // Waking the pool costs tens of microseconds: split only work that takes longer.
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t tasks = !use_pool || m * n * p < kMinParallelBytes
                            ? 1
                            : std::max<int64_t>(1, std::min({pool.num_threads() + 1, cores, n / 16}));  // n < 16: 1
  if (tasks == 1) {
    Block(a, 0, n);
    return ffi::Error::Success();
  }
  // Chunks of rows are taken from a counter by this thread and by pool tasks.
  // This thread never waits for a chunk nobody has started (XLA may run other
  // calls on every pool thread, which would then never get to ours): it takes
  // what is left itself, then waits only for chunks being computed. A task
  // that starts late finds the counter spent and touches nothing else, so the
  // counters live on the heap, owned jointly.
  struct Shared {
    std::atomic<int64_t> next{0}, finished{0};
    int64_t chunks, rows;
  };
  auto shared = std::make_shared<Shared>();
  shared->rows = ((n + 4 * tasks - 1) / (4 * tasks) + kRowsW - 1) / kRowsW * kRowsW;
  shared->chunks = (n + shared->rows - 1) / shared->rows;
  auto work = [](Shared& s, const Problem* a) {
    for (int64_t c; (c = s.next.fetch_add(1, std::memory_order_relaxed)) < s.chunks;) {
      Block(*a, c * s.rows, std::min(a->n, (c + 1) * s.rows));
      s.finished.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < tasks; ++t) pool.Schedule([shared, work, pa = &a] { work(*shared, pa); });
  work(*shared, &a);
  while (shared->finished.load(std::memory_order_acquire) < shared->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

// The instruction set this build's inner loop uses: 2 = AVX-512, 1 = AVX2, 0 = the plain loop.
extern "C" int Any4LutGemvIsa() {
#if defined(__AVX512F__)
  return 2;
#elif defined(__AVX2__)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Any4LutGemv, LutGemv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Floats>()          // x (M, K)
                                  .Arg<Bytes>()           // codes (N, row_bytes)
                                  .Arg<ffi::AnyBuffer>()  // lut (N, levels)
                                  .Arg<ffi::AnyBuffer>()  // scales (N, groups)
                                  .Arg<ffi::AnyBuffer>()  // zeros (N, groups)
                                  .Ret<Floats>()          // y (M, N)
                                  .Attr<int64_t>("group_size")
                                  .Attr<int64_t>("use_pool"));  // 0: one thread (other devices share the cores)
