// MXFP4 matrix products read straight from the packed codes (no dequantised copy of the weight):
//   y[n, r] = sum_j x[n, j] W[r, j],  W[r, j] = e2m1(nibble(r, j)) * 2^(e[r, j / 32] - 127)
// with two e2m1 codes per byte (LOW nibble = even j) and one e8m0 scale per 32 values, the format of
// dsv4.quant.formats. Each 16-byte block is decoded once by a 16-entry table lookup into two 16-lane
// vectors (even and odd elements), scaled (exact: a power of two), and used for every row of x.
// The reference twin is dequant_mxfp4 + F.linear (dsv4.quant.execution); tests compare them.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint8_t u16v __attribute__((vector_size(16)));

static inline float hsum16(f16v a) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += a[i];
  return s;
}

// x [N, in] fp32, packed [out, in/2] uint8, scale [out, in/32] uint8 (e8m0 bits) -> y [N, out] fp32
torch::Tensor mxfp4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale) {
  const int64_t N = x.size(0), IN = x.size(1), OUT = packed.size(0), NB = IN / 32;
  TORCH_CHECK(IN % 32 == 0 && packed.size(1) == IN / 2 && scale.size(0) == OUT && scale.size(1) == NB,
              "mxfp4_linear: shapes do not fit the MXFP4 layout");
  auto y = torch::empty({N, OUT}, x.options());
  if (N == 0 || OUT == 0) return y;
  // x de-interleaved per block: [N, NB, 2, 16] (even elements, then odd ones)
  std::vector<float> xd(N * IN);
  const float* xp = x.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < NB; ++b)
      for (int i = 0; i < 16; ++i) {
        xd[(n * NB + b) * 32 + i] = xp[n * IN + b * 32 + 2 * i];
        xd[(n * NB + b) * 32 + 16 + i] = xp[n * IN + b * 32 + 2 * i + 1];
      }
  float pow2[256];
  for (int e = 0; e < 256; ++e) pow2[e] = e == 255 ? NAN : std::ldexp(1.0f, e - 127);
  const f16v lut = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f, -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const uint8_t* sp = scale.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  constexpr int64_t NR = 16;  // rows of x per pass: their accumulators stay in registers
  at::parallel_for(0, OUT, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t n0 = 0; n0 < N; n0 += NR) {
        const int64_t nn = std::min(NR, N - n0);
        f16v acc[NR];
        for (int64_t n = 0; n < NR; ++n) acc[n] = f16v{};
        for (int64_t b = 0; b < NB; ++b) {
          u16v bytes;
          std::memcpy(&bytes, wp + r * (IN / 2) + b * 16, 16);
          const i16v code = __builtin_convertvector(bytes, i16v);
          const float s = pow2[sp[r * NB + b]];
          const f16v even = __builtin_shuffle(lut, code & 15) * s;
          const f16v odd = __builtin_shuffle(lut, code >> 4) * s;
          for (int64_t n = 0; n < nn; ++n) {
            const float* xb = xd.data() + ((n0 + n) * NB + b) * 32;
            f16v xe, xo;
            std::memcpy(&xe, xb, 64);
            std::memcpy(&xo, xb + 16, 64);
            acc[n] += even * xe + odd * xo;
          }
        }
        for (int64_t n = 0; n < nn; ++n) yp[(n0 + n) * OUT + r] = hsum16(acc[n]);
      }
    }
  });
  return y;
}
