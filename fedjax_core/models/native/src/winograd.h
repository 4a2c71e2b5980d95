// Winograd F(2x2, 3x3) convolutions for float32, stride 1 (src/winograd.cc): the forward,
// input-gradient and weight-gradient kernels of a 3x3 convolution with 2.25x fewer
// multiplications than the direct one. conv.cc calls them instead of oneDNN's direct
// primitives where `WinogradFits` says so.
#pragma once

#include <cstdint>

#include "common.h"

namespace fedjax_native {

// A stride-1 3x3 convolution in "forward form":
//   out[n, i, j, o] = sum_{p, q, c} in[n, i + p - off_t, j + q - off_l, c] * k[p, q, c, o]
// with `in` zero outside [0, h) x [0, w). `in` is NHWC [n, h, w, c], `out` NHWC
// [n, ho, wo, o]. The kernel k comes from an HWIO buffer: k = w [3, 3, c, o] as it is, or,
// when `flip` (the input gradient: in = dy, out = dx), k[p, q, c, o] = w[2 - p, 2 - q, o, c]
// of w [3, 3, o, c].
struct Winograd3x3 {
  int64_t n, h, w, c;
  int64_t ho, wo, o;
  int64_t off_t, off_l;
  bool flip;
};

// Whether this build and CPU run the Winograd kernels (AVX-512F; checked once).
bool WinogradSupported();

// out = the forward-form convolution of `in` with the kernel from `w` (written, not added);
// the tiles in `parts` ranges (RunParts on `pool`; fewer for small problems: at least 4
// blocks of 36 tiles per part).
void WinogradConv(const Winograd3x3& s, const float* in, const float* w, float* out,
                  ffi::ThreadPool& pool, int parts);

// dw[p, q, c, o] = sum_{n, i, j} in[n, i + p - off_t, j + q - off_l, c] * dy[n, i, j, o]
// (the weight gradient; dy is [n, ho, wo, o], dw HWIO [3, 3, c, o]; `flip` is ignored);
// the tiles in `parts` ranges (as WinogradConv), whose partial sums add up in part order.
void WinogradWeights(const Winograd3x3& s, const float* in, const float* dy, float* dw,
                     ffi::ThreadPool& pool, int parts);

}  // namespace fedjax_native
