// CPU implementations of the fused_accum ops: every call splits its tensors into
// chunks and runs them on ATen's thread pool, each chunk through a vectorised loop
// compiled for the baseline instruction set and, on x86-64 with GCC, for AVX2 and for
// AVX-512 as well, the widest the CPU runs picked once at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "../step_args.h"
#include "../step_ops.h"

namespace fused_accum {
namespace cpu {

namespace baseline {
#if defined(__x86_64__)
inline void stream_line(float* dst, const float* src) {
  for (int j = 0; j < 16; j += 4) _mm_stream_ps(dst + j, _mm_load_ps(src + j));
}
inline void stream_fence() { _mm_sfence(); }
#else
inline void stream_line(float* dst, const float* src) { std::memcpy(dst, src, 64); }
inline void stream_fence() {}
#endif
#include "kernel_loops.h"
}  // namespace baseline

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSED_ACCUM_HAVE_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
inline void stream_line(float* dst, const float* src) {
  _mm256_stream_ps(dst, _mm256_load_ps(src));
  _mm256_stream_ps(dst + 8, _mm256_load_ps(src + 8));
}
inline void stream_fence() { _mm_sfence(); }
#include "kernel_loops.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,prefer-vector-width=512")
namespace avx512 {
inline void stream_line(float* dst, const float* src) { _mm512_stream_ps(dst, _mm512_load_ps(src)); }
inline void stream_fence() { _mm_sfence(); }
#include "kernel_loops.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

namespace {

enum class InstructionSet { baseline, avx2, avx512 };

// The widest instruction set this CPU runs that we compiled loops for.
InstructionSet instruction_set() {
#ifdef FUSED_ACCUM_HAVE_X86_VARIANTS
  static const InstructionSet best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    return avx512 ? InstructionSet::avx512 : avx2 ? InstructionSet::avx2 : InstructionSet::baseline;
  }();
  return best;
#else
  return InstructionSet::baseline;
#endif
}

using AccumulateFn = bool (*)(void*, const void*, int64_t, double, bool, bool, bool, double*,
                              double*);
using StepFn = void (*)(void*, const void*, const void*, void* const*, void*, int64_t, int64_t,
                       const StepArgs&, double*);

#ifdef FUSED_ACCUM_HAVE_X86_VARIANTS
#define FUSED_ACCUM_PICK(function, format)                                   \
  (instruction_set() == InstructionSet::avx512 ? &avx512::function<avx512::format> \
   : instruction_set() == InstructionSet::avx2 ? &avx2::function<avx2::format>     \
                                               : &baseline::function<baseline::format>)
#else
#define FUSED_ACCUM_PICK(function, format) (&baseline::function<baseline::format>)
#endif

AccumulateFn accumulate_function(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return FUSED_ACCUM_PICK(accumulate_entry, F32);
    case at::kDouble: return FUSED_ACCUM_PICK(accumulate_entry, F64);
    case at::kBFloat16: return FUSED_ACCUM_PICK(accumulate_entry, BF16);
    case at::kHalf: return FUSED_ACCUM_PICK(accumulate_entry, F16);
    default: check_param_dtype(dtype); return nullptr;
  }
}

StepFn step_function(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return FUSED_ACCUM_PICK(step_entry, F32);
    case at::kDouble: return FUSED_ACCUM_PICK(step_entry, F64);
    case at::kBFloat16: return FUSED_ACCUM_PICK(step_entry, BF16);
    case at::kHalf: return FUSED_ACCUM_PICK(step_entry, F16);
    default: check_param_dtype(dtype); return nullptr;
  }
}

// A piece of one tensor, small enough to stay in cache between its loads and stores.
struct Chunk {
  size_t tensor;
  int64_t begin;
  int64_t size;
};
constexpr int64_t kChunkElements = int64_t(1) << 15;

// From this many buffer bytes in one call, a first micro-step writes the buffer past
// the cache: it will not fit anyway, and a plain store first reads each line it
// writes. Below it, the buffer may still be in cache when the next micro-step reads it.
constexpr int64_t kStreamingBytes = int64_t(64) << 20;

std::vector<Chunk> chunks_of(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t numel = tensors[t].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunkElements) {
      chunks.push_back({t, begin, std::min(kChunkElements, numel - begin)});
    }
  }
  return chunks;
}

// Below this many elements in one call, waking the thread pool costs more than it saves.
constexpr int64_t kParallelElements = int64_t(1) << 16;

template <typename Fn>
void for_each_chunk(const std::vector<Chunk>& chunks, const Fn& fn) {
  int64_t elements = 0;
  for (const Chunk& chunk : chunks) elements += chunk.size;
  if (elements < kParallelElements) {
    for (const Chunk& chunk : chunks) fn(chunk);
    return;
  }
  at::parallel_for(0, int64_t(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(chunks[size_t(i)]);
  });
}

// Address of element `offset` of a dense tensor, in memory order.
inline void* at_element(const at::Tensor& tensor, int64_t offset) {
  return static_cast<char*>(tensor.data_ptr()) + offset * tensor.element_size();
}

void accumulate(at::TensorList buffers, at::TensorList grads, double scale, bool overwrite,
                const std::optional<at::Tensor>& found_inf,
                const std::optional<at::Tensor>& sum_sq,
                const std::optional<at::Tensor>& grad_sum_sq) {
  const std::optional<at::ScalarType> dtype = check_accumulate(buffers, grads);
  if (!dtype.has_value()) return;
  if (found_inf.has_value()) {
    TORCH_CHECK(found_inf->numel() == 1 && found_inf->scalar_type() == at::kFloat &&
                    found_inf->device().is_cpu(),
                "fused_accum: found_inf must be a one-element float32 CPU tensor");
  }
  for (const auto* sums : {&sum_sq, &grad_sum_sq}) {
    TORCH_CHECK(!sums->has_value() || ((*sums)->numel() == 1 &&
                                       (*sums)->scalar_type() == at::kFloat &&
                                       (*sums)->device().is_cpu()),
                "fused_accum: ", sums == &sum_sq ? "sum_sq" : "grad_sum_sq",
                " must be a one-element float32 CPU tensor");
  }
  const AccumulateFn run = accumulate_function(*dtype);
  const bool check = found_inf.has_value();
  int64_t buffer_bytes = 0;
  bool aligned = true;  // the streaming stores write whole, 64-byte aligned lines
  for (const auto& buffer : buffers) {
    buffer_bytes += buffer.numel() * buffer.element_size();
    aligned &= reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 64 == 0;
  }
  const bool squares = sum_sq.has_value() || grad_sum_sq.has_value();
  const bool stream = overwrite && aligned && buffer_bytes >= kStreamingBytes;
  const std::vector<Chunk> chunks = chunks_of(grads);
  // partial sums per chunk (of the new buffer values, of the gradients), added up in
  // order afterwards: the same totals every run
  std::vector<double> partials(squares ? 2 * chunks.size() : 0, 0.0);
  std::atomic<bool> nonfinite{false};
  for_each_chunk(chunks, [&](const Chunk& chunk) {
    double* partial = squares ? &partials[2 * size_t(&chunk - chunks.data())] : nullptr;
    if (run(at_element(buffers[chunk.tensor], chunk.begin),
            at_element(grads[chunk.tensor], chunk.begin), chunk.size, scale, overwrite, check,
            stream, sum_sq.has_value() ? partial : nullptr,
            grad_sum_sq.has_value() ? partial + 1 : nullptr)) {
      nonfinite.store(true, std::memory_order_relaxed);
    }
  });
  if (nonfinite.load()) found_inf->fill_(1.0);
  double totals[2] = {0, 0};
  for (size_t i = 0; i < partials.size(); ++i) totals[i % 2] += partials[i];
  if (sum_sq.has_value()) sum_sq->add_(totals[0]);
  if (grad_sum_sq.has_value()) grad_sum_sq->add_(totals[1]);
}

void step(at::TensorList params, at::TensorList buffers, const std::optional<at::TensorList>& grads,
          const std::vector<at::TensorList>& states, at::TensorList masters, const StepArgs& args) {
  // a window skipped for a non-finite gradient: write nothing
  if (args.device_scalars != nullptr && args.device_scalars[0] != 0) return;
  const StepFn run = step_function(params[0].scalar_type());
  const std::vector<Chunk> chunks = chunks_of(params);
  // per chunk: [sum |g|, sum g^2, max |g|, sum grad^2], folded into the rows afterwards
  std::vector<double> stats(args.grad_stats != nullptr ? 4 * chunks.size() : 0, 0.0);
  for_each_chunk(chunks, [&](const Chunk& chunk) {
    void* state[3] = {nullptr, nullptr, nullptr};
    for (size_t s = 0; s < states.size(); ++s) {
      if (!states[s].empty()) state[s] = at_element(states[s][chunk.tensor], chunk.begin);
    }
    const void* grad = grads.has_value() ? at_element((*grads)[chunk.tensor], chunk.begin) : nullptr;
    void* master = masters.empty() ? nullptr : at_element(masters[chunk.tensor], chunk.begin);
    const int64_t flat_begin = buffers[chunk.tensor].storage_offset() + chunk.begin;
    double* chunk_stats =
        stats.empty() ? nullptr : &stats[4 * size_t(&chunk - chunks.data())];
    run(at_element(params[chunk.tensor], chunk.begin),
        at_element(buffers[chunk.tensor], chunk.begin), grad, state, master, flat_begin,
        chunk.size, args, chunk_stats);
  });
  for (size_t c = 0; c < chunks.size() && !stats.empty(); ++c) {
    float* row = args.grad_stats + 4 * chunks[c].tensor;
    const double* chunk_stats = &stats[4 * c];
    row[0] += float(chunk_stats[0]);
    row[1] += float(chunk_stats[1]);
    const bool nan = chunk_stats[2] != chunk_stats[2] || row[2] != row[2];
    row[2] = nan ? NAN : std::max(row[2], float(chunk_stats[2]));
    row[3] += float(chunk_stats[3]);
  }
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fused_accum, CPU, m) {
  m.impl("accumulate", &cpu::accumulate);
  m.impl("sgd_step", &sgd_step_op<&cpu::step>);
  m.impl("adam_step", &adam_step_op<&cpu::step>);
}

}  // namespace fused_accum
