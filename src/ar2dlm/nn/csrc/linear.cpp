// A bf16 linear for a CPU whose every output is one fixed function of its row and the weight, at any row count,
// and whose one-row call reads the weight once (what an AR step costs is then its bytes).
//
// Why our own: oneDNN picks its kernel by the row count, so a row's bits change with the rows beside it unless
// every call has the same shape; padding every call to 16 rows (what ar2dlm did) makes an AR step compute 16
// rows to use one, and on a CPU whose bf16 matmuls are not free that is most of the step. Here the order is
// written down:
//
//   y[m, n] = sum over k in pairs (k, k + 1), ascending: one bf16 pair-dot per step into an fp32 accumulator
//             (AVX512-BF16 `vdpbf16ps` where the CPU has it; else the two products added in fp32, in order)
//   + bias[n] in fp32, then rounded to bf16 once.
//
// The same instructions run for every (row, column) whatever the tile it falls in, so a row's result does not
// depend on how many rows share the call, which columns a thread took, or the thread count.
//
// The weight is packed once ([N/16][K/2][16][2] bf16: 16 columns' k-pairs side by side, one 64-byte load per
// pair step); `pack` does it (zero-padded to whole blocks, which add exact zeros).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t COLS = 16;   // output columns per block (one zmm of fp32 accumulators)

#ifdef __AVX512BF16__
#define AR2DLM_DPBF16 1
#endif

// acc[r][c] += x[r] . w[c] over `count` k-pairs (x: bf16 rows, k-pairs as int32; w: packed blocks of `pairs`)
template <int R, int C>
inline void tile(const uint32_t* const* x, const uint32_t* w, int64_t pairs, __m512* acc, int64_t count) {
  for (int64_t p = 0; p < count; ++p) {
    __m512i wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_si512(w + (c * pairs + p) * COLS);
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int32_t>(x[r][p]));
      for (int c = 0; c < C; ++c) {
#ifdef AR2DLM_DPBF16
        acc[r * C + c] = _mm512_dpbf16_ps(acc[r * C + c], (__m512bh)xv, (__m512bh)wv[c]);
#else
        const __m512 x0 = _mm512_castsi512_ps(_mm512_slli_epi32(xv, 16));
        const __m512 x1 = _mm512_castsi512_ps(_mm512_and_si512(xv, _mm512_set1_epi32(0xFFFF0000)));
        const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(wv[c], 16));
        const __m512 w1 = _mm512_castsi512_ps(_mm512_and_si512(wv[c], _mm512_set1_epi32(0xFFFF0000)));
        acc[r * C + c] = _mm512_fmadd_ps(x1, w1, _mm512_fmadd_ps(x0, w0, acc[r * C + c]));
#endif
      }
    }
  }
}

inline uint16_t round_bf16(float f) {
  return c10::BFloat16(f).x;  // round to nearest even
}

template <int R, int C>
inline void run_tile(const uint32_t* const* x, const uint32_t* w, int64_t pairs, const float* bias, int64_t n0,
                     int64_t N, uint16_t* const* y) {
  __m512 acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = _mm512_setzero_ps();
  tile<R, C>(x, w, pairs, acc, pairs);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      alignas(64) float out[COLS];
      _mm512_store_ps(out, acc[r * C + c]);
      for (int64_t j = 0; j < COLS; ++j) {
        const int64_t n = n0 + c * COLS + j;
        if (n < N) y[r][n] = round_bf16(bias ? out[j] + bias[n] : out[j]);
      }
    }
}

// Column blocks nb.. for rn rows (rn <= 8), in a tile of up to C blocks (the tail narrower): each output the same
// arithmetic whatever the tile.
template <int C>
inline void run_rows(int rn, const uint32_t* const* x, const uint32_t* w, int64_t pairs, const float* bias,
                     int64_t nb, int64_t blocks, int64_t N, uint16_t* const* y) {
  const int64_t left = blocks - nb;
  const int c = static_cast<int>(left >= C ? C : left);
  const uint32_t* wb = w + nb * pairs * COLS;
#define AR2DLM_TILE(R, CC) run_tile<R, CC>(x, wb, pairs, bias, nb * COLS, N, y)
#define AR2DLM_ROWS(CC)                                      \
  switch (rn) {                                              \
    case 8: AR2DLM_TILE(8, CC); break;                       \
    case 7: AR2DLM_TILE(7, CC); break;                       \
    case 6: AR2DLM_TILE(6, CC); break;                       \
    case 5: AR2DLM_TILE(5, CC); break;                       \
    case 4: AR2DLM_TILE(4, CC); break;                       \
    case 3: AR2DLM_TILE(3, CC); break;                       \
    case 2: AR2DLM_TILE(2, CC); break;                       \
    default: AR2DLM_TILE(1, CC); break;                      \
  }
  switch (c) {
    case 4: AR2DLM_ROWS(4); break;
    case 3: AR2DLM_ROWS(3); break;
    case 2: AR2DLM_ROWS(2); break;
    default: AR2DLM_ROWS(1); break;
  }
#undef AR2DLM_ROWS
#undef AR2DLM_TILE
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "x: bf16 [M, K], rows contiguous");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == COLS && packed.size(3) == 2,
              "packed: [N/16, K/2, 16, 2] bf16 (from pack)");
  const int64_t M = x.size(0), K = x.size(1), pairs = packed.size(1), blocks = packed.size(0);
  TORCH_CHECK((K + 1) / 2 == pairs && N <= blocks * COLS, "x's K or N do not match the packed weight");
  const float* bp = nullptr;
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(at::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "bias: [N]");
    bp = b.data_ptr<float>();
  }
  // the rows as k-pairs (an odd K padded with a zero column, which the packed weight also has)
  at::Tensor xs = x;
  if (K % 2) {
    xs = at::zeros({M, K + 1}, x.options());
    xs.narrow(1, 0, K).copy_(x);
  } else if (xs.stride(0) % 2) {
    xs = xs.contiguous();  // rows read as whole k-pairs
  }
  at::Tensor y = at::empty({M, N}, x.options());
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(xs.data_ptr<c10::BFloat16>());
  const int64_t xstride = xs.stride(0) / 2;
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  // micro-tiles: up to 8 rows x 3 column blocks (24 accumulators) when there are rows to share the weight's loads,
  // else 4 rows x 4 blocks (a one-row call streams 4 blocks at once)
  const int rows_per = M >= 6 ? 8 : 4, cols_per = M >= 6 ? 3 : 4;
  const int64_t tiles = (blocks + cols_per - 1) / cols_per;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t m = 0; m < M; m += rows_per) {
        const uint32_t* xr[8];
        uint16_t* yr[8];
        const int rn = static_cast<int>(std::min<int64_t>(rows_per, M - m));
        for (int r = 0; r < rn; ++r) {
          xr[r] = xp + (m + r) * xstride;
          yr[r] = yp + (m + r) * N;
        }
        if (cols_per == 3)
          run_rows<3>(rn, xr, wp, pairs, bp, t * 3, blocks, N, yr);
        else
          run_rows<4>(rn, xr, wp, pairs, bp, t * 4, blocks, N, yr);
      }
    }
  });
  return y;
}

// y[b, m, n] = bf16(y[b, m, n] + sum over the k-pairs [ranges[nb, 0], ranges[nb, 1]) of column block nb, ascending)
// in place: a block-diagonal product (each column block reads only its own member's k range: a LoRA update of a
// fused group, [h_1 .. h_n] blockdiag(B_1 .. B_n)^T) added into the rows it updates, in one call.
template <int R>
inline void add_block(const uint32_t* const* x, const uint32_t* wblock, int64_t pairs, int64_t p0, int64_t p1,
                      int64_t n0, int64_t N, uint16_t* const* y) {
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const uint32_t* xs[R];
  for (int r = 0; r < R; ++r) xs[r] = x[r] + p0;
  tile<R, 1>(xs, wblock + p0 * COLS, pairs, acc, p1 - p0);
  for (int r = 0; r < R; ++r) {
    alignas(64) float out[COLS];
    _mm512_store_ps(out, acc[r]);
    for (int64_t j = 0; j < COLS; ++j) {
      const int64_t n = n0 + j;
      if (n < N) y[r][n] = round_bf16(static_cast<float>(c10::BFloat16(y[r][n], c10::BFloat16::from_bits())) + out[j]);
    }
  }
}

void linear_add(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& ranges, at::Tensor y) {
  TORCH_CHECK(x.dim() == 3 && y.dim() == 3 && x.scalar_type() == at::kBFloat16 && y.scalar_type() == at::kBFloat16,
              "x, y: bf16 [B, M, *]");
  TORCH_CHECK(x.stride(2) == 1 && y.stride(2) == 1 && x.stride(1) % 2 == 0 && x.stride(0) % 2 == 0,
              "x, y: the last dim contiguous; x's rows whole k-pairs");
  const int64_t B = x.size(0), M = x.size(1), K = x.size(2), N = y.size(2);
  const int64_t blocks = packed.size(0), pairs = packed.size(1);
  TORCH_CHECK(y.size(0) == B && y.size(1) == M && K % 2 == 0 && K / 2 == pairs && N <= blocks * COLS,
              "shapes of x, y and the packed weight disagree");
  TORCH_CHECK(ranges.scalar_type() == at::kLong && ranges.is_contiguous() && ranges.size(0) == blocks,
              "ranges: int64 [blocks, 2]");
  const int64_t* rp = ranges.data_ptr<int64_t>();
  const uint32_t* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<c10::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr<c10::BFloat16>());
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), ys0 = y.stride(0), ys1 = y.stride(1);
  // both threads even for one row: the update's weights come from memory, and two cores draw more bandwidth
  at::parallel_for(0, blocks, 4, [&](int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const int64_t p0 = rp[2 * nb], p1 = rp[2 * nb + 1];
      if (p1 <= p0) continue;
      const uint32_t* wblock = wp + nb * pairs * COLS;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t m = 0; m < M; m += 8) {
          const uint32_t* xr[8];
          uint16_t* yr[8];
          const int rn = static_cast<int>(std::min<int64_t>(8, M - m));
          for (int r = 0; r < rn; ++r) {
            xr[r] = xp + (b * xs0 + (m + r) * xs1) / 2;
            yr[r] = yp + b * ys0 + (m + r) * ys1;
          }
          switch (rn) {
            case 8: add_block<8>(xr, wblock, pairs, p0, p1, nb * COLS, N, yr); break;
            case 7: add_block<7>(xr, wblock, pairs, p0, p1, nb * COLS, N, yr); break;
            case 6: add_block<6>(xr, wblock, pairs, p0, p1, nb * COLS, N, yr); break;
            case 5: add_block<5>(xr, wblock, pairs, p0, p1, nb * COLS, N, yr); break;
            case 4: add_block<4>(xr, wblock, pairs, p0, p1, nb * COLS, N, yr); break;
            case 3: add_block<3>(xr, wblock, pairs, p0, p1, nb * COLS, N, yr); break;
            case 2: add_block<2>(xr, wblock, pairs, p0, p1, nb * COLS, N, yr); break;
            default: add_block<1>(xr, wblock, pairs, p0, p1, nb * COLS, N, yr); break;
          }
        }
    }
  });
}

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "weight: bf16 [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  const int64_t Np = (N + COLS - 1) / COLS * COLS, Kp = (K + 1) / 2 * 2;
  at::Tensor w = at::zeros({Np, Kp}, weight.options());
  w.narrow(0, 0, N).narrow(1, 0, K).copy_(weight);
  // [Np/16, 16, Kp/2, 2] -> [Np/16, Kp/2, 16, 2]
  return w.view({Np / COLS, COLS, Kp / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ar2dlm_native, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor");
  m.def("pack(Tensor weight) -> Tensor");
  m.def("linear_add(Tensor x, Tensor packed, Tensor ranges, Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(ar2dlm_native, CPU, m) {
  m.impl("linear", &linear);
  m.impl("pack", &pack);
  m.impl("linear_add", &linear_add);
}
