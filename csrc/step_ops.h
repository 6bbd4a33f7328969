// The step ops' entry points, shared by the CPU and CUDA registrations: argument checks
// and the scalars of the update, then the device's `run` over the tensors.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "step_args.h"

namespace fused_accum {

// Runs a step on one device: `states` holds the momentum buffers (SGD) or exp_avgs,
// exp_avg_sqs, max_exp_avg_sqs (Adam), `masters` the fp32 master copies of the
// parameters; an unused list is empty.
using StepRunner = void (*)(at::TensorList params, at::TensorList buffers,
                            const std::optional<at::TensorList>& grads,
                            const std::vector<at::TensorList>& states, at::TensorList masters,
                            const StepArgs& args);

inline void check_masters(at::TensorList masters, at::TensorList params) {
  TORCH_CHECK(masters.empty() || masters.size() == params.size(),
              "fused_accum: master weights are all or nothing: ", masters.size(), " for ",
              params.size(), " parameters");
  TORCH_CHECK(masters.empty() || params[0].scalar_type() == at::kBFloat16 ||
                  params[0].scalar_type() == at::kHalf,
              "fused_accum: master weights are for bfloat16/float16 parameters, not ",
              params[0].scalar_type());
}

// rounding_seed < 0: round to nearest; else stochastic rounding of bf16 parameters.
inline void set_rounding(StepArgs& args, int64_t rounding_seed, at::TensorList params,
                         at::TensorList buffers) {
  args.stochastic = rounding_seed >= 0 && params[0].scalar_type() == at::kBFloat16;
  args.rounding_seed = static_cast<uint32_t>(rounding_seed);
  args.flat_base = static_cast<const char*>(buffers[0].data_ptr()) -
                   buffers[0].storage_offset() * buffers[0].element_size();
}

// The step's device scalars (see StepArgs::device_scalars): `count` float64 values on
// the parameters' device.
inline void set_device_scalars(StepArgs& args, const std::optional<at::Tensor>& scalars,
                               at::TensorList params, int64_t count) {
  if (!scalars.has_value()) return;
  TORCH_CHECK(scalars->scalar_type() == at::kDouble && scalars->numel() == count &&
                  scalars->is_contiguous() && scalars->device() == params[0].device(),
              "fused_accum: device_scalars must be ", count,
              " contiguous float64 values on the parameters' device (", params[0].device(),
              "), got ", scalars->numel(), " ", scalars->scalar_type(), " values on ",
              scalars->device());
  args.device_scalars = scalars->data_ptr<double>();
}

// The step's gradient statistics table (see StepArgs::grad_stats).
inline void set_grad_stats(StepArgs& args, const std::optional<at::Tensor>& stats,
                           at::TensorList params) {
  if (!stats.has_value()) return;
  const int64_t rows = static_cast<int64_t>(params.size());
  TORCH_CHECK(stats->scalar_type() == at::kFloat && stats->dim() == 2 &&
                  stats->size(0) == rows && stats->size(1) == 4 && stats->is_contiguous() &&
                  stats->device() == params[0].device(),
              "fused_accum: grad_stats must be a contiguous float32 (", rows,
              ", 4) tensor on the parameters' device (", params[0].device(), "), got ",
              stats->scalar_type(), " ", stats->sizes(), " on ", stats->device());
  args.grad_stats = stats->data_ptr<float>();
}

template <StepRunner run>
void sgd_step_op(at::TensorList params, at::TensorList buffers,
                 std::optional<at::TensorList> grads, at::TensorList momentum_buffers,
                 at::TensorList masters, bool use_buffer, double normaliser, double grad_weight, double lr, double momentum,
                 double dampening, double weight_decay, bool nesterov, bool maximize,
                 bool init_momentum, int64_t rounding_seed,
                 const std::optional<at::Tensor>& device_scalars,
                 const std::optional<at::Tensor>& grad_stats) {
  check_step(params, buffers, grads,
             {{"momentum_buffers", momentum_buffers}, {"masters", masters}}, use_buffer);
  check_masters(masters, params);
  TORCH_CHECK(momentum == 0 || momentum_buffers.size() == params.size(),
              "fused_accum: momentum needs one momentum buffer per parameter");
  StepArgs args;
  args.use_buffer = use_buffer;
  args.has_grads = grads.has_value();
  args.normaliser = normaliser;
  args.grad_weight = grad_weight;
  args.lr = lr;
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.nesterov = nesterov;
  args.maximize = maximize;
  args.init_momentum = init_momentum;
  set_rounding(args, rounding_seed, params, buffers);
  set_device_scalars(args, device_scalars, params, 2);
  set_grad_stats(args, grad_stats, params);
  run(params, buffers, grads, {momentum_buffers}, masters, args);
}

template <StepRunner run>
void adam_step_op(at::TensorList params, at::TensorList buffers,
                  std::optional<at::TensorList> grads, at::TensorList exp_avgs,
                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                  at::TensorList masters, bool use_buffer,
                  double normaliser, double grad_weight, int64_t step_number, double lr,
                  double beta1, double beta2, double eps, double weight_decay,
                  bool decoupled_weight_decay, bool amsgrad, bool maximize,
                  int64_t rounding_seed, const std::optional<at::Tensor>& device_scalars,
                  const std::optional<at::Tensor>& grad_stats) {
  check_step(params, buffers, grads,
             {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
              {"max_exp_avg_sqs", max_exp_avg_sqs}, {"masters", masters}},
             use_buffer);
  check_masters(masters, params);
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "fused_accum: Adam needs exp_avgs and exp_avg_sqs for every parameter");
  TORCH_CHECK(!amsgrad || max_exp_avg_sqs.size() == params.size(),
              "fused_accum: amsgrad needs max_exp_avg_sqs for every parameter");
  TORCH_CHECK(step_number >= 1, "fused_accum: Adam steps count from 1, got ", step_number);
  StepArgs args;
  args.adam = true;
  args.use_buffer = use_buffer;
  args.has_grads = grads.has_value();
  args.normaliser = normaliser;
  args.grad_weight = grad_weight;
  args.lr = lr;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.decoupled_weight_decay = decoupled_weight_decay;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  args.set_adam_step(step_number);
  set_rounding(args, rounding_seed, params, buffers);
  set_device_scalars(args, device_scalars, params, 4);
  set_grad_stats(args, grad_stats, params);
  run(params, buffers, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, masters, args);
}

}  // namespace fused_accum
