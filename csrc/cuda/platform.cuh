// What the shared CUDA sources need from the machine they run on: a stream, a device
// guard, a kernel launch and a block's shared array. Here for a GPU; the tests' CUDA
// emulator defines the same names (FUSED_ACCUM_EMULATED_CUDA) to run the same device
// code on CPU threads of its own.
#pragma once

#if !defined(FUSED_ACCUM_EMULATED_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>

namespace fused_accum {
namespace cuda {

using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;

inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// kernel<<<blocks, threads, 0, stream>>>(args...), with the launch error checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int blocks, int threads, Stream stream, Args&&... args) {
  kernel<<<blocks, threads, 0, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fused_accum

// `__shared__ type name;` for an array type (`using Partials = float[4][16];`). The
// emulator gives each block a fresh one filled with NaN bytes, so that a read before
// any write of this block shows.
#define FUSED_ACCUM_SHARED(type, name) __shared__ type name
// An access of `bytes` at `address` that must be aligned to them (the emulator checks).
#define FUSED_ACCUM_ASSUME_ALIGNED(address, bytes) ((void)0)
#endif
