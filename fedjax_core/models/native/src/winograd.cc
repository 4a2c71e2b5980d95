// Winograd F(2x2, 3x3) convolutions, float32, stride 1 (Lavin and Gray, "Fast Algorithms
// for Convolutional Neural Networks", CVPR 2016).
//
// Each 2x2 output tile Y of one channel pair is, with the tile's 4x4 input window d,
//   Y = A^T [ (G g G^T) .* (B^T d B) ] A
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1],
// 16 multiplications per tile where the direct convolution takes 36. Summed over input
// channels, the 16 products .* become 16 matrix products: with U[xi] = (G g G^T)[xi]
// ([C, O], for each of the 16 positions xi of the 4x4 tile) and V[xi] = (B^T d B)[xi]
// ([T, C] over a block of T tiles), M[xi] = V[xi] U[xi], and each output tile is A^T M A.
//
// The weight gradient is the adjoint in g of the same map:
//   dg = G^T [ sum over tiles (A dY A^T) .* (B^T d B) ] G,
// where the sum over tiles is again 16 matrix products S[xi] = V[xi]^T (A dY A^T)[xi].
// The input gradient is a forward-form convolution of dy with the kernel flipped and its
// channel axes swapped (Winograd3x3::flip).
//
// Work runs over blocks of kTileBlock tiles, so that one block's transformed input V,
// products M and the transformed kernel U stay in the core's L2 cache; blocks are split
// into contiguous ranges, one per part, run by the caller and XLA's thread pool
// (RunParts; the weight gradient's partial sums add up in part order, so results repeat
// bit for bit for a given number of parts). The products are AVX-512 register-blocked loops (intrinsics), the
// transforms loops over channels that the compiler vectorises. Accuracy: the transforms'
// coefficients (0, +-1, +-0.5) are exact in float; results differ from the direct
// convolution by float summation order only (relative errors ~1e-7 on unit-scale data).
#include "winograd.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fedjax_native {

bool WinogradSupported() {
  static const bool supported = __builtin_cpu_supports("avx512f") != 0;
  return supported;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma,prefer-vector-width=512")

namespace {

constexpr int64_t kTileBlock = 36;  // tiles per block (rows of the 16 products)

// The distance between the 16 matrices of a block's V, M or Mh ([16, kTileBlock, channels]
// with padding): one cache line more than the matrix, so that the transforms' 16 streams
// (one per xi) do not fall into one L1 cache set, as they would 4 KB multiples apart.
constexpr int64_t XiStride(int64_t channels) { return kTileBlock * channels + 16; }

// A per-thread buffer of at least `count` floats, one per Slot.
template <int Slot>
float* Scratch(size_t count) {
  thread_local std::vector<float> buffer;
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

// c[r, 0:16 NV] (+)= sum_k a[r * a_rs + k * a_ks] * b[k * ldb + 0:16 NV], r < R.
template <int R, int NV, bool Accumulate>
inline void MicroKernel(const float* a, int64_t a_rs, int64_t a_ks, const float* b,
                        int64_t ldb, int64_t k, float* c, int64_t ldc) {
  __m512 acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      acc[r][v] = Accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + kk * ldb + 16 * v);
    const float* ak = a + kk * a_ks;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(ak[r * a_rs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

// c [rows, cols:cols+16 NV] (+)= a [rows, k] b [k, 16 NV], in register blocks of R rows
// (about 24 accumulators), the leftover rows one at a time.
template <int NV, bool Accumulate>
void Columns(const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
             int64_t k, float* c, int64_t ldc, int64_t rows) {
  constexpr int R = NV == 4 ? 6 : NV == 3 ? 8 : 12;
  int64_t r = 0;
  for (; r + R <= rows; r += R)
    MicroKernel<R, NV, Accumulate>(a + r * a_rs, a_rs, a_ks, b, ldb, k, c + r * ldc, ldc);
  for (; r < rows; ++r)
    MicroKernel<1, NV, Accumulate>(a + r * a_rs, a_rs, a_ks, b, ldb, k, c + r * ldc, ldc);
}

// c [rows, cols] (+)= a [rows, k] b [k, cols] (a with row / k strides a_rs / a_ks, b and c
// row-major with ldb / ldc; cols a multiple of 16), in column blocks of 64.
template <bool Accumulate>
void Product(const float* a, int64_t a_rs, int64_t a_ks, const float* b, int64_t ldb,
             int64_t k, float* c, int64_t ldc, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; j += 64) {
    switch (std::min<int64_t>(4, (cols - j) / 16)) {
      case 4: Columns<4, Accumulate>(a, a_rs, a_ks, b + j, ldb, k, c + j, ldc, rows); break;
      case 3: Columns<3, Accumulate>(a, a_rs, a_ks, b + j, ldb, k, c + j, ldc, rows); break;
      case 2: Columns<2, Accumulate>(a, a_rs, a_ks, b + j, ldb, k, c + j, ldc, rows); break;
      default: Columns<1, Accumulate>(a, a_rs, a_ks, b + j, ldb, k, c + j, ldc, rows); break;
    }
  }
}

// The tile grid: tiles of 2x2 outputs, `th` x `tw` per image, numbered (n, ti, tj) row-major.
struct Tiles {
  int64_t th, tw, count;
  explicit Tiles(const Winograd3x3& s)
      : th((s.ho + 1) / 2), tw((s.wo + 1) / 2), count(s.n * ((s.ho + 1) / 2) * ((s.wo + 1) / 2)) {}
  void Decode(int64_t t, int64_t* n, int64_t* ti, int64_t* tj) const {
    *tj = t % tw;
    t /= tw;
    *ti = t % th;
    *n = t / th;
  }
};

// window[a * K + b] = the pixel (2 ti - off_t + a, 2 tj - off_l + b) of tile t's image in
// an NHWC buffer [n, height, width, channels], or `outside` where that is not in the image.
template <int K, typename T>
void TileWindow(const Tiles& tiles, int64_t t, T* base, int64_t height, int64_t width,
                int64_t channels, int64_t off_t, int64_t off_l, T* outside, T** window) {
  int64_t n, ti, tj;
  tiles.Decode(t, &n, &ti, &tj);
  for (int a = 0; a < K; ++a)
    for (int b = 0; b < K; ++b) {
      const int64_t r = 2 * ti - off_t + a, col = 2 * tj - off_l + b;
      window[a * K + b] = (r >= 0 && r < height && col >= 0 && col < width)
                              ? base + ((n * height + r) * width + col) * channels
                              : outside;
    }
}

// U[xi][c][o] = (G k G^T)[xi] for every channel pair: [16, c, o].
void KernelTransform(const Winograd3x3& s, const float* w, float* u) {
  const int64_t cs = s.c, os = s.o, xi_stride = cs * os;
  for (int64_t c = 0; c < cs; ++c) {
    for (int64_t o = 0; o < os; ++o) {
      float g[3][3];
      for (int p = 0; p < 3; ++p)
        for (int q = 0; q < 3; ++q)
          g[p][q] = s.flip ? w[((2 - p) * 3 + (2 - q)) * os * cs + o * cs + c]
                           : w[(p * 3 + q) * cs * os + c * os + o];
      float t[4][3];  // G g
      for (int q = 0; q < 3; ++q) {
        t[0][q] = g[0][q];
        t[1][q] = 0.5f * (g[0][q] + g[1][q] + g[2][q]);
        t[2][q] = 0.5f * (g[0][q] - g[1][q] + g[2][q]);
        t[3][q] = g[2][q];
      }
      float* uo = u + c * os + o;
      for (int a = 0; a < 4; ++a) {  // (G g) G^T
        uo[(a * 4 + 0) * xi_stride] = t[a][0];
        uo[(a * 4 + 1) * xi_stride] = 0.5f * (t[a][0] + t[a][1] + t[a][2]);
        uo[(a * 4 + 2) * xi_stride] = 0.5f * (t[a][0] - t[a][1] + t[a][2]);
        uo[(a * 4 + 3) * xi_stride] = t[a][2];
      }
    }
  }
}

// V[xi][t][c] = (B^T d B)[xi] for the block's tiles t0 .. t0 + rows: [16, kTileBlock, c].
void InputTransform(const Winograd3x3& s, const Tiles& tiles, const float* in, int64_t t0,
                    int64_t rows, const float* zeros, float* v) {
  const int64_t cs = s.c, xi_stride = XiStride(cs);
  for (int64_t t = 0; t < rows; ++t) {
    const float* d[16];
    TileWindow<4>(tiles, t0 + t, in, s.h, s.w, cs, s.off_t, s.off_l, zeros, d);
    float* vt = v + t * cs;
    for (int64_t c = 0; c < cs; c += 16) {
      __m512 x[16], r[16];
      for (int k = 0; k < 16; ++k) x[k] = _mm512_loadu_ps(d[k] + c);
      for (int b = 0; b < 4; ++b) {  // B^T d
        r[0 + b] = _mm512_sub_ps(x[0 + b], x[8 + b]);
        r[4 + b] = _mm512_add_ps(x[4 + b], x[8 + b]);
        r[8 + b] = _mm512_sub_ps(x[8 + b], x[4 + b]);
        r[12 + b] = _mm512_sub_ps(x[4 + b], x[12 + b]);
      }
      for (int a = 0; a < 4; ++a) {  // (B^T d) B
        float* va = vt + a * 4 * xi_stride + c;
        _mm512_storeu_ps(va, _mm512_sub_ps(r[a * 4 + 0], r[a * 4 + 2]));
        _mm512_storeu_ps(va + xi_stride, _mm512_add_ps(r[a * 4 + 1], r[a * 4 + 2]));
        _mm512_storeu_ps(va + 2 * xi_stride, _mm512_sub_ps(r[a * 4 + 2], r[a * 4 + 1]));
        _mm512_storeu_ps(va + 3 * xi_stride, _mm512_sub_ps(r[a * 4 + 1], r[a * 4 + 3]));
      }
    }
  }
}

// out's 2x2 tiles = A^T M A, from M[xi][t][o] ([16, kTileBlock, o]); only the outputs
// inside [0, ho) x [0, wo) are written (`sink` takes the others).
void OutputTransform(const Winograd3x3& s, const Tiles& tiles, const float* m, int64_t t0,
                     int64_t rows, float* sink, float* out) {
  const int64_t os = s.o, xi_stride = XiStride(os);
  for (int64_t t = 0; t < rows; ++t) {
    float* y[4];
    TileWindow<2>(tiles, t0 + t, out, s.ho, s.wo, os, 0, 0, sink, y);
    const float* mt = m + t * os;
    for (int64_t o = 0; o < os; o += 16) {
      __m512 x[16], r[8];
      for (int k = 0; k < 16; ++k) x[k] = _mm512_loadu_ps(mt + k * xi_stride + o);
      for (int b = 0; b < 4; ++b) {  // A^T M
        r[0 + b] = _mm512_add_ps(_mm512_add_ps(x[0 + b], x[4 + b]), x[8 + b]);
        r[4 + b] = _mm512_sub_ps(_mm512_sub_ps(x[4 + b], x[8 + b]), x[12 + b]);
      }
      for (int a = 0; a < 2; ++a) {  // (A^T M) A
        _mm512_storeu_ps(y[a * 2 + 0] + o, _mm512_add_ps(_mm512_add_ps(r[a * 4 + 0], r[a * 4 + 1]),
                                                         r[a * 4 + 2]));
        _mm512_storeu_ps(y[a * 2 + 1] + o, _mm512_sub_ps(_mm512_sub_ps(r[a * 4 + 1], r[a * 4 + 2]),
                                                         r[a * 4 + 3]));
      }
    }
  }
}

// Mh[xi][t][o] = (A dY A^T)[xi] for the block's tiles of dy [n, ho, wo, o] (outside
// [0, ho) x [0, wo) dY is 0): [16, kTileBlock, o].
void GradientTransform(const Winograd3x3& s, const Tiles& tiles, const float* dy, int64_t t0,
                       int64_t rows, const float* zeros, float* mh) {
  const int64_t os = s.o, xi_stride = XiStride(os);
  for (int64_t t = 0; t < rows; ++t) {
    const float* y[4];
    TileWindow<2>(tiles, t0 + t, dy, s.ho, s.wo, os, 0, 0, zeros, y);
    float* mt = mh + t * os;
    for (int64_t o = 0; o < os; o += 16) {
      const __m512 y00 = _mm512_loadu_ps(y[0] + o), y01 = _mm512_loadu_ps(y[1] + o),
                   y10 = _mm512_loadu_ps(y[2] + o), y11 = _mm512_loadu_ps(y[3] + o);
      const __m512 zero = _mm512_setzero_ps();
      // A dY: rows (y0, y0 + y1, y0 - y1, -y1) of the 2-row dY, per column.
      const __m512 r[4][2] = {{y00, y01},
                              {_mm512_add_ps(y00, y10), _mm512_add_ps(y01, y11)},
                              {_mm512_sub_ps(y00, y10), _mm512_sub_ps(y01, y11)},
                              {_mm512_sub_ps(zero, y10), _mm512_sub_ps(zero, y11)}};
      for (int a = 0; a < 4; ++a) {  // (A dY) A^T
        float* ma = mt + a * 4 * xi_stride + o;
        _mm512_storeu_ps(ma, r[a][0]);
        _mm512_storeu_ps(ma + xi_stride, _mm512_add_ps(r[a][0], r[a][1]));
        _mm512_storeu_ps(ma + 2 * xi_stride, _mm512_sub_ps(r[a][0], r[a][1]));
        _mm512_storeu_ps(ma + 3 * xi_stride, _mm512_sub_ps(zero, r[a][1]));
      }
    }
  }
}

// dw[p][q][c][o] = (G^T S G)[p][q] from S[xi][c][o] ([16, c, o]).
void WeightsTransform(const Winograd3x3& s, const float* sum, float* dw) {
  const int64_t cs = s.c, os = s.o, xi_stride = cs * os;
  for (int64_t c = 0; c < cs; ++c) {
    for (int64_t o = 0; o < os; ++o) {
      const float* so = sum + c * os + o;
      float x[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) x[a][b] = so[(a * 4 + b) * xi_stride];
      float r[3][4];  // G^T S
      for (int b = 0; b < 4; ++b) {
        r[0][b] = x[0][b] + 0.5f * (x[1][b] + x[2][b]);
        r[1][b] = 0.5f * (x[1][b] - x[2][b]);
        r[2][b] = 0.5f * (x[1][b] + x[2][b]) + x[3][b];
      }
      for (int p = 0; p < 3; ++p) {  // (G^T S) G
        float* d = dw + (p * 3) * cs * os + c * os + o;
        d[0] = r[p][0] + 0.5f * (r[p][1] + r[p][2]);
        d[cs * os] = 0.5f * (r[p][1] - r[p][2]);
        d[2 * cs * os] = 0.5f * (r[p][1] + r[p][2]) + r[p][3];
      }
    }
  }
}

}  // namespace

// At most one part per kMinBlocksPerPart blocks (at least one part): on a many-core pool a
// small convolution would otherwise spend more on tasks and, for the weight gradient, on
// adding up per-part sums than on its tiles.
constexpr int64_t kMinBlocksPerPart = 4;

int PartsFor(int64_t blocks, int parts) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, blocks / kMinBlocksPerPart)));
}

// The blocks [first, last) of part p of `parts`.
void PartBlocks(int64_t blocks, int parts, int p, int64_t* first, int64_t* last) {
  *first = blocks * p / parts;
  *last = blocks * (p + 1) / parts;
}

void WinogradConv(const Winograd3x3& s, const float* in, const float* w, float* out,
                  ffi::ThreadPool& pool, int parts) {
  const Tiles tiles(s);
  const int64_t blocks = (tiles.count + kTileBlock - 1) / kTileBlock;
  parts = PartsFor(blocks, parts);
  float* u = Scratch<4>(16 * s.c * s.o);  // the calling thread's
  KernelTransform(s, w, u);
  const float* up = u;
  RunParts(pool, parts, [&](int p) {
    float* v = Scratch<0>(16 * XiStride(s.c));
    float* m = Scratch<1>(16 * XiStride(s.o));
    float* zeros = Scratch<2>(s.c);
    std::fill(zeros, zeros + s.c, 0.0f);
    float* sink = Scratch<3>(s.o);  // written, never read
    int64_t first, last;
    PartBlocks(blocks, parts, p, &first, &last);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t t0 = blk * kTileBlock, rows = std::min(kTileBlock, tiles.count - t0);
      InputTransform(s, tiles, in, t0, rows, zeros, v);
      for (int xi = 0; xi < 16; ++xi)
        Product<false>(v + xi * XiStride(s.c), s.c, 1, up + xi * s.c * s.o, s.o, s.c,
                       m + xi * XiStride(s.o), s.o, rows, s.o);
      OutputTransform(s, tiles, m, t0, rows, sink, out);
    }
  });
}

void WinogradWeights(const Winograd3x3& s, const float* in, const float* dy, float* dw,
                     ffi::ThreadPool& pool, int parts) {
  const Tiles tiles(s);
  const int64_t blocks = (tiles.count + kTileBlock - 1) / kTileBlock;
  parts = PartsFor(blocks, parts);
  const int64_t sum_size = 16 * s.c * s.o;
  float* sums = Scratch<5>(parts * sum_size);  // the calling thread's; one S per part
  std::fill(sums, sums + parts * sum_size, 0.0f);
  RunParts(pool, parts, [&](int p) {
    float* v = Scratch<0>(16 * XiStride(s.c));
    float* mh = Scratch<1>(16 * XiStride(s.o));
    float* zeros = Scratch<2>(std::max(s.c, s.o));
    std::fill(zeros, zeros + std::max(s.c, s.o), 0.0f);
    float* sum = sums + p * sum_size;
    int64_t first, last;
    PartBlocks(blocks, parts, p, &first, &last);
    for (int64_t blk = first; blk < last; ++blk) {
      const int64_t t0 = blk * kTileBlock, rows = std::min(kTileBlock, tiles.count - t0);
      InputTransform(s, tiles, in, t0, rows, zeros, v);
      GradientTransform(s, tiles, dy, t0, rows, zeros, mh);
      // S[xi] [c, o] += V[xi]^T [c, rows] Mh[xi] [rows, o]
      for (int xi = 0; xi < 16; ++xi)
        Product<true>(v + xi * XiStride(s.c), 1, s.c, mh + xi * XiStride(s.o), s.o, rows,
                      sum + xi * s.c * s.o, s.o, s.c, s.o);
    }
  });
  for (int p = 1; p < parts; ++p) {
    const float* src = sums + p * sum_size;
    for (int64_t i = 0; i < sum_size; ++i) sums[i] += src[i];
  }
  WeightsTransform(s, sums, dw);
}

#pragma GCC pop_options

}  // namespace fedjax_native
