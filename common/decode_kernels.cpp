// The compiled decode step's own operators (common/decode_step.py), which its packages call: built by the package's
// build into the package's folder (AVX2 and FMA: x86-64 CPUs with AVX2 or AVX-512 only), loaded by every process that
// loads the package. float32.
//
// decode_step::blocked_mm, the batch step's products (products_in_blocks): rows [M, K] times a weight laid out in
// blocks of 24 outputs [NB, K, 24] -> [M, NB * 24]. Why not inductor's C++ GEMM template, which it replaces: a decode
// step's product is a few rows by a weight read once from memory, and the template's per-call work around its 4x24
// register block (cache blocking worked out at run time, an accumulator buffer allocated per block of outputs, a
// second copy of the sums) made SmolLM2's 211 products at 8 rows take 25.3-26.5 ms against 20.8-21.3 for this
// operator in a package (a plain read of the weights: ~17), and its whole 8-row decode step 33.2-33.6 ms against
// 28.0-28.6 (2-core EPYC limited to AVX2, 2026-12-08; docs/performance.md). Each output is summed over k in order;
// the rows go through in fours (4 rows x 24 outputs: 12 accumulators, 3 weight registers, 1 broadcast: AVX2's 16),
// each block of the weight read from memory by the first four and from cache by the rest.
//
// decode_step::one_query_attention, both steps' attention (one_query_attention): each row's one new query per query
// head over its cached keys and values, the query heads grouped by the key/value head they share, a row's first
// `padding` positions hidden. ATen's flash attention splits the same work into a product of 3 query rows per head
// and pays its per-block setup for each (SmolLM2's 30 layers at 8 rows, 170 cached positions: 5.8-5.9 ms against
// 3.1-3.3 here; at 1,000 positions 22.4-22.7 against 15.2; one row of 2,000: 7.6 against 5.4): here each cached key
// is read once per query of its group and each value once per query, from cache after the first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

inline float sum_of(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

// One key/value head of one row: its G queries [G, 8*NV] over positions start..L-1 of keys and values (position
// strides ks, vs) into out [G, 8*NV]; scores: room for L floats.
template <int NV>
void attend_head(const float* queries, int64_t G, const float* keys, int64_t ks, const float* values, int64_t vs,
                 int64_t start, int64_t L, float scale, float* scores, float* out) {
  constexpr int64_t D = 8 * NV;
  for (int64_t g = 0; g < G; ++g) {
    __m256 q[NV];
    for (int j = 0; j < NV; ++j) q[j] = _mm256_loadu_ps(queries + g * D + 8 * j);
    float top = -INFINITY;
    for (int64_t l = start; l < L; ++l) {
      const float* key = keys + l * ks;
      __m256 dot = _mm256_mul_ps(q[0], _mm256_loadu_ps(key));
      for (int j = 1; j < NV; ++j) dot = _mm256_fmadd_ps(q[j], _mm256_loadu_ps(key + 8 * j), dot);
      scores[l] = sum_of(dot) * scale;
      top = std::max(top, scores[l]);
    }
    float total = 0;
    for (int64_t l = start; l < L; ++l) total += scores[l] = std::exp(scores[l] - top);
    __m256 sums[NV];
    for (int j = 0; j < NV; ++j) sums[j] = _mm256_setzero_ps();
    for (int64_t l = start; l < L; ++l) {
      const float* value = values + l * vs;
      const __m256 weight = _mm256_set1_ps(scores[l]);
      for (int j = 0; j < NV; ++j) sums[j] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * j), sums[j]);
    }
    const __m256 inverse = _mm256_set1_ps(1.0f / total);
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(out + g * D + 8 * j, _mm256_mul_ps(sums[j], inverse));
  }
}

at::Tensor one_query_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                               const at::Tensor& padding, double scale) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
              values.scalar_type() == at::kFloat, "one_query_attention: float32 only");
  TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && keys.sizes() == values.sizes() &&
              query.size(0) == keys.size(0) && query.size(1) == keys.size(1) && query.size(3) == keys.size(3) &&
              keys.stride(3) == 1 && values.stride(3) == 1 && padding.numel() == query.size(0),
              "one_query_attention: query [B, H, G, D], keys and values [B, H, L, D], padding [B, 1] expected");
  const at::Tensor q = query.contiguous(), starts = padding.to(at::kLong).contiguous();
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), L = keys.size(2);
  auto head = D == 16 ? attend_head<2> : D == 32 ? attend_head<4> : D == 64 ? attend_head<8>
            : D == 128 ? attend_head<16> : D == 256 ? attend_head<32> : nullptr;
  TORCH_CHECK(head != nullptr, "one_query_attention: head dim 16, 32, 64, 128 or 256 expected");
  at::Tensor out = at::empty_like(q);
  const float *Q = q.data_ptr<float>(), *K = keys.data_ptr<float>(), *V = values.data_ptr<float>();
  const int64_t* S = starts.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  // The (row, head) pairs split over torch's threads
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(L);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / H, h = t % H;
      head(Q + t * G * D, G, K + b * keys.stride(0) + h * keys.stride(1), keys.stride(2),
           V + b * values.stride(0) + h * values.stride(1), values.stride(2), S[b], L, static_cast<float>(scale),
           scores.data(), O + t * G * D);
    }
  });
  return out;
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

TORCH_LIBRARY(decode_step, m) {
  m.def("blocked_mm(Tensor rows, Tensor blocks) -> Tensor");
  m.def("one_query_attention(Tensor query, Tensor keys, Tensor values, Tensor padding, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(decode_step, CPU, m) {
  m.impl("blocked_mm", blocked_mm);
  m.impl("one_query_attention", one_query_attention);
}
