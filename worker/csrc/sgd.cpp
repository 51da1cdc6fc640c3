// SGD (momentum, Nesterov, L2 weight decay; torch.optim.SGD's rule with dampening 0) over a
// list of CPU float32 tensors in one call and one pass per tensor: each element's parameter,
// gradient and momentum are read once and the parameter and momentum written once, where the
// same update as separate ATen operations makes about eight passes, allocates four temporaries
// per tensor and crosses the FFI eight times per tensor. The arithmetic is the separate
// operations' own, in float, in their order (so the results are identical):
//   d = g + wd * p          (weight decay; skipped when wd is 0)
//   b = d                   (first step)   or   b = m * b + d
//   d = d + m * b           (Nesterov)     or   d = b
//   p = p + (-lr) * d
// Errors come back as text, never as exceptions across the C ABI.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "shim_error.hpp"

#include <cstddef>
#include <stdexcept>
#include <string>

namespace {

// Elements per task of the intra-op thread pool: below this a tensor runs on the caller.
constexpr int64_t kGrain = 32768;

void check(const at::Tensor& t, const at::Tensor& like, const char* what) {
  if (!t.defined() || t.device().type() != at::kCPU || t.scalar_type() != at::kFloat ||
      !t.is_contiguous() || t.numel() != like.numel()) {
    throw std::invalid_argument(std::string("fused SGD: the ") + what +
                                " must be defined contiguous CPU float32 tensors of the "
                                "parameter's size");
  }
}

}  // namespace

// params, grads, bufs: n tensor handles each (tch's `C_tensor`, an `at::Tensor*`).
// flags[i]: bit 0, tensor i gets the weight decay; bit 1, its momentum buffer is set to the
// gradient instead of updated (its first step).
extern "C" int axial_sgd_step(at::Tensor** params, at::Tensor** grads, at::Tensor** bufs,
                              const unsigned char* flags, size_t n, double lr, double momentum,
                              double weight_decay, int nesterov, char* err, size_t err_len) {
  try {
    const float neg_lr = static_cast<float>(-lr);
    const float m = static_cast<float>(momentum);
    const float wd_all = static_cast<float>(weight_decay);
    for (size_t i = 0; i < n; ++i) {
      check(*params[i], *params[i], "parameters");
      check(*grads[i], *params[i], "gradients");
      if (momentum != 0.0) {
        check(*bufs[i], *params[i], "momentum buffers");
      }
    }
    for (size_t i = 0; i < n; ++i) {
      float* p = params[i]->data_ptr<float>();
      const float* g = grads[i]->data_ptr<float>();
      float* b = momentum != 0.0 ? bufs[i]->data_ptr<float>() : nullptr;
      const bool use_wd = (flags[i] & 1) != 0 && weight_decay != 0.0;
      const float wd = use_wd ? wd_all : 0.0f;
      const bool first = (flags[i] & 2) != 0;
      at::parallel_for(0, params[i]->numel(), kGrain, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          float d = g[j];
          if (use_wd) {
            d = d + wd * p[j];
          }
          if (b != nullptr) {
            const float nb = first ? d : m * b[j] + d;
            b[j] = nb;
            d = nesterov ? d + m * nb : nb;
          }
          p[j] = p[j] + neg_lr * d;
        }
      });
    }
    return 0;
  } catch (const std::exception& e) {
    return axial_report(e, err, err_len);
  }
}

// Drops the gradients of n tensors (`tensor.grad = None`): the next backward pass then hands
// each parameter its new gradient as it is, instead of adding it into a zeroed one (a pass
// over every gradient to zero it and one to add into it, saved).
extern "C" void axial_clear_grads(at::Tensor** tensors, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    tensors[i]->mutable_grad().reset();
  }
}
