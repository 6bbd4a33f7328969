// The CPU loops of the kernel spec over one chunk of one tensor, written so that the
// compiler vectorises them. kernels.cpp includes this file once per instruction set
// (baseline, and on x86-64 with GCC under `#pragma GCC target` for AVX2 and AVX-512),
// each time inside its own namespace that first defines stream_line(dst, src) (copy one
// 64-byte line past the cache) and stream_fence(). No include guard on purpose; it
// includes nothing (kernels.cpp includes what it needs first).

// Element formats: how a stored value is widened to the accumulation type and how a
// result is rounded back (to nearest even).
struct F32 {
  using storage = float;
  using acc = float;
  static inline acc load(storage x) { return x; }
  static inline storage store(acc x) { return x; }
};

struct F64 {
  using storage = double;
  using acc = double;
  static inline acc load(storage x) { return x; }
  static inline storage store(acc x) { return x; }
};

struct BF16 {
  using storage = uint16_t;
  using acc = float;
  static inline acc load(storage x) {
    const uint32_t bits = uint32_t(x) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
  }
  static inline storage store(acc x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint32_t quiet_nan = (bits >> 16) | 0x40u;
    return storage(x != x ? quiet_nan : rounded);
  }
};

struct F16 {
  using storage = uint16_t;
  using acc = float;
  // Branch-free bit conversions (IEEE half <-> single, round to nearest even), which the
  // compiler vectorises; GCC's _Float16 conversions stay scalar here.
  static inline acc load(storage x) { return c10::detail::fp16_ieee_to_fp32_value(x); }
  static inline storage store(acc x) { return c10::detail::fp16_ieee_from_fp32_value(x); }
};

// buffer = scale * grad (OVERWRITE) or buffer + scale * grad; returns whether a
// gradient element is not finite (CHECK), and adds the sum of the squares of the new
// buffer values to *squares (SQUARES; `omp simd` lets that sum be vectorised).
template <typename G, bool OVERWRITE, bool CHECK, bool SQUARES = false>
bool accumulate_chunk(typename G::acc* __restrict buffer,
                      const typename G::storage* __restrict grad, int64_t n,
                      typename G::acc scale, double* squares = nullptr,
                      double* grad_squares = nullptr) {
  using acc = typename G::acc;
  int nonfinite = 0;
  acc square_sum = 0, grad_square_sum = 0;
#pragma omp simd reduction(| : nonfinite) reduction(+ : square_sum, grad_square_sum)
  for (int64_t i = 0; i < n; ++i) {
    const acc value = G::load(grad[i]);
    if constexpr (CHECK) nonfinite |= !(value - value == acc(0));
    acc sum = value * scale;
    if constexpr (!OVERWRITE) sum += buffer[i];
    buffer[i] = sum;
    if constexpr (SQUARES) {
      square_sum += sum * sum;
      grad_square_sum += value * value;
    }
  }
  if constexpr (SQUARES) {
    if (squares != nullptr) *squares += double(square_sum);
    if (grad_squares != nullptr) *grad_squares += double(grad_square_sum);
  }
  return nonfinite != 0;
}

// The applied gradient: (buffer (USE_BUFFER) + grad_weight * grad (HAS_GRADS)) * normaliser,
// times the factor decided on the device (1 without device scalars: exact). The sum is
// completed before it is normalised, so that a window that cancels gives exactly zero.
template <typename P, bool USE_BUFFER, bool HAS_GRADS>
inline typename P::acc applied_gradient(const typename P::acc* __restrict buffer,
                                        const typename P::storage* __restrict grad, int64_t i,
                                        typename P::acc normaliser, typename P::acc grad_weight,
                                        typename P::acc factor) {
  if constexpr (USE_BUFFER && HAS_GRADS) {
    return ((buffer[i] + P::load(grad[i]) * grad_weight) * normaliser) * factor;
  } else if constexpr (USE_BUFFER) {
    return (buffer[i] * normaliser) * factor;
  } else {
    return ((P::load(grad[i]) * grad_weight) * normaliser) * factor;
  }
}

// Where an update starts: the fp32 master (HAS_MASTER), else the parameter widened.
template <typename P, bool HAS_MASTER>
inline typename P::acc load_param(const typename P::storage* __restrict param,
                                  const typename P::acc* __restrict master, int64_t i) {
  if constexpr (HAS_MASTER) {
    return master[i];
  } else {
    return P::load(param[i]);
  }
}

// The update's result: into the master (HAS_MASTER), and into the parameter rounded,
// stochastically for bf16 when STOCHASTIC (by the noise of flat position
// flat_begin + i and this update's seed), else to nearest even.
template <typename P, bool HAS_MASTER, bool STOCHASTIC>
inline void store_param(typename P::acc value, typename P::storage* __restrict param,
                        typename P::acc* __restrict master, int64_t i, int64_t flat_begin,
                        uint32_t seed) {
  if constexpr (HAS_MASTER) master[i] = value;
  if constexpr (STOCHASTIC && std::is_same_v<P, BF16>) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    param[i] = stochastic_bf16_bits(bits, stochastic_noise(uint64_t(flat_begin + i), seed));
  } else {
    param[i] = P::store(value);
  }
}

template <typename acc>
struct SgdScalars {
  acc normaliser, grad_weight, factor, sign, lr, momentum, one_minus_dampening, weight_decay;
  bool init_momentum, nesterov;
  int64_t flat_begin;  // flat position of the chunk's first element
  uint32_t seed;
};

template <typename P, bool USE_BUFFER, bool HAS_GRADS, bool HAS_WEIGHT_DECAY, bool HAS_MOMENTUM,
          bool HAS_MASTER, bool STOCHASTIC>
void sgd_chunk(typename P::storage* __restrict param, const typename P::acc* __restrict buffer,
               const typename P::storage* __restrict grad,
               typename P::acc* __restrict momentum_buffer, typename P::acc* __restrict master,
               int64_t n, const SgdScalars<typename P::acc>& s) {
  using acc = typename P::acc;
  for (int64_t i = 0; i < n; ++i) {
    acc gradient =
        s.sign * applied_gradient<P, USE_BUFFER, HAS_GRADS>(buffer, grad, i, s.normaliser,
                                                             s.grad_weight, s.factor);
    acc value = load_param<P, HAS_MASTER>(param, master, i);
    if constexpr (HAS_WEIGHT_DECAY) gradient += s.weight_decay * value;
    if constexpr (HAS_MOMENTUM) {
      const acc decayed = momentum_buffer[i] * s.momentum + s.one_minus_dampening * gradient;
      const acc velocity = s.init_momentum ? gradient : decayed;
      momentum_buffer[i] = velocity;
      gradient = s.nesterov ? gradient + s.momentum * velocity : velocity;
    }
    value -= s.lr * gradient;
    store_param<P, HAS_MASTER, STOCHASTIC>(value, param, master, i, s.flat_begin, s.seed);
  }
}

template <typename acc>
struct AdamScalars {
  acc normaliser, grad_weight, factor, sign, one_minus_beta1, beta2, one_minus_beta2, eps,
      weight_decay, decay_factor, step_size, inverse_bias_correction2_sqrt;
  int64_t flat_begin;  // flat position of the chunk's first element
  uint32_t seed;
};

enum class WeightDecay { none, coupled, decoupled };

template <typename P, bool USE_BUFFER, bool HAS_GRADS, WeightDecay DECAY, bool AMSGRAD,
          bool HAS_MASTER, bool STOCHASTIC>
void adam_chunk(typename P::storage* __restrict param, const typename P::acc* __restrict buffer,
                const typename P::storage* __restrict grad, typename P::acc* __restrict exp_avg,
                typename P::acc* __restrict exp_avg_sq, typename P::acc* __restrict max_exp_avg_sq,
                typename P::acc* __restrict master, int64_t n,
                const AdamScalars<typename P::acc>& s) {
  using acc = typename P::acc;
  for (int64_t i = 0; i < n; ++i) {
    acc gradient =
        s.sign * applied_gradient<P, USE_BUFFER, HAS_GRADS>(buffer, grad, i, s.normaliser,
                                                             s.grad_weight, s.factor);
    acc value = load_param<P, HAS_MASTER>(param, master, i);
    if constexpr (DECAY == WeightDecay::coupled) gradient += s.weight_decay * value;
    if constexpr (DECAY == WeightDecay::decoupled) value *= s.decay_factor;
    acc first = exp_avg[i];
    first += s.one_minus_beta1 * (gradient - first);
    const acc second = exp_avg_sq[i] * s.beta2 + s.one_minus_beta2 * gradient * gradient;
    exp_avg[i] = first;
    exp_avg_sq[i] = second;
    acc second_moment = second;
    if constexpr (AMSGRAD) {
      const acc running_max = max_exp_avg_sq[i];
      // torch.maximum: a NaN wins
      second_moment = (running_max < second || second != second) ? second : running_max;
      max_exp_avg_sq[i] = second_moment;
    }
    // one division per element, not two: they bound this loop on two cores
    const acc denominator = std::sqrt(second_moment) * s.inverse_bias_correction2_sqrt + s.eps;
    value -= s.step_size * (first / denominator);
    store_param<P, HAS_MASTER, STOCHASTIC>(value, param, master, i, s.flat_begin, s.seed);
  }
}

// Calls fn(std::true_type{}) or fn(std::false_type{}): a run-time flag made a template
// argument, so that each combination gets its own vectorised loop.
template <typename Fn>
inline void with_flag(bool flag, const Fn& fn) {
  if (flag) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// buffer = scale * grad, a cache line at a time through stores that bypass the cache
// (stream_line): the buffer is not read before the window's next micro-step, so this
// saves the read of each line that a plain store costs. Needs a 64-byte aligned buffer.
// With SQUARES, the sums of squares of the new values and of the gradients are added
// to *squares and *grad_squares (either may be nullptr).
template <typename G, bool CHECK, bool SQUARES>
bool overwrite_streaming(float* __restrict buffer, const typename G::storage* __restrict grad,
                         int64_t n, float scale, double* squares, double* grad_squares) {
  constexpr int64_t kLine = 16;
  int nonfinite = 0;
  // one running sum per lane, so that the line's loop stays a vector loop
  alignas(64) float square_lanes[kLine] = {}, grad_square_lanes[kLine] = {};
  int64_t i = 0;
  for (; i + kLine <= n; i += kLine) {
    alignas(64) float line[kLine];
    for (int64_t j = 0; j < kLine; ++j) {
      const float value = G::load(grad[i + j]);
      if constexpr (CHECK) nonfinite |= !(value - value == 0.0f);
      line[j] = value * scale;
      if constexpr (SQUARES) {
        square_lanes[j] += line[j] * line[j];
        grad_square_lanes[j] += value * value;
      }
    }
    stream_line(buffer + i, line);
  }
  stream_fence();
  if constexpr (SQUARES) {
    double square_sum = 0, grad_square_sum = 0;
    for (int64_t j = 0; j < kLine; ++j) {
      square_sum += square_lanes[j];
      grad_square_sum += grad_square_lanes[j];
    }
    if (squares != nullptr) *squares += square_sum;
    if (grad_squares != nullptr) *grad_squares += grad_square_sum;
  }
  return accumulate_chunk<G, true, CHECK, SQUARES>(buffer + i, grad + i, n - i, scale, squares,
                                                    grad_squares) ||
         nonfinite != 0;
}

// `squares`, `grad_squares`: nullptr, or where to add the sum of squares of the new
// buffer values, of the gradients.
template <typename G>
bool accumulate_entry(void* buffer, const void* grad, int64_t n, double scale, bool overwrite,
                      bool check, bool stream, double* squares, double* grad_squares) {
  using acc = typename G::acc;
  auto* sums = static_cast<acc*>(buffer);
  const auto* grads = static_cast<const typename G::storage*>(grad);
  const acc factor = acc(scale);
  if constexpr (std::is_same_v<acc, float>) {
    if (overwrite && stream && reinterpret_cast<uintptr_t>(buffer) % 64 == 0) {
      bool nonfinite = false;
      with_flag(check, [&](auto checked) {
        with_flag(squares != nullptr || grad_squares != nullptr, [&](auto with_squares) {
          nonfinite = overwrite_streaming<G, decltype(checked)::value, decltype(with_squares)::value>(
              sums, grads, n, factor, squares, grad_squares);
        });
      });
      return nonfinite;
    }
  }
  if (squares != nullptr || grad_squares != nullptr) {
    bool nonfinite = false;
    with_flag(overwrite, [&](auto first) {
      with_flag(check, [&](auto checked) {
        nonfinite = accumulate_chunk<G, decltype(first)::value, decltype(checked)::value, true>(
            sums, grads, n, factor, squares, grad_squares);
      });
    });
    return nonfinite;
  }
  if (overwrite) {
    return check ? accumulate_chunk<G, true, true>(sums, grads, n, factor)
                 : accumulate_chunk<G, true, false>(sums, grads, n, factor);
  }
  return check ? accumulate_chunk<G, false, true>(sums, grads, n, factor)
               : accumulate_chunk<G, false, false>(sums, grads, n, factor);
}

// Stochastic rounding as a template flag, for bf16 only (the others never instantiate it).
template <typename P, typename Fn>
inline void with_stochastic(const StepArgs& a, const Fn& fn) {
  if constexpr (std::is_same_v<P, BF16>) {
    with_flag(a.stochastic, fn);
  } else {
    fn(std::false_type{});
  }
}

template <typename P, bool USE_BUFFER, bool HAS_GRADS>
void sgd_flags(void* param, const void* buffer, const void* grad, void* momentum, void* master,
               int64_t flat_begin, int64_t n, const StepArgs& a) {
  using acc = typename P::acc;
  const double* device = a.device_scalars;  // [skip, grad_factor], in host memory here
  const SgdScalars<acc> s{acc(a.normaliser),  acc(a.grad_weight), acc(device ? device[1] : 1),
                          acc(a.maximize ? -1 : 1), acc(a.lr),  acc(a.momentum),
                          acc(1 - a.dampening), acc(a.weight_decay), a.init_momentum,
                          a.nesterov,         flat_begin,        a.rounding_seed};
  auto* p = static_cast<typename P::storage*>(param);
  const auto* b = static_cast<const acc*>(buffer);
  const auto* g = static_cast<const typename P::storage*>(grad);
  auto* m = static_cast<acc*>(momentum);
  auto* w = static_cast<acc*>(master);
  with_flag(a.weight_decay != 0, [&](auto decay) {
    with_flag(a.momentum != 0, [&](auto has_momentum) {
      with_flag(w != nullptr, [&](auto has_master) {
        with_stochastic<P>(a, [&](auto stochastic) {
          sgd_chunk<P, USE_BUFFER, HAS_GRADS, decltype(decay)::value,
                    decltype(has_momentum)::value, decltype(has_master)::value,
                    decltype(stochastic)::value>(p, b, g, m, w, n, s);
        });
      });
    });
  });
}

template <typename P, bool USE_BUFFER, bool HAS_GRADS>
void adam_flags(void* param, const void* buffer, const void* grad, void* exp_avg,
                void* exp_avg_sq, void* max_exp_avg_sq, void* master, int64_t flat_begin,
                int64_t n, const StepArgs& a) {
  using acc = typename P::acc;
  // [skip, grad_factor, step_size, bias_correction2_sqrt], in host memory here
  const double* device = a.device_scalars;
  const AdamScalars<acc> s{acc(a.normaliser),
                           acc(a.grad_weight),
                           acc(device ? device[1] : 1),
                           acc(a.maximize ? -1 : 1),
                           acc(1 - a.beta1),
                           acc(a.beta2),
                           acc(1 - a.beta2),
                           acc(a.eps),
                           acc(a.weight_decay),
                           acc(1 - a.lr * a.weight_decay),
                           acc(device ? device[2] : a.step_size),
                           acc(1 / (device ? device[3] : a.bias_correction2_sqrt)),
                           flat_begin,
                           a.rounding_seed};
  auto* p = static_cast<typename P::storage*>(param);
  const auto* b = static_cast<const acc*>(buffer);
  const auto* g = static_cast<const typename P::storage*>(grad);
  auto* m = static_cast<acc*>(exp_avg);
  auto* v = static_cast<acc*>(exp_avg_sq);
  auto* v_max = static_cast<acc*>(max_exp_avg_sq);
  auto* w = static_cast<acc*>(master);
  auto run = [&](auto decay) {
    with_flag(a.amsgrad, [&](auto amsgrad) {
      with_flag(w != nullptr, [&](auto has_master) {
        with_stochastic<P>(a, [&](auto stochastic) {
          adam_chunk<P, USE_BUFFER, HAS_GRADS, decltype(decay)::value, decltype(amsgrad)::value,
                     decltype(has_master)::value, decltype(stochastic)::value>(p, b, g, m, v,
                                                                               v_max, w, n, s);
        });
      });
    });
  };
  if (a.weight_decay == 0) {
    run(std::integral_constant<WeightDecay, WeightDecay::none>{});
  } else if (a.decoupled_weight_decay) {
    run(std::integral_constant<WeightDecay, WeightDecay::decoupled>{});
  } else {
    run(std::integral_constant<WeightDecay, WeightDecay::coupled>{});
  }
}

// The statistics of a chunk's applied gradient, added into `out`: [sum |g|, sum g^2,
// max |g| (NaN wins), sum grad^2 of the fresh gradient]. A separate loop that reads the
// chunk's buffer and gradient into the cache just before the step's loop reads them
// again: no extra pass over memory, and the step loops keep one instantiation.
template <typename P, bool USE_BUFFER, bool HAS_GRADS>
void gradient_stats(const void* buffer, const void* grad, int64_t n, const StepArgs& a,
                    double* out) {
  using acc = typename P::acc;
  const auto* b = static_cast<const acc*>(buffer);
  const auto* g = static_cast<const typename P::storage*>(grad);
  const acc normaliser = acc(a.normaliser), grad_weight = acc(a.grad_weight);
  const acc factor = acc(a.device_scalars ? a.device_scalars[1] : 1);
  acc abs_sum = 0, square_sum = 0, abs_max = 0, fresh_sum = 0;
  int nan = 0;
#pragma omp simd reduction(+ : abs_sum, square_sum, fresh_sum) reduction(max : abs_max) \
    reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const acc magnitude =
        std::abs(applied_gradient<P, USE_BUFFER, HAS_GRADS>(b, g, i, normaliser, grad_weight, factor));
    abs_sum += magnitude;
    square_sum += magnitude * magnitude;
    abs_max = magnitude > abs_max ? magnitude : abs_max;
    nan |= magnitude != magnitude;
    if constexpr (HAS_GRADS) {
      const acc fresh = P::load(g[i]);
      fresh_sum += fresh * fresh;
    }
  }
  out[0] += double(abs_sum);
  out[1] += double(square_sum);
  out[2] = (nan || out[2] != out[2]) ? double(NAN) : std::max(out[2], double(abs_max));
  out[3] += double(fresh_sum);
}

// Entry points: one per op and element format, taking untyped pointers and the
// host-side arguments, and choosing the loop instantiation for the flags. kernels.cpp
// calls them through function pointers picked once for the CPU's instruction set.

// The step entry: `state` holds the momentum buffer (SGD) or the three moments (Adam);
// `master` the fp32 master copy, or nullptr; `stats` where to add the chunk's gradient
// statistics (see gradient_stats), or nullptr.
template <typename P>
void step_entry(void* param, const void* buffer, const void* grad, void* const* state,
                void* master, int64_t flat_begin, int64_t n, const StepArgs& a, double* stats) {
  if (stats != nullptr) {
    if (a.use_buffer && a.has_grads) {
      gradient_stats<P, true, true>(buffer, grad, n, a, stats);
    } else if (a.use_buffer) {
      gradient_stats<P, true, false>(buffer, grad, n, a, stats);
    } else {
      gradient_stats<P, false, true>(buffer, grad, n, a, stats);
    }
  }
  if (a.adam) {
    auto adam = [&](auto use_buffer, auto has_grads) {
      adam_flags<P, decltype(use_buffer)::value, decltype(has_grads)::value>(
          param, buffer, grad, state[0], state[1], state[2], master, flat_begin, n, a);
    };
    if (a.use_buffer && a.has_grads) return adam(std::true_type{}, std::true_type{});
    if (a.use_buffer) return adam(std::true_type{}, std::false_type{});
    return adam(std::false_type{}, std::true_type{});
  }
  auto sgd = [&](auto use_buffer, auto has_grads) {
    sgd_flags<P, decltype(use_buffer)::value, decltype(has_grads)::value>(
        param, buffer, grad, state[0], master, flat_begin, n, a);
  };
  if (a.use_buffer && a.has_grads) return sgd(std::true_type{}, std::true_type{});
  if (a.use_buffer) return sgd(std::true_type{}, std::false_type{});
  return sgd(std::false_type{}, std::true_type{});
}

// Instantiated here, so that they are compiled for this file's instruction set.
template bool accumulate_entry<F32>(void*, const void*, int64_t, double, bool, bool, bool,
                                      double*, double*);
template bool accumulate_entry<F64>(void*, const void*, int64_t, double, bool, bool, bool,
                                      double*, double*);
template bool accumulate_entry<BF16>(void*, const void*, int64_t, double, bool, bool, bool,
                                      double*, double*);
template bool accumulate_entry<F16>(void*, const void*, int64_t, double, bool, bool, bool,
                                      double*, double*);
template void step_entry<F32>(void*, const void*, const void*, void* const*, void*, int64_t,
                                int64_t, const StepArgs&, double*);
template void step_entry<F64>(void*, const void*, const void*, void* const*, void*, int64_t,
                                int64_t, const StepArgs&, double*);
template void step_entry<BF16>(void*, const void*, const void*, void* const*, void*, int64_t,
                                int64_t, const StepArgs&, double*);
template void step_entry<F16>(void*, const void*, const void*, void* const*, void*, int64_t,
                                int64_t, const StepArgs&, double*);
