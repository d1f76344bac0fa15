// Fused forward of the V4 core attention for inference (no autograd): for each query, its raw window
// band plus its entries (the indexer's top-k ids, or every causally complete entry), one softmax with
// the per-head sink, read straight from the key arrays -- no gathered copy, no logits tensor.
//
//   o_th = sum_{s in keys(t)} p_ths k_s,   p_th. = softmax({scale q_th . k_s} U {z_h}),  z_h in the
//   denominator only (the sink).  K = V (MQA: one kv head shared by the H query heads).
//
// The reference twin is dsv4.kernels.sparse_attention (the PyTorch chunked kernels); tests compare them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));

static inline float hsum(v16 a) {
  v8 lo = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7);
  v8 hi = __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  v8 b = lo + hi;
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += b[i];
  return s;
}

typedef int32_t v16i __attribute__((vector_size(64)));

// e^x for x <= 0 (softmax terms), 16 lanes: 2^n * 2^f, n = round(x log2 e), |f| <= 1/2, degree-6
// polynomial of 2^f (relative error ~2e-7); x below -87 gives 0.
static inline v16 vexp(v16 x) {
  const v16 lo = v16{} - 87.0f;
  v16 t = (x < lo ? lo : x) * 1.4426950408889634f;
  v16i n = __builtin_convertvector(t + (t < 0 ? v16{} - 0.5f : v16{} + 0.5f), v16i);
  v16 f = t - __builtin_convertvector(n, v16);
  v16 p = v16{} + 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  v16i bits = (n + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, 64);
  v16 r = p * scale;
  return x < lo ? v16{} : r;
}

typedef float v4 __attribute__((vector_size(16)));

// the lane sums of 4 vectors at once (a transposing add tree instead of 4 separate reductions)
static inline void hsum4(const v16* a, float* out) {
  v8 x[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    x[i] = __builtin_shufflevector(a[i], a[i], 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(a[i], a[i], 8, 9, 10, 11, 12, 13, 14, 15);
  v8 ab = __builtin_shufflevector(x[0], x[1], 0, 1, 2, 3, 8, 9, 10, 11) +
          __builtin_shufflevector(x[0], x[1], 4, 5, 6, 7, 12, 13, 14, 15);
  v8 cd = __builtin_shufflevector(x[2], x[3], 0, 1, 2, 3, 8, 9, 10, 11) +
          __builtin_shufflevector(x[2], x[3], 4, 5, 6, 7, 12, 13, 14, 15);
  v8 g = __builtin_shufflevector(ab, cd, 0, 1, 4, 5, 8, 9, 12, 13) +
         __builtin_shufflevector(ab, cd, 2, 3, 6, 7, 10, 11, 14, 15);
  v4 h = __builtin_shufflevector(g, g, 0, 2, 4, 6) + __builtin_shufflevector(g, g, 1, 3, 5, 7);
  std::memcpy(out, &h, 16);
}

// Logits of one key for the query's heads, with the D dims in 16-lane vectors (H % 4 == 0, D % 16 == 0):
// the key row is read once per group of 4 heads; fixed trip counts keep the accumulators in registers.
static inline void logits_v16(const float* q, const float* key, int64_t H, int64_t D, float sc, float* lg,
                              int64_t stride) {
  for (int64_t h0 = 0; h0 < H; h0 += 4) {
    v16 acc[4] = {v16{}, v16{}, v16{}, v16{}};
    for (int64_t c = 0; c < D; c += 16) {
      v16 k;
      std::memcpy(&k, key + c, 64);
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) {
        v16 qv;
        std::memcpy(&qv, q + (h0 + h) * D + c, 64);
        acc[h] += qv * k;
      }
    }
    float out4[4];
    hsum4(acc, out4);
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) lg[(h0 + h) * stride] = sc * out4[h];
  }
}

// o_h += p_hj k_j for the 4 heads of p (rows of pstride) over n keys (key_of(j) -> its D floats), D % 16 == 0:
// 4 heads x 64 dims of accumulators held in registers over the keys, then 16-dim blocks for the rest.
// Writes (does not add to) out [4, D] (rows of ostride).
template <typename KeyOf>
static inline void pv_4heads(const float* p, int64_t pstride, KeyOf key_of, int64_t n, int64_t D, float* out,
                             int64_t ostride) {
  int64_t c0 = 0;
  for (; c0 + 64 <= D; c0 += 64) {
    v16 a[4][4] = {};
    for (int64_t j = 0; j < n; ++j) {
      v16 k[4];
      std::memcpy(k, key_of(j) + c0, 256);
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) {
        const float pj = p[h * pstride + j];
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) a[h][c] += pj * k[c];
      }
    }
    for (int h = 0; h < 4; ++h) std::memcpy(out + h * ostride + c0, a[h], 256);
  }
  for (; c0 < D; c0 += 16) {
    v16 a[4] = {};
    for (int64_t j = 0; j < n; ++j) {
      v16 k;
      std::memcpy(&k, key_of(j) + c0, 64);
#pragma GCC unroll 4
      for (int h = 0; h < 4; ++h) a[h] += p[h * pstride + j] * k;
    }
    for (int h = 0; h < 4; ++h) std::memcpy(out + h * ostride + c0, &a[h], 64);
  }
}

// plain loops: `omp simd` vectorises them for the build's -march=native
static inline float dot(const float* __restrict a, const float* __restrict b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

static inline void axpy(float p, const float* __restrict x, float* __restrict y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += p * x[i];
}

// q [B,T,H,D]; kv [B,S,D] at kv_pos [S] (increasing); entries [B,N,D] (may be empty);
// idx [B,T,K] int64 (-1 = none) when sparse, else entries visible iff j < (q_pos + 1 - excl) div ratio;
// sink [H]. All float32 contiguous. Returns o [B,T,H,D].
torch::Tensor v4_attention_fwd(torch::Tensor q, torch::Tensor kv, torch::Tensor kv_pos, torch::Tensor q_pos,
                               torch::Tensor entries, torch::Tensor idx, torch::Tensor sink, double scale,
                               int64_t window, int64_t ratio, int64_t exclude_window, bool sparse) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S = kv.size(1), N = entries.numel() ? entries.size(1) : 0;
  const int64_t K = sparse ? idx.size(2) : 0;
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  const float* ep = N ? entries.data_ptr<float>() : nullptr;
  const int64_t* ip = sparse ? idx.data_ptr<int64_t>() : nullptr;
  const int64_t* kpos = kv_pos.data_ptr<int64_t>();
  const int64_t* qpos = q_pos.data_ptr<int64_t>();
  const float* zp = sink.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const bool vec = D % 16 == 0 && H % 4 == 0;  // V3.2's absorbed rows: 576 (and the tiny preset's 80)
  at::parallel_for(0, B * T, 8, [&](int64_t r0, int64_t r1) {
    std::vector<const float*> keys;
    std::vector<float> logit;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / T, t = r % T, pos = qpos[t];
      keys.clear();
      const int64_t lo = std::lower_bound(kpos, kpos + S, pos - window + 1) - kpos;
      const int64_t hi = std::upper_bound(kpos, kpos + S, pos) - kpos;
      for (int64_t s = lo; s < hi; ++s) keys.push_back(kvp + (b * S + s) * D);
      if (sparse) {
        const int64_t* row = ip + (b * T + t) * K;
        for (int64_t i = 0; i < K; ++i)
          if (row[i] >= 0) keys.push_back(ep + (b * N + row[i]) * D);
      } else if (N) {
        int64_t n = (pos + 1 - exclude_window);
        n = n < 0 ? 0 : std::min<int64_t>(n / ratio, N);
        for (int64_t j = 0; j < n; ++j) keys.push_back(ep + (b * N + j) * D);
      }
      const int64_t L = keys.size();
      logit.resize(H * L);
      const float* qr = qp + r * H * D;
      for (int64_t j = 0; j < L; ++j) {
        if (j + 24 < L)   // gathered rows: fetch ahead, the hardware cannot guess them
          for (int64_t i = 0; i < D; i += 16) __builtin_prefetch(keys[j + 24] + i);
        if (vec)
          logits_v16(qr, keys[j], H, D, sc, logit.data() + j, L);
        else
          for (int64_t h = 0; h < H; ++h) logit[h * L + j] = sc * dot(qr + h * D, keys[j], D);
      }
      float* orow = op + r * H * D;
      std::fill(orow, orow + H * D, 0.f);
      float inv[64];
      for (int64_t h = 0; h < H; ++h) {   // softmax with the sink: logits -> unnormalised p in place
        float* lg = logit.data() + h * L;
        float m = zp[h];
        {
          int64_t j = 0;
          v16 mv = v16{} + m;
          for (; j + 16 <= L; j += 16) {
            v16 x;
            std::memcpy(&x, lg + j, 64);
            mv = x > mv ? x : mv;
          }
          for (int i = 0; i < 16; ++i) m = std::max(m, mv[i]);
          for (; j < L; ++j) m = std::max(m, lg[j]);
        }
        float den = std::exp(zp[h] - m);
        int64_t j = 0;
        v16 dv{};
        for (; j + 16 <= L; j += 16) {
          v16 x;
          std::memcpy(&x, lg + j, 64);
          x = vexp(x - m);
          dv += x;
          std::memcpy(lg + j, &x, 64);
        }
        den += hsum(dv);
        for (; j < L; ++j) {
          lg[j] = std::exp(lg[j] - m);
          den += lg[j];
        }
        if (h < 64) {
          inv[h] = 1.f / den;
        } else {   // (past 64 heads: normalise the probabilities themselves)
          for (int64_t j = 0; j < L; ++j) lg[j] /= den;
        }
      }
      if (vec) {   // o_h += p_hj k_j, 4 heads at a time
        for (int64_t h0 = 0; h0 < H; h0 += 4)
          pv_4heads(logit.data() + h0 * L, L, [&](int64_t j) { return keys[j]; }, L, D, orow + h0 * D, D);
      } else {
        for (int64_t h = 0; h < H; ++h)
          for (int64_t j = 0; j < L; ++j) axpy(logit[h * L + j], keys[j], orow + h * D, D);
      }
      for (int64_t h = 0; h < std::min<int64_t>(H, 64); ++h)
        for (int64_t i = 0; i < D; ++i) orow[h * D + i] *= inv[h];
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Lightning-indexer top-k for inference, fused: Score(t, s) = sum_j w_tj ReLU(q_tj . k_s) is computed
// for 16 keys x QB queries at a time from keys stored in blocks of 16 ([N/16, c, 16], zero-padded), and
// each query keeps its best keys in a small buffer pruned by a running threshold, so no [T, N] score
// block is ever written. Selection order: score descending, then position ascending, via one distinct
// int64 key per entry (order-preserving int32 of the score << 32 | 2^32 - 1 - position). The selected
// ids come out in ascending position. Entry s is visible to query t iff
// s < (q_pos[t] + 1 - exclude_window) div ratio. Reference twin: dsv4.kernels.indexer_topk.
static constexpr int QB = 8;
static constexpr int64_t LOW = (int64_t(1) << 32) - 1;

static inline int64_t make_key(float score, int64_t pos) {
  float v = score + 0.0f;  // -0.0 -> +0.0
  int32_t i;
  std::memcpy(&i, &v, 4);
  int32_t o = i < 0 ? (i ^ 0x7FFFFFFF) : i;
  return (int64_t(o) << 32) | (LOW - pos);
}

// Exact top-kk of one query's stored scores sc[0..L) (kk < L): a threshold from a strided sample of
// ~1024 scores, chosen a little below the expected kk-th value, keeps ~kk + O(sqrt kk) candidates in one
// pass; their distinct keys are then partitioned exactly. If fewer than kk pass (unlikely), the
// threshold drops to -inf. Writes the ids in ascending position.
static void select_row(const float* sc, int64_t L, int64_t kk, std::vector<float>& sample,
                       std::vector<int64_t>& buf, std::vector<uint64_t>& bits, int64_t* out) {
  const int64_t stride = std::max<int64_t>(1, L / 1024);
  sample.clear();
  for (int64_t i = 0; i < L; i += stride) sample.push_back(sc[i]);
  const int64_t m = sample.size();
  const double r = double(kk) * m / L;
  const int64_t rank = std::min<int64_t>(m - 1, int64_t(r + 4.0 * std::sqrt(r) + 8.0));
  std::nth_element(sample.begin(), sample.begin() + rank, sample.end(), std::greater<float>());
  float thr = sample[rank];
  for (int attempt = 0; attempt < 2; ++attempt) {
    buf.clear();
    for (int64_t i = 0; i < L; ++i)
      if (sc[i] >= thr) buf.push_back(make_key(sc[i], i));
    if ((int64_t)buf.size() >= kk) break;
    thr = -INFINITY;
  }
  std::nth_element(buf.begin(), buf.begin() + (kk - 1), buf.end(), std::greater<int64_t>());
  bits.assign((L + 63) / 64, 0);
  for (int64_t j = 0; j < kk; ++j) {
    const int64_t p = LOW - (buf[j] & LOW);
    bits[p >> 6] |= uint64_t(1) << (p & 63);
  }
  int64_t i = 0;
  for (int64_t w = 0; w < (int64_t)bits.size(); ++w)
    for (uint64_t x = bits[w]; x; x &= x - 1) out[i++] = w * 64 + __builtin_ctzll(x);
}

// q [B,T,n,c], w [B,T,n], keys_b [B,N/16,c,16] (zero-padded), q_pos [T] -> ids [B,T,min(k,N)].
torch::Tensor indexer_topk_fwd(torch::Tensor q, torch::Tensor w, torch::Tensor keys_b, int64_t n_keys,
                               torch::Tensor q_pos, int64_t k, int64_t ratio, int64_t exclude_window) {
  const int64_t B = q.size(0), T = q.size(1), NH = q.size(2), C = q.size(3), NB = keys_b.size(1);
  const int64_t N = n_keys, KK = std::min(k, N);
  auto out = torch::full({B, T, KK}, -1, q.options().dtype(torch::kLong));
  if (KK == 0 || T == 0) return out;
  const float* qp = q.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* kp = keys_b.data_ptr<float>();
  const int64_t* pp = q_pos.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t tiles = (T + QB - 1) / QB;
  at::parallel_for(0, B * tiles, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> scores, sample;
    std::vector<int64_t> buf;
    std::vector<uint64_t> bits;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / tiles, t0 = (r % tiles) * QB, nq = std::min<int64_t>(QB, T - t0);
      int64_t lim[QB];
      int64_t top = 0;
      const float* qrow[QB];
      const float* wrow[QB];
      for (int qq = 0; qq < QB; ++qq) {
        const int64_t t = std::min<int64_t>(t0 + qq, T - 1);   // padded queries repeat the last one
        qrow[qq] = qp + (b * T + t) * NH * C;
        wrow[qq] = wp + (b * T + t) * NH;
        int64_t l = 0;
        if (qq < nq) {
          l = pp[t] + 1 - exclude_window;
          l = l < 0 ? 0 : std::min<int64_t>(l / ratio, N);
        }
        lim[qq] = l;
        top = std::max(top, l);
      }
      const int64_t width = (top + 15) / 16 * 16;
      scores.resize(QB * width);
      for (int64_t s0 = 0; s0 < top; s0 += 16) {
        const float* kc = kp + (b * NB + s0 / 16) * C * 16;
        v16 score[QB];
#pragma GCC unroll 8
        for (int qq = 0; qq < QB; ++qq) score[qq] = v16{};
        for (int64_t h = 0; h < NH; ++h) {
          v16 acc[QB];
#pragma GCC unroll 8
          for (int qq = 0; qq < QB; ++qq) acc[qq] = v16{};
          for (int64_t i = 0; i < C; ++i) {
            v16 kv;
            std::memcpy(&kv, kc + i * 16, 64);
#pragma GCC unroll 8
            for (int qq = 0; qq < QB; ++qq) acc[qq] += qrow[qq][h * C + i] * kv;
          }
          const v16 zero{};
#pragma GCC unroll 8
          for (int qq = 0; qq < QB; ++qq) score[qq] += wrow[qq][h] * (acc[qq] > zero ? acc[qq] : zero);
        }
#pragma GCC unroll 8
        for (int qq = 0; qq < QB; ++qq) std::memcpy(scores.data() + qq * width + s0, &score[qq], 64);
      }
      for (int qq = 0; qq < nq; ++qq) {
        int64_t* o = op + (b * T + t0 + qq) * KK;
        const float* sc = scores.data() + qq * width;
        const int64_t L = lim[qq];
        if (L <= KK) {   // every visible entry, then -1 padding
          for (int64_t i = 0; i < L; ++i) o[i] = i;
          for (int64_t i = L; i < KK; ++i) o[i] = -1;
        } else {
          select_row(sc, L, KK, sample, buf, bits, o);
        }
      }
    }
  });
  return out;
}

// One decode query per row, keys read in place: q [B,n,c], w [B,n], keys [B,N,c] (rows of c contiguous,
// any row stride), lim [B] = visible entries of each row -> (ids [B,min(k,N)] in ascending position, 0
// where none; valid [B,min(k,N)] bool). Scores go to a [B, N] buffer in key ranges split over the threads (each key row is read once,
// for all heads), then each row selects exactly as indexer_topk_fwd does.
std::vector<torch::Tensor> indexer_decode_topk(torch::Tensor q, torch::Tensor w, torch::Tensor keys,
                                               torch::Tensor lim, int64_t k) {
  const int64_t B = q.size(0), NH = q.size(1), C = q.size(2), N = keys.size(1), KK = std::min(k, N);
  TORCH_CHECK(keys.stride(2) == 1 && keys.stride(1) == C, "indexer keys: rows of c contiguous floats expected");
  auto out = torch::zeros({B, KK}, q.options().dtype(torch::kLong));
  auto valid = torch::zeros({B, KK}, q.options().dtype(torch::kBool));
  if (KK == 0 || B == 0) return {out, valid};
  const float* qp = q.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const int64_t kstride = keys.stride(0);
  const int64_t* lp = lim.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  std::vector<int64_t> L(B);
  int64_t top = 0;
  for (int64_t b = 0; b < B; ++b) {
    L[b] = std::max<int64_t>(0, std::min<int64_t>(lp[b], N));
    top = std::max(top, L[b]);
  }
  const bool vec = C % 16 == 0 && NH % 4 == 0 && NH <= 256;
  std::vector<float> scores(B * top);
  constexpr int64_t KB = 2048;
  const int64_t blocks = (top + KB - 1) / KB;
  // a thread takes at least 4 blocks (8K keys): fewer keys are faster on one thread than waking another
  at::parallel_for(0, B * blocks, 4, [&](int64_t r0, int64_t r1) {
    float dots[256];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / blocks, s0 = (r % blocks) * KB, s1 = std::min(s0 + KB, L[b]);
      const float* qb = qp + b * NH * C;
      const float* wb = wp + b * NH;
      for (int64_t s = s0; s < s1; ++s) {
        const float* key = kp + b * kstride + s * C;
        float sc = 0.f;
        if (vec) {
          logits_v16(qb, key, NH, C, 1.0f, dots, 1);
          for (int64_t h = 0; h < NH; ++h) sc += wb[h] * std::max(dots[h], 0.f);
        } else {
          for (int64_t h = 0; h < NH; ++h) sc += wb[h] * std::max(dot(qb + h * C, key, C), 0.f);
        }
        scores[b * top + s] = sc;
      }
    }
  });
  bool* vp = valid.data_ptr<bool>();
  at::parallel_for(0, B, B * top < (int64_t(1) << 16) ? B : 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> sample;
    std::vector<int64_t> buf;
    std::vector<uint64_t> bits;
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* o = op + b * KK;
      if (L[b] <= KK) {
        for (int64_t i = 0; i < L[b]; ++i) o[i] = i;
      } else {
        select_row(scores.data() + b * top, L[b], KK, sample, buf, bits, o);
      }
      for (int64_t i = 0; i < std::min(L[b], KK); ++i) vp[b * KK + i] = true;
    }
  });
  return {out, valid};
}

// One decode query per row over one part of its keys, as partial softmax statistics (flash decoding):
// q [B,H,D], keys [B,L,D] (rows of D contiguous, any row stride), valid [B,L] (uint8), scale ->
// acc [B,H,D] = sum_l e^(scale q.k_l - m) k_l, m [B,H] = max_l scale q.k_l (-inf: no valid key),
// den [B,H] = sum_l e^(scale q.k_l - m), over the valid keys. Key chunks are split over the threads and
// merged here; the caller merges the parts and the sink (dsv4.kernels.decode_attention).
std::vector<torch::Tensor> decode_attention_part(torch::Tensor q, torch::Tensor keys, torch::Tensor valid,
                                                 double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), L = keys.size(1);
  TORCH_CHECK(keys.stride(2) == 1 && keys.stride(1) == D, "decode keys: rows of D contiguous floats expected");
  constexpr int64_t CH = 512;
  const int64_t chunks = std::max<int64_t>(1, (L + CH - 1) / CH);
  // per chunk: acc [H, D], m [H], den [H]
  std::vector<float> pacc(B * chunks * H * D, 0.f), pm(B * chunks * H, -INFINITY), pden(B * chunks * H, 0.f);
  const float* qp = q.data_ptr<float>();
  const float* kp = keys.data_ptr<float>();
  const uint8_t* vp = valid.data_ptr<uint8_t>();
  const int64_t ks = keys.stride(0);
  const bool vec = D % 16 == 0 && H % 4 == 0;
  const float sc = float(scale);
  at::parallel_for(0, B * chunks, 16, [&](int64_t r0, int64_t r1) {  // >= 8K keys per thread
    std::vector<float> lg(CH * H);
    std::vector<int64_t> rows(CH);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / chunks, l0 = (r % chunks) * CH, l1 = std::min(l0 + CH, L);
      const float* qb = qp + b * H * D;
      int64_t n = 0;
      for (int64_t l = l0; l < l1; ++l)
        if (vp[b * L + l]) rows[n++] = l;
      if (n == 0) continue;
      float* m = pm.data() + r * H;
      float* den = pden.data() + r * H;
      float* acc = pacc.data() + r * H * D;
      for (int64_t j = 0; j < n; ++j) {
        const float* key = kp + b * ks + rows[j] * D;
        if (vec) {
          logits_v16(qb, key, H, D, sc, lg.data() + j, n);
        } else {
          for (int64_t h = 0; h < H; ++h) lg[h * n + j] = sc * dot(qb + h * D, key, D);
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float* x = lg.data() + h * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, x[j]);
        float s = 0.f;
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
          v16 v;
          std::memcpy(&v, x + j, 64);
          v = vexp(v - mx);
          std::memcpy(x + j, &v, 64);
          s += hsum(v);
        }
        for (; j < n; ++j) {
          x[j] = std::exp(x[j] - mx);
          s += x[j];
        }
        m[h] = mx;
        den[h] = s;
      }
      if (vec) {  // o_h += p_hj k_j, 4 heads at a time
        const float* kb = kp + b * ks;
        for (int64_t h0 = 0; h0 < H; h0 += 4)
          pv_4heads(lg.data() + h0 * n, n, [&](int64_t j) { return kb + rows[j] * D; }, n, D, acc + h0 * D, D);
      } else {
        for (int64_t j = 0; j < n; ++j) {
          const float* key = kp + b * ks + rows[j] * D;
          for (int64_t h = 0; h < H; ++h) axpy(lg[h * n + j], key, acc + h * D, D);
        }
      }
    }
  });
  auto opt = q.options().dtype(torch::kFloat);
  auto acc = torch::zeros({B, H, D}, opt), m = torch::full({B, H}, -INFINITY, opt), den = torch::zeros({B, H}, opt);
  float* ap = acc.data_ptr<float>();
  float* mp = m.data_ptr<float>();
  float* dp = den.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      float mx = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, pm[(b * chunks + c) * H + h]);
      if (mx == -INFINITY) continue;
      float d = 0.f;
      float* o = ap + (b * H + h) * D;
      for (int64_t c = 0; c < chunks; ++c) {
        const float mc = pm[(b * chunks + c) * H + h];
        if (mc == -INFINITY) continue;
        const float f = std::exp(mc - mx);
        d += f * pden[(b * chunks + c) * H + h];
        axpy(f, pacc.data() + ((b * chunks + c) * H + h) * D, o, D);
      }
      mp[b * H + h] = mx;
      dp[b * H + h] = d;
    }
  return {acc, m, den};
}

torch::Tensor mxfp4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale);  // mxfp4.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("indexer_topk_fwd", &indexer_topk_fwd, "lightning indexer top-k ids (fused score + selection)");
  m.def("indexer_decode_topk", &indexer_decode_topk, "lightning indexer top-k of one decode query per row");
  m.def("decode_attention_part", &decode_attention_part, "partial softmax attention of one decode query per row");
  m.def("mxfp4_linear", &mxfp4_linear, "x W^T with W in MXFP4 (packed codes + e8m0 scales)");
  m.def("v4_attention_fwd", &v4_attention_fwd, "V4 core attention forward (window band + entries, sink)");
}
