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
  double grad_weight = 1;      // factor on the fresh gradients, before the normaliser
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
  // Stochastic rounding of bf16 parameters (see stochastic_noise): the seed of this
  // update, and where the flat storage of the buffers starts (flat positions count
  // from there).
  bool stochastic = false;
  uint32_t rounding_seed = 0;
  const void* flat_base = nullptr;
  // Scalars decided on the device (see spec.StepBatch.device_scalars), or nullptr:
  // [skip, grad_factor] for SGD, [skip, grad_factor, step_size, bias_correction2_sqrt]
  // for Adam, float64, in the parameters' device memory.
  const double* device_scalars = nullptr;
  // Gradient statistics to add to (see spec.StepBatch.grad_stats), or nullptr: a
  // contiguous float32 (number of parameters, 4) table in the parameters' device memory.
  float* grad_stats = nullptr;

  // Bias corrections of update number `step`, computed as torch.optim.Adam does.
  void set_adam_step(int64_t step) {
    step_size = lr / (1 - std::pow(beta1, double(step)));
    bias_correction2_sqrt = std::pow(1 - std::pow(beta2, double(step)), 0.5);
  }
};

// The 32-bit hash behind stochastic rounding: murmur3's finaliser of
// index * 0x9E3779B1 + seed (mod 2^32); fused_accum/backends/spec.py defines it.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint32_t stochastic_noise(uint64_t index, uint32_t seed) {
  uint32_t h = static_cast<uint32_t>(index) * 0x9E3779B1u + seed;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// fp32 bits to bf16 bits, rounded stochastically by the low 16 bits of `noise`.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline uint16_t stochastic_bf16_bits(uint32_t float_bits, uint32_t noise) {
  return static_cast<uint16_t>((float_bits + (noise & 0xFFFFu)) >> 16);
}

}  // namespace fused_accum
