// The schemas of the fused_accum ops (the kernel spec, fused_accum/backends/spec.py),
// defined in one place for the library and for the tests' emulated CUDA library.
#pragma once

#include <torch/library.h>

namespace fused_accum {

inline void define_ops(torch::Library& m) {
  m.def(
      "accumulate(Tensor(a!)[] buffers, Tensor[] grads, float scale, bool overwrite, "
      "Tensor(b!)? found_inf, Tensor(c!)? sum_sq=None, Tensor(d!)? grad_sum_sq=None) -> ()");
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor[] buffers, Tensor[]? grads, "
      "Tensor(b!)[] momentum_buffers, Tensor(c!)[] masters, bool use_buffer, float normaliser, "
      "float grad_weight, "
      "float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize, bool init_momentum, int rounding_seed, Tensor? device_scalars=None, "
      "Tensor(d!)? grad_stats=None) -> ()");
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor[] buffers, Tensor[]? grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, "
      "bool use_buffer, "
      "float normaliser, float grad_weight, int step, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool decoupled_weight_decay, bool amsgrad, "
      "bool maximize, int rounding_seed, Tensor? device_scalars=None, "
      "Tensor(f!)? grad_stats=None) -> ()");
}

}  // namespace fused_accum
