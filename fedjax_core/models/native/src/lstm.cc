// The LSTM recurrence fused over a whole sequence: forward and BPTT backward as two XLA
// FFI handlers (haiku's gate order i, g, f, o; forget bias +1; float32).
//
// Forward, per sequence, for t = 0..T-1 (z_t = x_proj[t] + h_{t-1} W_h):
//   i = sigmoid(z_i), g = tanh(z_g), f = sigmoid(z_f + 1), o = sigmoid(z_o),
//   c_t = f c_{t-1} + i g,  h_t = o tanh(c_t).
// It writes hs [T, B, H], cs [T, B, H] and the activated gates acts [T, B, 4H] (i, g, f, o),
// the residuals of the backward. Backward, for t = T-1..0 (dh, dc from step t+1):
//   dh += d_hs[t];  dc += dh o (1 - tanh(c_t)^2);
//   dz = [dc g i (1-i), dc i (1-g^2), dc c_{t-1} f (1-f), dh tanh(c_t) o (1-o)];
//   dc = dc f;  dh = dz W_h^T.
// It writes dzs [T, B, 4H] (the gradient of x_proj), dh0, dc0; the weight gradient
// dW_h = sum_t h_{t-1}^T dz_t is one large matmul, done by XLA (fedjax_core/models/native/lstm.py).
//
// The per-step products ([B, H] x [H, 4H], B = 4 in the Shakespeare model) are small:
// one XLA op each costs more in dispatch than in arithmetic. Here they are a register-
// blocked loop over W_h packed once per call in column blocks (read as contiguous
// streams) that the compiler vectorises, compiled for AVX-512, AVX2+FMA and baseline
// x86-64 (GCC function multiversioning picks one when the library loads). sigmoid and tanh
// use a Cephes-style expf (about 1 ulp) that vectorises, instead of libm's scalar calls.
//
// Two threads (unless FEDJAX_NATIVE_THREADS=1): one sequence is split by hidden unit
// between the calling thread and a task on XLA's intra-op thread pool (the FFI's
// ThreadPool context). Each owns half of the units, packs only their columns of W_h (all
// four gates of each unit; W_h^T's for the backward), so its share (0.5 MB for H = 256)
// stays in its own core's L2 cache, and computes their gates; a spinning barrier per time
// step publishes h_t (forward) or dz_t (backward) to the other. XLA's pool, not a thread
// of our own: a separate OpenMP team measured no faster inside a training step than one
// thread, as XLA's idle pool worker kept the second core; the pool's worker runs the half
// at once. Every output element is summed in the same order as on one thread, so the
// results are the same bits either way. Several sequences in one call (jax.vmap) run one
// after another on the calling thread.
//
// Batching (jax.vmap): registered with vmap_method="broadcast_all", so a vmapped call has
// L leading axes of one shape on every operand; each leading index is one sequence.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDJAX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FEDJAX_CLONES
#endif

namespace fedjax_native {
namespace {

// exp(x), Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6 polynomial,
// 2^n by the exponent bits. Branch-free so that loops over it vectorise; x is clamped to
// [-87.3, 88.3] (no overflow to inf; exp(-87.3) ~ 1.2e-38).
inline float ExpF(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.3f ? 88.3f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float Sigmoid(float x) { return 1.0f / (1.0f + ExpF(-x)); }
inline float Tanh(float x) { return 2.0f / (1.0f + ExpF(-2.0f * x)) - 1.0f; }

constexpr int64_t kRows = 4;   // rows of the register block
constexpr int64_t kCols = 32;  // columns of the register block

// Columns `cols` of w [k, ld] (of w^T when `transpose`: then w is [ld, k] and column j of
// w^T is row cols[j] of w), packed: [ceil(n / kCols)][k][kCols] for n = cols.size(),
// zero-padded, so that a block's rows are read as one contiguous stream (prefetch-
// friendly; a 4H = 1024 row stride would put a block's rows in the same cache sets).
void Pack(const float* w, int64_t k, int64_t ld, const std::vector<int64_t>& cols,
          bool transpose, std::vector<float>* out) {
  const int64_t n = cols.size(), blocks = (n + kCols - 1) / kCols;
  out->assign(blocks * k * kCols, 0.0f);
  float* p = out->data();
  for (int64_t jb = 0; jb < blocks; ++jb)
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t j = jb * kCols; j < std::min(n, (jb + 1) * kCols); ++j)
        p[(jb * k + kk) * kCols + j - jb * kCols] =
            transpose ? w[cols[j] * k + kk] : w[kk * ld + cols[j]];
}

// out[r, j0:j0+cols] += a[r, :] @ block for R rows, cols <= kCols valid columns (all of
// them when Full).
template <int64_t R, bool Full>
__attribute__((always_inline)) inline void Block(const float* a, int64_t k, const float* block,
                                                 int64_t n, int64_t j0, int64_t cols,
                                                 float* out) {
  float acc[R][kCols];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < kCols; ++j)
      acc[r][j] = (Full || j < cols) ? out[r * n + j0 + j] : 0.0f;
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* wr = block + kk * kCols;
    for (int64_t r = 0; r < R; ++r) {
      const float av = a[r * k + kk];
      for (int64_t j = 0; j < kCols; ++j) acc[r][j] += av * wr[j];
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < kCols; ++j)
      if (Full || j < cols) out[r * n + j0 + j] = acc[r][j];
}

// out[r, :] += a[r, :] @ w for r < rows; a [rows, k], out [rows, n] row-major, w packed by
// `Pack`. Blocks of kRows x kCols accumulators stay in registers while k runs.
FEDJAX_CLONES
void AddRowsTimesPacked(const float* a, int64_t rows, int64_t k, const float* packed,
                        int64_t n, float* out) {
  const int64_t blocks = (n + kCols - 1) / kCols;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const int64_t rr = std::min(kRows, rows - r0);
    for (int64_t jb = 0; jb < blocks; ++jb) {
      const int64_t j0 = jb * kCols, cols = std::min(kCols, n - j0);
      const float* block = packed + jb * k * kCols;
      const float* ar = a + r0 * k;
      float* o = out + r0 * n;
      if (rr == kRows && cols == kCols) {
        Block<kRows, true>(ar, k, block, n, j0, cols, o);
        continue;
      }
      switch (rr) {
        case 4: Block<4, false>(ar, k, block, n, j0, cols, o); break;
        case 3: Block<3, false>(ar, k, block, n, j0, cols, o); break;
        case 2: Block<2, false>(ar, k, block, n, j0, cols, o); break;
        default: Block<1, false>(ar, k, block, n, j0, cols, o); break;
      }
    }
  }
}

// The hidden units [u0, u0 + nu) of one sequence: the range a thread owns.
struct Units {
  int64_t u0, nu;
  // The columns of [B, 4H] gate rows that belong to these units, gate by gate.
  std::vector<int64_t> GateColumns(int64_t hidden) const {
    std::vector<int64_t> cols;
    for (int64_t g = 0; g < 4; ++g)
      for (int64_t j = 0; j < nu; ++j) cols.push_back(g * hidden + u0 + j);
    return cols;
  }
  std::vector<int64_t> Columns() const {
    std::vector<int64_t> cols;
    for (int64_t j = 0; j < nu; ++j) cols.push_back(u0 + j);
    return cols;
  }
};

// Gates of one step for the units `u`: z [B, 4 nu] (pre-activations, x_proj + h W_h, of
// these units, gate by gate) -> the activated gates acts [B, 4H]; c_prev [B, H] -> c,
// h [B, H] (only these units' entries are read and written).
FEDJAX_CLONES
void ForwardGates(int64_t batch, int64_t hidden, Units u, const float* __restrict z,
                  const float* __restrict c_prev, float* __restrict acts,
                  float* __restrict c, float* __restrict h) {
  const int64_t nu = u.nu;
  for (int64_t b = 0; b < batch; ++b) {
    const float* zb = z + b * 4 * nu;
    float* ab = acts + b * 4 * hidden + u.u0;
    const int64_t off = b * hidden + u.u0;
    for (int64_t j = 0; j < nu; ++j) {
      const float i = Sigmoid(zb[j]), g = Tanh(zb[nu + j]), f = Sigmoid(zb[2 * nu + j] + 1.0f),
                  o = Sigmoid(zb[3 * nu + j]);
      const float cn = f * c_prev[off + j] + i * g;
      ab[j] = i;
      ab[hidden + j] = g;
      ab[2 * hidden + j] = f;
      ab[3 * hidden + j] = o;
      c[off + j] = cn;
      h[off + j] = o * Tanh(cn);
    }
  }
}

// The gate gradients of one step for the units `u`: dh, dc [B, nu] (in: from step t+1,
// without d_hs[t]; out: dc for step t-1), d_hs [B, H], acts [B, 4H], c and c_prev [B, H]
// -> these units' columns of dz [B, 4H].
FEDJAX_CLONES
void BackwardGates(int64_t batch, int64_t hidden, Units u, const float* __restrict d_hs,
                   const float* __restrict acts, const float* __restrict c,
                   const float* __restrict c_prev, const float* __restrict dh,
                   float* __restrict dc, float* __restrict dz) {
  const int64_t nu = u.nu;
  for (int64_t b = 0; b < batch; ++b) {
    const float* ab = acts + b * 4 * hidden + u.u0;
    float* zb = dz + b * 4 * hidden + u.u0;
    const int64_t off = b * hidden + u.u0, loc = b * nu;
    for (int64_t j = 0; j < nu; ++j) {
      const float i = ab[j], g = ab[hidden + j], f = ab[2 * hidden + j], o = ab[3 * hidden + j];
      const float h_grad = dh[loc + j] + d_hs[off + j];
      const float tc = Tanh(c[off + j]);
      const float c_grad = dc[loc + j] + h_grad * o * (1.0f - tc * tc);
      zb[j] = c_grad * g * i * (1.0f - i);
      zb[hidden + j] = c_grad * i * (1.0f - g * g);
      zb[2 * hidden + j] = c_grad * c_prev[off + j] * f * (1.0f - f);
      zb[3 * hidden + j] = h_grad * tc * o * (1.0f - o);
      dc[loc + j] = c_grad * f;
    }
  }
}

// The barrier between time steps of a team splitting one sequence: spinning, because a
// step takes tens of microseconds and OpenMP's own barrier (GNU OpenMP's default wait
// policy) measured twice as slow as one thread here; after 2048 pauses (tens of
// microseconds) it yields the core between checks, for a partner that was descheduled
// (more threads than cores: several CPU devices at once).
class StepBarrier {
 public:
  explicit StepBarrier(int threads) : threads_(threads) {}
  void Wait() {
    if (threads_ <= 1) return;
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < (1 << 11)) {
        CpuRelax();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  int threads_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// The forward of one sequence for the units `u`, on one thread of the team of `barrier`.
void ForwardUnits(int64_t steps, int64_t batch, int64_t hidden, Units u, StepBarrier* barrier,
                  const float* x_proj, const float* w, const float* h0, const float* c0,
                  float* hs, float* cs, float* acts) {
  const int64_t bh = batch * hidden, bg = batch * 4 * hidden, nu = u.nu;
  thread_local std::vector<float> z_buffer, w_packed;
  z_buffer.resize(batch * 4 * nu);
  float* z = z_buffer.data();
  Pack(w, hidden, 4 * hidden, u.GateColumns(hidden), false, &w_packed);
  const float* h = h0;
  const float* c = c0;
  for (int64_t t = 0; t < steps; ++t) {
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t g = 0; g < 4; ++g)
        std::memcpy(z + (b * 4 + g) * nu, x_proj + t * bg + b * 4 * hidden + g * hidden + u.u0,
                    sizeof(float) * nu);
    AddRowsTimesPacked(h, batch, hidden, w_packed.data(), 4 * nu, z);
    ForwardGates(batch, hidden, u, z, c, acts + t * bg, cs + t * bh, hs + t * bh);
    barrier->Wait();  // h_t complete: every thread's next product reads all of it
    h = hs + t * bh;
    c = cs + t * bh;
  }
}

// The backward of one sequence for the units `u`, on one thread of the team of `barrier`.
void BackwardUnits(int64_t steps, int64_t batch, int64_t hidden, Units u, StepBarrier* barrier,
                   const float* d_hs, const float* d_h_last, const float* d_c_last,
                   const float* acts, const float* cs, const float* c0, const float* w,
                   float* dzs, float* dh0, float* dc0) {
  const int64_t bh = batch * hidden, bg = batch * 4 * hidden, g4 = 4 * hidden, nu = u.nu;
  thread_local std::vector<float> scratch, w_t;
  scratch.resize(2 * batch * nu);
  float* dh = scratch.data();  // [B, nu]
  float* dc = dh + batch * nu;
  Pack(w, g4, hidden, u.Columns(), true, &w_t);  // these units' columns of W_h^T [4H, H]
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(dh + b * nu, d_h_last + b * hidden + u.u0, sizeof(float) * nu);
    std::memcpy(dc + b * nu, d_c_last + b * hidden + u.u0, sizeof(float) * nu);
  }
  for (int64_t t = steps - 1; t >= 0; --t) {
    float* dz = dzs + t * bg;
    BackwardGates(batch, hidden, u, d_hs + t * bh, acts + t * bg, cs + t * bh,
                  t > 0 ? cs + (t - 1) * bh : c0, dh, dc, dz);
    barrier->Wait();  // dz_t complete: every thread's product reads all of it
    std::fill(dh, dh + batch * nu, 0.0f);
    AddRowsTimesPacked(dz, batch, g4, w_t.data(), nu, dh);
  }
  for (int64_t b = 0; b < batch; ++b) {
    std::memcpy(dh0 + b * hidden + u.u0, dh + b * nu, sizeof(float) * nu);
    std::memcpy(dc0 + b * hidden + u.u0, dc + b * nu, sizeof(float) * nu);
  }
}

// The two halves of one sequence's team: the calling thread and a task on XLA's
// intra-op thread pool (the pool XLA:CPU's own parallel ops run on, so no thread outside
// it competes for the cores). The task claims its half when it starts; if it has not
// started within about a millisecond (the pool is busy), the calling thread claims the
// whole sequence instead and runs it alone, and the task, when it runs, finds nothing to
// do. The shared record outlives both (shared_ptr).
struct Team {
  std::atomic<int> claim{0};  // 0: open, 1: the task took its half, 2: the caller took all
  std::atomic<bool> done{false};
  StepBarrier barrier{2};
};

// Sequences run split over two threads since the library loaded (for tests).
std::atomic<int64_t>& SplitCount() {
  static std::atomic<int64_t> count{0};
  return count;
}

// Runs `one(0, units, barrier)` for every sequence l < n: one sequence's hidden units split
// in two (a multiple of 8 each, at least 64) between the caller and a pool task when the
// kernel may use 2 threads and the pool has them; otherwise on the calling thread.
template <typename One>
void ForEachSequence(ffi::ThreadPool& pool, int64_t n, int64_t hidden, const One& one) {
  StepBarrier alone(1);
  const int threads = KernelThreads() > 0 ? KernelThreads() : 2;
  const int64_t half = (hidden / 2 + 7) / 8 * 8;
  if (n != 1 || threads < 2 || half < 64 || hidden - half < 64 || pool.num_threads() < 2) {
    for (int64_t l = 0; l < n; ++l) one(l, Units{0, hidden}, &alone);
    return;
  }
  auto team = std::make_shared<Team>();
  const Units mine{0, half}, theirs{half, hidden - half};
  const std::thread::id caller = std::this_thread::get_id();
  pool.Schedule([team, theirs, caller, &one]() {
    // Not on the caller's thread (a pool that cannot schedule runs the task inline), and
    // only while the caller has not taken the whole sequence.
    int open = 0;
    if (std::this_thread::get_id() == caller || !team->claim.compare_exchange_strong(open, 1))
      return;
    one(0, theirs, &team->barrier);
    team->done.store(true, std::memory_order_release);
  });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(1);
  for (int spins = 1; team->claim.load(std::memory_order_acquire) == 0; ++spins) {
    CpuRelax();
    if (spins % 64 == 0 && std::chrono::steady_clock::now() > deadline) break;
  }
  int open = 0;
  if (team->claim.compare_exchange_strong(open, 2)) {
    one(0, Units{0, hidden}, &alone);
    return;
  }
  SplitCount().fetch_add(1, std::memory_order_relaxed);
  one(0, mine, &team->barrier);
  while (!team->done.load(std::memory_order_acquire)) CpuRelax();
}

using F32 = ffi::Buffer<ffi::F32>;

// The leading (vmapped) count of a buffer of rank `rank` + L, after checking that the
// trailing dimensions are `tail`.
bool Split(const F32& buffer, std::initializer_list<int64_t> tail, int64_t lead_rank,
           int64_t* count) {
  auto dims = buffer.dimensions();
  if (static_cast<int64_t>(dims.size()) != lead_rank + static_cast<int64_t>(tail.size()))
    return false;
  int64_t n = 1;
  for (int64_t i = 0; i < lead_rank; ++i) n *= dims[i];
  int64_t i = lead_rank;
  for (int64_t d : tail)
    if (dims[i++] != d) return false;
  *count = n;
  return true;
}

ffi::Error Forward(ffi::ThreadPool pool, F32 x_proj, F32 w_h, F32 h0, F32 c0,
                   ffi::Result<F32> hs, ffi::Result<F32> cs, ffi::Result<F32> acts) {
  auto xd = x_proj.dimensions();
  if (xd.size() < 3) return Fail("lstm forward: x_proj must be [..., T, B, 4H]");
  const int64_t lead = xd.size() - 3, steps = xd[lead], batch = xd[lead + 1],
                g4 = xd[lead + 2], hidden = g4 / 4;
  int64_t n = 0, m = 0;
  if (g4 % 4 != 0 || !Split(x_proj, {steps, batch, g4}, lead, &n) ||
      !Split(w_h, {hidden, g4}, lead, &m) || m != n || !Split(h0, {batch, hidden}, lead, &m) ||
      m != n || !Split(c0, {batch, hidden}, lead, &m) || m != n ||
      !Split(*hs, {steps, batch, hidden}, lead, &m) || m != n ||
      !Split(*cs, {steps, batch, hidden}, lead, &m) || m != n ||
      !Split(*acts, {steps, batch, g4}, lead, &m) || m != n)
    return Fail("lstm forward: shapes do not agree");
  const int64_t sx = steps * batch * g4, sw = hidden * g4, ss = batch * hidden,
                sh = steps * batch * hidden;
  ForEachSequence(pool, n, hidden, [&](int64_t l, Units u, StepBarrier* barrier) {
    ForwardUnits(steps, batch, hidden, u, barrier, x_proj.typed_data() + l * sx,
                 w_h.typed_data() + l * sw, h0.typed_data() + l * ss, c0.typed_data() + l * ss,
                 hs->typed_data() + l * sh, cs->typed_data() + l * sh,
                 acts->typed_data() + l * sx);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, F32 d_hs, F32 d_h_last, F32 d_c_last, F32 acts,
                    F32 cs, F32 c0, F32 w_h, ffi::Result<F32> dzs, ffi::Result<F32> dh0,
                    ffi::Result<F32> dc0) {
  auto ad = acts.dimensions();
  if (ad.size() < 3) return Fail("lstm backward: acts must be [..., T, B, 4H]");
  const int64_t lead = ad.size() - 3, steps = ad[lead], batch = ad[lead + 1],
                g4 = ad[lead + 2], hidden = g4 / 4;
  int64_t n = 0, m = 0;
  if (g4 % 4 != 0 || !Split(acts, {steps, batch, g4}, lead, &n) ||
      !Split(d_hs, {steps, batch, hidden}, lead, &m) || m != n ||
      !Split(d_h_last, {batch, hidden}, lead, &m) || m != n ||
      !Split(d_c_last, {batch, hidden}, lead, &m) || m != n ||
      !Split(cs, {steps, batch, hidden}, lead, &m) || m != n ||
      !Split(c0, {batch, hidden}, lead, &m) || m != n ||
      !Split(w_h, {hidden, g4}, lead, &m) || m != n ||
      !Split(*dzs, {steps, batch, g4}, lead, &m) || m != n ||
      !Split(*dh0, {batch, hidden}, lead, &m) || m != n ||
      !Split(*dc0, {batch, hidden}, lead, &m) || m != n)
    return Fail("lstm backward: shapes do not agree");
  const int64_t sx = steps * batch * g4, sw = hidden * g4, ss = batch * hidden,
                sh = steps * batch * hidden;
  ForEachSequence(pool, n, hidden, [&](int64_t l, Units u, StepBarrier* barrier) {
    BackwardUnits(steps, batch, hidden, u, barrier, d_hs.typed_data() + l * sh,
                  d_h_last.typed_data() + l * ss, d_c_last.typed_data() + l * ss,
                  acts.typed_data() + l * sx, cs.typed_data() + l * sh,
                  c0.typed_data() + l * ss, w_h.typed_data() + l * sw,
                  dzs->typed_data() + l * sx, dh0->typed_data() + l * ss,
                  dc0->typed_data() + l * ss);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace fedjax_native

namespace fn = fedjax_native;

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxLstmForward, fn::Forward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<fn::F32>()   // x_proj [T, B, 4H]
                                  .Arg<fn::F32>()   // w_h [H, 4H]
                                  .Arg<fn::F32>()   // h0 [B, H]
                                  .Arg<fn::F32>()   // c0 [B, H]
                                  .Ret<fn::F32>()   // hs [T, B, H]
                                  .Ret<fn::F32>()   // cs [T, B, H]
                                  .Ret<fn::F32>());  // acts [T, B, 4H]

XLA_FFI_DEFINE_HANDLER_SYMBOL(FedjaxLstmBackward, fn::Backward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<fn::F32>()   // d_hs [T, B, H]
                                  .Arg<fn::F32>()   // d_h_last [B, H]
                                  .Arg<fn::F32>()   // d_c_last [B, H]
                                  .Arg<fn::F32>()   // acts [T, B, 4H]
                                  .Arg<fn::F32>()   // cs [T, B, H]
                                  .Arg<fn::F32>()   // c0 [B, H]
                                  .Arg<fn::F32>()   // w_h [H, 4H]
                                  .Ret<fn::F32>()   // dzs [T, B, 4H]
                                  .Ret<fn::F32>()   // dh0 [B, H]
                                  .Ret<fn::F32>());  // dc0 [B, H]

// How many sequences ran split over two threads since the library loaded.
extern "C" int64_t fedjax_native_lstm_split_count() {
  return fedjax_native::SplitCount().load(std::memory_order_relaxed);
}
