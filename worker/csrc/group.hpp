// What the shim's translation units share: the group handle and the exception guard.
#pragma once

#include <ATen/core/grad_mode.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "shm.hpp"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <thread>

namespace axial {

// A process group handle as Rust sees it: the backend, the store it formed through (kept
// alive as long as the group), and the timeout every collective waits at most.
struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  std::chrono::milliseconds timeout;
  // Gloo's coalesced all-reduce takes CPU tensors only: CUDA tensors are copied through the
  // host (several ranks sharing one GPU use Gloo this way). True exactly for Gloo groups.
  bool host_staging;
  // Set from another thread when the coordinator has ended this generation: a Gloo collective
  // waiting for a hung peer gives up at once instead of at its timeout.
  std::atomic<bool> aborted{false};
  // Nanoseconds spent in the differentiable all-reduces (synchronized batch norm), in all:
  // the step's sync_wait phase, told apart from the rank's own forward and backward work.
  mutable std::atomic<uint64_t> sync_wait_ns{0};
  // How many of them there were.
  mutable std::atomic<uint64_t> sync_calls{0};
  // When every rank runs on this host: shared memory for those all-reduces (shm.hpp).
  std::shared_ptr<Shm> shm{};
};

// Waits for `work`: at most the group's timeout, and no longer once the group is aborted.
// Gloo work is polled (its own wait cannot be interrupted); NCCL work is waited for the usual
// way (stream-ordered, the CPU does not block), and ProcessGroupNCCL::abort ends a hung one.
inline void wait_work(const Group& g, const c10::intrusive_ptr<c10d::Work>& work) {
  if (g.host_staging) {
    auto start = std::chrono::steady_clock::now();
    for (int spins = 0; !work->isCompleted(); ++spins) {
      if (g.aborted.load(std::memory_order_relaxed)) {
        throw std::runtime_error("aborted: the coordinator ended this generation");
      }
      if (std::chrono::steady_clock::now() - start > g.timeout) {
        throw std::runtime_error("collective did not complete within its timeout");
      }
      // A few yields for the short waits, then sleeps: a rank waiting for a slower peer (or
      // for its own all-reduce) must not burn the CPU its loader threads, or under a CPU quota
      // its own work, need (2,000 yields first made a waiting rank spin a core).
      if (spins < 20) {
        std::this_thread::yield();
      } else {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
      }
    }
  }
  // Completed (Gloo: returns at once, rethrowing the work's error if it failed).
  if (!work->wait(g.timeout)) throw std::runtime_error("collective did not complete within its timeout");
}

inline void set_err(char* err, size_t len, const char* what) {
  if (err != nullptr && len > 0) {
    std::strncpy(err, what, len - 1);
    err[len - 1] = '\0';
  }
}

// Runs `run` on `ts`, through host copies when the group needs them for CUDA tensors; the
// results are copied back in place.
template <typename F>
void on_device(const Group& g, std::vector<at::Tensor>& ts, F&& run) {
  if (!g.host_staging || ts.empty() || !ts[0].is_cuda()) {
    run(ts);
    return;
  }
  std::vector<at::Tensor> host;
  host.reserve(ts.size());
  for (auto& t : ts) host.push_back(t.to(at::kCPU).contiguous());
  run(host);
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < ts.size(); ++i) ts[i].copy_(host[i]);
}

// `parts` as one 1-D tensor over the same memory, when they lie back to back in one storage,
// in order, each contiguous, of one dtype and device (gradients placed in their bucket's
// storage, see collective::ddp::into_buckets); else an undefined tensor. A collective on it
// sums the parts in place: no copy into a flat buffer and back.
inline at::Tensor flat_alias(const std::vector<at::Tensor>& parts) {
  if (parts.empty()) return {};
  const auto& first = parts[0];
  if (!first.defined() || !first.has_storage()) return {};
  int64_t offset = first.storage_offset();
  int64_t total = 0;
  for (const auto& t : parts) {
    if (!t.defined() || !t.has_storage() || !t.is_contiguous() || t.scalar_type() != first.scalar_type() ||
        t.device() != first.device() || !t.storage().is_alias_of(first.storage()) ||
        t.storage_offset() != offset + total) {
      return {};
    }
    total += t.numel();
  }
  auto flat = at::empty({0}, first.options());
  flat.set_(first.storage(), offset, {total}, {1});
  return flat;
}

// In-place sum over the group's ranks of one contiguous tensor, its time counted in the
// group's sync_wait_ns (synchronized batch norm; c10d_shim.cpp). Throws, with the collective
// failure mark, when the collective fails.
void sum_over_ranks(const Group& g, at::Tensor& t);

// Runs `f`, turning any exception into an error text and a non-zero return: nothing throws
// across the C ABI.
template <typename F>
int guarded(char* err, size_t len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
  } catch (...) {
    set_err(err, len, "unknown C++ exception");
  }
  return 1;
}

}  // namespace axial
