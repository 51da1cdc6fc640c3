// CUDA-graph capture and replay of the training step's forward and backward
// (`[train] cuda_graphs`, worker/src/train/graph.rs), over ATen's at::cuda::CUDAGraph.
//
// A graph owns a side stream from the pool: the warm-up passes and the capture run on it (a
// capture cannot run on the default stream), each entered after the current stream's work and
// left with the current stream waiting for it, so that the caller sees plain stream order.
// Autocast's cast cache is off while capturing (cached casts would outlive the capture's
// memory pool), as torch.cuda.make_graphed_callables requires.
//
// Compiled into every build against the CUDA libtorch with its headers (build.rs defines
// AXIAL_WITH_CUDA); without them every entry point says why instead. Errors come back as text,
// never as exceptions across the C ABI.
#include "group.hpp"

#ifdef AXIAL_WITH_CUDA
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAEvent.h>

#include <optional>
#endif

#include <stdexcept>
#include <string>

namespace {

#ifdef AXIAL_WITH_CUDA
struct Graph {
  explicit Graph(c10::DeviceIndex d)
      : device(d), side(c10::cuda::getStreamFromPool(false, d)) {}

  // Makes the side stream current after the current stream's work so far.
  void enter() {
    auto current = c10::cuda::getCurrentCUDAStream(device);
    c10::cuda::CUDAEvent ready;
    ready.record(current);
    ready.block(side);
    previous = current;
    guard.emplace(side);
  }

  // Makes the previous stream current again, waiting for the side stream's work.
  void leave() {
    guard.reset();
    c10::cuda::CUDAEvent done;
    done.record(side);
    done.block(*previous);
    previous.reset();
  }

  c10::DeviceIndex device;
  c10::cuda::CUDAStream side;
  std::optional<c10::cuda::CUDAStream> previous;
  std::optional<c10::cuda::CUDAStreamGuard> guard;
  at::cuda::CUDAGraph graph;
  bool capturing = false;
  bool captured = false;
  bool cache_was_enabled = true;
};
#endif

#ifndef AXIAL_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error(
      "this build has no CUDA (built against a libtorch without CUDA or its "
      "headers; run scripts/setup-libtorch.sh and rebuild)");
}
#endif

}  // namespace

extern "C" {

// A graph for CUDA device `device` with its side stream; nullptr on error (no such device,
// no CUDA in this build).
void* axial_cuda_graph_new(int device, char* err, size_t err_len) {
  void* out = nullptr;
  axial::guarded(err, err_len, [&] {
#ifdef AXIAL_WITH_CUDA
    int count = static_cast<int>(c10::cuda::device_count());
    if (device < 0 || device >= count) {
      throw std::runtime_error("this machine has no GPU cuda:" +
                               std::to_string(device) + " (" + std::to_string(count) +
                               " CUDA devices)");
    }
    out = new Graph(static_cast<c10::DeviceIndex>(device));
#else
    no_cuda();
#endif
  });
  return out;
}

// `capture` 0: makes the side stream current (a warm-up pass runs on it); 1: also begins the
// capture, with autocast's cache off, replacing an earlier capture. Each begin is closed by
// axial_cuda_graph_end.
int axial_cuda_graph_begin(void* handle, int capture, char* err, size_t err_len) {
  return axial::guarded(err, err_len, [&] {
#ifdef AXIAL_WITH_CUDA
    auto* g = static_cast<Graph*>(handle);
    if (g->guard) throw std::runtime_error("begin inside an unfinished begin");
    if (capture) {
      if (g->captured) {
        // Captured again (what it used moved): the old graph and its memory pool go first.
        g->graph.reset();
        g->captured = false;
      }
      // A capture allocates only from its own new pool: what the caching allocator holds
      // goes back first (as torch.cuda.graph does), or a batch that fits uncaptured may not.
      c10::cuda::device_synchronize();
      c10::cuda::CUDACachingAllocator::emptyCache();
    }
    g->enter();
    if (capture) {
      g->cache_was_enabled = at::autocast::is_autocast_cache_enabled();
      at::autocast::set_autocast_cache_enabled(false);
      try {
        g->graph.capture_begin();
      } catch (...) {
        at::autocast::set_autocast_cache_enabled(g->cache_was_enabled);
        g->leave();
        throw;
      }
      g->capturing = true;
    }
#else
    (void)handle;
    (void)capture;
    no_cuda();
#endif
  });
}

// Ends what axial_cuda_graph_begin began: the capture (the graph is then ready to replay; a
// failed capture leaves none) and the side stream.
int axial_cuda_graph_end(void* handle, char* err, size_t err_len) {
  return axial::guarded(err, err_len, [&] {
#ifdef AXIAL_WITH_CUDA
    auto* g = static_cast<Graph*>(handle);
    if (!g->guard) throw std::runtime_error("end without a begin");
    if (g->capturing) {
      g->capturing = false;
      at::autocast::set_autocast_cache_enabled(g->cache_was_enabled);
      try {
        g->graph.capture_end();
      } catch (...) {
        g->leave();
        throw;
      }
      g->captured = true;
    }
    g->leave();
#else
    (void)handle;
    no_cuda();
#endif
  });
}

// Replays the captured graph on the current stream.
int axial_cuda_graph_replay(void* handle, char* err, size_t err_len) {
  return axial::guarded(err, err_len, [&] {
#ifdef AXIAL_WITH_CUDA
    auto* g = static_cast<Graph*>(handle);
    if (!g->captured) throw std::runtime_error("replay before a capture");
    g->graph.replay();
#else
    (void)handle;
    no_cuda();
#endif
  });
}

void axial_cuda_graph_free(void* handle) {
#ifdef AXIAL_WITH_CUDA
  try {
    delete static_cast<Graph*>(handle);
  } catch (...) {
  }
#else
  (void)handle;
#endif
}

}  // extern "C"
