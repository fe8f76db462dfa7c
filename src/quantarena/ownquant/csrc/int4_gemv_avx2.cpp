// y (M, N) = x (M, K) @ W.T for the own int4 format as stored: W[n, k] = q[n, k] * scale[n, g] + min[n, g] with
// g = k / G, q packed two per byte along k (even k in the low nibble), scales and mins fp16, one per group.
//
// Why a kernel of our own: PyTorch's CPU int4 kernel converts every nibble through bf16 and reaches ~6 GB/s of
// int4 here (AVX2), a quarter of the memory bandwidth, so a batch-1 decode step is compute-bound; so does a
// plain fp32 FMA loop (widen, convert, FMA per weight). This one multiplies in integers: the activations of each
// group are rounded once per call to int16 on the group's own scale (error at most 2^-16 of the group's largest
// |x|, against 2^-9 of every value for the bf16 activations of PyTorch's kernel), and 16 nibbles meet 16
// activations in one vpmaddwd. The scale and min leave the inner loop:
//   sum_k W[n,k] x[k] = sum_g scale[n,g] * xscale[g] * (sum_{k in g} q[n,k] x16[k]) + sum_g min[n,g] * xsum[g]
// with xsum the fp32 sum of the group's activations. Activations are split into even and odd k, so the low and
// high nibbles of 16 bytes meet 16 contiguous activations each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

struct Activations {  // one row of x, prepared once per call
  std::vector<int16_t> even, odd;  // x16 at even / odd k
  std::vector<float> scale, sum;   // per group: x ~= scale * x16; the fp32 sum of x
};

Activations prepare(const float* x, int64_t K, int64_t G) {
  Activations a{std::vector<int16_t>(K / 2), std::vector<int16_t>(K / 2), std::vector<float>(K / G),
                std::vector<float>(K / G)};
  for (int64_t g = 0; g < K / G; ++g) {
    float amax = 0.f, sum = 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) {
      amax = std::max(amax, std::fabs(x[k]));
      sum += x[k];
    }
    // A NaN or inf makes the sum non-finite: the group's scale becomes NaN, so every output is NaN as on the
    // portable path, and no non-finite value is cast to an integer.
    const bool finite = std::isfinite(sum);
    const float inverse = finite && amax > 0.f ? 32767.f / amax : 0.f;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) {
      const auto v = finite ? static_cast<int16_t>(std::nearbyint(x[k] * inverse)) : int16_t{0};
      (k % 2 ? a.odd : a.even)[k / 2] = v;
    }
    a.scale[g] = finite ? amax / 32767.f : std::numeric_limits<float>::quiet_NaN();
    a.sum[g] = sum;
  }
  return a;
}

template <int R>
void rows_dot(const Activations& a, const uint8_t* q, const at::Half* scales, const at::Half* mins, float* y,
              int64_t K, int64_t G) {
  const int64_t row_bytes = K / 2, groups = K / G, group_bytes = G / 2;
  const __m256i nibble = _mm256_set1_epi16(0x0F);
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dot[R];
    for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
    for (int64_t j = g * group_bytes; j < (g + 1) * group_bytes; j += 16) {
      const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.even.data() + j));
      const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.odd.data() + j));
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * row_bytes + j)));
        dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_and_si256(b, nibble), even));
        dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(_mm256_srli_epi16(b, 4), odd));
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 scale = _mm256_set1_ps(half_to_float(scales[r * groups + g]) * a.scale[g]);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), scale, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float offset = 0.f;
    for (int64_t g = 0; g < groups; ++g) offset += half_to_float(mins[r * groups + g]) * a.sum[g];
    y[r] = hsum(acc[r]) + offset;
  }
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& mins, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be (M, K) float32");
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == at::kHalf &&
                  mins.scalar_type() == at::kHalf, "qweight uint8, scales and mins float16");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), G = group_size;
  TORCH_CHECK(G % 32 == 0 && K % G == 0 && qweight.size(1) == K / 2, "K a multiple of the group, the group of 32");
  TORCH_CHECK(scales.numel() == N * (K / G) && mins.numel() == N * (K / G), "one scale and min per row and group");
  const auto xc = x.contiguous();
  const auto qc = qweight.contiguous(), sc = scales.contiguous(), mc = mins.contiguous();
  auto y = at::empty({M, N}, x.options());
  const int64_t groups = K / G, blocks = (N + kRows - 1) / kRows;
  for (int64_t m = 0; m < M; ++m) {
    const Activations a = prepare(xc.data_ptr<float>() + m * K, K, G);
    float* ym = y.data_ptr<float>() + m * N;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * kRows;
        const uint8_t* q = qc.data_ptr<uint8_t>() + n * (K / 2);
        const at::Half* s = sc.data_ptr<at::Half>() + n * groups;
        const at::Half* mn = mc.data_ptr<at::Half>() + n * groups;
        if (n + kRows <= N) {
          rows_dot<kRows>(a, q, s, mn, ym + n, K, G);
        } else {
          for (int64_t r = n; r < N; ++r)
            rows_dot<1>(a, q + (r - n) * (K / 2), s + (r - n) * groups, mn + (r - n) * groups, ym + r, K, G);
        }
      }
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(quantarena_cpu, m) {
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor mins, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(quantarena_cpu, CPU, m) { m.impl("int4_gemv", &int4_gemv); }
