// sluice's CPU GEMM for fp16-stored weights: y[M, N] = x[M, K] (fp32) @ w[N, K]^T (fp16), fp32 sums.
// x86-64 with AVX2, FMA and F16C; compiled on first use by engine/layers/cpu_native.py.
//
// A decode or verify step of a small model on a CPU has 1 to 1 + k rows and streams every weight
// once, so the kernel is built around the weight stream: each weight row is read once per block
// of rows, converted to fp32 eight values at a time, and multiplied into one AVX2 accumulator per
// (row, output); nothing is packed or transposed.
//
// Every output is computed the same way whatever M and wherever it lies in a tile: eight fp32
// lanes accumulate k = 0, 8, 16, ... in order, the lanes are summed in a fixed order, then the
// K % 8 tail is added in order. A row's result is therefore the same bits however many rows come
// with it (a verify step scores a token exactly as a decode step would).
//
// Work split: output features in chunks of kChunk, shared out among the threads (OpenMP, the
// runtime torch already loaded); inside a chunk, up to 8 rows go through one tile (the weight
// chunk streams once); more rows go in blocks of 4 against the chunk while it sits in L2.

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

namespace {

constexpr int64_t kChunk = 48;  // output features per unit of work (a multiple of every tile width)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

// Rows [0, R) of x (row stride K) against weight rows n0 .. n0 + NB (row stride K) into y (row stride N).
// The unroll pragmas let the compiler keep the accumulators in registers (without them GCC 12
// keeps acc[][] on the stack for some tile shapes, and every FMA waits on a store).
#define SLUICE_UNROLL _Pragma("GCC unroll 16")

template <int R, int NB>
inline void tile(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0) {
  __m256 acc[R][NB];
  SLUICE_UNROLL for (int i = 0; i < R; ++i) SLUICE_UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  const uint16_t* wn = w + n0 * K;
  const int64_t k8 = K - K % 8;
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 wv[NB];
    SLUICE_UNROLL for (int j = 0; j < NB; ++j)
      wv[j] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + j * K + k)));
    SLUICE_UNROLL for (int i = 0; i < R; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * K + k);
      SLUICE_UNROLL for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  SLUICE_UNROLL for (int i = 0; i < R; ++i)
    SLUICE_UNROLL for (int j = 0; j < NB; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = k8; k < K; ++k) s += x[i * K + k] * half_to_float(wn[j * K + k]);
      y[i * N + n0 + j] = s;
    }
}

// Weight rows [n0, n1) against rows [0, R) of x: tiles of NB outputs, the remainder one by one.
template <int R, int NB>
inline void span(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) tile<R, NB>(x, w, y, K, N, n);
  for (; n < n1; ++n) tile<R, 1>(x, w, y, K, N, n);
}

// Up to 8 rows: one weight row at a time (measured fastest for a streamed weight: at one row, tiles
// of 2, 4 or 8 weight rows took 1.3-1.6x as long as one).
void few_rows(int64_t rows, const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t n0,
              int64_t n1) {
  switch (rows) {
    case 1: span<1, 1>(x, w, y, K, N, n0, n1); break;
    case 2: span<2, 1>(x, w, y, K, N, n0, n1); break;
    case 3: span<3, 1>(x, w, y, K, N, n0, n1); break;
    case 4: span<4, 1>(x, w, y, K, N, n0, n1); break;
    case 5: span<5, 1>(x, w, y, K, N, n0, n1); break;
    case 6: span<6, 1>(x, w, y, K, N, n0, n1); break;
    case 7: span<7, 1>(x, w, y, K, N, n0, n1); break;
    case 8: span<8, 1>(x, w, y, K, N, n0, n1); break;
    default: break;
  }
}

}  // namespace

extern "C" void sluice_gemm_f16w(const float* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N,
                                 int num_threads) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = c * kChunk, n1 = n0 + kChunk < N ? n0 + kChunk : N;
    if (M <= 8) {
      few_rows(M, x, w, y, K, N, n0, n1);
      continue;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) span<4, 3>(x + m * K, w, y + m * N, K, N, n0, n1);
    few_rows(M - m, x + m * K, w, y + m * N, K, N, n0, n1);
  }
}
