// y (M, N) = x (M, K) @ W.T (+ bias) for bf16 or fp16 x and W, on AVX2, bit for bit what PyTorch computes on a CPU
// whose oneDNN has no half kernels (AVX2 without AVX512 or AVX2-VNNI-2), about 5x faster.
//
// PyTorch's fallback there (cpublas gemm_transa_ / gemv_trans -> {bf16,fp16}_dot_with_fp32_arith) computes every
// output as its own dot product: 8 fp32 registers of 8 lanes take the products of each 64-element block of k
// (register r, lane e: k = 64 j + 8 r + e, summed over j in order), the registers are added as a tree (r + r+4,
// then r + r+2, then r + r+1), the lanes as vec_reduce_all's shuffles ((e + e+4) + (e + e+2), then e + e+1), the
// bias added in fp32, and the sum rounded once to the half dtype. Half times half is exact in fp32 (8- or 11-bit
// significands), so a fused multiply-add and a multiply then add round alike, and only that order decides the
// bits. One dot product per output, each reloading and converting both operands, is what makes it slow.
//
// Here the same 64 partial sums per output are computed as 64 small GEMMs: the partial sum of lane class
// l = 8 r + e over j is a dot product of length K / 64, computed for a tile of 6 rows x 16 outputs at once from
// fp32 copies of x and W laid out [l][j] (W a panel of 16 outputs at a time), then the 64 tiles are added in the
// tree's order. Only K a multiple of 64 (the fallback's tails follow other rules); the caller checks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <vector>

namespace {

constexpr int64_t kLanes = 64;  // products per block of k in PyTorch's dot: 8 registers x 8 lanes
constexpr int64_t kRows = 6;    // rows of x per tile: 12 accumulators, 2 weight vectors, 1 broadcast
constexpr int64_t kCols = 16;   // outputs per panel: two AVX2 vectors

template <typename T>
float widen(T v) {
  return static_cast<float>(v);  // exact: bf16 is the top half of an fp32, fp16 fits fp32
}

// x (M, K) to fp32 [row][l][j], rows padded with zeros to a multiple of kRows.
std::vector<float> pack_rows(const at::Tensor& x, int64_t padded_rows) {
  const int64_t M = x.size(0), K = x.size(1), J = K / kLanes;
  std::vector<float> packed(padded_rows * K, 0.f);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "pack_rows", [&] {
    const auto* src = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        for (int64_t j = 0; j < J; ++j)
          for (int64_t l = 0; l < kLanes; ++l) packed[m * K + l * J + j] = widen(src[m * K + j * kLanes + l]);
    });
  });
  return packed;
}

// 16 outputs of W (N, K) from n0 to fp32 [l][j][16], outputs past N as zeros.
template <typename T>
void pack_panel(const T* w, int64_t N, int64_t K, int64_t n0, float* panel) {
  const int64_t J = K / kLanes;
  for (int64_t c = 0; c < kCols; ++c) {
    const int64_t n = n0 + c;
    for (int64_t j = 0; j < J; ++j)
      for (int64_t l = 0; l < kLanes; ++l)
        panel[(l * J + j) * kCols + c] = n < N ? widen(w[n * K + j * kLanes + l]) : 0.f;
  }
}

// The 64 partial sums of a 6 x 16 tile: partial[l][r][c] = sum_j x[r][l][j] * W[c][l][j], j in order.
void tile_partials(const float* x, int64_t K, const float* panel, float* partial) {
  const int64_t J = K / kLanes;
  for (int64_t l = 0; l < kLanes; ++l) {
    __m256 acc[kRows][2];
    for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
    const float* xl = x + l * J;
    const float* wl = panel + l * J * kCols;
    for (int64_t j = 0; j < J; ++j) {
      const __m256 w0 = _mm256_loadu_ps(wl + j * kCols), w1 = _mm256_loadu_ps(wl + j * kCols + 8);
      for (int64_t r = 0; r < kRows; ++r) {
        const __m256 xb = _mm256_broadcast_ss(xl + r * K + j);
        acc[r][0] = _mm256_fmadd_ps(xb, w0, acc[r][0]);  // exact products: fused or not, the same sum
        acc[r][1] = _mm256_fmadd_ps(xb, w1, acc[r][1]);
      }
    }
    for (int64_t r = 0; r < kRows; ++r) {
      _mm256_storeu_ps(partial + (l * kRows + r) * kCols, acc[r][0]);
      _mm256_storeu_ps(partial + (l * kRows + r) * kCols + 8, acc[r][1]);
    }
  }
}

// The partial sums added in PyTorch's order, in place; the totals end in partial[0].
void reduce_partials(float* partial) {
  constexpr int64_t tile = kRows * kCols;
  auto add = [&](int64_t into, int64_t from) {
    for (int64_t i = 0; i < tile; i += 8) {
      const __m256 s = _mm256_add_ps(_mm256_loadu_ps(partial + into * tile + i),
                                     _mm256_loadu_ps(partial + from * tile + i));
      _mm256_storeu_ps(partial + into * tile + i, s);
    }
  };
  // l = 8 r + e. Registers: r + (r + 4), then r + (r + 2), then r + (r + 1), for every lane e.
  for (int64_t half = 4; half >= 1; half /= 2)
    for (int64_t r = 0; r < half; ++r)
      for (int64_t e = 0; e < 8; ++e) add(8 * r + e, 8 * (r + half) + e);
  // Lanes: e + (e + 4), then (e + (e + 2)), then e + (e + 1).
  for (int64_t half = 4; half >= 1; half /= 2)
    for (int64_t e = 0; e < half; ++e) add(e, e + half);
}

at::Tensor half_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "half_linear: x (M, K), weight (N, K)");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "half_linear: x and weight of one dtype");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, "half_linear: bf16 or fp16");
  TORCH_CHECK(x.size(1) % kLanes == 0, "half_linear: K a multiple of 64");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "half_linear: contiguous x and weight");
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == x.scalar_type()),
              "half_linear: bias (N,) of x's dtype");
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  const int64_t padded_rows = (M + kRows - 1) / kRows * kRows;
  const std::vector<float> rows = pack_rows(x, padded_rows);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "half_linear", [&] {
    const auto* w = weight.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    auto* y = out.data_ptr<scalar_t>();
    const int64_t panels = (N + kCols - 1) / kCols;
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> panel(K * kCols), partial(kLanes * kRows * kCols);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n0 = p * kCols, cols = std::min(kCols, N - n0);
        pack_panel(w, N, K, n0, panel.data());
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
          tile_partials(rows.data() + m0 * K, K, panel.data(), partial.data());
          reduce_partials(partial.data());
          for (int64_t r = 0; r < std::min(kRows, M - m0); ++r)
            for (int64_t c = 0; c < cols; ++c) {
              const float sum = partial[r * kCols + c];
              y[(m0 + r) * N + n0 + c] = static_cast<scalar_t>(b ? widen(b[n0 + c]) + sum : sum);
            }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(quantarena_half, m) { m.def("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(quantarena_half, CPU, m) { m.impl("linear", &half_linear); }
