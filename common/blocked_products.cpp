// The batch decode step's products (common/decode_step.py, products_in_blocks): rows [M, K] times a float32 weight
// laid out in blocks of 24 outputs [NB, K, 24] -> [M, NB * 24], as the operator decode_step::blocked_mm, which the
// batch package calls. Built by the package's build into the package's folder (AVX2 and FMA: x86-64 CPUs with AVX2
// or AVX-512 only), loaded by every process that loads the package.
//
// Why not inductor's C++ GEMM template, which this replaces: a decode step's product is a few rows by a weight read
// once from memory, and the template's per-call work around its 4x24 register block (cache blocking worked out at run
// time, an accumulator buffer allocated per block of outputs, a second copy of the sums) made SmolLM2's 211 products
// at 8 rows take 25.3-26.5 ms against 20.8-21.3 for this operator in a package (a plain read of the weights: ~17),
// and its whole 8-row decode step 33.2-33.6 ms against 28.0-28.6 (2-core EPYC limited to AVX2, 2026-12-08;
// docs/performance.md).
//
// Each output is summed over k in order, one row at a time as F.linear's definition has it; the rows go through in
// fours (4 rows x 24 outputs: 12 accumulators, 3 weight registers, 1 broadcast: AVX2's 16), each block of the weight
// read from memory by the first four and from cache by the rest.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

namespace {

constexpr int64_t BLOCK = 24;

// R rows (at most 4) of X [.., ldx] times one block W [K, 24] into Y [.., ldy]
template <int R>
inline void rows_by_block(const float* X, int64_t ldx, const float* W, int64_t K, float* Y, int64_t ldy) {
  __m256 sums[R][3];
  for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = sums[r][2] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* w = W + k * BLOCK;
    const __m256 w0 = _mm256_loadu_ps(w), w1 = _mm256_loadu_ps(w + 8), w2 = _mm256_loadu_ps(w + 16);
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(X + r * ldx + k);
      sums[r][0] = _mm256_fmadd_ps(x, w0, sums[r][0]);
      sums[r][1] = _mm256_fmadd_ps(x, w1, sums[r][1]);
      sums[r][2] = _mm256_fmadd_ps(x, w2, sums[r][2]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) _mm256_storeu_ps(Y + r * ldy + 8 * j, sums[r][j]);
}

at::Tensor blocked_mm(const at::Tensor& rows, const at::Tensor& blocks) {
  TORCH_CHECK(rows.scalar_type() == at::kFloat && blocks.scalar_type() == at::kFloat, "blocked_mm: float32 only");
  TORCH_CHECK(rows.dim() == 2 && blocks.dim() == 3 && blocks.size(2) == BLOCK && blocks.size(1) == rows.size(1),
              "blocked_mm: rows [M, K] and blocks [NB, K, 24] expected");
  const at::Tensor x = rows.contiguous(), w = blocks.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * BLOCK;
  at::Tensor y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  // The blocks split over torch's threads: each block's outputs are one thread's, start to end.
  at::parallel_for(0, w.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* block = W + b * K * BLOCK;
      float* out = Y + b * BLOCK;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) rows_by_block<4>(X + m * K, K, block, K, out + m * N, N);
      switch (M - m) {
        case 3: rows_by_block<3>(X + m * K, K, block, K, out + m * N, N); break;
        case 2: rows_by_block<2>(X + m * K, K, block, K, out + m * N, N); break;
        case 1: rows_by_block<1>(X + m * K, K, block, K, out + m * N, N); break;
        default: break;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(decode_step, m) { m.def("blocked_mm(Tensor rows, Tensor blocks) -> Tensor"); }
TORCH_LIBRARY_IMPL(decode_step, CPU, m) { m.impl("blocked_mm", blocked_mm); }
