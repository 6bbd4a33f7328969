// Multi-tensor launches, shaped as ATen's and apex's multi_tensor_apply: the addresses
// of up to max_tensors<DEPTH>() tensors and a table of up to kMaxBlocks (tensor, chunk)
// pairs travel in the kernel's parameter block, so that a call needs no device-side
// metadata and one launch covers many tensors; longer lists take several launches.
//
// Sizes, as the best multi-tensor kernels choose them and for the same reasons:
// - 64K-element chunks, one per block of 512 threads: each thread runs 32 groups of
//   kIlp elements, long enough to hide a block's start and its reduction;
// - kIlp elements in flight per thread, kIlp * sizeof(accumulation type) = 16 bytes:
//   one 16-byte access per fp32/fp64 operand (8 bytes for bf16/fp16 ones) when every
//   operand's address allows it, element by element otherwise;
// - at most 64 registers per thread (__launch_bounds__(512, 2)): two blocks per SM,
//   50% occupancy on sm_80/sm_90, enough bytes in flight to saturate HBM;
// - 320 blocks per launch (2.4 waves of two blocks on 132 SMs), as ATen.
//
// Sums over elements (squares, gradient statistics) repeat bit for bit: every block
// reduces its own in a fixed tree and writes them to a partials buffer; after each
// launch, one small kernel adds the partials to their targets in block order.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace fused_accum {
namespace cuda {

constexpr int kThreads = 512;
constexpr int kMinBlocksPerSm = 2;
constexpr int64_t kChunk = 64 * 1024;  // elements per block
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

// Every block runs `op` over its chunk: op(table, tensor, begin, size) for the `size`
// elements from `begin` of the table's tensor `tensor`.
template <int DEPTH, typename Op>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    multi_tensor_kernel(TensorTable<DEPTH> table, Op op) {
  const int tensor = table.tensor_of_block[blockIdx.x];
  const int64_t begin = int64_t(table.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t numel = table.numel[tensor];
  const int size = static_cast<int>(numel - begin < kChunk ? numel - begin : kChunk);
  op(table, tensor, begin, size);
}

// After a launch of `blocks` blocks: op.finalize adds the blocks' partials to their
// targets, in block order.
template <int DEPTH, typename Op>
__global__ void __launch_bounds__(kThreads) finalize_kernel(TensorTable<DEPTH> table, int blocks,
                                                            Op op) {
  op.finalize(table, blocks);
}

// The `size` elements of a chunk in groups of ILP consecutive ones, thread by thread:
// group(offset, count, vector) for each, with the group's offset from the chunk's start
// (32 bits: a chunk is at most kChunk elements), `vector` when all ILP are there and
// `aligned` (every operand's address allows ILP-wide accesses).
template <int ILP, typename Group>
__device__ __forceinline__ void for_each_group(int size, bool aligned, const Group& group) {
  for (int offset = int(threadIdx.x) * ILP; offset < size; offset += kThreads * ILP) {
    const int count = size - offset < ILP ? size - offset : ILP;
    if (aligned && count == ILP) {
      group(offset, ILP, std::true_type{});
    } else {
      group(offset, count, std::false_type{});
    }
  }
}

// Whether `address` (nullptr: an unused operand) allows accesses of `bytes`.
__device__ __forceinline__ bool allows(const void* address, int bytes) {
  return reinterpret_cast<uintptr_t>(address) % uintptr_t(bytes) == 0;
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vector {
  T value[N];
};

// values[0..count) = source[first..first + count): one access of N elements when VECTOR.
template <bool VECTOR, typename T, int N>
__device__ __forceinline__ void load(const T* source, int first, int count, T (&values)[N]) {
  if constexpr (VECTOR) {
    FUSED_ACCUM_ASSUME_ALIGNED(source + first, sizeof(Vector<T, N>));
    const Vector<T, N> vector = *reinterpret_cast<const Vector<T, N>*>(source + first);
#pragma unroll
    for (int k = 0; k < N; ++k) values[k] = vector.value[k];
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < count) values[k] = source[first + k];
    }
  }
}

template <bool VECTOR, typename T, int N>
__device__ __forceinline__ void store(T* target, int first, int count, const T (&values)[N]) {
  if constexpr (VECTOR) {
    FUSED_ACCUM_ASSUME_ALIGNED(target + first, sizeof(Vector<T, N>));
    Vector<T, N> vector;
#pragma unroll
    for (int k = 0; k < N; ++k) vector.value[k] = values[k];
    *reinterpret_cast<Vector<T, N>*>(target + first) = vector;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < count) target[first + k] = values[k];
    }
  }
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

// Reduces the block's `values` in a fixed tree (warp shuffles, then the warps' results
// through shared memory): true in the one thread that then holds the block's totals.
// Every thread of the block must call it, at most once per kernel for each <A, N> (its
// shared memory). The maxed value must be non-negative or NaN (0 is its identity).
template <int MAX_INDEX = -1, typename A, int N>
__device__ __forceinline__ bool reduce_block(A (&values)[N]) {
  constexpr int kWarps = kThreads / 32;
  static_assert(kWarps <= 32, "one warp reduces the warps' results");
  using Partials = A[N][kWarps];
  FUSED_ACCUM_SHARED(Partials, partial);
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

// Runs `op` over every element of every tensor: `operands[d][t]` is operand d of tensor
// t (nullptr where unused), all laid out like `shapes[t]`. An op with Op::kPartials
// sums per block gets a partials buffer (op.partials) and a finalize launch after each
// of its launches.
template <int DEPTH, typename Op>
void for_each_element(const std::vector<std::vector<void*>>& operands, at::TensorList shapes,
                      Op op) {
  static_assert(sizeof(TensorTable<DEPTH>) + sizeof(Op) <= 4096,
                "the kernel's parameters must fit in 4 KiB");
  const Stream stream = current_stream();
  at::Tensor partials;
  if constexpr (Op::kPartials > 0) {
    partials = at::empty({kMaxBlocks * Op::kPartials}, shapes[0].options().dtype(at::kFloat));
    op.partials = partials.data_ptr<float>();
  }
  TensorTable<DEPTH> table;
  int tensors = 0, blocks = 0;
  auto run = [&] {
    if (blocks == 0) return;
    launch(&multi_tensor_kernel<DEPTH, Op>, blocks, kThreads, stream, table, op);
    if constexpr (Op::kPartials > 0) {
      launch(&finalize_kernel<DEPTH, Op>, 1, kThreads, stream, table, blocks, op);
    }
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
        if (tensors == max_tensors<DEPTH>()) run();
        for (int d = 0; d < DEPTH; ++d) table.address[d][tensors] = operands[d][t];
        table.numel[tensors] = numel;
        table.index[tensors] = static_cast<int>(t);
        ++tensors;
      }
      table.tensor_of_block[blocks] = static_cast<unsigned char>(tensors - 1);
      table.chunk_of_block[blocks] = static_cast<int>(chunk);
      if (++blocks == kMaxBlocks) run();
    }
  }
  run();
}

}  // namespace cuda
}  // namespace fused_accum
