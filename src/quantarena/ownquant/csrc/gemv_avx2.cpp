// Batch-1 decode matmuls for the own formats as stored, y (..., N) = x (..., K) @ W.T, on AVX2:
//   int4_gemv: W[n, k] = q[n, k] * scale[n, g] + min[n, g], g = k / G, q packed two per byte along k (even k in
//              the low nibble), scales and mins fp16, one per group;
//   int8_gemv: W[n, k] = q[n, k] * scale[n], q int8, one fp32 scale per row;
//   fp32_gemv: W fp32, for the float layers a quantized model keeps (its output head): MKL multiplies one row of x
//              by a matrix on one thread (9 GB/s here on SmolLM2's 113 MB head), this on all of them.
//
// Why kernels of our own: PyTorch's CPU int4 kernel converts every nibble through bf16 and reaches ~6 GB/s of
// int4 here (AVX2), a quarter of the memory bandwidth, so a batch-1 decode step is compute-bound; so does a
// plain fp32 FMA loop (widen, convert, FMA per weight). These multiply in integers: each group of activations
// (the int4 group, or a block of 64 for int8) is rounded once per call to int16 on its own scale (error at most
// 2^-16 of the group's largest |x|, against 2^-9 of every value for the bf16 activations of PyTorch's kernels),
// and 16 codes meet 16 activations in one vpmaddwd. Scales and mins leave the inner loop:
//   sum_k W[n,k] x[k] = sum_g scale[n,g] * xscale[g] * (sum_{k in g} q[n,k] x16[k]) + sum_g min[n,g] * xsum[g]
// with xsum the fp32 sum of the group's activations. For int4 the activations are split into even and odd k, so
// the low and high nibbles of 16 bytes meet 16 contiguous activations each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kRows = 4;  // rows per block: the activations loaded once serve four rows

inline float half_to_float(at::Half h) { return _cvtsh_ss(h.x); }  // F16C: c10's conversion is software

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256i load16(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m128i load8(const void* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

struct Activations {  // one row of x, prepared once per call
  std::vector<int16_t> x16;       // int4: the even k then the odd k; int8: in order
  std::vector<float> scale, sum;  // per group: x ~= scale * x16; the fp32 sum of x
};

// Sixteen activations k .. k + 15 rounded to int16 on ``inverse`` (round to nearest even, as nearbyint), in order,
// or for int4 the eight even k to ``even`` and the eight odd k to ``odd``.
inline void round16(const float* x, __m256 inverse, int16_t* even, int16_t* odd, bool split) {
  const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inverse));
  const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inverse));
  // packs interleaves the 128-bit lanes (a0-3 b0-3 a4-7 b4-7); the permute puts them back in order.
  __m256i v = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
  if (!split) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(even), v);
    return;
  }
  const __m256i evens_first = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,  //
                                               0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, evens_first), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm256_castsi256_si128(v));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), _mm256_extracti128_si256(v, 1));
}

Activations prepare(const float* x, int64_t K, int64_t G, bool split) {
  Activations a{std::vector<int16_t>(K), std::vector<float>(K / G), std::vector<float>(K / G)};
  const __m256 sign = _mm256_set1_ps(-0.f);
  int16_t *even = a.x16.data(), *odd = a.x16.data() + K / 2;
  for (int64_t g = 0; g < K / G; ++g) {
    __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
    for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
      const __m256 v = _mm256_loadu_ps(x + k);
      vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v));
      vsum = _mm256_add_ps(vsum, v);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))), sum = hsum(vsum);
    // A NaN or inf makes the sum non-finite (max_ps may drop a NaN; the sum cannot): the group's scale becomes
    // NaN, so every output is NaN as on the portable path, whatever integers the group's values convert to.
    const bool finite = std::isfinite(sum);
    const __m256 inverse = _mm256_set1_ps(finite && amax > 0.f ? 32767.f / amax : 0.f);
    for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
      round16(x + k, inverse, split ? even + k / 2 : a.x16.data() + k, odd + k / 2, split);
    }
    a.scale[g] = finite ? amax / 32767.f : std::numeric_limits<float>::quiet_NaN();
    a.sum[g] = sum;
  }
  return a;
}

struct Int4Rows {
  const uint8_t* q;
  const at::Half *scales, *mins;
  int64_t K, G;

  template <int R>
  void operator()(const Activations& a, int64_t n, float* y) const {
    const int64_t row_bytes = K / 2, groups = K / G, group_bytes = G / 2;
    const int16_t *even = a.x16.data(), *odd = a.x16.data() + K / 2;
    const uint8_t* rows = q + n * row_bytes;
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
      for (int64_t j = g * group_bytes; j < (g + 1) * group_bytes; j += 16) {
        const __m256i xe = load16(even + j), xo = load16(odd + j);
        for (int r = 0; r < R; ++r) {
          const __m256i b = _mm256_cvtepu8_epi16(load8(rows + r * row_bytes + j));
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_and_si256(b, nibble), xe));
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_srli_epi16(b, 4), xo));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m256 scale = _mm256_set1_ps(half_to_float(scales[(n + r) * groups + g]) * a.scale[g]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), scale, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float offset = 0.f;
      for (int64_t g = 0; g < groups; ++g) offset += half_to_float(mins[(n + r) * groups + g]) * a.sum[g];
      y[r] = hsum(acc[r]) + offset;
    }
  }
};

struct Int8Rows {
  const int8_t* q;
  const float* scales;
  int64_t K, G;

  template <int R>
  void operator()(const Activations& a, int64_t n, float* y) const {
    const int8_t* rows = q + n * K;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / G; ++g) {
      __m256i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
      for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
        const __m256i xv = load16(a.x16.data() + k);
        for (int r = 0; r < R; ++r)
          dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_cvtepi8_epi16(load8(rows + r * K + k)), xv));
      }
      const __m256 scale = _mm256_set1_ps(a.scale[g]);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), scale, acc[r]);
    }
    for (int r = 0; r < R; ++r) y[r] = hsum(acc[r]) * scales[n + r];
  }
};

struct Fp32Rows {
  const float* w;
  int64_t K;

  template <int R>
  void operator()(const float* x, int64_t n, float* y) const {
    const float* rows = w + n * K;
    const int64_t K8 = K - K % 8;
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(rows + r * K + k), xv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float tail = 0.f;
      for (int64_t k = K8; k < K; ++k) tail += rows[r * K + k] * x[k];
      y[r] = hsum(acc[r]) + tail;
    }
  }
};

// What the rows multiply: the integer kernels' activations prepared once per call; fp32 reads x as it is.
template <typename Rows>
Activations prepared(const float* x, int64_t K, int64_t G, bool split, const Rows&) {
  return prepare(x, K, G, split);
}
inline const float* prepared(const float* x, int64_t, int64_t, bool, const Fp32Rows&) { return x; }

// Rows in blocks of kRows over the threads, each row of x prepared once. x (..., K) in any float dtype, y (..., N)
// in x's: the reshapes and casts are done here, where they cost nothing, rather than as a decode step's 210 x 3
// dispatched Python calls.
template <typename Rows>
at::Tensor gemv(const at::Tensor& input, int64_t N, int64_t G, bool split, const Rows& rows) {
  const at::Tensor x = input.to(at::kFloat).contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K, blocks = (N + kRows - 1) / kRows;
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  for (int64_t m = 0; m < M; ++m) {
    const auto a = prepared(x.data_ptr<float>() + m * K, K, G, split, rows);
    float* ym = y.data_ptr<float>() + m * N;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * kRows;
        if (n + kRows <= N) {
          rows.template operator()<kRows>(a, n, ym + n);
        } else {
          for (int64_t r = n; r < N; ++r) rows.template operator()<1>(a, r, ym + r);
        }
      }
    });
  }
  return y.to(input.scalar_type());
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && at::isFloatingType(x.scalar_type()), "x must be (..., K) floats");
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins, int64_t group_size) {
  check_x(x);
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf &&
                  mins.scalar_type() == at::kHalf, "qweight uint8, scales and mins float16");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && mins.is_contiguous(), "contiguous tensors");
  const int64_t K = x.size(-1), N = qweight.size(0), G = group_size;
  TORCH_CHECK(G % 32 == 0 && K % G == 0 && qweight.size(1) == K / 2, "K a multiple of the group, the group of 32");
  TORCH_CHECK(scales.numel() == N * (K / G) && mins.numel() == N * (K / G), "one scale and min per row and group");
  return gemv(x, N, G, true, Int4Rows{qweight.data_ptr<uint8_t>(), scales.data_ptr<at::Half>(),
                                      mins.data_ptr<at::Half>(), K, G});
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  check_x(x);
  TORCH_CHECK(qweight.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat, "qweight int8, scales fp32");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "contiguous tensors");
  const int64_t K = x.size(-1), N = qweight.size(0);
  TORCH_CHECK(K % 16 == 0 && qweight.size(1) == K && scales.numel() == N, "K a multiple of 16, a scale a row");
  const int64_t G = K % 64 == 0 ? 64 : K % 32 == 0 ? 32 : 16;  // the activations' blocks
  return gemv(x, N, G, false, Int8Rows{qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), K, G});
}

at::Tensor fp32_gemv(const at::Tensor& x, const at::Tensor& weight) {
  check_x(x);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.size(1) == x.size(-1), "weight (N, K) float32, contiguous");
  return gemv(x, weight.size(0), 1, false, Fp32Rows{weight.data_ptr<float>(), x.size(-1)});
}

// The fp32 weights of the own formats, written into ``out`` (prompts and scoring multiply them in fp32): the same
// values as the portable path's dequantize, bit for bit (int4: round(q * scale) then + min, two roundings, never
// fused: the build passes -ffp-contract=off), several times faster, into a buffer the caller keeps.
void int4_dequantize(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& mins, int64_t group_size,
                     at::Tensor& out) {
  const int64_t N = out.size(0), K = out.size(1), G = group_size, groups = K / G;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && qweight.size(0) == N &&
                  qweight.size(1) == K / 2 && G % 32 == 0 && K % G == 0 && scales.numel() == N * groups &&
                  mins.numel() == N * groups,
              "out (N, K) float32, K a multiple of the group, the group of 32");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous() && mins.is_contiguous(), "contiguous tensors");
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const at::Half *sc = scales.data_ptr<at::Half>(), *mn = mins.data_ptr<at::Half>();
  float* w = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    const __m256i nibble = _mm256_set1_epi64x(0x0F);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t g = 0; g < groups; ++g) {
        const __m256 scale = _mm256_set1_ps(half_to_float(sc[n * groups + g]));
        const __m256 min = _mm256_set1_ps(half_to_float(mn[n * groups + g]));
        for (int64_t k = g * G; k < (g + 1) * G; k += 8) {  // 4 bytes: codes k .. k + 7
          int32_t four;
          std::memcpy(&four, q + n * K / 2 + k / 2, sizeof four);
          // One byte a 64-bit lane; byte j holds code k + 2j (low nibble) and k + 2j + 1 (high): as int32 lanes
          // (low, high) of each 64 bits, the codes in order.
          const __m256i b = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
          const __m256i lo = _mm256_and_si256(b, nibble), hi = _mm256_and_si256(_mm256_srli_epi64(b, 4), nibble);
          const __m256i codes = _mm256_or_si256(lo, _mm256_slli_epi64(hi, 32));
          const __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(codes), scale), min);
          _mm256_storeu_ps(w + n * K + k, v);
        }
      }
    }
  });
}

void int8_dequantize(const at::Tensor& qweight, const at::Tensor& scales, at::Tensor& out) {
  const int64_t N = out.size(0), K = out.size(1);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && qweight.size(0) == N &&
                  qweight.size(1) == K && scales.numel() == N, "out (N, K) float32");
  TORCH_CHECK(qweight.is_contiguous() && scales.is_contiguous(), "contiguous tensors");
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  float* w = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) w[n * K + k] = static_cast<float>(q[n * K + k]) * sc[n];
  });
}

}  // namespace

TORCH_LIBRARY(quantarena_cpu, m) {
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("fp32_gemv(Tensor x, Tensor weight) -> Tensor");
  m.def("int4_dequantize(Tensor qweight, Tensor scales, Tensor mins, int group_size, Tensor(a!) out) -> ()");
  m.def("int8_dequantize(Tensor qweight, Tensor scales, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(quantarena_cpu, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("fp32_gemv", &fp32_gemv);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int8_dequantize", &int8_dequantize);
}
