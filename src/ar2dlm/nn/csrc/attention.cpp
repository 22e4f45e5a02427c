// Batch-invariant attention for a CPU: every query row's result is one fixed
// function of its own query, the keys it sees and their values, whatever the
// other rows of the call, their number, or the keys it does not see.
//
// Why our own kernel: a library's attention (PyTorch's CPU flash kernel)
// blocks its rows by the row count and calls a matmul whose reduction order
// follows the shape and the CPU's instruction set, so a row's bits change
// with the rows beside it on some CPUs and not on others. Here the order is
// written down:
//
//   keys in chunks of CHUNK from key 0; segments of SEGMENT chunks.
//   per row, per chunk it sees any key of (a chunk it sees none of is skipped):
//     s_j   = sum_d (q_d * scale) k_jd          d ascending, fp32 FMA, per key j
//     m'    = max(m, max_j s_j)                 (max is exact in any order)
//     p_j   = exp(s_j - m') for a seen key, exactly 0 for an unseen one
//     l     = l * exp(m - m') + lanesum(p)      the sum in 16 fixed lanes, then a fixed tree
//     acc_d = acc_d * exp(m - m') + sum_j p_j v_jd     j ascending, seen keys only
//   per row, the segments merged in order (an empty one skipped); out = acc / l.
//
// The work is split among threads by (batch, head, segment, row block); each
// piece's arithmetic depends on nothing but its row, so the split (and the
// thread count) changes only the time. exp is our own polynomial (fixed
// code, no libm dispatch). Inputs are float, bfloat16 or half; everything
// inside is fp32.
//
// Rank order (`compact`, per query row): a flagged row reads its seen keys
// at virtual columns 0, 1, 2, ... (its n-th seen key, in column order, at
// column n), chunked and segmented as if they were stored there. Its result
// is then the row's over a cache holding exactly its keys, contiguously
// from key 0 (the AR loop's), wherever the call's layout put them: a
// candidate tree's sibling sees [cache | the step's first j keys | its own
// key further right], where the AR loop has its own key right after the
// others. A flagged row's chunks from the one its first gap falls in run in
// a second pass (see `run`); the other rows are untouched by it.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 64;     // keys per chunk (the reductions' fixed blocks)
constexpr int64_t SEGMENT = 4;    // chunks per segment (the unit of work over keys)
constexpr int64_t ROW_BLOCK = 64; // most rows per unit of work (K/V chunks converted once for them)
constexpr int LANES = 16;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

typedef float v16 __attribute__((vector_size(64)));    // 16 floats: a zmm register with AVX-512
typedef int32_t v16i __attribute__((vector_size(64)));
constexpr int V = CHUNK / 16;                             // vectors per chunk of keys
constexpr int GROUP = 6;                                  // rows that share each key / value load
#define INLINE inline __attribute__((always_inline))

INLINE v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
INLINE v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

// e^x without libm: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n in the exponent bits.
// Relative error ~2e-7 over the range softmax uses (x <= 0); below -87 (and -inf) it is exactly 0.
INLINE v16 exp16(v16 x) {
  const v16 lo = splat(-87.0f), hi = splat(88.0f);
  v16 v = x < lo ? lo : (x > hi ? hi : x);
  const v16 shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  v16 t = v * 1.44269504088896341f + shifter;
  v16 n = t - shifter;
  v16 r = v - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  v16i bits = ((v16i)t - 0x4B400000 + 127) << 23;  // n + 127 in the exponent field
  v16 y = p * (v16)bits;
  return x < lo ? v16{} : y;
}

INLINE float exp_one(float x) { return exp16(splat(x))[0]; }

INLINE float hmax(v16 a) {
  float lane[16];
  std::memcpy(lane, &a, 64);
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) lane[i] = lane[i] > lane[i + w] ? lane[i] : lane[i + w];
  return lane[0];
}

INLINE float hsum(v16 a) {
  float lane[16];
  std::memcpy(lane, &a, 64);
  for (int w = 8; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) lane[i] += lane[i + w];
  return lane[0];
}


struct Strides { int64_t b, h, r, l; };

// 1. scores s[g][j] = sum_d q[g][d] k[j][d] for G rows over one chunk (kt: [D][V] vectors, keys transposed).
// The same sequence of multiply-adds for each row, whatever G.
template <int G>
inline void scores(const float* const* q, const v16* kt, int64_t D, v16 (*s)[V]) {
  v16 a[G][V];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) a[g][i] = v16{};
  for (int64_t d = 0; d < D; ++d) {
    const v16* kd = kt + d * V;
    for (int g = 0; g < G; ++g) {
      const v16 qv = splat(q[g][d]);
      for (int i = 0; i < V; ++i) a[g][i] += qv * kd[i];
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) s[g][i] = a[g][i];
}

// 3. acc[g] += sum_j p[g][j] v[j] over the keys row g sees, j ascending (vf: [CHUNK][D / 16] vectors).
template <int G, int W>
inline void weighted_values(const float* const* p, const bool* const* seen, const v16* vf, int64_t n,
                            float* const* acc) {
  v16 a[G][W];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < W; ++i) std::memcpy(&a[g][i], acc[g] + 16 * i, 64);
  if (seen == nullptr) {  // every row sees every key of the chunk: the same arithmetic without the tests
    for (int64_t j = 0; j < n; ++j) {
      const v16* vj = vf + j * W;
      for (int g = 0; g < G; ++g) {
        const v16 pj = splat(p[g][j]);
        for (int i = 0; i < W; ++i) a[g][i] += pj * vj[i];
      }
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const v16* vj = vf + j * W;
      for (int g = 0; g < G; ++g) {
        if (!seen[g][j]) continue;
        const v16 pj = splat(p[g][j]);
        for (int i = 0; i < W; ++i) a[g][i] += pj * vj[i];
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < W; ++i) std::memcpy(acc[g] + 16 * i, &a[g][i], 64);
}

template <int G>
inline void weighted_values_any(const float* const* p, const bool* const* seen, const v16* vf, int64_t n,
                                int64_t D, float* const* acc) {
  switch (D / 16) {
    case 4: weighted_values<G, 4>(p, seen, vf, n, acc); return;
    case 8: weighted_values<G, 8>(p, seen, vf, n, acc); return;
    default: break;
  }
  const int64_t W = D / 16;  // any other multiple of 16: the same arithmetic, the accumulators in memory
  for (int64_t j = 0; j < n; ++j) {
    const v16* vj = vf + j * W;
    for (int g = 0; g < G; ++g) {
      if (seen != nullptr && !seen[g][j]) continue;
      const v16 pj = splat(p[g][j]);
      for (int64_t i = 0; i < W; ++i) {
        v16 a;
        std::memcpy(&a, acc[g] + 16 * i, 64);
        a += pj * vj[i];
        std::memcpy(acc[g] + 16 * i, &a, 64);
      }
    }
  }
}

// One chunk for G rows that each see at least one of its keys. bias[g][j]: 0 for a key row g sees, -inf else.
template <int G>
void rows_in_chunk(const float* const* q, const bool* const* seen, const float* const* bias, bool all_seen,
                   const v16* kt, const v16* vf, int64_t n, int64_t D, float* const* state) {
  v16 s[G][V];
  scores<G>(q, kt, D, s);
  float p[G][CHUNK];
  const float* pp[G];
  float* acc[G];
  for (int g = 0; g < G; ++g) {
    // 2. the running max and the chunk's weights (an unseen key: -inf, so exactly 0)
    v16 x[V];
    for (int i = 0; i < V; ++i) {
      v16 b;
      std::memcpy(&b, bias[g] + 16 * i, 64);
      x[i] = b < 0.0f ? b : s[g][i];  // a select, not a sum: an unseen key's score may be inf or NaN
    }
    v16 mx = x[0];
    for (int i = 1; i < V; ++i) mx = vmax(mx, x[i]);
    float* st = state[g];
    const float m_old = st[0];
    const float cmax = hmax(mx);
    const float m_new = m_old > cmax ? m_old : cmax;
    v16 sum = v16{};
    for (int i = 0; i < V; ++i) {
      const v16 e = exp16(x[i] - m_new);
      sum += e;
      std::memcpy(p[g] + 16 * i, &e, 64);
    }
    const float alpha = m_old == NEG_INF ? 0.0f : exp_one(m_old - m_new);
    st[0] = m_new;
    st[1] = st[1] * alpha + hsum(sum);
    acc[g] = st + 2;
    for (int64_t d = 0; d < D; ++d) acc[g][d] *= alpha;
    pp[g] = p[g];
  }
  weighted_values_any<G>(pp, all_seen ? nullptr : seen, vf, n, D, acc);
}

// rows_in_chunk for g_n (1 .. GROUP) rows
inline void rows_in_group(int g_n, const float* const* q, const bool* const* seen, const float* const* bias,
                          bool all_seen, const v16* kt, const v16* vf, int64_t n, int64_t D, float* const* state) {
  switch (g_n) {
    case 6: rows_in_chunk<6>(q, seen, bias, all_seen, kt, vf, n, D, state); break;
    case 5: rows_in_chunk<5>(q, seen, bias, all_seen, kt, vf, n, D, state); break;
    case 4: rows_in_chunk<4>(q, seen, bias, all_seen, kt, vf, n, D, state); break;
    case 3: rows_in_chunk<3>(q, seen, bias, all_seen, kt, vf, n, D, state); break;
    case 2: rows_in_chunk<2>(q, seen, bias, all_seen, kt, vf, n, D, state); break;
    default: rows_in_chunk<1>(q, seen, bias, all_seen, kt, vf, n, D, state); break;
  }
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, double scale_d,
         const c10::optional<at::Tensor>& keys_t, const c10::optional<at::Tensor>& compact, at::Tensor& out) {
  // D: the head size padded to whole vectors (the padding is zeros in q, k and v: it adds exact zeros)
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), Dq = q.size(3), L = k.size(2);
  const int64_t D = (Dq + 15) / 16 * 16;
  const int64_t W = D / 16;
  const int64_t chunks = (L + CHUNK - 1) / CHUNK;
  const int64_t segments = chunks == 0 ? 1 : (chunks + SEGMENT - 1) / SEGMENT;
  // rows per unit of work: enough units for every thread (which rows share a unit changes only the time)
  const int64_t units = B * H * segments, want = 2 * at::get_num_threads();
  int64_t per = (R + ((want + units - 1) / units) - 1) / ((want + units - 1) / units);
  per = std::min(ROW_BLOCK, std::max<int64_t>(1, per));
  const int64_t blocks = (R + per - 1) / per;
  const float scale = static_cast<float>(scale_d);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  // the keys transposed ([B, H, D, L], kept by the caller's cache): the same numbers, loaded without a transpose
  const T* ktp = keys_t.has_value() ? keys_t->data_ptr<T>() : nullptr;
  const int64_t kt_b = ktp ? keys_t->stride(0) : 0, kt_h = ktp ? keys_t->stride(1) : 0,
                kt_d = ktp ? keys_t->stride(2) : 0;
  const T* vp = v.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  T* op = out.data_ptr<T>();
  const Strides qs{q.stride(0), q.stride(1), q.stride(2), 0};
  const Strides ks{k.stride(0), k.stride(1), 0, k.stride(2)};
  const Strides vs{v.stride(0), v.stride(1), 0, v.stride(2)};
  const Strides ms{mask.stride(0), mask.size(1) == 1 ? 0 : mask.stride(1), mask.stride(2), mask.stride(3)};
  // compact [B, R] (any size-1 dims broadcast): the rows that read their keys in rank order
  const bool* cp = compact.has_value() ? compact->data_ptr<bool>() : nullptr;
  const int64_t c_dim = cp ? compact->dim() : 0;
  const int64_t cs_b = c_dim == 2 && compact->size(0) != 1 ? compact->stride(0) : 0;
  const int64_t cs_r = c_dim >= 1 && compact->size(c_dim - 1) != 1 ? compact->stride(c_dim - 1) : 0;
  // Per (b, mask head, r) the first chunk f a row runs in rank order (step 5): a flagged row's keys before its
  // first gap are at their rank already, so the chunks wholly before the gap are its virtual chunks as they
  // stand (every key seen) and run in the main pass with the other rows. `chunks` (none) for every other row,
  // and for a flagged row without a gap (all its keys at their rank). Hm: 1 when one mask serves every head.
  const int64_t Hm = mask.size(1);
  std::vector<int64_t> ranked_from;
  if (cp != nullptr) {
    ranked_from.assign(static_cast<size_t>(B * Hm * R), chunks);
    at::parallel_for(0, B * Hm * R, 16, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item % R, h = (item / R) % Hm, b = item / R / Hm;
        if (!cp[b * cs_b + r * cs_r]) continue;
        const bool* mrow = mp + b * ms.b + h * ms.h + r * ms.r;
        int64_t lead = 0;  // the keys seen from column 0 on
        while (lead < L && mrow[lead * ms.l]) ++lead;
        int64_t next = lead;  // the first seen key after them (L: none, no gap)
        while (next < L && !mrow[next * ms.l]) ++next;
        if (next < L) ranked_from[item] = lead / CHUNK;
      }
    });
  }
  auto ranked_of = [&](int64_t b, int64_t h) { return ranked_from.data() + (b * Hm + (Hm == 1 ? 0 : h)) * R; };
  auto ranked = [&](int64_t b, int64_t h, int64_t r) { return cp != nullptr && ranked_of(b, h)[r] < chunks; };
  // per (b, h, segment, row): m, l, acc[D]
  std::vector<float> part(static_cast<size_t>(B * H * segments * R * (D + 2)));
  auto part_at = [&](int64_t b, int64_t h, int64_t s, int64_t r) {
    return part.data() + (((b * H + h) * segments + s) * R + r) * (D + 2);
  };
  // 4. a row's result from its segments, in order (an empty one skipped); 0 for a row that sees no key
  auto finish = [&](int64_t b, int64_t h, int64_t r, float* acc) {
    float m = NEG_INF, l = 0.0f;
    for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
    for (int64_t s_idx = 0; s_idx < segments; ++s_idx) {
      const float* st = part_at(b, h, s_idx, r);
      if (st[1] == 0.0f) continue;
      const float m_new = m > st[0] ? m : st[0];
      const float a = m == NEG_INF ? 0.0f : exp_one(m - m_new);
      const float w = exp_one(st[0] - m_new);
      l = l * a + st[1] * w;
      for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * a + st[2 + d] * w;
      m = m_new;
    }
    T* orow = op + ((b * H + h) * R + r) * Dq;
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
    for (int64_t d = 0; d < Dq; ++d) orow[d] = static_cast<T>(acc[d] * inv);
  };

  at::parallel_for(0, B * H * segments * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<v16> kt(static_cast<size_t>(D * V)), vf(static_cast<size_t>(CHUNK * W));
    std::vector<float> qf(static_cast<size_t>(ROW_BLOCK * D)), scratch(static_cast<size_t>(D));
    bool seen[ROW_BLOCK][CHUNK];
    alignas(64) float bias[ROW_BLOCK][CHUNK];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t blk = item % blocks, s_idx = (item / blocks) % segments;
      const int64_t h = (item / blocks / segments) % H, b = item / blocks / segments / H;
      const int64_t r0 = blk * per, r1 = std::min(R, r0 + per);
      for (int64_t r = r0; r < r1; ++r) {
        const T* qrow = qp + b * qs.b + h * qs.h + r * qs.r;
        float* qd = qf.data() + (r - r0) * D;
        for (int64_t d = 0; d < D; ++d) qd[d] = d < Dq ? to_float(qrow[d]) * scale : 0.0f;
        float* st = part_at(b, h, s_idx, r);
        st[0] = NEG_INF;
        st[1] = 0.0f;
        for (int64_t d = 0; d < D; ++d) st[2 + d] = 0.0f;
      }
      const int64_t c0 = s_idx * SEGMENT, c1 = std::min(chunks, c0 + SEGMENT);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * CHUNK, n = std::min(CHUNK, L - j0);
        int64_t active[ROW_BLOCK], count = 0;
        bool full[ROW_BLOCK];
        const int64_t* from = cp != nullptr ? ranked_of(b, h) : nullptr;
        for (int64_t r = r0; r < r1; ++r) {
          if (from != nullptr && c >= from[r]) continue;  // its keys in rank order: step 5
          const bool* mrow = mp + b * ms.b + h * ms.h + r * ms.r + j0 * ms.l;
          uint8_t x[CHUNK];
          if (n == CHUNK && ms.l == 1) {
            std::memcpy(x, mrow, CHUNK);
          } else {
            for (int64_t j = 0; j < CHUNK; ++j) x[j] = j < n ? static_cast<uint8_t>(mrow[j * ms.l]) : 0;
          }
          uint8_t any = 0, all = 1;
          for (int64_t j = 0; j < CHUNK; ++j) {
            seen[r - r0][j] = x[j] != 0;
            bias[r - r0][j] = x[j] ? 0.0f : NEG_INF;
            any |= x[j];
            all &= x[j] | static_cast<uint8_t>(j >= n);
          }
          if (any) active[count++] = r;
          full[r - r0] = all != 0;
        }
        if (count == 0) continue;
        // this chunk's keys (transposed) and values in fp32, zeros past the end
        float* ktf = reinterpret_cast<float*>(kt.data());
        float* vff = reinterpret_cast<float*>(vf.data());
        if (ktp != nullptr && n == CHUNK) {
          for (int64_t d = 0; d < Dq; ++d) {
            const T* kd = ktp + b * kt_b + h * kt_h + d * kt_d + j0;
            for (int64_t j = 0; j < CHUNK; ++j) ktf[d * CHUNK + j] = to_float(kd[j]);
          }
          for (int64_t d = Dq; d < D; ++d)
            for (int64_t j = 0; j < CHUNK; ++j) ktf[d * CHUNK + j] = 0.0f;
        } else {
          for (int64_t j = 0; j < CHUNK; ++j) {
            const T* krow = kp + b * ks.b + h * ks.h + (j0 + j) * ks.l;
            for (int64_t d = 0; d < D; ++d) ktf[d * CHUNK + j] = j < n && d < Dq ? to_float(krow[d]) : 0.0f;
          }
        }
        for (int64_t j = 0; j < CHUNK; ++j) {
          const T* vrow = vp + b * vs.b + h * vs.h + (j0 + j) * vs.l;
          if (j < n) {
            for (int64_t d = 0; d < Dq; ++d) vff[j * D + d] = to_float(vrow[d]);
            for (int64_t d = Dq; d < D; ++d) vff[j * D + d] = 0.0f;
          } else {
            for (int64_t d = 0; d < D; ++d) vff[j * D + d] = 0.0f;
          }
        }
        for (int64_t a0 = 0; a0 < count; a0 += GROUP) {
          const float* qg[GROUP];
          const bool* sg[GROUP];
          const float* bg[GROUP];
          float* stg[GROUP];
          bool all_seen = true;
          const int g_n = static_cast<int>(std::min<int64_t>(GROUP, count - a0));
          for (int g = 0; g < g_n; ++g) {
            const int64_t r = active[a0 + g];
            qg[g] = qf.data() + (r - r0) * D;
            sg[g] = seen[r - r0];
            bg[g] = bias[r - r0];
            all_seen = all_seen && full[r - r0];
            stg[g] = part_at(b, h, s_idx, r);
          }
          rows_in_group(g_n, qg, sg, bg, all_seen, kt.data(), vf.data(), n, D, stg);
        }
      }
      if (segments == 1)  // nothing to merge: each row's result now, while its state is in cache
        for (int64_t r = r0; r < r1; ++r)
          if (!ranked(b, h, r)) finish(b, h, r, scratch.data());
    }
  });
  // 5. the rows in rank order, on the states the pass above left: row r's seen columns c_0 < c_1 < ... (n of
  // them) as virtual columns 0 .. n-1, virtual chunk vc (keys c_{64 vc} ..) into virtual segment vc / SEGMENT,
  // from its chunk f on (the ones before it ran above, on the same states, in order). The arithmetic is the
  // main path's for a cache holding exactly these keys at 0 .. n-1:
  //   - every virtual chunk holds m >= 1 keys, all seen, in the order of the columns; the buffers hold their
  //     keys (transposed) and values at lanes 0 .. m-1 and zeros past m, bias 0 below m and -inf from m on:
  //     what the main path builds for chunk vc of that cache (m = min(CHUNK, n - 64 vc)), whose last partial
  //     chunk has x[j] = 0 only for j >= m, where its `all` counts the lane as seen, so it too is `full`;
  //   - so both run rows_in_chunk with the same q, kt, vf, bias and n = m, and the weighted sum over j < m
  //     with nothing skipped (all_seen: the main path's nullptr branch, or its seen branch skipping no j < m);
  //     a row's scores, chunk max and lane sums are the same in a group of G rows as alone;
  //   - the chunks of a segment run in order on its state, and finish merges the segments in order, skipping
  //     the empty ones (virtual segments past the last one, and the main path's segments past its keys).
  // Rows of one (b, h) with the same f and the same seen columns from chunk f on (the query heads stacked on
  // one KV head, when the mask is one for all of them) share each virtual chunk's keys, up to GROUP at a time.
  struct Group { int64_t b, h, first, n; int64_t r[GROUP]; };
  std::vector<Group> groups;
  std::vector<char> taken(static_cast<size_t>(R));
  for (int64_t bh = 0; cp != nullptr && bh < B * H; ++bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t* from = ranked_of(b, h);
    std::fill(taken.begin(), taken.end(), 0);
    for (int64_t r = 0; r < R; ++r) {
      if (taken[r] || from[r] >= chunks) continue;
      Group grp{b, h, from[r], 1, {r}};
      const bool* m1 = mp + b * ms.b + h * ms.h + r * ms.r;
      for (int64_t r2 = r + 1; r2 < R && grp.n < GROUP; ++r2) {
        if (taken[r2] || from[r2] != from[r]) continue;
        const bool* m2 = mp + b * ms.b + h * ms.h + r2 * ms.r;
        int64_t j = from[r] * CHUNK;
        while (j < L && m1[j * ms.l] == m2[j * ms.l]) ++j;
        if (j == L) {
          taken[r2] = 1;
          grp.r[grp.n++] = r2;
        }
      }
      groups.push_back(grp);
    }
  }
  const int64_t n_groups = static_cast<int64_t>(groups.size());
  if (n_groups > 0) {
    at::parallel_for(0, n_groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<v16> kt(static_cast<size_t>(D * V)), vf(static_cast<size_t>(CHUNK * W));
      std::vector<float> qf(static_cast<size_t>(GROUP * D)), scratch(static_cast<size_t>(D));
      std::vector<int64_t> cols(static_cast<size_t>(L));
      bool seen[CHUNK];
      alignas(64) float bias[CHUNK];
      float* ktf = reinterpret_cast<float*>(kt.data());
      float* vff = reinterpret_cast<float*>(vf.data());
      for (int64_t item = begin; item < end; ++item) {
        const Group& grp = groups[item];
        const int64_t b = grp.b, h = grp.h, f = grp.first;
        const int g_n = static_cast<int>(grp.n);
        const bool* mrow = mp + b * ms.b + h * ms.h + grp.r[0] * ms.r;
        int64_t n = 0;  // the seen columns from chunk f on: ranks 64 f + 0, 1, ...
        for (int64_t j = f * CHUNK; j < L; ++j)
          if (mrow[j * ms.l]) cols[n++] = j;
        const float* qg[GROUP];
        const bool* sg[GROUP];
        const float* bg[GROUP];
        float* stg[GROUP];
        for (int g = 0; g < g_n; ++g) {
          const T* qrow = qp + b * qs.b + h * qs.h + grp.r[g] * qs.r;
          float* qd = qf.data() + g * D;
          for (int64_t d = 0; d < D; ++d) qd[d] = d < Dq ? to_float(qrow[d]) * scale : 0.0f;
          qg[g] = qd;
          sg[g] = seen;
          bg[g] = bias;
        }
        for (int64_t i = 0; i * CHUNK < n; ++i) {
          const int64_t j0 = i * CHUNK, m = std::min(CHUNK, n - j0), vc = f + i;
          for (int64_t j = 0; j < CHUNK; ++j) {
            const int64_t col = j < m ? cols[j0 + j] : 0;
            const T* krow = kp + b * ks.b + h * ks.h + col * ks.l;
            const T* vrow = vp + b * vs.b + h * vs.h + col * vs.l;
            for (int64_t d = 0; d < D; ++d) {
              ktf[d * CHUNK + j] = j < m && d < Dq ? to_float(krow[d]) : 0.0f;
              vff[j * D + d] = j < m && d < Dq ? to_float(vrow[d]) : 0.0f;
            }
            seen[j] = j < m;
            bias[j] = j < m ? 0.0f : NEG_INF;
          }
          for (int g = 0; g < g_n; ++g) stg[g] = part_at(b, h, vc / SEGMENT, grp.r[g]);
          rows_in_group(g_n, qg, sg, bg, true, kt.data(), vf.data(), m, D, stg);
        }
        for (int g = 0; g < g_n; ++g) finish(b, h, grp.r[g], scratch.data());
      }
    });
  }
  if (segments == 1) return;
  at::parallel_for(0, B * H * R, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(static_cast<size_t>(D));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / R / H, h = (item / R) % H, r = item % R;
      if (!ranked(b, h, r)) finish(b, h, r, acc.data());
    }
  });
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                     double scale, const c10::optional<at::Tensor>& keys_t,
                     const c10::optional<at::Tensor>& compact) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "q, k, v, mask must be 4-d");
  TORCH_CHECK(q.device().is_cpu(), "a CPU kernel");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v: one dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask: bool (True = attend)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "q, k, v: the last dim contiguous");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "k: [B, H, L, D]");
  TORCH_CHECK(v.sizes() == k.sizes(), "v: the shape of k");
  TORCH_CHECK(mask.size(0) == q.size(0) && (mask.size(1) == 1 || mask.size(1) == q.size(1)) &&
                  mask.size(2) == q.size(2) && mask.size(3) == k.size(2),
              "mask: [B, 1 or H, R, L]");
  if (keys_t.has_value()) {
    const at::Tensor& t = *keys_t;
    TORCH_CHECK(t.dim() == 4 && t.size(0) == k.size(0) && t.size(1) == k.size(1) && t.size(2) == k.size(3) &&
                    t.size(3) == k.size(2) && t.stride(3) == 1 && t.scalar_type() == k.scalar_type(),
                "keys_t: k transposed, [B, H, D, L], the last dim contiguous");
  }
  if (compact.has_value()) {
    const at::Tensor& c = *compact;
    const int64_t cd = c.dim();
    TORCH_CHECK(c.scalar_type() == at::kBool && c.device().is_cpu() && cd <= 2 &&
                    (cd < 1 || c.size(cd - 1) == 1 || c.size(cd - 1) == q.size(2)) &&
                    (cd < 2 || c.size(0) == 1 || c.size(0) == q.size(0)),
                "compact: bool, broadcastable to [B, R]");
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), q.size(3)}, q.options());
  switch (q.scalar_type()) {
    case at::kFloat: run<float>(q, k, v, mask, scale, keys_t, compact, out); break;
    case at::kBFloat16: run<c10::BFloat16>(q, k, v, mask, scale, keys_t, compact, out); break;
    case at::kHalf: run<c10::Half>(q, k, v, mask, scale, keys_t, compact, out); break;
    default: TORCH_CHECK(false, "dtype: float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(ar2dlm_native, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale, Tensor? keys_t=None, "
        "Tensor? compact=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(ar2dlm_native, CPU, m) {
  m.impl("attention", &attention);
}
