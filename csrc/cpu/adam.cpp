// torch.optim.Adam's update (no weight decay, amsgrad or maximize) over every parameter in one
// call: torch's optimizer spends more time per small parameter in Python and dispatch than in
// arithmetic (d2l's zh model: 23 tensors, 49k values; about 0.2-0.4 ms a step, this op 0.03).
// Each parameter carries its own step count, as in torch's state: steps[i] is incremented here.
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu/math.h"

namespace seq2seq_fast::cpu {
namespace {

// torch's single-tensor Adam, rounding for rounding: exp_avg.lerp_(grad, 1 - beta1) (a fused
// multiply-add, as ATen's vectorized lerp), exp_avg_sq.mul_(beta2).addcmul_(grad, grad,
// value=1 - beta2), param.addcdiv_(exp_avg, sqrt(exp_avg_sq) / sqrt(bias2) + eps, value=-lr / bias1),
// the scalars computed in double and rounded once, as torch hands them to its kernels.
template <typename T>
SEQ2SEQ_FAST_INLINE void adam_update(T* p, const T* g, T* m, T* v, int64_t n, double lr, double beta1, double beta2,
                                     double eps, double step) {
  const T w1 = static_cast<T>(1 - beta1), b2 = static_cast<T>(beta2), w2 = static_cast<T>(1 - beta2);
  const T neg_step_size = static_cast<T>(-(lr / (1 - std::pow(beta1, step))));
  const T bias2_sqrt = static_cast<T>(std::sqrt(1 - std::pow(beta2, step)));
  const T e = static_cast<T>(eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    m[i] = std::fma(w1, g[i] - m[i], m[i]);
    v[i] = v[i] * b2 + w2 * g[i] * g[i];
    p[i] = p[i] + neg_step_size * m[i] / (std::sqrt(v[i]) / bias2_sqrt + e);
  }
}

SEQ2SEQ_FAST_CLONES void adam_update_f32(float* p, const float* g, float* m, float* v, int64_t n, double lr,
                                         double beta1, double beta2, double eps, double step) {
  adam_update<float>(p, g, m, v, n, lr, beta1, beta2, eps, step);
}

void adam_update_f64(double* p, const double* g, double* m, double* v, int64_t n, double lr, double beta1,
                     double beta2, double eps, double step) {
  adam_update<double>(p, g, m, v, n, lr, beta1, beta2, eps, step);
}

void check_list(at::TensorList list, const char* name, size_t expected) {
  TORCH_CHECK_VALUE(list.size() == expected, "seq2seq_fast: ", name, " must hold ", expected,
                    " tensors (one per parameter), got ", list.size());
}

// One optimizer group's settings.
struct Group {
  int64_t size;
  double lr, beta1, beta2, eps;
};

// The groups of `groups` (each a count of consecutive parameters) with their settings, checked.
std::vector<Group> check_groups(size_t count, at::IntArrayRef groups, at::ArrayRef<double> lr,
                                at::ArrayRef<double> beta1, at::ArrayRef<double> beta2, at::ArrayRef<double> eps) {
  for (auto [name, list] : {std::pair{"lr", lr}, {"beta1", beta1}, {"beta2", beta2}, {"eps", eps}}) {
    TORCH_CHECK_VALUE(list.size() == groups.size(), "seq2seq_fast: ", name, " must hold ", groups.size(),
                      " values (one per group), got ", list.size());
  }
  std::vector<Group> out;
  int64_t total = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const std::string index = "[" + std::to_string(g) + "]";
    TORCH_CHECK_VALUE(groups[g] >= 1, "seq2seq_fast: groups", index, " must be >= 1, got ", groups[g]);
    TORCH_CHECK_VALUE(lr[g] >= 0 && std::isfinite(lr[g]), "seq2seq_fast: lr", index,
                      " must be a finite number >= 0, got ", lr[g]);
    TORCH_CHECK_VALUE(beta1[g] >= 0 && beta1[g] < 1, "seq2seq_fast: beta1", index, " must be in [0, 1), got ",
                      beta1[g]);
    TORCH_CHECK_VALUE(beta2[g] >= 0 && beta2[g] < 1, "seq2seq_fast: beta2", index, " must be in [0, 1), got ",
                      beta2[g]);
    TORCH_CHECK_VALUE(eps[g] > 0 && std::isfinite(eps[g]), "seq2seq_fast: eps", index,
                      " must be a positive number, got ", eps[g]);
    total += groups[g];
    out.push_back({groups[g], lr[g], beta1[g], beta2[g], eps[g]});
  }
  TORCH_CHECK_VALUE(total == static_cast<int64_t>(count), "seq2seq_fast: groups must add up to the ", count,
                    " params, got ", total);
  return out;
}

void adam_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList steps, at::IntArrayRef groups, at::ArrayRef<double> lr, at::ArrayRef<double> beta1,
               at::ArrayRef<double> beta2, at::ArrayRef<double> eps) {
  TORCH_CHECK_VALUE(!params.empty(), "seq2seq_fast: params must hold at least one tensor, got an empty list");
  for (auto [name, list] : {std::pair{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                            {"steps", steps}}) {
    check_list(list, name, params.size());
  }
  const std::vector<Group> settings = check_groups(params.size(), groups, lr, beta1, beta2, eps);
  // Every tensor is checked before any is written: a call that raises changes nothing.
  const Placement on = check_reference(params[0], "params[0]", at::kCPU, kCpuFloats);
  for (size_t i = 0; i < params.size(); ++i) {
    const std::string index = "[" + std::to_string(i) + "]";
    for (auto [name, t] : {std::pair{"params", params[i]}, {"grads", grads[i]}, {"exp_avgs", exp_avgs[i]},
                           {"exp_avg_sqs", exp_avg_sqs[i]}}) {
      check_float(t, name + index, on, params[i].sizes());
      TORCH_CHECK_VALUE(t.is_contiguous(), "seq2seq_fast: ", name, index, " must be contiguous");
    }
    const at::ScalarType step_type = steps[i].scalar_type();
    TORCH_CHECK_VALUE(steps[i].device().is_cpu() && steps[i].numel() == 1 &&
                          (step_type == at::kFloat || step_type == at::kDouble),
                      "seq2seq_fast: steps", index, " must be a CPU float32/float64 tensor of one value, got ",
                      step_type, " of shape ", steps[i].sizes(), " on ", steps[i].device());
  }
  size_t i = 0;
  for (const Group& g : settings) {
    for (const size_t end = i + g.size; i < end; ++i) {
      double step = 0;
      AT_DISPATCH_FLOATING_TYPES(steps[i].scalar_type(), "seq2seq_fast::adam_step_", [&] {
        scalar_t* count = steps[i].data_ptr<scalar_t>();
        *count += 1;
        step = static_cast<double>(*count);
      });
      if (on.dtype == at::kFloat) {
        adam_update_f32(params[i].data_ptr<float>(), grads[i].data_ptr<float>(), exp_avgs[i].data_ptr<float>(),
                        exp_avg_sqs[i].data_ptr<float>(), params[i].numel(), g.lr, g.beta1, g.beta2, g.eps, step);
      } else {
        adam_update_f64(params[i].data_ptr<double>(), grads[i].data_ptr<double>(), exp_avgs[i].data_ptr<double>(),
                        exp_avg_sqs[i].data_ptr<double>(), params[i].numel(), g.lr, g.beta1, g.beta2, g.eps, step);
      }
    }
  }
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("adam_step_", &seq2seq_fast::cpu::adam_step);
}
