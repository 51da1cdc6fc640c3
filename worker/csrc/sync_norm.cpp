// Synchronized batch norm on the CPU as one autograd function (model/batch_norm.rs): the
// statistics of every rank's batch, two passes over the activations forward and two backward,
// as libtorch's own batch norm makes, where the same maths written as tensor operations (sums
// in float64, a differentiable all-reduce, the normalization's element-wise operations and
// their backwards) made some ten passes and a dozen small operations per norm.
//
//   forward:  S1, S2, n = all-reduce(sum x, sum x^2, count)          per channel, float64
//             mean = S1 / n, var = S2 / n - mean^2, y = (x - mean) invstd gamma + beta
//   backward: D1, D2 = all-reduce(sum dy, sum dy (x - mean))          per channel, float64
//             dx = gamma invstd (dy - D1 / n - (x - mean) invstd^2 D2 / n)
//             d gamma = invstd sum_local dy (x - mean), d beta = sum_local dy
//
// (the scale's and shift's gradients stay this rank's: the gradient all-reduce sums them).
// Running statistics are updated with the global mean and unbiased variance, the same on every
// rank. Sums are taken per fixed chunk of rows, then added in chunk order: the results do not
// depend on the thread count. x is [N, C, *] contiguous float32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include "group.hpp"
#include "shim_error.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunks = 16;

struct Shape {
  int64_t n, c, inner;  // x as [n, c, inner]
};

Shape shape_of(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, n * c == 0 ? 0 : x.numel() / (n * c)};
}

// Per channel, over every row and position: sums of f(i) (f gives k values per element),
// chunked over the rows, chunk sums added in order. out: [k][c].
template <int K, typename F>
std::vector<double> channel_sums(const Shape& s, F&& f) {
  const int64_t chunks = std::min<int64_t>(kChunks, std::max<int64_t>(s.n, 1));
  std::vector<double> partial(static_cast<size_t>(chunks) * K * s.c, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      double* acc = partial.data() + chunk * K * s.c;
      const int64_t r0 = s.n * chunk / chunks, r1 = s.n * (chunk + 1) / chunks;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t ch = 0; ch < s.c; ++ch) {
          double a[K] = {};
          const int64_t base = (r * s.c + ch) * s.inner;
          for (int64_t i = 0; i < s.inner; ++i) f(base + i, ch, a);
          for (int k = 0; k < K; ++k) acc[k * s.c + ch] += a[k];
        }
      }
    }
  });
  std::vector<double> out(static_cast<size_t>(K) * s.c, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t j = 0; j < K * s.c; ++j) out[j] += partial[chunk * K * s.c + j];
  }
  return out;
}

// Sums `values` over the group's ranks (no group: nothing).
void over_ranks(const axial::Group* group, std::vector<double>& values) {
  if (group == nullptr) return;
  at::Tensor t = at::tensor(values, at::TensorOptions().dtype(at::kDouble));
  axial::sum_over_ranks(*group, t);
  const double* summed = t.data_ptr<double>();
  std::copy(summed, summed + values.size(), values.begin());
}

struct SyncNormFn : public torch::autograd::Function<SyncNormFn> {
  static at::Tensor forward(AutogradContext* ctx, at::Tensor x, at::Tensor weight, at::Tensor bias,
                            at::Tensor running_mean, at::Tensor running_var, int64_t group,
                            double momentum, double eps) {
    const Shape s = shape_of(x);
    const auto* g = reinterpret_cast<const axial::Group*>(group);
    const float* xs = x.data_ptr<float>();
    // S1, S2 per channel, then the count.
    std::vector<double> sums = channel_sums<2>(s, [&](int64_t i, int64_t, double* a) {
      const double v = xs[i];
      a[0] += v;
      a[1] += v * v;
    });
    sums.push_back(static_cast<double>(s.n * s.inner));
    over_ranks(g, sums);
    const double count = sums[2 * s.c];
    at::Tensor mean = at::empty({s.c}, x.options());
    at::Tensor invstd = at::empty({s.c}, x.options());
    float* m = mean.data_ptr<float>();
    float* is = invstd.data_ptr<float>();
    float* rm = running_mean.data_ptr<float>();
    float* rv = running_var.data_ptr<float>();
    const float* w = weight.data_ptr<float>();
    const float* b = bias.data_ptr<float>();
    std::vector<float> scale(s.c), shift(s.c);
    for (int64_t ch = 0; ch < s.c; ++ch) {
      const double mu = count > 0 ? sums[ch] / count : 0.0;
      const double var = count > 0 ? std::max(sums[s.c + ch] / count - mu * mu, 0.0) : 0.0;
      const double inv = 1.0 / std::sqrt(var + eps);
      m[ch] = static_cast<float>(mu);
      is[ch] = static_cast<float>(inv);
      scale[ch] = static_cast<float>(inv * w[ch]);
      shift[ch] = b[ch];
      const double unbiased = count > 1.0 ? var * count / (count - 1.0) : var;
      rm[ch] = static_cast<float>((1.0 - momentum) * rm[ch] + momentum * mu);
      rv[ch] = static_cast<float>((1.0 - momentum) * rv[ch] + momentum * unbiased);
    }
    at::Tensor y = at::empty_like(x);
    float* ys = y.data_ptr<float>();
    at::parallel_for(0, s.n * s.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t rc = begin; rc < end; ++rc) {
        const int64_t ch = rc % s.c;
        const float mu = m[ch], a = scale[ch], sh = shift[ch];
        const float* xr = xs + rc * s.inner;
        float* yr = ys + rc * s.inner;
        for (int64_t i = 0; i < s.inner; ++i) yr[i] = (xr[i] - mu) * a + sh;
      }
    });
    ctx->save_for_backward({x, weight, mean, invstd});
    ctx->saved_data["group"] = group;
    ctx->saved_data["count"] = count;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const Shape s = shape_of(x);
    const auto* g = reinterpret_cast<const axial::Group*>(ctx->saved_data["group"].toInt());
    const double count = ctx->saved_data["count"].toDouble();
    at::Tensor dy = grads[0].contiguous();
    const float* xs = x.data_ptr<float>();
    const float* dys = dy.data_ptr<float>();
    const float* m = saved[2].data_ptr<float>();
    const float* is = saved[3].data_ptr<float>();
    const float* w = saved[1].data_ptr<float>();
    // D1 = sum dy, D2 = sum dy (x - mean), local first (the scale's and shift's gradients).
    std::vector<double> local = channel_sums<2>(s, [&](int64_t i, int64_t ch, double* a) {
      const double d = dys[i];
      a[0] += d;
      a[1] += d * (static_cast<double>(xs[i]) - m[ch]);
    });
    std::vector<double> global = local;
    over_ranks(g, global);
    at::Tensor dweight = at::empty({s.c}, x.options());
    at::Tensor dbias = at::empty({s.c}, x.options());
    float* dw = dweight.data_ptr<float>();
    float* db = dbias.data_ptr<float>();
    std::vector<float> k_dy(s.c), k_x(s.c), k_0(s.c);
    for (int64_t ch = 0; ch < s.c; ++ch) {
      dw[ch] = static_cast<float>(local[s.c + ch] * is[ch]);
      db[ch] = static_cast<float>(local[ch]);
      // dx = a dy + kx (x - mean) + k0, a = gamma invstd
      const double a = static_cast<double>(w[ch]) * is[ch];
      const double inv = is[ch];
      k_dy[ch] = static_cast<float>(a);
      k_x[ch] = static_cast<float>(count > 0 ? -a * inv * inv * global[s.c + ch] / count : 0.0);
      k_0[ch] = static_cast<float>(count > 0 ? -a * global[ch] / count : 0.0);
    }
    at::Tensor dx = at::empty_like(x);
    float* dxs = dx.data_ptr<float>();
    at::parallel_for(0, s.n * s.c, 1, [&](int64_t begin, int64_t end) {
      for (int64_t rc = begin; rc < end; ++rc) {
        const int64_t ch = rc % s.c;
        const float a = k_dy[ch], kx = k_x[ch], k0 = k_0[ch], mu = m[ch];
        const float* xr = xs + rc * s.inner;
        const float* dr = dys + rc * s.inner;
        float* out = dxs + rc * s.inner;
        for (int64_t i = 0; i < s.inner; ++i) out[i] = a * dr[i] + kx * (xr[i] - mu) + k0;
      }
    });
    at::Tensor none;
    return {dx, dweight, dbias, none, none, none, none, none};
  }
};

void check(const at::Tensor& t, const char* what, int64_t c) {
  if (!t.defined() || t.device().type() != at::kCPU || t.scalar_type() != at::kFloat ||
      !t.is_contiguous() || t.dim() != 1 || t.size(0) != c) {
    throw std::invalid_argument(std::string("synchronized batch norm: ") + what +
                                " must be a contiguous CPU float32 [C] tensor");
  }
}

}  // namespace

// x: [N, C, *] contiguous CPU float32; weight, bias, running_mean, running_var: [C] float32;
// group: an axial::Group whose ranks' batches the statistics span (or null: this rank's
// alone). *out receives y, a new tensor owned by the caller; the running statistics are
// updated in place.
extern "C" int axial_sync_batch_norm(at::Tensor* x, at::Tensor* weight, at::Tensor* bias,
                                     at::Tensor* running_mean, at::Tensor* running_var, void* group,
                                     double momentum, double eps, at::Tensor** out, char* err,
                                     size_t err_len) {
  try {
    if (!x->defined() || x->device().type() != at::kCPU || x->scalar_type() != at::kFloat ||
        !x->is_contiguous() || x->dim() < 2) {
      throw std::invalid_argument("synchronized batch norm: x must be a contiguous CPU float32 [N, C, ...] tensor");
    }
    const int64_t c = x->size(1);
    check(*weight, "the weight", c);
    check(*bias, "the bias", c);
    check(*running_mean, "the running mean", c);
    check(*running_var, "the running variance", c);
    *out = new at::Tensor(SyncNormFn::apply(*x, *weight, *bias, *running_mean, *running_var,
                                            reinterpret_cast<int64_t>(group), momentum, eps));
    return 0;
  } catch (const std::exception& e) {
    return axial_report(e, err, err_len);
  }
}
