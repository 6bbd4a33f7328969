// The CUDA backend of the compiled ops, for a GPU: the shared device and host code of
// ops.cuh on the real platform (platform.cuh), registered for CUDA tensors. The tests
// run the same code under their CUDA emulator.
#include <torch/library.h>

#include "platform.cuh"
#include "ops.cuh"

namespace fused_accum {

TORCH_LIBRARY_IMPL(fused_accum, CUDA, m) {
  m.impl("accumulate", &cuda::accumulate);
  m.impl("sgd_step", &sgd_step_op<&cuda::step>);
  m.impl("adam_step", &adam_step_op<&cuda::step>);
}

}  // namespace fused_accum
