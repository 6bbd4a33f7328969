// The CUDA kernels of csrc/cuda, device and host code alike, built against the
// emulator (emulator.h) and registered for CPU tensors as the ops of the library
// fused_accum_emulated, with the schemas of fused_accum. Also: the emulator's own
// controls, and a self-test kernel with a switch that drops a barrier.
#include "emulator.h"  // first: the platform that csrc/cuda expects

#include <torch/library.h>

#include "cuda/ops.cuh"
#include "op_schemas.h"

namespace {

using fused_accum_emulator::emulator;

void set_order(const std::string& order) {
  if (order != "forward" && order != "reverse") {
    throw std::invalid_argument("order must be 'forward' or 'reverse', got " + order);
  }
  emulator().order = order == "forward" ? fused_accum_emulator::Order::forward
                                        : fused_accum_emulator::Order::reverse;
}

// A block sums its kThreads values with the kernels' reduce_block; with `barrier`
// false, a copy of its shared-memory step without __syncthreads(), which a GPU may run
// with warp 0 reading the other warps' slots before they are written.
__global__ void block_sum_kernel(const float* values, float* total, bool barrier) {
  using fused_accum::cuda::kThreads;
  float value[1] = {values[threadIdx.x]};
  if (barrier) {
    if (fused_accum::cuda::reduce_block(value)) *total = value[0];
    return;
  }
  using Slots = float[kThreads / 32];
  FUSED_ACCUM_SHARED(Slots, slots);
  fused_accum::cuda::reduce_warp<-1>(value);
  if (threadIdx.x % 32 == 0) slots[threadIdx.x / 32] = value[0];
  if (threadIdx.x >= 32) return;
  value[0] = threadIdx.x < kThreads / 32 ? slots[threadIdx.x] : 0.f;
  fused_accum::cuda::reduce_warp<-1>(value);
  if (threadIdx.x == 0) *total = value[0];
}

at::Tensor block_sum(const at::Tensor& values, bool barrier) {
  TORCH_CHECK(values.numel() == fused_accum::cuda::kThreads && values.scalar_type() == at::kFloat &&
                  values.is_contiguous(),
              "block_sum takes ", fused_accum::cuda::kThreads, " contiguous float32 values");
  at::Tensor total = at::full({1}, -1.f, values.options());
  fused_accum::cuda::launch(&block_sum_kernel, 1, fused_accum::cuda::kThreads, 0,
                            values.data_ptr<float>(), total.data_ptr<float>(), barrier);
  return total;
}

}  // namespace

TORCH_LIBRARY(fused_accum_emulated, m) {
  fused_accum::define_ops(m);
  m.def("set_order", &set_order);
  m.def("block_sum", &block_sum);
}

TORCH_LIBRARY_IMPL(fused_accum_emulated, CPU, m) {
  m.impl("accumulate", &fused_accum::cuda::accumulate);
  m.impl("sgd_step", &fused_accum::sgd_step_op<&fused_accum::cuda::step>);
  m.impl("adam_step", &fused_accum::adam_step_op<&fused_accum::cuda::step>);
}
