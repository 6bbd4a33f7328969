// CUDA implementations of the fused_accum ops, the second GPU backend beside Triton.
//
// Multi-tensor launches: the addresses of up to kMaxTensors[DEPTH] tensors and a table
// of up to kMaxBlocks (tensor, chunk) pairs travel in the kernel's parameter block, so
// a call needs no device-side metadata and one launch covers many tensors; longer
// lists take several launches. Every block runs one chunk of one tensor.
//
// Steps may take their skip flag, gradient factor and bias corrections from device
// memory (StepArgs::device_scalars): each thread reads them once, with no host sync.
// Sums over the elements (sum_sq, grad_sum_sq, the gradient statistics of a step) are
// reduced per block and added with one atomic per value and block; each is behind a
// template flag, so that calls without it run the plain loops.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "../step_args.h"
#include "../step_ops.h"

namespace fused_accum {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 16 * 1024;  // elements per block
constexpr int kMaxBlocks = 320;

// Tensors per launch for DEPTH addresses each, keeping the table and the op's
// arguments under the 4 KiB kernel parameter limit of older toolkits.
template <int DEPTH>
constexpr int max_tensors() {
  return DEPTH <= 2 ? 80 : DEPTH <= 5 ? 40 : 32;
}

template <int DEPTH>
struct TensorTable {
  void* address[DEPTH][max_tensors<DEPTH>()];
  int64_t numel[max_tensors<DEPTH>()];
  int index[max_tensors<DEPTH>()];  // the tensor's position in the call's lists
  unsigned char tensor_of_block[kMaxBlocks];
  int chunk_of_block[kMaxBlocks];
};
static_assert(sizeof(TensorTable<2>) <= 3840 && sizeof(TensorTable<5>) <= 3840 &&
                  sizeof(TensorTable<7>) <= 3840,
              "the table must leave room for the op's arguments in 4 KiB");

// Every block runs `op` over its chunk: op(table, tensor, start, end), where the thread
// takes the elements start, start + kThreads, ... below end. Per-chunk rather than
// per-element, so that an op can read its device scalars once and reduce at the end.
template <int DEPTH, typename Op>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(TensorTable<DEPTH> table, Op op) {
  const int tensor = table.tensor_of_block[blockIdx.x];
  const int64_t begin = int64_t(table.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t numel = table.numel[tensor];
  const int64_t end = begin + kChunk < numel ? begin + kChunk : numel;
  op(table, tensor, begin + threadIdx.x, end);
}

// Runs `op` over every element of every tensor: `operands[d][t]` is operand d of
// tensor t (nullptr where unused), all laid out like `shapes[t]`.
template <int DEPTH, typename Op>
void for_each_element(const std::vector<std::vector<void*>>& operands, at::TensorList shapes,
                      const Op& op) {
  static_assert(sizeof(TensorTable<DEPTH>) + sizeof(Op) <= 4096,
                "the kernel's parameters must fit in 4 KiB");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TensorTable<DEPTH> table;
  int tensors = 0, blocks = 0;
  auto launch = [&] {
    if (blocks == 0) return;
    multi_tensor_kernel<DEPTH, Op><<<blocks, kThreads, 0, stream>>>(table, op);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tensors = 0;
    blocks = 0;
  };
  for (size_t t = 0; t < shapes.size(); ++t) {
    const int64_t numel = shapes[t].numel();
    if (numel == 0) continue;
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(chunks <= INT32_MAX, "fused_accum: tensor ", t, " is too large");
    TORCH_CHECK(t <= size_t(INT32_MAX), "fused_accum: too many tensors");
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      if (chunk == 0 || blocks == 0) {  // (re)register the tensor in this launch's table
        if (tensors == max_tensors<DEPTH>()) launch();
        for (int d = 0; d < DEPTH; ++d) table.address[d][tensors] = operands[d][t];
        table.numel[tensors] = numel;
        table.index[tensors] = static_cast<int>(t);
        ++tensors;
      }
      table.tensor_of_block[blocks] = static_cast<unsigned char>(tensors - 1);
      table.chunk_of_block[blocks] = static_cast<int>(chunk);
      if (++blocks == kMaxBlocks) launch();
    }
  }
  launch();
}

std::vector<void*> addresses(at::TensorList tensors, size_t count) {
  std::vector<void*> result(count, nullptr);
  for (size_t i = 0; i < tensors.size(); ++i) result[i] = tensors[i].data_ptr();
  return result;
}

template <typename A>
__device__ __forceinline__ bool finite(A value) {
  return value - value == A(0);
}

// The larger of two non-negative values, NaN winning (as torch.maximum).
template <typename A>
__device__ __forceinline__ A max_nan(A a, A b) {
  return (a < b || b != b) ? b : a;
}

// One step of the block reduction: value k is summed, or maxed (NaN winning) for
// k == MAX_INDEX.
template <int MAX_INDEX, typename A, int N>
__device__ __forceinline__ void reduce_warp(A (&values)[N]) {
  constexpr unsigned kAll = 0xFFFFFFFFu;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const A other = __shfl_down_sync(kAll, values[k], offset);
      values[k] = k == MAX_INDEX ? max_nan(values[k], other) : values[k] + other;
    }
  }
}

// Reduces the block's `values` (warp shuffles, then the warps' results through shared
// memory): true in the one thread that then holds the block's totals. Every thread of
// the block must call it, at most once per kernel for each <A, N> (its shared memory).
// The maxed value must be non-negative or NaN (0 is its identity).
template <int MAX_INDEX = -1, typename A, int N>
__device__ __forceinline__ bool reduce_block(A (&values)[N]) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kWarps <= 32, "one warp reduces the warps' results");
  __shared__ A partial[N][kWarps];
  reduce_warp<MAX_INDEX>(values);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) partial[k][warp] = values[k];
  }
  __syncthreads();
  if (warp != 0) return false;
#pragma unroll
  for (int k = 0; k < N; ++k) values[k] = lane < kWarps ? partial[k][lane] : A(0);
  reduce_warp<MAX_INDEX>(values);
  return lane == 0;
}

// *target = max(*target, value) for a non-negative (or NaN) `value`, NaN winning: the
// int bits of non-negative floats order as the floats, and a NaN with its sign bit
// cleared is above inf. (A negative *target is below any such value.)
__device__ __forceinline__ void atomic_max_magnitude(float* target, float value) {
  atomicMax(reinterpret_cast<int*>(target), __float_as_int(value) & 0x7FFFFFFF);
}

// SUM_SQ: add the squares of the new buffer values to *sum_sq; GRAD_SQ: add the squares
// of the gradients as given (before `scale`) to *grad_sum_sq (template flags, so that
// calls without them do no extra work).
template <typename G, typename A, bool SUM_SQ, bool GRAD_SQ>
struct Accumulate {
  A scale;
  bool overwrite;
  float* found_inf;
  float* sum_sq;
  float* grad_sum_sq;
  template <typename Table>
  __device__ void operator()(const Table& table, int t, int64_t start, int64_t end) const {
    auto* buffer = static_cast<A*>(table.address[0][t]);
    const auto* grad = static_cast<const G*>(table.address[1][t]);
    A squares = 0, grad_squares = 0;
    for (int64_t i = start; i < end; i += kThreads) {
      const A value = static_cast<A>(grad[i]);
      if (found_inf != nullptr && !finite(value)) *found_inf = 1.f;
      if constexpr (GRAD_SQ) grad_squares += value * value;
      A sum = value * scale;
      if (!overwrite) sum += buffer[i];
      buffer[i] = sum;
      if constexpr (SUM_SQ) squares += sum * sum;
    }
    if constexpr (SUM_SQ && GRAD_SQ) {
      A totals[2] = {squares, grad_squares};
      if (reduce_block(totals)) {
        atomicAdd(sum_sq, static_cast<float>(totals[0]));
        atomicAdd(grad_sum_sq, static_cast<float>(totals[1]));
      }
    } else if constexpr (SUM_SQ || GRAD_SQ) {
      A totals[1] = {SUM_SQ ? squares : grad_squares};
      float* total = SUM_SQ ? sum_sq : grad_sum_sq;
      if (reduce_block(totals)) atomicAdd(total, static_cast<float>(totals[0]));
    }
  }
};

// A step's scalars that may come from the device: without device scalars no skip, a
// factor of exactly 1 (x * 1 == x, bit for bit) and the host's bias corrections.
template <typename A>
struct StepScalars {
  bool skip = false;
  A grad_factor = A(1);
  A step_size, bias_correction2_sqrt;

  __device__ explicit StepScalars(const StepArgs& a)
      : step_size(A(a.step_size)), bias_correction2_sqrt(A(a.bias_correction2_sqrt)) {
    const double* device = a.device_scalars;
    if (device == nullptr) return;
    skip = device[0] != 0;  // NaN skips too, as in the reference
    grad_factor = A(device[1]);
    if (a.adam) {  // SGD has two values only
      step_size = A(device[2]);
      bias_correction2_sqrt = A(device[3]);
    }
  }
};

// The fresh gradient of element i widened, when the step has grads (else 0, not read).
template <typename P, typename A>
__device__ __forceinline__ A fresh_gradient(const P* grad, int64_t i, const StepArgs& a) {
  return a.has_grads ? static_cast<A>(grad[i]) : A(0);
}

// The gradient an update applies, before the sign of maximize: the window's sum completed
// by the fresh gradient, normalised, times the device's gradient factor, as in the
// reference (the sum first, so that a window that cancels gives exactly zero).
template <typename A>
__device__ __forceinline__ A applied_gradient(const A* buffer, A fresh, int64_t i,
                                              const StepArgs& a, A grad_factor) {
  A gradient = a.use_buffer ? buffer[i] : A(0);
  if (a.has_grads) gradient += fresh * A(a.grad_weight);
  return (gradient * A(a.normaliser)) * grad_factor;
}

// A block's share of one row of the gradient statistics (spec.StepBatch.grad_stats):
// [sum |g|, sum g^2, max |g| (NaN wins), sum grad^2] over its elements, with g the
// applied gradient before the sign of maximize and grad the fresh gradient.
template <typename A>
struct GradStats {
  A abs_sum = 0, square_sum = 0, abs_max = 0, fresh_sum = 0;

  __device__ __forceinline__ void add(A gradient, A fresh) {
    const A magnitude = fabs(gradient);
    abs_sum += magnitude;
    square_sum += magnitude * magnitude;
    abs_max = max_nan(abs_max, magnitude);
    fresh_sum += fresh * fresh;  // 0 without grads
  }

  // Adds the block's totals to `row`, column 3 only when the step has grads. Every
  // thread of the block must call it.
  __device__ __forceinline__ void add_to(float* row, bool has_grads) const {
    A totals[4] = {abs_sum, square_sum, abs_max, fresh_sum};
    if (!reduce_block<2>(totals)) return;
    atomicAdd(row + 0, static_cast<float>(totals[0]));
    atomicAdd(row + 1, static_cast<float>(totals[1]));
    atomic_max_magnitude(row + 2, static_cast<float>(totals[2]));
    if (has_grads) atomicAdd(row + 3, static_cast<float>(totals[3]));
  }
};

// Row `t` of the launch's table in the statistics table.
template <typename Table>
__device__ __forceinline__ float* stats_row(const Table& table, int t, const StepArgs& a) {
  return a.grad_stats + 4 * int64_t(table.index[t]);
}

// Where an update starts: the fp32 master when there is one, else the parameter.
template <typename P, typename A>
__device__ __forceinline__ A load_param(const P* param, const A* master, int64_t i) {
  return master != nullptr ? master[i] : static_cast<A>(param[i]);
}

// The update's result: into the master when there is one, and into the parameter
// rounded, stochastically for bf16 when the step asks for it (by the noise of the
// element's flat position), else to nearest even.
template <typename P, typename A>
__device__ __forceinline__ void store_param(A value, P* param, A* master, const A* buffer,
                                            int64_t i, const StepArgs& a) {
  if (master != nullptr) master[i] = value;
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (a.stochastic) {
      const int64_t index = (buffer - static_cast<const A*>(a.flat_base)) + i;
      const uint16_t bits = stochastic_bf16_bits(__float_as_uint(value),
                                                 stochastic_noise(uint64_t(index), a.rounding_seed));
      param[i] = c10::BFloat16(bits, c10::BFloat16::from_bits());
      return;
    }
  }
  param[i] = static_cast<P>(value);
}

// STATS: add the gradient statistics to a.grad_stats (a template flag, so that steps
// without them run the plain loop).
template <typename P, typename A, bool STATS>
struct Sgd {
  StepArgs a;
  template <typename Table>
  __device__ void operator()(const Table& table, int t, int64_t start, int64_t end) const {
    const StepScalars<A> scalars(a);
    if (scalars.skip) return;  // a skipped step writes nothing
    auto* param = static_cast<P*>(table.address[0][t]);
    const auto* buffer = static_cast<const A*>(table.address[1][t]);
    const auto* grad = static_cast<const P*>(table.address[2][t]);
    auto* momentum_buffer = static_cast<A*>(table.address[3][t]);
    auto* master = static_cast<A*>(table.address[4][t]);
    GradStats<A> stats;
    for (int64_t i = start; i < end; i += kThreads) {
      const A fresh = fresh_gradient<P, A>(grad, i, a);
      A gradient = applied_gradient<A>(buffer, fresh, i, a, scalars.grad_factor);
      if constexpr (STATS) stats.add(gradient, fresh);
      if (a.maximize) gradient = -gradient;
      A value = load_param<P, A>(param, master, i);
      if (a.weight_decay != 0) gradient += A(a.weight_decay) * value;
      if (a.momentum != 0) {
        const A velocity = a.init_momentum ? gradient
                                           : momentum_buffer[i] * A(a.momentum) +
                                                 A(1 - a.dampening) * gradient;
        momentum_buffer[i] = velocity;
        gradient = a.nesterov ? gradient + A(a.momentum) * velocity : velocity;
      }
      value -= A(a.lr) * gradient;
      store_param<P, A>(value, param, master, buffer, i, a);
    }
    if constexpr (STATS) stats.add_to(stats_row(table, t, a), a.has_grads);
  }
};

template <typename P, typename A, bool STATS>
struct Adam {
  StepArgs a;
  template <typename Table>
  __device__ void operator()(const Table& table, int t, int64_t start, int64_t end) const {
    const StepScalars<A> scalars(a);
    if (scalars.skip) return;  // a skipped step writes nothing
    auto* param = static_cast<P*>(table.address[0][t]);
    const auto* buffer = static_cast<const A*>(table.address[1][t]);
    const auto* grad = static_cast<const P*>(table.address[2][t]);
    auto* exp_avg = static_cast<A*>(table.address[3][t]);
    auto* exp_avg_sq = static_cast<A*>(table.address[4][t]);
    auto* max_exp_avg_sq = static_cast<A*>(table.address[5][t]);
    auto* master = static_cast<A*>(table.address[6][t]);
    GradStats<A> stats;
    for (int64_t i = start; i < end; i += kThreads) {
      const A fresh = fresh_gradient<P, A>(grad, i, a);
      A gradient = applied_gradient<A>(buffer, fresh, i, a, scalars.grad_factor);
      if constexpr (STATS) stats.add(gradient, fresh);
      if (a.maximize) gradient = -gradient;
      A value = load_param<P, A>(param, master, i);
      if (a.weight_decay != 0) {
        if (a.decoupled_weight_decay) {
          value *= A(1 - a.lr * a.weight_decay);
        } else {
          gradient += A(a.weight_decay) * value;
        }
      }
      A first = exp_avg[i];
      first += A(1 - a.beta1) * (gradient - first);
      const A second = exp_avg_sq[i] * A(a.beta2) + A(1 - a.beta2) * gradient * gradient;
      exp_avg[i] = first;
      exp_avg_sq[i] = second;
      A second_moment = second;
      if (a.amsgrad) {
        const A running_max = max_exp_avg_sq[i];
        second_moment = (running_max < second || second != second) ? second : running_max;
        max_exp_avg_sq[i] = second_moment;
      }
      const A denominator = sqrt(second_moment) / scalars.bias_correction2_sqrt + A(a.eps);
      value -= scalars.step_size * (first / denominator);
      store_param<P, A>(value, param, master, buffer, i, a);
    }
    if constexpr (STATS) stats.add_to(stats_row(table, t, a), a.has_grads);
  }
};

void check_device(at::TensorList tensors, const at::Device& device, const char* what) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == device, "fused_accum: ", what, "[", i, "] is on ",
                tensors[i].device(), " but the call runs on ", device);
  }
}

// The address of an optional one-element float32 tensor on `device`, or nullptr.
float* one_float(const std::optional<at::Tensor>& tensor, const at::Device& device,
                 const char* what) {
  if (!tensor.has_value()) return nullptr;
  TORCH_CHECK(tensor->numel() == 1 && tensor->scalar_type() == at::kFloat &&
                  tensor->device() == device,
              "fused_accum: ", what, " must be a one-element float32 tensor on ", device);
  return tensor->data_ptr<float>();
}

void accumulate(at::TensorList buffers, at::TensorList grads, double scale, bool overwrite,
                const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& sum_sq,
                const std::optional<at::Tensor>& grad_sum_sq) {
  TORCH_CHECK(buffers.size() == grads.size(), "fused_accum: ", grads.size(),
              " gradients for ", buffers.size(), " buffers");
  if (grads.empty()) return;
  const auto dtype = grads[0].scalar_type();
  check_param_dtype(dtype);
  check_buffers(buffers, dtype);
  check_list(grads, buffers, "grads", dtype);
  const at::Device device = buffers[0].device();
  check_device(buffers, device, "buffers");
  float* flag = one_float(found_inf, device, "found_inf");
  float* squares = one_float(sum_sq, device, "sum_sq");
  float* grad_squares = one_float(grad_sum_sq, device, "grad_sum_sq");
  const c10::cuda::CUDAGuard guard(device);
  const std::vector<std::vector<void*>> operands = {addresses(buffers, buffers.size()),
                                                    addresses(grads, grads.size())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fused_accum_accumulate", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto run = [&](auto sum_sq_flag, auto grad_sq_flag) {
      using Op = Accumulate<scalar_t, A, decltype(sum_sq_flag)::value,
                            decltype(grad_sq_flag)::value>;
      for_each_element<2>(operands, grads, Op{A(scale), overwrite, flag, squares, grad_squares});
    };
    if (squares != nullptr && grad_squares != nullptr) {
      run(std::true_type{}, std::true_type{});
    } else if (squares != nullptr) {
      run(std::true_type{}, std::false_type{});
    } else if (grad_squares != nullptr) {
      run(std::false_type{}, std::true_type{});
    } else {
      run(std::false_type{}, std::false_type{});
    }
  });
}

void step(at::TensorList params, at::TensorList buffers, const std::optional<at::TensorList>& grads,
          const std::vector<at::TensorList>& states, at::TensorList masters, const StepArgs& args) {
  const at::Device device = params[0].device();
  check_device(params, device, "params");
  const c10::cuda::CUDAGuard guard(device);
  const size_t count = params.size();
  std::vector<std::vector<void*>> operands = {addresses(params, count), addresses(buffers, count),
                                              grads.has_value() ? addresses(*grads, count)
                                                                : std::vector<void*>(count)};
  for (const auto& state : states) operands.push_back(addresses(state, count));
  operands.push_back(addresses(masters, count));  // the last operand, nullptr without
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "fused_accum_step", [&] {
    using A = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const bool stats = args.grad_stats != nullptr;
    if (args.adam) {
      if (stats) {
        for_each_element<7>(operands, params, Adam<scalar_t, A, true>{args});
      } else {
        for_each_element<7>(operands, params, Adam<scalar_t, A, false>{args});
      }
    } else {
      if (stats) {
        for_each_element<5>(operands, params, Sgd<scalar_t, A, true>{args});
      } else {
        for_each_element<5>(operands, params, Sgd<scalar_t, A, false>{args});
      }
    }
  });
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fused_accum, CUDA, m) {
  m.impl("accumulate", &cuda::accumulate);
  m.impl("sgd_step", &sgd_step_op<&cuda::step>);
  m.impl("adam_step", &adam_step_op<&cuda::step>);
}

}  // namespace fused_accum
