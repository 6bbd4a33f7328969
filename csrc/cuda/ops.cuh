// The CUDA implementations of the fused_accum ops, on the host: contract checks, the
// tensors' addresses, the dtype dispatch and the multi-tensor launches. Included by
// kernels.cu for a GPU, and by the tests' CUDA emulator (after its platform), so that
// the same code runs in both.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../step_args.h"
#include "../step_ops.h"
#include "multi_tensor.cuh"
#include "update_ops.cuh"

namespace fused_accum {
namespace cuda {

inline std::vector<void*> addresses(at::TensorList tensors, size_t count) {
  std::vector<void*> result(count, nullptr);
  for (size_t i = 0; i < tensors.size(); ++i) result[i] = tensors[i].data_ptr();
  return result;
}

inline void check_device(at::TensorList tensors, const at::Device& device, const char* what) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == device, "fused_accum: ", what, "[", i, "] is on ",
                tensors[i].device(), " but the call runs on ", device);
  }
}

// The address of an optional one-element float32 tensor on `device`, or nullptr.
inline float* one_float(const std::optional<at::Tensor>& tensor, const at::Device& device,
                        const char* what) {
  if (!tensor.has_value()) return nullptr;
  TORCH_CHECK(tensor->numel() == 1 && tensor->scalar_type() == at::kFloat &&
                  tensor->device() == device,
              "fused_accum: ", what, " must be a one-element float32 tensor on ", device);
  return tensor->data_ptr<float>();
}

// Calls fn(std::true_type{}) or fn(std::false_type{}): a run-time flag made a template
// argument. (The CPU loops keep their own, compiled for each instruction set.)
template <typename Fn>
inline void with_flag(bool flag, const Fn& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

inline void accumulate(at::TensorList buffers, at::TensorList grads, double scale, bool overwrite,
                       const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& sum_sq,
                       const std::optional<at::Tensor>& grad_sum_sq) {
  const std::optional<at::ScalarType> dtype = check_accumulate(buffers, grads);
  if (!dtype.has_value()) return;
  const at::Device device = buffers[0].device();
  check_device(buffers, device, "buffers");
  float* flag = one_float(found_inf, device, "found_inf");
  float* squares = one_float(sum_sq, device, "sum_sq");
  float* grad_squares = one_float(grad_sum_sq, device, "grad_sum_sq");
  const DeviceGuard guard(device);
  const std::vector<std::vector<void*>> operands = {addresses(buffers, buffers.size()),
                                                    addresses(grads, grads.size())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, *dtype, "fused_accum_accumulate", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    with_flag(squares != nullptr, [&](auto sum_sq_flag) {
      with_flag(grad_squares != nullptr, [&](auto grad_sq_flag) {
        using Op = Accumulate<scalar_t, A, decltype(sum_sq_flag)::value,
                              decltype(grad_sq_flag)::value>;
        for_each_element<2>(operands, grads,
                            Op{A(scale), overwrite, flag, squares, grad_squares});
      });
    });
  });
}

inline void step(at::TensorList params, at::TensorList buffers,
                 const std::optional<at::TensorList>& grads,
                 const std::vector<at::TensorList>& states, at::TensorList masters,
                 const StepArgs& args) {
  const at::Device device = params[0].device();
  check_device(params, device, "params");
  const DeviceGuard guard(device);
  const size_t count = params.size();
  std::vector<std::vector<void*>> operands = {addresses(params, count), addresses(buffers, count),
                                              grads.has_value() ? addresses(*grads, count)
                                                                : std::vector<void*>(count)};
  for (const auto& state : states) operands.push_back(addresses(state, count));
  operands.push_back(addresses(masters, count));  // the last operand, nullptr without
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "fused_accum_step", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    with_flag(args.grad_stats != nullptr, [&](auto stats) {
      constexpr bool kStats = decltype(stats)::value;
      if (args.adam) {
        for_each_element<7>(operands, params, Adam<scalar_t, A, kStats>{{DeviceStepArgs<A>(args)}});
      } else {
        for_each_element<5>(operands, params, Sgd<scalar_t, A, kStats>{{DeviceStepArgs<A>(args)}});
      }
    });
  });
}

}  // namespace cuda
}  // namespace fused_accum
