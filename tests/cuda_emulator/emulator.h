// An emulator of the CUDA execution model, for the tests: the CUDA kernels' own device
// code (csrc/cuda/*.cuh), compiled as host C++, runs on CPU tensors.
//
// - Grid and blocks: a launch runs its blocks one after another, in block order or in
//   reverse (set_order).
// - Threads: every CUDA thread of a block is a fiber (ucontext) with its own stack. A
//   fiber runs until it reaches __syncthreads(), a warp shuffle or its end.
// - Scheduling is warp-greedy: one warp runs as far as it can (its lanes taking turns,
//   shuffle by shuffle) before the next starts, warps in the launch's order. A warp so
//   races ahead of the others; a missing __syncthreads() then lets it read shared memory
//   that the others have not written yet, as a GPU may.
// - Shared memory (FUSED_ACCUM_SHARED) is fresh for each block and filled with 0xFF
//   bytes (NaN): a read before this block wrote shows.
// - __shfl_down_sync: every lane of the mask must arrive; the values exchanged are those
//   the lanes held at the call. A lane that never arrives (it returned, or waits at a
//   barrier) is a deadlock, reported as an error, as is a barrier that a thread of the
//   block exited before.
// - 16-byte (vector) accesses are checked for alignment, as a GPU faults on them.
// Atomics need no emulation: fibers switch only at the points above, so a
// read-modify-write is never interleaved.
#pragma once

// Everything the device code includes, first: the CUDA keywords defined below must not
// reach library headers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define FUSED_ACCUM_EMULATED_CUDA 1

// The float overloads, as device code has them (not sqrt(double) on a float).
using std::fabs;
using std::sqrt;

namespace fused_accum_emulator {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

enum class Order { forward, reverse };

struct Fiber {
  enum class State { ready, at_barrier, at_shuffle, done };
  ucontext_t context;
  State state = State::ready;
  // at a shuffle: what the lane gave, and what it gets back
  unsigned mask = 0;
  int delta = 0;
  uint64_t value = 0;
  uint64_t result = 0;
};

class Emulator {
 public:
  Order order = Order::forward;
  Dim3 block_index, block_dim, grid_dim;

  // Runs body() as every thread of every block of a grid; throws what went wrong.
  void run_grid(int blocks, int threads, const std::function<void()>& body) {
    if (threads <= 0 || threads > 1024) throw std::invalid_argument("bad block size");
    grid_dim = {unsigned(blocks), 1, 1};
    block_dim = {unsigned(threads), 1, 1};
    body_ = &body;
    for (int i = 0; i < blocks; ++i) {
      const int block = order == Order::forward ? i : blocks - 1 - i;
      block_index = {unsigned(block), 0, 0};
      run_block(threads);
      if (!error_.empty()) {
        std::string error = "CUDA emulator, block " + std::to_string(block) + ": " + error_;
        error_.clear();
        throw std::runtime_error(error);
      }
    }
  }

  Fiber& current() { return fibers_[size_t(current_)]; }
  int current_thread() const { return current_; }

  // Back to the scheduler, until the fiber is ready again.
  void yield() {
    swapcontext(&fibers_[size_t(current_)].context, &scheduler_);
  }

  void fail(const std::string& what) {
    if (error_.empty()) error_ = what;
  }

  template <typename T>
  T& shared(const void* site) {
    auto& bytes = shared_[site];
    if (bytes.empty()) bytes.assign(sizeof(T), 0xFF);
    return *reinterpret_cast<T*>(bytes.data());
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;

  static void fiber_entry() {
    Emulator& self = instance();
    (*self.body_)();
    self.current().state = Fiber::State::done;
    swapcontext(&self.current().context, &self.scheduler_);
  }

  char* stack(size_t thread) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    while (stacks_.size() <= thread) {
      // a guard page below each stack: an overflow faults instead of corrupting another
      void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (memory == MAP_FAILED) throw std::runtime_error("CUDA emulator: no memory for stacks");
      mprotect(memory, page, PROT_NONE);
      stacks_.push_back(static_cast<char*>(memory) + page);
    }
    return stacks_[thread];
  }

  void switch_to(int thread) {
    current_ = thread;
    swapcontext(&scheduler_, &fibers_[size_t(thread)].context);
    current_ = -1;
  }

  // Completes the shuffle that warp `warp`'s lanes wait at, when all of its lanes have
  // arrived: true if it did.
  bool resolve_shuffle(int warp, int threads) {
    const int first = warp * 32;
    const int lanes = std::min(32, threads - first);
    unsigned waiting = 0, mask = 0;
    for (int lane = 0; lane < lanes; ++lane) {
      const Fiber& fiber = fibers_[size_t(first + lane)];
      if (fiber.state != Fiber::State::at_shuffle) continue;
      waiting |= 1u << lane;
      if (mask != 0 && fiber.mask != mask) {
        fail("lanes of warp " + std::to_string(warp) + " shuffle with different masks");
      }
      mask = fiber.mask;
    }
    if (waiting == 0 || (mask & waiting) != mask) return false;  // not all there yet
    if ((waiting & ~mask) != 0) fail("a lane outside the mask of a shuffle joined it");
    for (int lane = 0; lane < lanes; ++lane) {
      if (!(mask >> lane & 1u)) continue;
      Fiber& fiber = fibers_[size_t(first + lane)];
      const int source = lane + fiber.delta;
      const bool inside = source < 32 && source < lanes;
      if (inside && !(mask >> source & 1u)) {
        fail("a lane shuffled from lane " + std::to_string(source) + ", outside the mask");
      }
      fiber.result = inside ? fibers_[size_t(first + source)].value : fiber.value;
      fiber.state = Fiber::State::ready;
    }
    return true;
  }

  std::string describe(int threads) const {
    std::ostringstream out;
    int counts[4] = {0, 0, 0, 0};
    for (int t = 0; t < threads; ++t) ++counts[int(fibers_[size_t(t)].state)];
    out << counts[1] << " threads at __syncthreads(), " << counts[2]
        << " at a warp shuffle, " << counts[3] << " finished";
    return out.str();
  }

  void run_block(int threads) {
    fibers_.resize(size_t(threads));
    shared_.clear();
    for (int t = 0; t < threads; ++t) {
      Fiber& fiber = fibers_[size_t(t)];
      fiber = Fiber{};
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = stack(size_t(t));
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = nullptr;
      makecontext(&fiber.context, &Emulator::fiber_entry, 0);
    }
    const int warps = (threads + 31) / 32;
    int finished = 0;
    while (finished < threads && error_.empty()) {
      bool progressed = false;
      for (int i = 0; i < warps; ++i) {
        const int warp = order == Order::forward ? i : warps - 1 - i;
        for (bool moved = true; moved && error_.empty();) {  // this warp as far as it goes
          moved = false;
          for (int t = warp * 32; t < std::min(threads, warp * 32 + 32); ++t) {
            if (fibers_[size_t(t)].state != Fiber::State::ready) continue;
            switch_to(t);
            moved = true;
            if (fibers_[size_t(t)].state == Fiber::State::done) ++finished;
          }
          moved |= resolve_shuffle(warp, threads);
          progressed |= moved;
        }
      }
      int at_barrier = 0;
      for (int t = 0; t < threads; ++t) {
        at_barrier += fibers_[size_t(t)].state == Fiber::State::at_barrier;
      }
      if (at_barrier > 0 && at_barrier + finished == threads) {
        if (finished > 0) {
          fail("__syncthreads() after " + std::to_string(finished) +
               " threads of the block returned");
          break;
        }
        for (auto& fiber : fibers_) fiber.state = Fiber::State::ready;
        progressed = true;
      }
      if (!progressed && finished < threads) {
        fail("deadlock: " + describe(threads));
        break;
      }
    }
    fibers_.clear();  // a failed block's fibers are abandoned mid-way, never resumed
  }

 public:
  static Emulator& instance() {
    static Emulator emulator;
    return emulator;
  }

 private:
  const std::function<void()>* body_ = nullptr;
  std::vector<Fiber> fibers_;
  std::vector<char*> stacks_;
  std::map<const void*, std::vector<unsigned char>> shared_;
  ucontext_t scheduler_;
  int current_ = -1;
  std::string error_;
};

inline Emulator& emulator() { return Emulator::instance(); }

inline Dim3 thread_index() { return {unsigned(emulator().current_thread()), 0, 0}; }

inline void check_aligned(const void* address, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(address) % bytes != 0) {
    std::ostringstream out;
    out << "misaligned " << bytes << "-byte access at " << address << " by thread "
        << emulator().current_thread() << " (a GPU faults: misaligned address)";
    emulator().fail(out.str());
  }
}

}  // namespace fused_accum_emulator

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::fused_accum_emulator::thread_index())
#define blockIdx (::fused_accum_emulator::emulator().block_index)
#define blockDim (::fused_accum_emulator::emulator().block_dim)
#define gridDim (::fused_accum_emulator::emulator().grid_dim)
#define FUSED_ACCUM_SHARED(type, name) \
  static const char name##_site = 0;   \
  type& name = ::fused_accum_emulator::emulator().shared<type>(&name##_site)
#define FUSED_ACCUM_ASSUME_ALIGNED(address, bytes) \
  ::fused_accum_emulator::check_aligned(address, bytes)

inline void __syncthreads() {
  auto& emulator = ::fused_accum_emulator::emulator();
  emulator.current().state = ::fused_accum_emulator::Fiber::State::at_barrier;
  emulator.yield();
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
  auto& emulator = ::fused_accum_emulator::emulator();
  auto& fiber = emulator.current();
  const unsigned lane = unsigned(emulator.current_thread()) % 32;
  if (!(mask >> lane & 1u)) emulator.fail("a lane shuffled outside its own mask");
  fiber.mask = mask;
  fiber.delta = int(delta);
  fiber.value = 0;
  std::memcpy(&fiber.value, &value, sizeof(T));
  fiber.state = ::fused_accum_emulator::Fiber::State::at_shuffle;
  emulator.yield();
  T result;
  std::memcpy(&result, &emulator.current().result, sizeof(T));
  return result;
}

inline unsigned __float_as_uint(float value) {
  unsigned bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// The platform of csrc/cuda/platform.cuh, emulated.
namespace fused_accum {
namespace cuda {

using Stream = int;

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};

inline Stream current_stream() { return 0; }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int blocks, int threads, Stream, Args&&... args) {
  // the kernel's parameters, copied as a launch copies them
  const std::tuple<std::decay_t<Params>...> parameters(std::forward<Args>(args)...);
  ::fused_accum_emulator::emulator().run_grid(blocks, threads,
                                              [&] { std::apply(kernel, parameters); });
}

}  // namespace cuda
}  // namespace fused_accum
