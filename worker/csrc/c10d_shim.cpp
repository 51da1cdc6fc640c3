// A small C ABI over libtorch's c10d process groups, so that the Rust worker runs the very
// collectives PyTorch DDP runs: ProcessGroupGloo for CPU tensors (ProcessGroupNCCL, for CUDA
// tensors, is in nccl_shim.cpp, behind the same handle). Every call catches exceptions and
// returns their text; nothing throws across the ABI. A tch `Tensor` is an `at::Tensor*`, so
// tensors pass straight through.
#define USE_C10D_GLOO 1
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/autograd/custom_function.h>

#include "group.hpp"

#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <string>
#include <thread>
#include <vector>

using axial::Group;
using axial::guarded;
using axial::on_device;

namespace {

std::vector<at::Tensor> gather(at::Tensor** tensors, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*tensors[i]);
  return out;
}

// In-place sum over ranks of `ts` (same dtype, dense): one coalesced collective (or, between
// the two ranks of a group on one host, sums through shared memory: shm.hpp; with two ranks
// a + b is the same bits in any order, so the result does not depend on where the ranks run).
// Its errors carry a mark (collective::FAILURE_MARK on the Rust side): inside autograd they
// surface as plain torch errors, and the worker must still know a collective failed.
void sum_coalesced(const Group& g, std::vector<at::Tensor>& ts) {
  try {
    // One tensor, or parts of one buffer lying back to back (gradients in their bucket's
    // storage): a plain all-reduce of it, in place. Otherwise the coalesced all-reduce, which
    // copies the tensors into a flat buffer and back.
    auto flat = ts.size() == 1 ? ts[0] : axial::flat_alias(ts);
    // Two ranks on one host: through shared memory, one tensor (or one buffer) at a time.
    if (g.shm && g.pg->getSize() == 2) {
      if (flat.defined() && g.shm->sum(flat, g.aborted)) return;
      bool eligible = !ts.empty();
      for (const auto& t : ts) {
        eligible &= t.defined() && t.device().type() == at::kCPU && t.is_contiguous() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble);
      }
      if (eligible) {
        for (auto& t : ts) g.shm->sum(t, g.aborted);
        return;
      }
    }
    if (flat.defined() && flat.is_contiguous()) {
      std::vector<at::Tensor> one{flat};
      on_device(g, one, [&](std::vector<at::Tensor>& xs) {
        c10d::AllreduceOptions opts;
        opts.reduceOp = c10d::ReduceOp::SUM;
        opts.timeout = g.timeout;
        axial::wait_work(g, g.pg->allreduce(xs, opts));
      });
      return;
    }
    on_device(g, ts, [&](std::vector<at::Tensor>& xs) {
      c10d::AllreduceCoalescedOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      opts.timeout = g.timeout;
      axial::wait_work(g, g.pg->allreduce_coalesced(xs, opts));
    });
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("axial collective failed: ") + e.what());
  }
}

// In-place sum over ranks of one contiguous CPU tensor, added up in rank order on every rank,
// so that the bits do not depend on the transport or on where the ranks run: through shared
// memory between ranks on one host, else every rank's values gathered (Gloo) and summed here.
// For the synchronized norms' sums (a few kilobytes). False when it does not apply.
bool sum_in_rank_order(const Group& g, at::Tensor& t) {
  if (!t.defined() || t.device().type() != at::kCPU || !t.is_contiguous() ||
      (t.scalar_type() != at::kDouble && t.scalar_type() != at::kFloat)) {
    return false;
  }
  try {
    if (g.shm) return g.shm->sum(t, g.aborted);
    if (!g.host_staging) return false;  // NCCL: its own all-reduce
    const int world = g.pg->getSize();
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int r = 0; r < world; ++r) outputs[0].push_back(at::empty_like(t));
    std::vector<at::Tensor> inputs{t};
    c10d::AllgatherOptions opts;
    opts.timeout = g.timeout;
    axial::wait_work(g, g.pg->allgather(outputs, inputs, opts));
    at::NoGradGuard no_grad;
    t.copy_(outputs[0][0]);
    for (int r = 1; r < world; ++r) t.add_(outputs[0][r]);
    return true;
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("axial collective failed: ") + e.what());
  }
}

// A synchronized norm's sum over ranks (in rank order where it can: sum_in_rank_order), its
// time added to the group's sync_wait_ns.
void timed_sum(const Group& g, std::vector<at::Tensor>& ts) {
  auto start = std::chrono::steady_clock::now();
  struct Add {
    const Group& g;
    std::chrono::steady_clock::time_point start;
    ~Add() {
      auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start);
      g.sync_wait_ns.fetch_add(static_cast<uint64_t>(ns.count()), std::memory_order_relaxed);
      g.sync_calls.fetch_add(1, std::memory_order_relaxed);
    }
  } add{g, start};
  if (ts.size() == 1 && sum_in_rank_order(g, ts[0])) return;
  sum_coalesced(g, ts);
}

// Sum over ranks that autograd can go through: the forward all-reduces the values, the
// backward all-reduces the incoming gradients (d(sum_r x_r)/dx_r = 1 on every rank, and every
// rank's loss depends on the sum). This is what synchronized batch norm needs.
struct AllReduceSumFn : public torch::autograd::Function<AllReduceSumFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor x, int64_t group) {
    ctx->saved_data["group"] = group;
    auto* g = reinterpret_cast<Group*>(group);
    std::vector<at::Tensor> ts{x.detach().clone().contiguous()};
    timed_sum(*g, ts);
    return ts[0];
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    std::vector<at::Tensor> ts{grads[0].detach().clone().contiguous()};
    timed_sum(*g, ts);
    return {ts[0], at::Tensor()};
  }
};

}  // namespace

namespace axial {

void sum_over_ranks(const Group& g, at::Tensor& t) {
  std::vector<at::Tensor> ts{t};
  timed_sum(g, ts);
}

}  // namespace axial

extern "C" {

// Whether the group's sums go through shared memory (every rank on this host: shm.hpp).
int axial_group_shared_memory(void* g) { return reinterpret_cast<Group*>(g)->shm ? 1 : 0; }

// How many synchronized-norm all-reduces the group has run.
uint64_t axial_group_sync_calls(void* g) {
  return reinterpret_cast<Group*>(g)->sync_calls.load(std::memory_order_relaxed);
}

// Seconds the group's differentiable all-reduces have taken, in all.
double axial_group_sync_wait_seconds(void* g) {
  return static_cast<double>(reinterpret_cast<Group*>(g)->sync_wait_ns.load(std::memory_order_relaxed)) * 1e-9;
}

// Differentiable sum over ranks: *out receives a new tensor (owned by the caller).
int axial_allreduce_sum_autograd(void* g, at::Tensor* x, at::Tensor** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto y = AllReduceSumFn::apply(*x, reinterpret_cast<int64_t>(g));
    *out = new at::Tensor(std::move(y));
  });
}

// A TCPStore (tests and benchmarks; workers bootstrap through the coordinator's store,
// kv_store.cpp): rank 0 hosts it on `host:port` (port 0: any free port; the chosen one is
// written to *bound_port); the others connect to it. Returns a c10d::Store*, nullptr on error.
void* axial_store_new(const char* host, int port, int rank, int world, int64_t timeout_ms,
                      int* bound_port, char* err, size_t err_len) {
  c10d::TCPStore* out = nullptr;
  guarded(err, err_len, [&] {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = rank == 0;
    opts.numWorkers = world;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    if (bound_port != nullptr) *bound_port = store->getPort();
    out = store.release();
  });
  return static_cast<c10d::Store*>(out);
}

void axial_store_free(void* store) {
  if (store != nullptr) c10::intrusive_ptr<c10d::Store>::reclaim(static_cast<c10d::Store*>(store));
}

// Joins the Gloo group through `store` (blocks until every rank has joined, or the timeout).
// Gloo's device, where this rank's peers connect, is bound to network interface `iface` when
// it is not empty, else to the address `host` resolves to (this rank's own address, not the
// store's). Returns nullptr on error.
void* axial_gloo_new(void* store, const char* host, const char* iface, int rank, int world,
                     int64_t timeout_ms, char* err, size_t err_len) {
  Group* group = nullptr;
  guarded(err, err_len, [&] {
    auto s = c10::intrusive_ptr<c10d::Store>::unsafe_reclaim_from_nonowning(static_cast<c10d::Store*>(store));
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    options->devices.push_back(
        iface != nullptr && iface[0] != '\0'
            ? c10d::ProcessGroupGloo::createDeviceForInterface(std::string(iface))
            : c10d::ProcessGroupGloo::createDeviceForHostname(std::string(host)));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(s, rank, world, options);
    group = new Group{s, pg, std::chrono::milliseconds(timeout_ms), true};
    group->shm = axial::Shm::create(*s, rank, world, std::chrono::milliseconds(timeout_ms));
  });
  return group;
}

// In-place sum over ranks of a list of same-dtype dense tensors (one coalesced collective).
int axial_allreduce_sum(void* g, at::Tensor** tensors, int n, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* group = static_cast<Group*>(g);
    auto ts = gather(tensors, n);
    sum_coalesced(*group, ts);
  });
}

// In-place broadcast of one tensor from `root`.
int axial_broadcast(void* g, at::Tensor* tensor, int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* group = static_cast<Group*>(g);
    std::vector<at::Tensor> ts{*tensor};
    on_device(*group, ts, [&](std::vector<at::Tensor>& xs) {
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      opts.timeout = group->timeout;
      axial::wait_work(*group, group->pg->broadcast(xs, opts));
    });
  });
}

int axial_barrier(void* g, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto* group = static_cast<Group*>(g);
    c10d::BarrierOptions opts;
    opts.timeout = group->timeout;
    axial::wait_work(*group, group->pg->barrier(opts));
  });
}

// Ends the group from any thread: collectives waiting in it fail at once (Gloo: our wait
// stops polling; NCCL: ProcessGroupNCCL::abort).
void axial_group_abort(void* g) {
  auto* group = static_cast<Group*>(g);
  group->aborted.store(true);
  if (group->shm) group->shm->abort();
  if (!group->host_staging) {
    try {
      group->pg->abort();
    } catch (...) {
    }
  }
}

// Aborted groups still being closed on threads of their own (see axial_group_free).
static std::atomic<int> closing_groups{0};

int axial_groups_closing() { return closing_groups.load(); }

void axial_group_free(void* g) {
  auto* group = static_cast<Group*>(g);
  if (group->aborted.load()) {
    closing_groups.fetch_add(1);
    // A Gloo backend's destructor waits for its in-flight work, which may be a collective with
    // a hung peer, until the collective timeout: close it (then its store) on a thread of its
    // own, so the worker can form its next group meanwhile and nothing is leaked for good.
    std::thread([pg = std::move(group->pg), store = std::move(group->store)]() mutable {
      try {
        pg.reset();
        store.reset();
      } catch (...) {
      }
      closing_groups.fetch_sub(1);
    }).detach();
  }
  delete group;
}

}  // extern "C"
