// Shared pieces of fedjax-sim's native CPU kernels: the oneDNN engine, one stream per
// calling thread, a thread-safe cache of built primitives, and XLA FFI <-> oneDNN types.
//
// Every kernel is an XLA FFI handler (xla/ffi/api/ffi.h, shipped with jaxlib) that XLA:CPU
// calls with device buffers; the handler looks its oneDNN primitives up by shape in a
// PlanCache (building them once), runs them on the calling thread's stream, and waits.
// Scratchpads are user-managed (one buffer per calling thread), so one primitive can run
// on several XLA threads at once (multi-device CPU meshes).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

// GNU OpenMP's thread-count calls, weak: oneDNN's GOMP build brings libgomp, and a build
// with another threading runtime simply lacks them (then the count is oneDNN's own).
extern "C" {
void omp_set_num_threads(int) __attribute__((weak));
int omp_get_max_threads() __attribute__((weak));
}

namespace fedjax_native {

namespace ffi = xla::ffi;

// Threads per kernel call (0: oneDNN's default, every core); set by fedjax_native_set_threads.
inline int& KernelThreads() {
  static int threads = 0;
  return threads;
}

// Runs the calling thread's oneDNN work on KernelThreads() threads while in scope.
class ThreadScope {
 public:
  ThreadScope() {
    if (KernelThreads() > 0 && omp_set_num_threads != nullptr && omp_get_max_threads != nullptr) {
      previous_ = omp_get_max_threads();
      omp_set_num_threads(KernelThreads());
    }
  }
  ~ThreadScope() {
    if (previous_ > 0) omp_set_num_threads(previous_);
  }
  ThreadScope(const ThreadScope&) = delete;
  ThreadScope& operator=(const ThreadScope&) = delete;

 private:
  int previous_ = 0;
};

// The process-wide CPU engine.
inline dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One in-order stream per calling thread.
inline dnnl::stream& Stream() {
  thread_local dnnl::stream stream(Engine());
  return stream;
}

// A buffer of at least `bytes` owned by the calling thread, one per `Slot` (kept and
// grown across calls: the kernels of a training step reuse it instead of allocating).
template <int Slot>
void* ThreadBuffer(size_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

// The oneDNN scratchpad of the calling thread (ThreadBuffer slot 0).
inline void* Scratchpad(size_t bytes) { return ThreadBuffer<0>(bytes); }

// The oneDNN data type of an XLA buffer type; `undef` for unsupported types.
inline dnnl::memory::data_type DnnlType(ffi::DataType type) {
  switch (type) {
    case ffi::DataType::F32:
      return dnnl::memory::data_type::f32;
    case ffi::DataType::BF16:
      return dnnl::memory::data_type::bf16;
    default:
      return dnnl::memory::data_type::undef;
  }
}

// Built plans of type Plan, keyed by a string of their shapes and attributes; built once
// by `make`, then shared read-only by every caller.
template <typename Plan>
class PlanCache {
 public:
  const Plan& Get(const std::string& key, const std::function<Plan()>& make) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      it = plans_.emplace(key, std::make_unique<Plan>(make())).first;
    }
    return *it->second;
  }

 private:
  std::mutex mutex_;
  std::map<std::string, std::unique_ptr<Plan>> plans_;
};

// "1x2x3" for a list of integers (cache keys).
inline std::string Join(std::initializer_list<int64_t> values) {
  std::string out;
  for (int64_t v : values) {
    if (!out.empty()) out += 'x';
    out += std::to_string(v);
  }
  return out;
}

// One pause in a spin-wait loop (x86's PAUSE: lets the sibling hyper-thread run and saves
// power; nothing elsewhere).
inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Runs fn(p) once for every part p < parts: part 0 on the calling thread, the others as
// tasks on XLA's intra-op thread pool (the threads XLA:CPU's own parallel ops use, so
// none of ours competes with them for the cores). A part whose task has not started by
// the time the caller is done with its own runs on the caller, so nothing waits on a busy
// pool, and a pool that runs tasks inline costs nothing. Which thread runs a part does
// not change what it computes: results depend on `parts` only.
template <typename Fn>
void RunParts(ffi::ThreadPool& pool, int parts, const Fn& fn) {
  if (parts <= 1) {
    fn(0);
    return;
  }
  struct Shared {
    explicit Shared(int n) : claimed(n), done(n) {}
    std::vector<std::atomic<bool>> claimed, done;
  };
  auto shared = std::make_shared<Shared>(parts);
  for (int p = 1; p < parts; ++p) {
    pool.Schedule([shared, p, &fn]() {
      if (shared->claimed[p].exchange(true)) return;  // the caller took it
      fn(p);
      shared->done[p].store(true, std::memory_order_release);
    });
  }
  fn(0);
  for (int p = 1; p < parts; ++p) {
    if (!shared->claimed[p].exchange(true)) {
      fn(p);
      continue;
    }
    while (!shared->done[p].load(std::memory_order_acquire)) CpuRelax();
  }
}

// The ffi::Error of a failed oneDNN call or a bad argument.
inline ffi::Error Fail(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fedjax native kernel: " + what);
}

}  // namespace fedjax_native
