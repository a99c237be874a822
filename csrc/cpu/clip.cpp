// d2l's grad_clipping in one call: the global 2-norm of a list of gradients and, when it exceeds
// theta, every gradient scaled in place by theta / norm. One dispatcher call replaces d2l's
// per-parameter Python loop and its host read of the norm (the `if norm > theta` test); the
// squares are summed in double, so the norm is the exact one rounded once.
#include <torch/library.h>

#include <cmath>

#include "checks.h"

namespace seq2seq_fast::cpu {
namespace {

template <typename T>
double sum_of_squares(const at::Tensor& g) {
  const T* p = g.data_ptr<T>();
  double acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < g.numel(); ++i) {
    acc += static_cast<double>(p[i]) * static_cast<double>(p[i]);
  }
  return acc;
}

template <typename T>
void scale_in_place(const at::Tensor& g, T factor) {
  T* p = g.data_ptr<T>();
#pragma omp simd
  for (int64_t i = 0; i < g.numel(); ++i) {
    p[i] *= factor;
  }
}

at::Tensor clip_grad_norm(at::TensorList grads, double theta) {
  TORCH_CHECK_VALUE(!grads.empty(), "seq2seq_fast: grads must hold at least one tensor, got an empty list");
  TORCH_CHECK_VALUE(std::isfinite(theta) && theta > 0, "seq2seq_fast: theta must be a positive number, got ", theta);
  const Placement on = check_reference(grads[0], "grads[0]", at::kCPU, kCpuFloats);
  for (size_t i = 0; i < grads.size(); ++i) {
    const std::string name = "grads[" + std::to_string(i) + "]";
    check_float(grads[i], name, on);
    TORCH_CHECK_VALUE(grads[i].is_contiguous(), "seq2seq_fast: ", name, " must be contiguous, got strides ",
                      grads[i].strides());
  }
  at::Tensor norm = at::empty({}, grads[0].options());
  AT_DISPATCH_FLOATING_TYPES(on.dtype, "seq2seq_fast::clip_grad_norm", [&] {
    using T = scalar_t;
    double squares = 0;
    for (const at::Tensor& g : grads) {
      squares += sum_of_squares<T>(g);
    }
    const T total = static_cast<T>(std::sqrt(squares));
    *norm.data_ptr<T>() = total;
    if (total > static_cast<T>(theta)) {
      const T factor = static_cast<T>(theta) / total;
      for (const at::Tensor& g : grads) {
        scale_in_place<T>(g, factor);
      }
    }
  });
  return norm;
}

}  // namespace
}  // namespace seq2seq_fast::cpu

TORCH_LIBRARY_IMPL(seq2seq_fast, CPU, m) {
  m.impl("clip_grad_norm_", &seq2seq_fast::cpu::clip_grad_norm);
}
