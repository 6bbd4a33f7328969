// The CUDA kernels' per-chunk work: accumulate, and the SGD and Adam steps of the kernel
// spec (fused_accum/backends/spec.py), each run by multi_tensor_kernel over one chunk of
// one tensor, in groups of kIlp elements (multi_tensor.cuh). Steps may take their skip
// flag, gradient factor and bias corrections from device memory
// (StepArgs::device_scalars): each thread reads them once, with no host sync. Sums over
// the elements are behind template flags, so that calls without them run the plain loops.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "../step_args.h"
#include "multi_tensor.cuh"

namespace fused_accum {
namespace cuda {

template <typename A>
__device__ __forceinline__ bool finite(A value) {
  return value - value == A(0);
}

// Elements per thread and group: 16 bytes of the accumulation type.
template <typename A>
constexpr int ilp() {
  return int(16 / sizeof(A));
}

// SUM_SQ: add the squares of the new buffer values to *sum_sq; GRAD_SQ: add the squares
// of the gradients as given (before `scale`) to *grad_sum_sq.
template <typename G, typename A, bool SUM_SQ, bool GRAD_SQ>
struct Accumulate {
  static constexpr int kIlp = ilp<A>();
  static constexpr int kPartials = int(SUM_SQ) + int(GRAD_SQ);
  A scale;
  bool overwrite;
  float* found_inf;
  float* sum_sq;
  float* grad_sum_sq;
  float* partials = nullptr;  // [blocks][kPartials], set by for_each_element

  template <typename Table>
  __device__ void operator()(const Table& table, int t, int64_t begin, int size) const {
    auto* buffer = static_cast<A*>(table.address[0][t]) + begin;
    const auto* grad = static_cast<const G*>(table.address[1][t]) + begin;
    const bool aligned = allows(buffer, sizeof(A) * kIlp) && allows(grad, sizeof(G) * kIlp);
    A squares = 0, grad_squares = 0;
    bool nonfinite = false;
    for_each_group<kIlp>(size, aligned, [&](int first, int count, auto vector) {
      constexpr bool kVector = decltype(vector)::value;
      G fresh[kIlp];
      A sums[kIlp];
      load<kVector>(grad, first, count, fresh);
      if (!overwrite) load<kVector>(buffer, first, count, sums);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        if (!kVector && k >= count) continue;
        const A value = static_cast<A>(fresh[k]);
        nonfinite |= !finite(value);
        if constexpr (GRAD_SQ) grad_squares += value * value;
        A sum = value * scale;
        if (!overwrite) sum += sums[k];
        sums[k] = sum;
        if constexpr (SUM_SQ) squares += sum * sum;
      }
      store<kVector>(buffer, first, count, sums);
    });
    if (nonfinite && found_inf != nullptr) *found_inf = 1.f;
    if constexpr (kPartials > 0) {
      A totals[kPartials];
      if constexpr (SUM_SQ) totals[0] = squares;
      if constexpr (GRAD_SQ) totals[kPartials - 1] = grad_squares;
      if (reduce_block(totals)) {
#pragma unroll
        for (int k = 0; k < kPartials; ++k) {
          partials[blockIdx.x * kPartials + k] = static_cast<float>(totals[k]);
        }
      }
    }
  }

  // Thread k adds partial k of every block, in block order, to its total.
  template <typename Table>
  __device__ void finalize(const Table&, int blocks) const {
    const int k = threadIdx.x;
    if (k >= kPartials) return;
    double total = 0;
    for (int block = 0; block < blocks; ++block) total += partials[block * kPartials + k];
    float* target = SUM_SQ && k == 0 ? sum_sq : grad_sum_sq;
    *target += static_cast<float>(total);
  }
};

// A step's arguments as its kernels use them: the scalars already in the accumulation
// type, so that the kernel reads them from the parameter bank instead of converting
// each into a register of its own.
template <typename A>
struct DeviceStepArgs {
  A normaliser, grad_weight, lr, weight_decay;
  A momentum, one_minus_dampening;                                        // SGD
  A one_minus_beta1, beta2, one_minus_beta2, eps, decay_factor, step_size,  // Adam
      bias_correction2_sqrt;
  bool adam, use_buffer, has_grads, maximize, has_weight_decay, has_momentum, nesterov,
      init_momentum, decoupled_weight_decay, amsgrad, stochastic;
  uint32_t rounding_seed;
  const void* flat_base;
  const double* device_scalars;
  float* grad_stats;

  explicit DeviceStepArgs(const StepArgs& a)
      : normaliser(A(a.normaliser)),
        grad_weight(A(a.grad_weight)),
        lr(A(a.lr)),
        weight_decay(A(a.weight_decay)),
        momentum(A(a.momentum)),
        one_minus_dampening(A(1 - a.dampening)),
        one_minus_beta1(A(1 - a.beta1)),
        beta2(A(a.beta2)),
        one_minus_beta2(A(1 - a.beta2)),
        eps(A(a.eps)),
        decay_factor(A(1 - a.lr * a.weight_decay)),
        step_size(A(a.step_size)),
        bias_correction2_sqrt(A(a.bias_correction2_sqrt)),
        adam(a.adam),
        use_buffer(a.use_buffer),
        has_grads(a.has_grads),
        maximize(a.maximize),
        has_weight_decay(a.weight_decay != 0),
        has_momentum(a.momentum != 0),
        nesterov(a.nesterov),
        init_momentum(a.init_momentum),
        decoupled_weight_decay(a.decoupled_weight_decay),
        amsgrad(a.amsgrad),
        stochastic(a.stochastic),
        rounding_seed(a.rounding_seed),
        flat_base(a.flat_base),
        device_scalars(a.device_scalars),
        grad_stats(a.grad_stats) {}
};

// A step's scalars that may come from the device (DeviceStepArgs::device_scalars):
// without them no skip, a factor of exactly 1 (x * 1 == x, bit for bit) and the host's
// bias corrections. Read where used, not held in registers through the loop: a load
// that hits L1, against registers that two blocks per SM cannot spare (fp64 Adam).
template <typename A>
struct StepScalars {
  __device__ __forceinline__ static bool skip(const DeviceStepArgs<A>& a) {
    return a.device_scalars != nullptr && a.device_scalars[0] != 0;  // NaN skips too
  }
  __device__ __forceinline__ static A grad_factor(const DeviceStepArgs<A>& a) {
    return a.device_scalars != nullptr ? A(a.device_scalars[1]) : A(1);
  }
  __device__ __forceinline__ static A step_size(const DeviceStepArgs<A>& a) {
    return a.device_scalars != nullptr ? A(a.device_scalars[2]) : a.step_size;
  }
  __device__ __forceinline__ static A bias_correction2_sqrt(const DeviceStepArgs<A>& a) {
    return a.device_scalars != nullptr ? A(a.device_scalars[3]) : a.bias_correction2_sqrt;
  }
};

// The gradient an update applies, before the sign of maximize: the window's sum
// completed by the fresh gradient, normalised, times the device's gradient factor, as in
// the reference (the sum first, so that a window that cancels gives exactly zero).
template <typename A>
__device__ __forceinline__ A applied_gradient(A buffer, A fresh, const DeviceStepArgs<A>& a) {
  A gradient = a.use_buffer ? buffer : A(0);
  if (a.has_grads) gradient += fresh * a.grad_weight;
  return (gradient * a.normaliser) * StepScalars<A>::grad_factor(a);
}

// The block's share of one row of the gradient statistics (spec.StepBatch.grad_stats):
// [sum |g|, sum g^2, max |g| (NaN wins), sum grad^2] over its elements, with g the
// applied gradient before the sign of maximize and grad the fresh gradient. Each thread
// keeps its running values in its own column of shared memory, not in registers that
// the step's loop needs (no barrier: no other thread touches the column); a group's
// values are gathered in registers first and added once.
template <typename A>
struct GradStats {
  static constexpr int kValues = 4;
  using Columns = A[kValues][kThreads];
  A (&running)[kValues][kThreads];
  A group[kValues] = {0, 0, 0, 0};

  __device__ explicit GradStats(Columns& columns) : running(columns) {
#pragma unroll
    for (int k = 0; k < kValues; ++k) running[k][threadIdx.x] = A(0);
  }

  __device__ __forceinline__ void add(A gradient, A fresh) {
    const A magnitude = fabs(gradient);
    group[0] += magnitude;
    group[1] += magnitude * magnitude;
    group[2] = max_nan(group[2], magnitude);
    group[3] += fresh * fresh;  // 0 without grads
  }

  // The group's values into the thread's running ones.
  __device__ __forceinline__ void end_group() {
    const int t = threadIdx.x;
    running[0][t] += group[0];
    running[1][t] += group[1];
    running[2][t] = max_nan(running[2][t], group[2]);
    running[3][t] += group[3];
#pragma unroll
    for (int k = 0; k < kValues; ++k) group[k] = A(0);
  }

  // Writes the block's totals to `partial`. Every thread of the block must call it.
  __device__ __forceinline__ void write_block(float* partial) const {
    A totals[kValues];
#pragma unroll
    for (int k = 0; k < kValues; ++k) totals[k] = running[k][threadIdx.x];
    if (!reduce_block<2>(totals)) return;
#pragma unroll
    for (int k = 0; k < kValues; ++k) partial[k] = static_cast<float>(totals[k]);
  }
};

// Thread s adds the partials of the blocks of the launch's tensor s, in block order, to
// its row of the statistics table; a skipped step leaves the rows alone.
template <typename A, typename Table>
__device__ void add_stats_partials(const Table& table, int blocks, const float* partials,
                                   const DeviceStepArgs<A>& a) {
  if (StepScalars<A>::skip(a)) return;
  const int tensor = threadIdx.x;
  if (tensor > table.tensor_of_block[blocks - 1]) return;  // tensors register in order
  double abs_sum = 0, square_sum = 0, fresh_sum = 0;
  float abs_max = 0;
  for (int block = 0; block < blocks; ++block) {
    if (table.tensor_of_block[block] != tensor) continue;
    const float* partial = partials + block * GradStats<A>::kValues;
    abs_sum += partial[0];
    square_sum += partial[1];
    abs_max = max_nan(abs_max, partial[2]);
    fresh_sum += partial[3];
  }
  float* row = a.grad_stats + 4 * int64_t(table.index[tensor]);
  row[0] += static_cast<float>(abs_sum);
  row[1] += static_cast<float>(square_sum);
  row[2] = max_nan(row[2], abs_max);
  if (a.has_grads) row[3] += static_cast<float>(fresh_sum);
}

// The update's result in the parameter's dtype: stochastically rounded for bf16 when
// the step asks for it (by the noise of the element's flat position `index`), else to
// nearest even.
template <typename P, typename A>
__device__ __forceinline__ P rounded_param(A value, uint32_t index, const DeviceStepArgs<A>& a) {
  if constexpr (std::is_same_v<P, c10::BFloat16>) {
    if (a.stochastic) {
      const uint16_t bits = stochastic_bf16_bits(__float_as_uint(value),
                                                 stochastic_noise(uint64_t(index), a.rounding_seed));
      return c10::BFloat16(bits, c10::BFloat16::from_bits());
    }
  }
  return static_cast<P>(value);
}

// The steps' shared frame: operands, alignment, statistics. A group is read in two
// rounds, so that fewer values are live at once (64 registers: two blocks per SM): the
// buffer, fresh gradient and parameter (or its fp32 master) give the applied gradient
// and the parameter widened; then the STATES state tensors (1 for SGD's momentum, 3 for
// Adam's moments) are read, and `update(state, k, gradient, value)` applies the
// optimizer's rule to element k, updating `state` in place and returning the new value.
// Either round keeps at least 32 bytes per thread in flight, more than the ~18 KB per
// SM that HBM3's bandwidth-latency product asks of 1024 threads.
template <typename P, typename A, int STATES, bool STATS, typename Table, typename Update>
__device__ __forceinline__ void run_step(const DeviceStepArgs<A>& a, const Table& table, int t,
                                         int64_t begin, int size,
                                         const bool (&uses_state)[STATES],
                                         const bool (&reads_state)[STATES], float* partials,
                                         const Update& update) {
  constexpr int kIlp = ilp<A>();
  // the operands from the chunk's start, straight from the table, so that the compiler
  // knows them global (a pointer chosen against nullptr would be generic); an unused
  // one is never dereferenced
  auto* param = static_cast<P*>(table.address[0][t]) + begin;
  const auto* buffer = static_cast<const A*>(table.address[1][t]) + begin;
  const auto* grad = static_cast<const P*>(table.address[2][t]) + begin;
  auto* master = static_cast<A*>(table.address[3 + STATES][t]) + begin;
  const bool has_master = table.address[3 + STATES][t] != nullptr;
  A* state[STATES];
  bool aligned = allows(param, sizeof(P) * kIlp) && allows(buffer, sizeof(A) * kIlp) &&
                 (!a.has_grads || allows(grad, sizeof(P) * kIlp)) &&
                 (!has_master || allows(master, sizeof(A) * kIlp));
#pragma unroll
  for (int s = 0; s < STATES; ++s) {
    state[s] = static_cast<A*>(table.address[3 + s][t]) + begin;
    aligned = aligned && (!uses_state[s] || allows(state[s], sizeof(A) * kIlp));
  }
  // flat position of the chunk's start, for stochastic rounding: its noise hashes the
  // low 32 bits only (stochastic_noise), so 32 bits are kept
  const uint32_t flat_begin = static_cast<uint32_t>(buffer - static_cast<const A*>(a.flat_base));
  FUSED_ACCUM_SHARED(typename GradStats<A>::Columns, stats_columns);
  GradStats<A> stats(stats_columns);
  for_each_group<kIlp>(size, aligned, [&](int first, int count, auto vector) {
    constexpr bool kVector = decltype(vector)::value;
    A gradient[kIlp], value[kIlp];
    {
      A sums[kIlp];
      P fresh[kIlp], stored[kIlp];
      if (a.use_buffer) load<kVector>(buffer, first, count, sums);
      if (a.has_grads) load<kVector>(grad, first, count, fresh);
      if (has_master) {
        load<kVector>(master, first, count, value);
      } else {
        load<kVector>(param, first, count, stored);
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        if (!kVector && k >= count) continue;
        const A widened = a.has_grads ? static_cast<A>(fresh[k]) : A(0);
        gradient[k] = applied_gradient<A>(sums[k], widened, a);
        if constexpr (STATS) stats.add(gradient[k], widened);
        if (a.maximize) gradient[k] = -gradient[k];
        if (!has_master) value[k] = static_cast<A>(stored[k]);
      }
      if constexpr (STATS) stats.end_group();
    }
    A states[STATES][kIlp];
#pragma unroll
    for (int s = 0; s < STATES; ++s) {
      if (reads_state[s]) load<kVector>(state[s], first, count, states[s]);
    }
    P rounded[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      if (!kVector && k >= count) continue;
      value[k] = update(states, k, gradient[k], value[k]);
      rounded[k] = rounded_param<P, A>(value[k], flat_begin + uint32_t(first + k), a);
    }
#pragma unroll
    for (int s = 0; s < STATES; ++s) {
      if (uses_state[s]) store<kVector>(state[s], first, count, states[s]);
    }
    if (has_master) store<kVector>(master, first, count, value);
    store<kVector>(param, first, count, rounded);
  });
  if constexpr (STATS) stats.write_block(partials + blockIdx.x * GradStats<A>::kValues);
}

// What the steps share: their arguments, and with STATS the partials of the gradient
// statistics (added to a.grad_stats) and their finalize.
template <typename A, bool STATS>
struct StepOp {
  static constexpr int kPartials = STATS ? GradStats<A>::kValues : 0;
  DeviceStepArgs<A> a;
  float* partials = nullptr;  // [blocks][kPartials], set by for_each_element

  template <typename Table>
  __device__ void finalize(const Table& table, int blocks) const {
    if constexpr (STATS) add_stats_partials<A>(table, blocks, partials, a);
  }
};

template <typename P, typename A, bool STATS>
struct Sgd : StepOp<A, STATS> {
  using StepOp<A, STATS>::a;
  using StepOp<A, STATS>::partials;

  template <typename Table>
  __device__ void operator()(const Table& table, int t, int64_t begin, int size) const {
    if (StepScalars<A>::skip(a)) return;  // a skipped step writes nothing
    const bool uses_state[1] = {a.has_momentum};
    const bool reads_state[1] = {a.has_momentum && !a.init_momentum};
    run_step<P, A, 1, STATS>(
        a, table, t, begin, size, uses_state, reads_state, partials,
        [&](A(&state)[1][ilp<A>()], int k, A gradient, A value) {
          if (a.has_weight_decay) gradient += a.weight_decay * value;
          if (a.has_momentum) {
            const A velocity = a.init_momentum ? gradient
                                               : state[0][k] * a.momentum +
                                                     a.one_minus_dampening * gradient;
            state[0][k] = velocity;
            gradient = a.nesterov ? gradient + a.momentum * velocity : velocity;
          }
          return value - a.lr * gradient;
        });
  }
};

template <typename P, typename A, bool STATS>
struct Adam : StepOp<A, STATS> {
  using StepOp<A, STATS>::a;
  using StepOp<A, STATS>::partials;

  template <typename Table>
  __device__ void operator()(const Table& table, int t, int64_t begin, int size) const {
    if (StepScalars<A>::skip(a)) return;  // a skipped step writes nothing
    const bool uses_state[3] = {true, true, a.amsgrad};
    run_step<P, A, 3, STATS>(
        a, table, t, begin, size, uses_state, uses_state, partials,
        [&](A(&state)[3][ilp<A>()], int k, A gradient, A value) {
          if (a.has_weight_decay) {
            if (a.decoupled_weight_decay) {
              value *= a.decay_factor;
            } else {
              gradient += a.weight_decay * value;
            }
          }
          A first = state[0][k];
          first += a.one_minus_beta1 * (gradient - first);
          const A second = state[1][k] * a.beta2 + a.one_minus_beta2 * gradient * gradient;
          state[0][k] = first;
          state[1][k] = second;
          A second_moment = second;
          if (a.amsgrad) {
            const A running_max = state[2][k];
            second_moment = (running_max < second || second != second) ? second : running_max;
            state[2][k] = second_moment;
          }
          const A denominator = sqrt(second_moment) / StepScalars<A>::bias_correction2_sqrt(a) + a.eps;
          return value - StepScalars<A>::step_size(a) * (first / denominator);
        });
  }
};

}  // namespace cuda
}  // namespace fused_accum
