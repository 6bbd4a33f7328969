// Host-side arguments of a step, shared by the CPU loops and the op wrappers.
#pragma once

#include <cmath>
#include <cstdint>

namespace fused_accum {

struct StepArgs {
  bool adam = false;           // Adam/AdamW, else SGD
  bool use_buffer = true;      // the buffers hold this window's sums
  bool has_grads = false;      // fresh gradients of the last micro-step are added
  double normaliser = 1;       // factor on the buffers: 1 / window weight
  double grad_scale = 1;       // factor on the fresh gradients
  double lr = 0;
  double weight_decay = 0;
  bool maximize = false;
  // SGD
  double momentum = 0;
  double dampening = 0;
  bool nesterov = false;
  bool init_momentum = false;  // first update: the momentum buffer becomes the gradient
  // Adam
  double beta1 = 0;
  double beta2 = 0;
  double eps = 0;
  bool decoupled_weight_decay = false;
  bool amsgrad = false;
  double step_size = 0;              // lr / (1 - beta1^step)
  double bias_correction2_sqrt = 1;  // (1 - beta2^step)^0.5

  // Bias corrections of update number `step`, computed as torch.optim.Adam does.
  void set_adam_step(int64_t step) {
    step_size = lr / (1 - std::pow(beta1, double(step)));
    bias_correction2_sqrt = std::pow(1 - std::pow(beta2, double(step)), 0.5);
  }
};

}  // namespace fused_accum
