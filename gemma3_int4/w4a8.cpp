// int4 weights x int8 activations on the CPU: llama.cpp's arithmetic (its Q4_0 x Q8_0 dot product) as one
// PyTorch op, gemma::w4a8_linear(x, int4_data, scales, zeros) -> y = x @ W.T, for x (M, K) bf16 or float32, y in
// x's dtype; and its twin
// for int8 weights with one scale per row (llama.cpp's Q8_0 x Q8_0, near enough), gemma::w8a8_linear.
//
// Why: a token's matmuls are a weight-streaming job. PyTorch's int4 kernel unpacks every weight to float32
// and spends a float FMA on it; here each weight stays a 4-bit integer and meets an 8-bit integer activation,
// and one AVX2 instruction (vpmaddubsw) multiplies 32 byte pairs. The cost: the activations are rounded to
// int8, per group of 32 with a float scale, as llama.cpp rounds them.
//
// The arithmetic, which w4a8.py's reference computes the same way in plain PyTorch, bit for bit:
//   1. each row of x, per group g of 32: d[g] = max|x| / 127, xq = round_half_even(x * (1 / d[g])) in
//      [-127, 127], and xsum[g] = sum of xq;
//   2. for each output n and group g, the exact integer dot product isum = sum over the group of q * xq, with
//      q in [-8, 7] the weight's int4 value;
//   3. in float32, one rounding per operation (no FMA: built with -ffp-contract=off),
//      t = (float(isum) * scale[n, g] + float(xsum[g]) * zero[n, g]) * d[g]   (the zero term only with zeros);
//   4. y[n] = (t over the even groups, summed in order) + (t over the odd groups, summed in order).
// The weights are read as they are stored (quant.py's layout: int4_data (N, K/2), element 2j in the low
// nibble of byte j, bf16 scales and zeros (N, K/32)): no repacked copy.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>

namespace {

constexpr int64_t GROUP = 32;

// Step 1 for one row of K floats. For int4 weights (interleave) each pair of groups is stored as the 16 even
// elements of group g, the 16 even ones of g + 1, then their odd elements alike: the order in which a pair of
// groups' weight bytes unpack into low nibbles and high nibbles. A last, unpaired group is its 16 even elements,
// then its 16 odd ones. For int8 weights, the natural order.
template <typename T>  // float or at::BFloat16 (read as the float32 it is)
void quantize_row(const T* x, int64_t K, int8_t* xq, float* d, int32_t* xsum, bool interleave) {
  const int64_t G = K / GROUP;
  for (int64_t g = 0; g < G; g++) {
    float v[GROUP];
    for (int64_t i = 0; i < GROUP; i++) v[i] = static_cast<float>(x[g * GROUP + i]);
    float amax = 0.0f;
    for (int64_t i = 0; i < GROUP; i++) amax = std::fmax(amax, std::fabs(v[i]));
    d[g] = amax / 127.0f;
    const float id = d[g] != 0.0f ? 1.0f / d[g] : 0.0f;
    const bool paired = g + 1 < G || g % 2 == 1;  // the last group is unpaired when G is odd
    const int64_t base = g / 2 * 2 * GROUP, half = paired ? 2 * 16 : 16, offset = paired ? g % 2 * 16 : 0;
    int32_t sum = 0;
    for (int64_t i = 0; i < GROUP; i++) {
      const int8_t q = static_cast<int8_t>(std::nearbyint(v[i] * id));  // round half to even, as torch.round
      xq[interleave ? base + i % 2 * half + offset + i / 2 : g * GROUP + i] = q;
      sum += q;
    }
    xsum[g] = sum;
  }
}

// Step 1 for every row of x (M, K): xq (M, K) int8, d (M, K/32) float32, xsum (M, K/32) int32.
struct Activations {
  at::Tensor q, d, sum;
};

Activations quantize_rows(const at::Tensor& x, bool interleave) {
  const int64_t M = x.size(0), K = x.size(1), G = K / GROUP;
  Activations a{at::empty({M, K}, x.options().dtype(at::kChar)), at::empty({M, G}, x.options().dtype(at::kFloat)),
                at::empty({M, G}, x.options().dtype(at::kInt))};
  int8_t* q = a.q.data_ptr<int8_t>();
  float* d = a.d.data_ptr<float>();
  int32_t* sum = a.sum.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; m++) {
      if (x.scalar_type() == at::kBFloat16)
        quantize_row(x.data_ptr<at::BFloat16>() + m * K, K, q + m * K, d + m * G, sum + m * G, interleave);
      else
        quantize_row(x.data_ptr<float>() + m * K, K, q + m * K, d + m * G, sum + m * G, interleave);
    }
  });
  return a;
}

// y[i] = v in y's dtype: float32, or bf16 rounded to nearest even (as torch's .to(torch.bfloat16) rounds)
inline void put(void* y, bool bf16, int64_t i, float v) {
  if (bf16) static_cast<at::BFloat16*>(y)[i] = at::BFloat16(v);
  else static_cast<float*>(y)[i] = v;
}

void check_input(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && w.scalar_type() == at::kChar, op, ": shapes");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, op, ": x must be bf16 or float32");
  TORCH_CHECK(x.size(1) % GROUP == 0, op, ": K must be a multiple of 32");
}

// 8 bf16 -> the float32 of 4 scales of group g (low half) and of group g + 1 (high half), from the pairs (g, g+1)
// of 4 rows: each bf16 is the top half of its float32.
inline __m256 bf16_pairs(const at::BFloat16* const* rows, int64_t g) {
  int32_t pair[4];
  for (int r = 0; r < 4; r++) std::memcpy(&pair[r], rows[r] + g, 4);
  const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pair));
  const __m128 even = _mm_castsi128_ps(_mm_slli_epi32(p, 16));
  const __m128 odd = _mm_castsi128_ps(_mm_and_si128(p, _mm_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
  return _mm256_set_m128(odd, even);
}

inline __m128 bf16_column(const at::BFloat16* const* rows, int64_t g) {  // the 4 rows' values of one group g
  int32_t v[4];
  for (int r = 0; r < 4; r++) v[r] = static_cast<int32_t>(rows[r][g].x) << 16;
  return _mm_castsi128_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
}

// Steps 2-4 for 4 weight rows and R quantized activation rows (R = 1 when decoding; up to 4 at a time in a
// prefill, which unpacks each weight byte once for all of them) -> out[j * 4 + r]. The float accumulators' lanes are
// (row 0..3 of the even groups | row 0..3 of the odd groups).
template <int R>
void dot4(const uint8_t* const* w, const at::BFloat16* const* s, const at::BFloat16* const* z,
          const int8_t* const* xq, const float* const* d, const int32_t* const* xsum, int64_t G, float* out) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  // Our nibbles are two's complement; flipping each one's top bit gives u = q + 8 in 0..15, an unsigned byte
  // for vpmaddubsw (u * xq summed in pairs never saturates int16: 2 * 15 * 127 < 32767). The 8 * xsum this
  // adds to each group's dot product is taken back in integers.
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x88));
  const int64_t ahead = 8 * G * 16;  // bytes from a row to the same row two blocks of 4 on
  __m256 acc[R];
  for (int j = 0; j < R; j++) acc[j] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) {  // a pair of groups: 32 bytes of each weight row, 64 weights
    __m256i x_even[R], x_odd[R], p[R][4];
    for (int j = 0; j < R; j++) {
      x_even[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[j] + g * GROUP));
      x_odd[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[j] + g * GROUP + 32));
    }
    for (int r = 0; r < 4; r++) {
      _mm_prefetch(reinterpret_cast<const char*>(w[r] + g * 16 + ahead), _MM_HINT_T0);  // the next block's bytes
      const __m256i b = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + g * 16)), flip);
      const __m256i u_even = _mm256_and_si256(b, low4), u_odd = _mm256_and_si256(_mm256_srli_epi16(b, 4), low4);
      for (int j = 0; j < R; j++) {
        const __m256i pairs =
            _mm256_add_epi16(_mm256_maddubs_epi16(u_even, x_even[j]), _mm256_maddubs_epi16(u_odd, x_odd[j]));
        p[j][r] = _mm256_madd_epi16(pairs, ones);  // 8 int32: 4 partial sums of group g, then 4 of group g + 1
      }
    }
    const __m256 scale = bf16_pairs(s, g), zero = z ? bf16_pairs(z, g) : _mm256_setzero_ps();
    for (int j = 0; j < R; j++) {
      // two rounds of horizontal adds: (row 0..3 of group g | row 0..3 of group g + 1)
      __m256i isum = _mm256_hadd_epi32(_mm256_hadd_epi32(p[j][0], p[j][1]), _mm256_hadd_epi32(p[j][2], p[j][3]));
      const int32_t s0 = xsum[j][g], s1 = xsum[j][g + 1];
      const __m256i sums = _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1);
      isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(sums, 3));  // u = q + 8: take back 8 * xsum
      __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), scale);
      if (z) t = _mm256_add_ps(t, _mm256_mul_ps(_mm256_cvtepi32_ps(sums), zero));
      const float d0 = d[j][g], d1 = d[j][g + 1];
      acc[j] = _mm256_add_ps(acc[j], _mm256_mul_ps(t, _mm256_setr_ps(d0, d0, d0, d0, d1, d1, d1, d1)));
    }
  }
  for (int j = 0; j < R; j++) {
    __m128 even = _mm256_castps256_ps128(acc[j]);
    if (g < G) {  // a last, unpaired (even) group: the same with 16 bytes a row
      const __m128i x_even = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq[j] + g * GROUP));
      const __m128i x_odd = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xq[j] + g * GROUP + 16));
      __m128i p[4];
      for (int r = 0; r < 4; r++) {
        const __m128i b = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + g * 16)),
                                        _mm256_castsi256_si128(flip));
        const __m128i u_even = _mm_and_si128(b, _mm256_castsi256_si128(low4));
        const __m128i u_odd = _mm_and_si128(_mm_srli_epi16(b, 4), _mm256_castsi256_si128(low4));
        const __m128i pairs = _mm_add_epi16(_mm_maddubs_epi16(u_even, x_even), _mm_maddubs_epi16(u_odd, x_odd));
        p[r] = _mm_madd_epi16(pairs, _mm256_castsi256_si128(ones));
      }
      __m128i isum = _mm_hadd_epi32(_mm_hadd_epi32(p[0], p[1]), _mm_hadd_epi32(p[2], p[3]));
      const __m128i sums = _mm_set1_epi32(xsum[j][g]);
      isum = _mm_sub_epi32(isum, _mm_slli_epi32(sums, 3));
      __m128 t = _mm_mul_ps(_mm_cvtepi32_ps(isum), bf16_column(s, g));
      if (z) t = _mm_add_ps(t, _mm_mul_ps(_mm_cvtepi32_ps(sums), bf16_column(z, g)));
      even = _mm_add_ps(even, _mm_mul_ps(t, _mm_set1_ps(d[j][g])));
    }
    _mm_storeu_ps(out + 4 * j, _mm_add_ps(even, _mm256_extractf128_ps(acc[j], 1)));
  }
}

// int8 weights (quant.Int8Linear: one scale per row) meet the int8 activations the same way, per group:
// isum = sum of w * xq exactly, t = float(isum) * d[g], summed over the even groups and the odd groups in order,
// then y = (even + odd) * scale[n]. vpmaddubsw wants one unsigned operand: |w|, with w's sign moved onto xq
// (vpsignb; |-128| reads as the unsigned 128, and 2 * 128 * 127 < 32767 never saturates).
inline __m128i group_sums(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {  // 4 rows' 8 lanes -> 4 sums
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

void dot4_int8(const int8_t* const* w, const int8_t* xq, const float* d, int64_t G, float* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t ahead = 8 * G * GROUP;  // two blocks of 4 rows on
  __m256 acc = _mm256_setzero_ps();
  __m256i p[2][4];
  int64_t g = 0;
  for (; g + 2 <= G; g += 2) {
    for (int h = 0; h < 2; h++) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (g + h) * GROUP));
      for (int r = 0; r < 4; r++) {
        const int8_t* row = w[r] + (g + h) * GROUP;
        _mm_prefetch(reinterpret_cast<const char*>(row + ahead), _MM_HINT_T0);
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
        p[h][r] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(b, b), _mm256_sign_epi8(x, b)), ones);
      }
    }
    const __m256i isum = _mm256_set_m128i(group_sums(p[1][0], p[1][1], p[1][2], p[1][3]),
                                          group_sums(p[0][0], p[0][1], p[0][2], p[0][3]));
    const __m256 dg = _mm256_setr_ps(d[g], d[g], d[g], d[g], d[g + 1], d[g + 1], d[g + 1], d[g + 1]);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(isum), dg));
  }
  __m128 even = _mm256_castps256_ps128(acc);
  if (g < G) {  // a last, unpaired (even) group
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + g * GROUP));
    for (int r = 0; r < 4; r++) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + g * GROUP));
      p[0][r] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(b, b), _mm256_sign_epi8(x, b)), ones);
    }
    const __m128i isum = group_sums(p[0][0], p[0][1], p[0][2], p[0][3]);
    even = _mm_add_ps(even, _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_set1_ps(d[g])));
  }
  _mm_storeu_ps(out, _mm_add_ps(even, _mm256_extractf128_ps(acc, 1)));
}

at::Tensor w8a8_linear(const at::Tensor& x_in, const at::Tensor& int8_data, const at::Tensor& scales) {
  check_input(x_in, int8_data, "w8a8_linear");
  const at::Tensor x = x_in.contiguous(), w = int8_data.contiguous(), sc = scales.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / GROUP;
  TORCH_CHECK(w.size(1) == K, "w8a8_linear: int8_data must be (N, K)");
  TORCH_CHECK(sc.scalar_type() == at::kBFloat16 && sc.dim() == 1 && sc.size(0) == N, "w8a8_linear: scales");
  const Activations a = quantize_rows(x, false);
  const int8_t* w_p = w.data_ptr<int8_t>();
  const at::BFloat16* s_p = sc.data_ptr<at::BFloat16>();
  at::Tensor y = at::empty({M, N}, x.options());
  void* y_p = y.data_ptr();
  const bool bf16 = y.scalar_type() == at::kBFloat16;
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
      const int8_t* wr[4];
      for (int r = 0; r < 4; r++) wr[r] = w_p + std::min(4 * b + r, N - 1) * K;
      for (int64_t m = 0; m < M; m++) {
        float out[4];
        dot4_int8(wr, a.q.data_ptr<int8_t>() + m * K, a.d.data_ptr<float>() + m * G, G, out);
        for (int64_t r = 0; r < 4 && 4 * b + r < N; r++)
          put(y_p, bf16, m * N + 4 * b + r, out[r] * float(s_p[4 * b + r]));
      }
    }
  });
  return y;
}

at::Tensor w4a8_linear(const at::Tensor& x_in, const at::Tensor& int4_data, const at::Tensor& scales,
                       const std::optional<at::Tensor>& zeros) {
  check_input(x_in, int4_data, "w4a8_linear");
  const at::Tensor x = x_in.contiguous(), w = int4_data.contiguous(), sc = scales.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / GROUP;
  TORCH_CHECK(w.size(1) == K / 2, "w4a8_linear: int4_data must be (N, K / 2)");
  TORCH_CHECK(sc.scalar_type() == at::kBFloat16 && sc.size(0) == N && sc.size(1) == G, "w4a8_linear: scales");
  TORCH_CHECK(!zeros || (zeros->scalar_type() == at::kBFloat16 && zeros->sizes() == sc.sizes()), "w4a8_linear: zeros");
  const at::Tensor zc = zeros ? zeros->contiguous() : at::Tensor();
  const Activations a = quantize_rows(x, true);
  const int8_t* xq_p = a.q.data_ptr<int8_t>();
  const float* xd_p = a.d.data_ptr<float>();
  const int32_t* xs_p = a.sum.data_ptr<int32_t>();
  const uint8_t* w_p = reinterpret_cast<const uint8_t*>(w.data_ptr<int8_t>());
  const at::BFloat16* s_p = sc.data_ptr<at::BFloat16>();
  const at::BFloat16* z_p = zeros ? zc.data_ptr<at::BFloat16>() : nullptr;
  at::Tensor y = at::empty({M, N}, x.options());
  void* y_p = y.data_ptr();
  const bool bf16 = y.scalar_type() == at::kBFloat16;
  // Blocks of 4 weight rows, shared among the threads. A prefill's activation rows go a tile at a time: a tile's
  // quantized rows stay in cache while the thread's weight blocks stream past them, each block meeting the
  // tile's rows 4 at a time. A last block of fewer than 4 rows reads row N - 1 again in their place.
  constexpr int64_t TILE = 32;
  at::parallel_for(0, (N + 3) / 4, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t m0 = 0; m0 < M; m0 += TILE) {
      for (int64_t b = b0; b < b1; b++) {
        const uint8_t* wr[4];
        const at::BFloat16* sr[4];
        const at::BFloat16* zr[4];
        for (int r = 0; r < 4; r++) {
          const int64_t n = std::min(4 * b + r, N - 1);
          wr[r] = w_p + n * (K / 2);
          sr[r] = s_p + n * G;
          zr[r] = z_p ? z_p + n * G : nullptr;
        }
        const int64_t m_end = std::min(M, m0 + TILE);
        for (int64_t m = m0; m < m_end;) {
          const int rows = m_end - m >= 4 ? 4 : m_end - m >= 2 ? 2 : 1;
          const int8_t* xr[4];
          const float* dr[4];
          const int32_t* xsr[4];
          for (int j = 0; j < rows; j++) {
            xr[j] = xq_p + (m + j) * K;
            dr[j] = xd_p + (m + j) * G;
            xsr[j] = xs_p + (m + j) * G;
          }
          float out[16];
          const at::BFloat16* const* zp = z_p ? zr : nullptr;
          if (rows == 4) dot4<4>(wr, sr, zp, xr, dr, xsr, G, out);
          else if (rows == 2) dot4<2>(wr, sr, zp, xr, dr, xsr, G, out);
          else dot4<1>(wr, sr, zp, xr, dr, xsr, G, out);
          for (int j = 0; j < rows; j++)
            for (int64_t r = 0; r < 4 && 4 * b + r < N; r++)
              put(y_p, bf16, (m + j) * N + 4 * b + r, out[4 * j + r]);
          m += rows;
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gemma, m) {
  m.def("w4a8_linear(Tensor x, Tensor int4_data, Tensor scales, Tensor? zeros) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor int8_data, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(gemma, CPU, m) {
  m.impl("w4a8_linear", &w4a8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
}
