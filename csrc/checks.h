// Contract checks shared by the CPU and CUDA implementations of the fused_accum ops.
// Each check names the argument, the index in its list and what to do about it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace fused_accum {

// The dtype sums and state are kept in for parameters of `param_dtype`.
inline at::ScalarType accumulation_dtype(at::ScalarType param_dtype) {
  return param_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_param_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "fused_accum: parameters and gradients must be float32, float64, bfloat16 or "
              "float16, got ",
              dtype);
}

// `tensor` (element `index` of list `what`) can be walked in memory order beside
// `buffer`: same shape, same strides, dense, same device.
inline void check_like_buffer(const at::Tensor& tensor, const at::Tensor& buffer,
                              const char* what, size_t index) {
  TORCH_CHECK(tensor.sizes() == buffer.sizes(), "fused_accum: ", what, "[", index,
              "] has shape ", tensor.sizes(), " but its accumulation buffer has shape ",
              buffer.sizes());
  TORCH_CHECK(tensor.device() == buffer.device(), "fused_accum: ", what, "[", index,
              "] is on ", tensor.device(), " but its accumulation buffer is on ",
              buffer.device());
  // a ValueError in Python, apart from the other checks: the backend then retries on a
  // copy in the buffer's layout (nothing has been written yet)
  TORCH_CHECK_VALUE(tensor.numel() <= 1 || (tensor.strides() == buffer.strides() &&
                                            tensor.is_non_overlapping_and_dense()),
                    "fused_accum: ", what, "[", index, "] has strides ", tensor.strides(),
                    " but its accumulation buffer has strides ", buffer.strides(),
                    "; pass a dense tensor laid out like the buffer");
}

inline void check_list(const at::TensorList& tensors, const at::TensorList& buffers,
                       const char* what, at::ScalarType dtype) {
  TORCH_CHECK(tensors.size() == buffers.size(), "fused_accum: ", what, " has ",
              tensors.size(), " tensors but there are ", buffers.size(), " buffers");
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].scalar_type() == dtype, "fused_accum: ", what, "[", i,
                "] has dtype ", tensors[i].scalar_type(), " but ", dtype, " is expected");
    check_like_buffer(tensors[i], buffers[i], what, i);
  }
}

// The buffers of one call: one dtype (float32, or float64 for float64 parameters),
// each dense.
inline void check_buffers(const at::TensorList& buffers, at::ScalarType param_dtype) {
  const auto dtype = accumulation_dtype(param_dtype);
  for (size_t i = 0; i < buffers.size(); ++i) {
    TORCH_CHECK(buffers[i].scalar_type() == dtype, "fused_accum: buffers[", i,
                "] has dtype ", buffers[i].scalar_type(), " but ", dtype,
                " is the accumulation dtype of ", param_dtype, " parameters");
    TORCH_CHECK(buffers[i].numel() <= 1 || buffers[i].is_non_overlapping_and_dense(),
                "fused_accum: buffers[", i, "] is not dense");
  }
}

// The checks of an accumulate call: one gradient per buffer, laid out like it, in one
// supported dtype (returned; nullopt for a call without gradients, which does nothing).
inline std::optional<at::ScalarType> check_accumulate(const at::TensorList& buffers,
                                                      const at::TensorList& grads) {
  TORCH_CHECK(buffers.size() == grads.size(), "fused_accum: ", grads.size(),
              " gradients for ", buffers.size(), " buffers");
  if (grads.empty()) return std::nullopt;
  const auto dtype = grads[0].scalar_type();
  check_param_dtype(dtype);
  check_buffers(buffers, dtype);
  check_list(grads, buffers, "grads", dtype);
  return dtype;
}

// All checks of a step: parameters, buffers, fresh gradients and each state list that
// is used (an unused one, such as max_exp_avg_sqs without amsgrad, is empty).
inline at::ScalarType check_step(const at::TensorList& params, const at::TensorList& buffers,
                                 const std::optional<at::TensorList>& grads,
                                 const std::vector<std::pair<const char*, at::TensorList>>& states,
                                 bool use_buffer) {
  TORCH_CHECK(!params.empty(), "fused_accum: a step needs at least one parameter");
  TORCH_CHECK(use_buffer || grads.has_value(),
              "fused_accum: a step needs the buffers (use_buffer) or fresh gradients");
  const auto dtype = params[0].scalar_type();
  check_param_dtype(dtype);
  check_buffers(buffers, dtype);
  check_list(params, buffers, "params", dtype);
  if (grads.has_value()) check_list(*grads, buffers, "grads", dtype);
  for (const auto& [name, state] : states) {
    if (!state.empty()) check_list(state, buffers, name, accumulation_dtype(dtype));  // empty: unused
  }
  return dtype;
}

}  // namespace fused_accum
