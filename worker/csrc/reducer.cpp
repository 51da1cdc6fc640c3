// Gradient all-reduce overlapped with the backward pass, as PyTorch DDP's Reducer does it:
// a post-accumulate-grad hook on every parameter counts down its bucket; when a bucket's last
// gradient is in, the bucket's all-reduce starts (asynchronously) while autograd goes on
// computing the earlier layers' gradients. `finish` waits for every bucket (starting any whose
// gradients never came, e.g. unused parameters). Gradients placed in their bucket's storage
// (collective::ddp::into_buckets, as training does) are reduced in place; others are
// flattened into a buffer first and the sums copied back.
//
// Buckets start strictly in index order on every rank (a ready bucket waits for the ones
// before it), so the ranks issue their collectives in the same order whatever order autograd
// finishes the gradients in.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "group.hpp"

namespace {

struct Reducer {
  axial::Group* group;
  std::vector<at::Tensor> params;
  std::vector<std::vector<size_t>> buckets;  // parameter indices
  std::vector<size_t> bucket_of;
  std::vector<size_t> remaining;
  std::vector<at::Tensor> flat;  // the bucket's buffer being reduced (host copy under Gloo + CUDA)
  std::vector<bool> in_place;    // the buffer is the gradients' own storage: nothing to copy back
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  size_t next = 0;  // the next bucket to start
  size_t started_in_backward = 0;  // of the last finished step: buckets the hooks started
  bool armed = false;
  std::mutex mu;

  void reset() {
    for (size_t b = 0; b < buckets.size(); ++b) remaining[b] = buckets[b].size();
    works.assign(buckets.size(), {});
    flat.assign(buckets.size(), at::Tensor());
    in_place.assign(buckets.size(), false);
    next = 0;
  }

  // Starts bucket `b`'s all-reduce (the caller holds `mu`).
  void start(size_t b) {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> grads;
    grads.reserve(buckets[b].size());
    for (size_t i : buckets[b]) grads.push_back(params[i].grad());
    // Gradients in their bucket's storage (collective::ddp::into_buckets): reduced in place.
    auto buffer = axial::flat_alias(grads);
    in_place[b] = buffer.defined();
    if (!in_place[b]) {
      std::vector<at::Tensor> parts;
      parts.reserve(grads.size());
      for (size_t k = 0; k < grads.size(); ++k) {
        const auto& p = params[buckets[b][k]];
        parts.push_back(grads[k].defined() ? grads[k].reshape({-1}) : at::zeros({p.numel()}, p.options()));
      }
      buffer = at::cat(parts);
    }
    if (group->host_staging && buffer.is_cuda()) {
      buffer = buffer.to(at::kCPU);
      in_place[b] = false;
    }
    flat[b] = buffer;
    // Two ranks on one host: summed here, through shared memory (no core is free to overlap
    // it anyway when every core runs a rank; with two ranks the bits are those of Gloo's sum).
    if (group->shm && group->pg->getSize() == 2 && group->shm->sum(buffer, group->aborted)) return;
    std::vector<at::Tensor> ts{buffer};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    opts.timeout = group->timeout;
    works[b] = group->pg->allreduce(ts, opts);
  }

  // Starts every ready bucket in order.
  void start_ready() {
    while (next < buckets.size() && remaining[next] == 0) start(next++);
  }

  void ready(size_t i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed) return;
    size_t b = bucket_of[i];
    if (remaining[b] > 0) --remaining[b];
    try {
      start_ready();
    } catch (const std::exception& e) {
      throw std::runtime_error(std::string("axial collective failed: ") + e.what());
    }
  }

  void finish() {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed) return;
    armed = false;
    struct ResetOnExit {
      Reducer* r;
      ~ResetOnExit() { r->reset(); }
    } reset_on_exit{this};
    started_in_backward = next;
    for (auto& r : remaining) r = 0;
    start_ready();
    at::NoGradGuard no_grad;
    for (size_t b = 0; b < buckets.size(); ++b) {
      if (works[b]) axial::wait_work(*group, works[b]);
      if (in_place[b]) continue;
      int64_t offset = 0;
      for (size_t i : buckets[b]) {
        auto g = params[i].grad();
        int64_t n = params[i].numel();
        auto part = flat[b].narrow(0, offset, n).view(params[i].sizes());
        offset += n;
        if (g.defined()) g.copy_(part);
      }
    }
  }
};

struct Hook : torch::autograd::PostAccumulateGradHook {
  std::shared_ptr<Reducer> reducer;
  size_t index;
  Hook(std::shared_ptr<Reducer> r, size_t i) : reducer(std::move(r)), index(i) {}
  void operator()(const torch::autograd::Variable& /*tensor*/) override { reducer->ready(index); }
};

struct Handle {
  std::shared_ptr<Reducer> reducer;
};

}  // namespace

extern "C" {

// A reducer over `n` parameters (same dtype) in buckets of about `bucket_bytes`, filled walking
// the parameters backwards (the order backward produces their gradients). Installs a
// post-accumulate-grad hook on each (replacing any other such hook). nullptr on error.
void* axial_reducer_new(void* g, at::Tensor** params, int n, int64_t bucket_bytes, char* err,
                        size_t err_len) {
  Handle* out = nullptr;
  axial::guarded(err, err_len, [&] {
    auto r = std::make_shared<Reducer>();
    r->group = static_cast<axial::Group*>(g);
    for (int i = 0; i < n; ++i) r->params.push_back(*params[i]);
    r->bucket_of.assign(n, 0);
    int64_t size = 0;
    for (int i = n - 1; i >= 0; --i) {
      const auto& p = r->params[i];
      int64_t bytes = p.numel() * static_cast<int64_t>(p.element_size());
      if (r->buckets.empty() || size + bytes > bucket_bytes) {
        r->buckets.emplace_back();
        size = 0;
      }
      size += bytes;
      r->buckets.back().push_back(i);
      r->bucket_of[i] = r->buckets.size() - 1;
    }
    r->remaining.assign(r->buckets.size(), 0);
    r->reset();
    for (int i = 0; i < n; ++i) {
      torch::autograd::impl::set_post_acc_grad_hooks(r->params[i], std::make_unique<Hook>(r, i));
    }
    out = new Handle{r};
  });
  return out;
}

// The next backward pass starts the buckets' all-reduces as their gradients come in.
void axial_reducer_arm(void* h) {
  auto* handle = static_cast<Handle*>(h);
  std::lock_guard<std::mutex> lock(handle->reducer->mu);
  handle->reducer->armed = true;
}

// Waits for every bucket (starting those not started) and writes the sums into the gradients.
int axial_reducer_finish(void* h, char* err, size_t err_len) {
  return axial::guarded(err, err_len, [&] { static_cast<Handle*>(h)->reducer->finish(); });
}

// Buckets (of how many) the last step's backward pass started before `finish`.
int axial_reducer_overlapped(void* h, int* total) {
  auto* handle = static_cast<Handle*>(h);
  std::lock_guard<std::mutex> lock(handle->reducer->mu);
  *total = static_cast<int>(handle->reducer->buckets.size());
  return static_cast<int>(handle->reducer->started_in_backward);
}

// Removes the hooks and frees the reducer.
void axial_reducer_free(void* h) {
  auto* handle = static_cast<Handle*>(h);
  for (auto& p : handle->reducer->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  delete handle;
}

}  // extern "C"
