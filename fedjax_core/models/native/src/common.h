// Shared pieces of fedjax-sim's native CPU kernels: the oneDNN engine, one stream per
// calling thread, a thread-safe cache of built primitives, and XLA FFI <-> oneDNN types.
//
// Every kernel is an XLA FFI handler (xla/ffi/api/ffi.h, shipped with jaxlib) that XLA:CPU
// calls with device buffers; the handler looks its oneDNN primitives up by shape in a
// PlanCache (building them once), runs them on the calling thread's stream, and waits.
// Scratchpads are user-managed (one buffer per calling thread), so one primitive can run
// on several XLA threads at once (multi-device CPU meshes).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace fedjax_native {

namespace ffi = xla::ffi;

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

// A scratchpad buffer of at least `bytes`, owned by the calling thread.
inline void* Scratchpad(size_t bytes) {
  thread_local std::vector<uint8_t> buffer;
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

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

// The ffi::Error of a failed oneDNN call or a bad argument.
inline ffi::Error Fail(const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "fedjax native kernel: " + what);
}

}  // namespace fedjax_native
