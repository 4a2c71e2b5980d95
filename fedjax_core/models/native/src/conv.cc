// conv2d through oneDNN: forward, input gradient and weight gradient as XLA FFI handlers.
// float32 3x3 stride-1 convolutions with both channel counts multiples of 16 run on the
// Winograd kernels of winograd.cc instead (on AVX-512 CPUs; UseWinograd), their work split
// over XLA's intra-op thread pool, which the handlers receive as their FFI context.
//
// Layouts are JAX's: input NHWC, kernel HWIO, output NHWC. Explicit paddings (top, bottom,
// left, right) and strides are attributes; the Python side (fedjax_core/models/native/
// conv.py) turns "VALID" / "SAME" into paddings. f32 and bf16 buffers are accepted; each
// buffer keeps its own type (bf16 inputs with an f32 weight gradient, for example).
//
// Batching (jax.vmap): the handlers are registered with vmap_method="expand_dims", so a
// vmapped call arrives with L extra leading axes on every operand (size 1 where that
// operand is not batched). Where the kernel is shared (its leading axes are all 1) the
// forward and input-gradient fold the leading axes into the batch N: one convolution.
// Otherwise each leading index runs its own convolution, with size-1 axes broadcast.
//
// Primitives are built once per shape (PlanCache). oneDNN picks the kernel's internal
// layout (format_tag::any); the HWIO kernel is reordered to it on each call, which for a
// 3x3x32x64 kernel is 18K elements. Activations stay NHWC, except for the bf16 input
// gradient: there oneDNN 3.2's NHWC kernel ran at 95 GFLOP/s against 229 for its blocked
// (nChw16c) one on the EMNIST CNN's second layer (batch 20, one AVX512_BF16 core), so dy
// is reordered into the blocked layout and dx back out of it (two passes over a few MB).
#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "common.h"
#include "winograd.h"

namespace fedjax_native {
namespace {

using dnnl::memory;
using tag = memory::format_tag;

enum class ConvKind { kForward, kBackwardData, kBackwardWeights };

struct ConvShape {
  int64_t n, h, w, c, o, kh, kw, ho, wo;
  int64_t sh, sw, pt, pb, pl, pr;
};

struct ConvPlan {
  dnnl::primitive primitive;
  memory::desc src_md, weights_md, dst_md;  // the user (NHWC / HWIO) layouts
  memory::desc inner_weights_md;            // the primitive's weights layout
  bool reorder = false;
  dnnl::primitive weights_reorder;  // HWIO -> inner (fwd, bwd data) or inner -> HWIO (bwd weights)
  // Blocked activations (the bf16 input gradient): dy NHWC -> inner, dx inner -> NHWC.
  bool blocked = false;
  memory::desc inner_src_md, inner_dst_md;
  dnnl::primitive dst_reorder, src_reorder;
  size_t scratch_bytes = 0;
};

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

// Builds the primitive of one convolution kind; types are (src, weights, dst) in the
// forward sense: for kBackwardData src is the input gradient, for kBackwardWeights
// weights is the weight gradient.
ConvPlan MakePlan(ConvKind kind, const ConvShape& s, memory::data_type src_t,
                  memory::data_type wei_t, memory::data_type dst_t) {
  auto& engine = Engine();
  ConvPlan plan;
  plan.src_md = memory::desc({s.n, s.c, s.h, s.w}, src_t, tag::nhwc);
  plan.weights_md = memory::desc({s.o, s.c, s.kh, s.kw}, wei_t, tag::hwio);
  plan.dst_md = memory::desc({s.n, s.o, s.ho, s.wo}, dst_t, tag::nhwc);
  memory::desc any_weights({s.o, s.c, s.kh, s.kw}, wei_t, tag::any);
  memory::dims strides = {s.sh, s.sw}, pad_l = {s.pt, s.pl}, pad_r = {s.pb, s.pr};
  auto attr = UserScratchpad();
  // The forward descriptor is also the hint the backward primitives need.
  auto fwd = dnnl::convolution_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      plan.src_md, any_weights, plan.dst_md, strides, pad_l, pad_r, attr);
  size_t scratch = 0;
  if (kind == ConvKind::kForward) {
    plan.inner_weights_md = fwd.weights_desc();
    plan.primitive = dnnl::convolution_forward(fwd);
    scratch = fwd.scratchpad_desc().get_size();
  } else if (kind == ConvKind::kBackwardData) {
    bool blocked = src_t == memory::data_type::bf16;
    memory::desc any_src({s.n, s.c, s.h, s.w}, src_t, tag::any);
    memory::desc any_dst({s.n, s.o, s.ho, s.wo}, dst_t, tag::any);
    auto bwd = dnnl::convolution_backward_data::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, blocked ? any_src : plan.src_md,
        any_weights, blocked ? any_dst : plan.dst_md, strides, pad_l, pad_r, fwd, attr);
    plan.inner_weights_md = bwd.weights_desc();
    plan.primitive = dnnl::convolution_backward_data(bwd);
    scratch = bwd.scratchpad_desc().get_size();
    plan.inner_src_md = bwd.diff_src_desc();
    plan.inner_dst_md = bwd.diff_dst_desc();
    plan.blocked = plan.inner_src_md != plan.src_md || plan.inner_dst_md != plan.dst_md;
    if (plan.blocked) {
      auto dst_pd = dnnl::reorder::primitive_desc(engine, plan.dst_md, engine,
                                                  plan.inner_dst_md, attr);
      auto src_pd = dnnl::reorder::primitive_desc(engine, plan.inner_src_md, engine,
                                                  plan.src_md, attr);
      plan.dst_reorder = dnnl::reorder(dst_pd);
      plan.src_reorder = dnnl::reorder(src_pd);
      scratch = std::max({scratch, dst_pd.scratchpad_desc().get_size(),
                          src_pd.scratchpad_desc().get_size()});
    }
  } else {
    auto bwd = dnnl::convolution_backward_weights::primitive_desc(
        engine, dnnl::algorithm::convolution_direct, plan.src_md, any_weights, plan.dst_md,
        strides, pad_l, pad_r, fwd, attr);
    plan.inner_weights_md = bwd.diff_weights_desc();
    plan.primitive = dnnl::convolution_backward_weights(bwd);
    scratch = bwd.scratchpad_desc().get_size();
  }
  plan.reorder = plan.inner_weights_md != plan.weights_md;
  if (plan.reorder) {
    auto reorder_pd =
        kind == ConvKind::kBackwardWeights
            ? dnnl::reorder::primitive_desc(engine, plan.inner_weights_md, engine,
                                            plan.weights_md, attr)
            : dnnl::reorder::primitive_desc(engine, plan.weights_md, engine,
                                            plan.inner_weights_md, attr);
    plan.weights_reorder = dnnl::reorder(reorder_pd);
    scratch = std::max(scratch, reorder_pd.scratchpad_desc().get_size());
  }
  plan.scratch_bytes = scratch;
  return plan;
}

PlanCache<ConvPlan>& Plans() {
  static PlanCache<ConvPlan> cache;
  return cache;
}

// Per-thread buffers (common.h slots 1-3): the reordered kernel, the blocked activations.
void* WeightsBuffer(size_t bytes) { return ThreadBuffer<1>(bytes); }
void* BlockedSrcBuffer(size_t bytes) { return ThreadBuffer<2>(bytes); }
void* BlockedDstBuffer(size_t bytes) { return ThreadBuffer<3>(bytes); }

// Whether 3x3 convolutions may take the Winograd kernels (fedjax_native_set_conv_algorithm).
std::atomic<bool>& WinogradOn() {
  static std::atomic<bool> on{true};
  return on;
}

// Whether a convolution runs on the Winograd kernels (src/winograd.h): float32, 3x3,
// stride 1, both channel counts multiples of 16 (the products' column blocks), and an
// AVX-512 CPU. Everything else is oneDNN's direct convolution.
bool UseWinograd(const ConvShape& s, memory::data_type src_t, memory::data_type wei_t,
                 memory::data_type dst_t) {
  constexpr auto f32 = memory::data_type::f32;
  return WinogradOn().load(std::memory_order_relaxed) && src_t == f32 && wei_t == f32 && dst_t == f32 && s.kh == 3 &&
         s.kw == 3 && s.sh == 1 && s.sw == 1 && s.c % 16 == 0 && s.o % 16 == 0 &&
         WinogradSupported();
}

// One convolution of `kind` on the Winograd kernels (UseWinograd is true), its tiles split
// into as many parts as threads per call (FEDJAX_NATIVE_THREADS; 0: XLA's pool size).
void RunWinograd(ConvKind kind, const ConvShape& s, void* src, void* weights, void* dst,
                 ffi::ThreadPool& pool) {
  auto* x = static_cast<float*>(src);
  auto* w = static_cast<float*>(weights);
  auto* y = static_cast<float*>(dst);
  const int parts = KernelThreads() > 0
                        ? KernelThreads()
                        : static_cast<int>(std::max<int64_t>(1, pool.num_threads()));
  if (kind == ConvKind::kBackwardData) {
    // dx = dy convolved with the flipped kernel, padded by 2 - pad.
    WinogradConv({s.n, s.ho, s.wo, s.o, s.h, s.w, s.c, 2 - s.pt, 2 - s.pl, true}, y, w, x,
                 pool, parts);
    return;
  }
  const Winograd3x3 shape{s.n, s.h, s.w, s.c, s.ho, s.wo, s.o, s.pt, s.pl, false};
  if (kind == ConvKind::kForward)
    WinogradConv(shape, x, w, y, pool, parts);
  else
    WinogradWeights(shape, x, y, w, pool, parts);
}

// Runs one convolution of `kind` on raw pointers (src, weights, dst in the forward sense).
void RunConv(ConvKind kind, const ConvShape& s, memory::data_type src_t,
             memory::data_type wei_t, memory::data_type dst_t, void* src, void* weights,
             void* dst, ffi::ThreadPool& pool) {
  if (UseWinograd(s, src_t, wei_t, dst_t)) {
    RunWinograd(kind, s, src, weights, dst, pool);
    return;
  }
  std::string key = std::to_string(static_cast<int>(kind)) + ":" +
                    Join({s.n, s.h, s.w, s.c, s.o, s.kh, s.kw, s.sh, s.sw, s.pt, s.pb,
                          s.pl, s.pr}) +
                    ":" + Join({static_cast<int64_t>(src_t), static_cast<int64_t>(wei_t),
                                static_cast<int64_t>(dst_t)});
  const ConvPlan& plan =
      Plans().Get(key, [&] { return MakePlan(kind, s, src_t, wei_t, dst_t); });
  auto& engine = Engine();
  auto& stream = Stream();
  memory scratch(memory::desc({static_cast<int64_t>(plan.scratch_bytes)},
                              memory::data_type::u8, tag::a),
                 engine, Scratchpad(plan.scratch_bytes));
  memory src_m(plan.src_md, engine, src), dst_m(plan.dst_md, engine, dst);
  memory user_w(plan.weights_md, engine, weights);
  memory inner_w = plan.reorder ? memory(plan.inner_weights_md, engine,
                                         WeightsBuffer(plan.inner_weights_md.get_size()))
                                : user_w;
  if (kind == ConvKind::kForward) {
    if (plan.reorder)
      plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, user_w},
                                            {DNNL_ARG_TO, inner_w},
                                            {DNNL_ARG_SCRATCHPAD, scratch}});
    plan.primitive.execute(stream, {{DNNL_ARG_SRC, src_m},
                                    {DNNL_ARG_WEIGHTS, inner_w},
                                    {DNNL_ARG_DST, dst_m},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == ConvKind::kBackwardData) {
    if (plan.reorder)
      plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, user_w},
                                            {DNNL_ARG_TO, inner_w},
                                            {DNNL_ARG_SCRATCHPAD, scratch}});
    memory diff_src = src_m, diff_dst = dst_m;
    if (plan.blocked) {
      diff_src = memory(plan.inner_src_md, engine,
                        BlockedSrcBuffer(plan.inner_src_md.get_size()));
      diff_dst = memory(plan.inner_dst_md, engine,
                        BlockedDstBuffer(plan.inner_dst_md.get_size()));
      plan.dst_reorder.execute(stream, {{DNNL_ARG_FROM, dst_m},
                                        {DNNL_ARG_TO, diff_dst},
                                        {DNNL_ARG_SCRATCHPAD, scratch}});
    }
    plan.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, diff_src},
                                    {DNNL_ARG_WEIGHTS, inner_w},
                                    {DNNL_ARG_DIFF_DST, diff_dst},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
    if (plan.blocked)
      plan.src_reorder.execute(stream, {{DNNL_ARG_FROM, diff_src},
                                        {DNNL_ARG_TO, src_m},
                                        {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    plan.primitive.execute(stream, {{DNNL_ARG_SRC, src_m},
                                    {DNNL_ARG_DIFF_WEIGHTS, inner_w},
                                    {DNNL_ARG_DIFF_DST, dst_m},
                                    {DNNL_ARG_SCRATCHPAD, scratch}});
    if (plan.reorder)
      plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, inner_w},
                                            {DNNL_ARG_TO, user_w},
                                            {DNNL_ARG_SCRATCHPAD, scratch}});
  }
  stream.wait();
}

// The leading (vmapped) axes of a buffer of rank 4 + L.
std::vector<int64_t> Lead(ffi::AnyBuffer::Dimensions dims, size_t lead) {
  return std::vector<int64_t>(dims.begin(), dims.begin() + lead);
}

int64_t Product(const std::vector<int64_t>& v) {
  int64_t p = 1;
  for (int64_t d : v) p *= d;
  return p;
}

// The flat index into an operand with leading shape `shape` (sizes 1 broadcast) of the
// output's leading multi-index `index`.
int64_t Broadcast(const std::vector<int64_t>& index, const std::vector<int64_t>& shape) {
  int64_t flat = 0;
  for (size_t i = 0; i < shape.size(); ++i) flat = flat * shape[i] + (shape[i] == 1 ? 0 : index[i]);
  return flat;
}

size_t ByteWidthOf(ffi::DataType type) { return type == ffi::DataType::F32 ? 4 : 2; }

// The shared body of the three handlers. The operands are, in the forward sense, the
// image-side buffer `image` (NHWC: the input x, or the input gradient dx), the kernel-side
// buffer `kernel` (HWIO: w, or dw) and the output-side buffer `out` (NHWC: y, or dy);
// `result` is whichever of them the handler writes.
ffi::Error Conv(ConvKind kind, ffi::ThreadPool& pool, ffi::AnyBuffer image, ffi::AnyBuffer kernel,
                ffi::AnyBuffer out, int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                int64_t pr) {
  auto id = image.dimensions(), kd = kernel.dimensions(), od = out.dimensions();
  if (id.size() < 4 || id.size() != kd.size() || id.size() != od.size())
    return Fail("conv2d operands must have rank 4 plus the same number of vmapped axes");
  size_t lead = id.size() - 4;
  auto it = DnnlType(image.element_type()), kt = DnnlType(kernel.element_type()),
       ot = DnnlType(out.element_type());
  if (it == memory::data_type::undef || kt == memory::data_type::undef ||
      ot == memory::data_type::undef)
    return Fail("conv2d takes float32 or bfloat16 buffers");
  ConvShape s{id[lead], id[lead + 1], id[lead + 2], id[lead + 3], kd[lead + 3], kd[lead],
              kd[lead + 1], od[lead + 1], od[lead + 2], sh, sw, pt, pb, pl, pr};
  if (kd[lead + 2] != s.c || od[lead] != s.n || od[lead + 3] != s.o ||
      s.ho != (s.h + pt + pb - s.kh) / sh + 1 || s.wo != (s.w + pl + pr - s.kw) / sw + 1)
    return Fail("conv2d shapes do not agree");
  auto i_lead = Lead(id, lead), k_lead = Lead(kd, lead), o_lead = Lead(od, lead);
  // The leading shape of the written buffer is the full (broadcast) one.
  std::vector<int64_t> full(lead);
  for (size_t i = 0; i < lead; ++i) full[i] = std::max({i_lead[i], k_lead[i], o_lead[i]});
  auto* ip = static_cast<uint8_t*>(image.untyped_data());
  auto* kp = static_cast<uint8_t*>(kernel.untyped_data());
  auto* op = static_cast<uint8_t*>(out.untyped_data());
  size_t i_bytes = ByteWidthOf(image.element_type()) * s.n * s.h * s.w * s.c;
  size_t k_bytes = ByteWidthOf(kernel.element_type()) * s.kh * s.kw * s.c * s.o;
  size_t o_bytes = ByteWidthOf(out.element_type()) * s.n * s.ho * s.wo * s.o;
  ThreadScope threads;
  try {
    bool shared_kernel = Product(k_lead) == 1;
    if (kind != ConvKind::kBackwardWeights && shared_kernel && i_lead == full &&
        o_lead == full) {
      // One convolution over the folded batch.
      ConvShape folded = s;
      folded.n = s.n * Product(full);
      RunConv(kind, folded, it, kt, ot, ip, kp, op, pool);
      return ffi::Error::Success();
    }
    int64_t count = Product(full);
    std::vector<int64_t> index(lead, 0);
    for (int64_t flat = 0; flat < count; ++flat) {
      int64_t rest = flat;
      for (size_t i = lead; i-- > 0;) {
        index[i] = rest % full[i];
        rest /= full[i];
      }
      RunConv(kind, s, it, kt, ot, ip + Broadcast(index, i_lead) * i_bytes,
              kp + Broadcast(index, k_lead) * k_bytes, op + Broadcast(index, o_lead) * o_bytes, pool);
    }
  } catch (const dnnl::error& e) {
    return Fail(std::string("oneDNN: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w,
                   ffi::Result<ffi::AnyBuffer> y, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr) {
  return Conv(ConvKind::kForward, pool, x, w, *y, sh, sw, pt, pb, pl, pr);
}

ffi::Error BackwardData(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w,
                        ffi::Result<ffi::AnyBuffer> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  return Conv(ConvKind::kBackwardData, pool, *dx, w, dy, sh, sw, pt, pb, pl, pr);
}

ffi::Error BackwardWeights(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy,
                           ffi::Result<ffi::AnyBuffer> dw, int64_t sh, int64_t sw,
                           int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return Conv(ConvKind::kBackwardWeights, pool, x, *dw, dy, sh, sw, pt, pb, pl, pr);
}

}  // namespace
}  // namespace fedjax_native

namespace fn = fedjax_native;

#define FEDJAX_CONV_ATTRS                                                      \
  .Attr<int64_t>("stride_h")                                                   \
      .Attr<int64_t>("stride_w")                                               \
      .Attr<int64_t>("pad_top")                                                \
      .Attr<int64_t>("pad_bottom")                                             \
      .Attr<int64_t>("pad_left")                                               \
      .Attr<int64_t>("pad_right")

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxConv2dForward, fn::Forward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>() FEDJAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxConv2dBackwardData, fn::BackwardData,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>() FEDJAX_CONV_ATTRS);

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxConv2dBackwardWeights, fn::BackwardWeights,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Arg<xla::ffi::AnyBuffer>()
                                  .Ret<xla::ffi::AnyBuffer>() FEDJAX_CONV_ATTRS);

// Threads each kernel call uses (0: oneDNN's default, every core).
extern "C" void fedjax_native_set_threads(int threads) {
  fedjax_native::KernelThreads() = threads < 0 ? 0 : threads;
}

// 3x3 float32 convolutions: 0 (default) takes the Winograd kernels where they apply, 1
// oneDNN's direct convolution always (for comparisons).
extern "C" void fedjax_native_set_conv_algorithm(int direct) {
  fedjax_native::WinogradOn().store(direct == 0, std::memory_order_relaxed);
}

// Whether the Winograd kernels run on this CPU (the `auto` algorithm's 3x3 convolutions).
extern "C" int fedjax_native_has_winograd() { return fedjax_native::WinogradSupported() ? 1 : 0; }

// Whether the CPU runs oneDNN's bf16 kernels natively (AVX512_BF16 or AMX), for the
// Python side's choice of path.
extern "C" int fedjax_native_has_bf16() {
  return dnnl::get_effective_cpu_isa() >= dnnl::cpu_isa::avx512_core_bf16 ? 1 : 0;
}
