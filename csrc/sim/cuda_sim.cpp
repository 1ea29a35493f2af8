// cuda_sim runtime: the fiber scheduler behind cuda_sim::launch, the barriers, the warp exchange, and the runtime calls
// of cuda_sim.h. See cuda_sim.h for what it is and what it covers.
//
// Fibers switch with a few lines of x86-64 assembly (callee-saved registers, MXCSR and the x87 control word, then the
// stack pointer): no system call per switch, which matters because every barrier switches once per thread. Other
// architectures use ucontext. Under AddressSanitizer the switches are announced to it (the fiber annotations), so a
// build with -fsanitize=address checks every access the kernels make.
#include "cuda_sim.h"

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

// The assembly switch needs x86-64 ELF, and returns to addresses it wrote itself, which a process with CET shadow
// stacks would reject: there, and elsewhere, ucontext.
#if defined(__x86_64__) && defined(__ELF__) && !(defined(__CET__) && (__CET__ & 2))
#define CUDA_SIM_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CUDA_SIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CUDA_SIM_ASAN 1
#endif
#endif
#if defined(CUDA_SIM_ASAN)
#include <sanitizer/common_interface_defs.h>
#endif

namespace cuda_sim {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per fiber; kernels keep a few KB of registers-as-locals
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr int kWarpSize = 32;

#if defined(CUDA_SIM_ASM_SWITCH)
extern "C" void reft_fast_cuda_sim_switch(void** save_sp, void* load_sp);
extern "C" void reft_fast_cuda_sim_trampoline();
asm(R"(
  .text
  .p2align 4
  .globl reft_fast_cuda_sim_switch
  .hidden reft_fast_cuda_sim_switch
  .type reft_fast_cuda_sim_switch, @function
reft_fast_cuda_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size reft_fast_cuda_sim_switch, .-reft_fast_cuda_sim_switch

  .p2align 4
  .globl reft_fast_cuda_sim_trampoline
  .hidden reft_fast_cuda_sim_trampoline
  .type reft_fast_cuda_sim_trampoline, @function
reft_fast_cuda_sim_trampoline:
  movq %rbx, %rdi
  andq $-16, %rsp
  call reft_fast_cuda_sim_fiber_main
  ud2
  .size reft_fast_cuda_sim_trampoline, .-reft_fast_cuda_sim_trampoline
)");
#endif

enum class State { kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone };

// A fiber stack: mmap'ed, with an inaccessible guard page below it, so an overflow faults instead of corrupting memory.
class Stack {
 public:
  Stack() {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* p = mmap(nullptr, page_ + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    mprotect(p, page_, PROT_NONE);
    base_ = static_cast<char*>(p);
  }
  ~Stack() { munmap(base_, page_ + kStackBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* bottom() const { return base_ + page_; }  // lowest usable byte; the stack grows down from bottom() + kStackBytes

 private:
  char* base_ = nullptr;
  size_t page_ = 0;
};

struct Fiber {
  ThreadContext ctx;
  State state = State::kRunnable;
  Site site{nullptr, 0};  // the barrier call site this fiber waits at
  int warp = 0;
  int lane = 0;
  Stack* stack = nullptr;
#if defined(CUDA_SIM_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

struct Warp {
  int lanes = 0;        // threads of the block in this warp
  uint32_t slot[kWarpSize] = {};
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  const std::function<void()>* body = nullptr;
  Fiber* current = nullptr;
#if defined(CUDA_SIM_ASM_SWITCH)
  void* scheduler_sp = nullptr;
#else
  ucontext_t scheduler_uc;
#endif
#if defined(CUDA_SIM_ASAN)
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif
  cudaError_t error = cudaSuccess;
  std::string message;
};

// The order in which a pass of the scheduler resumes the runnable threads of a block, from REFT_FAST_CUDA_SIM_ORDER
// at each launch: forward (default), reverse, or shuffle (a fresh pseudo-random permutation per pass, fixed seed).
// Race-free kernels give bitwise the same results under every order; a missing barrier shows up as a difference.
enum class Order { kForward, kReverse, kShuffle };

Order schedule_order() {
  const char* value = std::getenv("REFT_FAST_CUDA_SIM_ORDER");
  if (value == nullptr || *value == 0 || std::strcmp(value, "forward") == 0) return Order::kForward;
  if (std::strcmp(value, "reverse") == 0) return Order::kReverse;
  if (std::strcmp(value, "shuffle") == 0) return Order::kShuffle;
  std::fprintf(stderr, "cuda_sim: REFT_FAST_CUDA_SIM_ORDER=%s is not forward, reverse or shuffle; using forward\n",
               value);
  return Order::kForward;
}

thread_local Block* t_block = nullptr;

// Fiber stacks are kept for the next launch on this thread (a block has at most 1024 threads).
Stack* pooled_stack(size_t i) {
  thread_local std::vector<std::unique_ptr<Stack>> pool;
  while (pool.size() <= i) pool.emplace_back(new Stack());
  return pool[i].get();
}
std::mutex g_launch_mutex;  // one launch at a time: __shared__ statics belong to the running block
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

void record(Block& block, cudaError_t error, std::string message) {
  if (block.error == cudaSuccess) {
    block.error = error;
    block.message = std::move(message);
  }
}

std::string where(const Fiber& f) {
  char buf[160];
  std::snprintf(buf, sizeof buf, " (block (%u, %u, %u), thread (%u, %u, %u))", f.ctx.block_idx.x, f.ctx.block_idx.y,
                f.ctx.block_idx.z, f.ctx.thread_idx.x, f.ctx.thread_idx.y, f.ctx.thread_idx.z);
  return buf;
}

// Fiber -> scheduler.
void yield_to_scheduler() {
  Block& block = *t_block;
  Fiber& self = *block.current;
#if defined(CUDA_SIM_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(self.state == State::kDone ? nullptr : &fake_stack, block.scheduler_stack_bottom,
                                 block.scheduler_stack_size);
#endif
#if defined(CUDA_SIM_ASM_SWITCH)
  reft_fast_cuda_sim_switch(&self.sp, block.scheduler_sp);
#else
  swapcontext(&self.uc, &block.scheduler_uc);
#endif
#if defined(CUDA_SIM_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// Scheduler -> fiber, returning when the fiber yields.
void resume(Block& block, Fiber& fiber) {
  block.current = &fiber;
#if defined(CUDA_SIM_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, fiber.stack->bottom(), kStackBytes);
#endif
#if defined(CUDA_SIM_ASM_SWITCH)
  reft_fast_cuda_sim_switch(&block.scheduler_sp, fiber.sp);
#else
  swapcontext(&block.scheduler_uc, &fiber.uc);
#endif
#if defined(CUDA_SIM_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  block.current = nullptr;
}

struct FaultUnwind {};  // thrown by fault() to leave the kernel; caught in fiber_main on the fiber's own stack

}  // namespace

extern "C" __attribute__((visibility("hidden"))) void reft_fast_cuda_sim_fiber_main(Fiber* fiber) {
#if defined(CUDA_SIM_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &t_block->scheduler_stack_bottom, &t_block->scheduler_stack_size);
#endif
  try {
    (*t_block->body)();
  } catch (const FaultUnwind&) {
  } catch (const std::exception& e) {
    record(*t_block, cudaErrorLaunchFailure, std::string("exception in kernel: ") + e.what() + where(*fiber));
  } catch (...) {
    record(*t_block, cudaErrorLaunchFailure, "unknown exception in kernel" + where(*fiber));
  }
  fiber->state = State::kDone;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

namespace {

#if !defined(CUDA_SIM_ASM_SWITCH)
void ucontext_entry(unsigned lo, unsigned hi) {
  reft_fast_cuda_sim_fiber_main(reinterpret_cast<Fiber*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

void start_fiber(Block& block, Fiber& f) {
#if defined(CUDA_SIM_ASM_SWITCH)
  // The frame reft_fast_cuda_sim_switch pops: [mxcsr | x87 cw], r15, r14, r13, r12, rbx (= fiber), rbp, return address.
  auto* top = reinterpret_cast<uint64_t*>(
      (reinterpret_cast<uintptr_t>(f.stack->bottom() + kStackBytes) & ~static_cast<uintptr_t>(15)));
  uint64_t* sp = top - 8;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = mxcsr | (static_cast<uint64_t>(fpcw) << 32);
  sp[1] = sp[2] = sp[3] = sp[4] = 0;                    // r15 .. r12
  sp[5] = reinterpret_cast<uint64_t>(&f);               // rbx: the trampoline's argument
  sp[6] = 0;                                            // rbp
  sp[7] = reinterpret_cast<uint64_t>(&reft_fast_cuda_sim_trampoline);
  f.sp = sp;
  (void)block;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack->bottom();
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  const auto bits = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 2, static_cast<unsigned>(bits & 0xffffffffu),
              static_cast<unsigned>(bits >> 32));
  (void)block;
#endif
  f.state = State::kRunnable;
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || (a.file != nullptr && b.file != nullptr && std::strcmp(a.file, b.file) == 0));
}

std::string site_text(const Site& s) { return std::string(s.file ? s.file : "?") + ":" + std::to_string(s.line); }

// Releases whatever barrier every live thread has reached. Returns false when nothing can move (a deadlock), and
// records a divergence when the threads of one barrier wait at different call sites.
bool release_barriers(Block& block) {
  size_t live = 0, at_block = 0;
  const Fiber* first_waiting = nullptr;
  for (const Fiber& f : block.fibers) {
    if (f.state == State::kDone) continue;
    ++live;
    if (f.state != State::kAtBlockBarrier) continue;
    ++at_block;
    if (first_waiting == nullptr) {
      first_waiting = &f;
    } else if (!same_site(f.site, first_waiting->site)) {
      record(block, cudaErrorLaunchFailure,
             "barrier divergence: threads wait at different __syncthreads: " + site_text(first_waiting->site) +
                 where(*first_waiting) + " and " + site_text(f.site) + where(f));
      return false;
    }
  }
  if (live > 0 && at_block == live) {
    for (Fiber& f : block.fibers)
      if (f.state == State::kAtBlockBarrier) f.state = State::kRunnable;
    return true;
  }
  bool released = false;
  for (size_t w = 0; w < block.warps.size(); ++w) {
    const size_t first = w * kWarpSize, last = first + block.warps[w].lanes;
    bool all_waiting = true;
    for (size_t i = first; i < last && all_waiting; ++i) all_waiting = block.fibers[i].state == State::kAtWarpBarrier;
    if (!all_waiting) continue;
    for (size_t i = first + 1; i < last; ++i) {
      if (!same_site(block.fibers[i].site, block.fibers[first].site)) {
        record(block, cudaErrorLaunchFailure,
               "barrier divergence: the lanes of a warp shuffle at different call sites: " +
                   site_text(block.fibers[first].site) + where(block.fibers[first]) + " and " +
                   site_text(block.fibers[i].site) + where(block.fibers[i]));
        return false;
      }
    }
    for (size_t i = first; i < last; ++i) block.fibers[i].state = State::kRunnable;
    released = true;
  }
  return released;
}

std::string deadlock_report(const Block& block) {
  std::string report = "barrier divergence: threads wait at different barriers and none can proceed;";
  int shown = 0;
  for (const Fiber& f : block.fibers) {
    if (f.state == State::kDone || shown == 4) continue;
    report += f.state == State::kAtBlockBarrier ? " __syncthreads" : " warp shuffle";
    report += where(f) + ";";
    ++shown;
  }
  return report;
}

Fiber& current_fiber() {
  if (t_block == nullptr || t_block->current == nullptr) {
    std::fprintf(stderr, "cuda_sim: a device function was called outside a kernel launch\n");
    std::abort();
  }
  return *t_block->current;
}

void warp_barrier(Fiber& self, Site site) {
  self.state = State::kAtWarpBarrier;
  self.site = site;
  yield_to_scheduler();
}

}  // namespace

const ThreadContext& context() { return current_fiber().ctx; }

void syncthreads(Site site) {
  Fiber& self = current_fiber();
  self.state = State::kAtBlockBarrier;
  self.site = site;
  yield_to_scheduler();
}

uint32_t shfl_xor_bits(unsigned mask, uint32_t bits, int lane_mask, int width, Site site) {
  Fiber& self = current_fiber();
  Block& block = *t_block;
  Warp& warp = block.warps[self.warp];
  if (width != kWarpSize) fault(cudaErrorLaunchFailure, "cuda_sim supports shuffles of width 32 only");
  if (mask != 0xffffffffu || warp.lanes != kWarpSize)
    fault(cudaErrorLaunchFailure, "__shfl_xor_sync needs a full warp and the full mask in csrc/ (UB otherwise)");
  warp.slot[self.lane] = bits;
  warp_barrier(self, site);  // every lane has written
  const uint32_t got = warp.slot[(self.lane ^ lane_mask) & (kWarpSize - 1)];
  warp_barrier(self, site);  // every lane has read before any writes again
  return got;
}

void fault(cudaError_t error, const char* what) {
  Fiber& self = current_fiber();
  record(*t_block, error, what + where(self));
  throw FaultUnwind{};
}

cudaError_t launch(dim3 grid, dim3 block_dim, size_t shared_bytes, const std::function<void()>& body) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const uint64_t threads = static_cast<uint64_t>(block_dim.x) * block_dim.y * block_dim.z;
  cudaError_t error = cudaSuccess;
  std::string message;
  if (threads == 0 || threads > kMaxThreadsPerBlock || block_dim.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    error = cudaErrorInvalidConfiguration;
    message = "invalid launch configuration (grid or block dimensions)";
  } else if (shared_bytes != 0) {
    error = cudaErrorInvalidValue;
    message = "cuda_sim does not model dynamic shared memory (csrc/ uses static __shared__ only)";
  }
  if (error != cudaSuccess) {
    if (t_last_error == cudaSuccess) {
      t_last_error = error;
      t_last_message = message;
    }
    return error;
  }

  Block block;
  block.body = &body;
  block.fibers.resize(threads);
  block.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  for (size_t w = 0; w < block.warps.size(); ++w)
    block.warps[w].lanes = static_cast<int>(std::min<uint64_t>(kWarpSize, threads - w * kWarpSize));
  for (size_t i = 0; i < threads; ++i) {
    Fiber& f = block.fibers[i];
    f.stack = pooled_stack(i);
    f.warp = static_cast<int>(i / kWarpSize);
    f.lane = static_cast<int>(i % kWarpSize);
    f.ctx.thread_idx = uint3{static_cast<unsigned>(i % block_dim.x), static_cast<unsigned>(i / block_dim.x % block_dim.y),
                             static_cast<unsigned>(i / (static_cast<uint64_t>(block_dim.x) * block_dim.y))};
    f.ctx.block_dim = block_dim;
    f.ctx.grid_dim = grid;
  }

  const Order order = schedule_order();
  std::vector<size_t> sequence(threads);
  for (size_t i = 0; i < threads; ++i) sequence[i] = order == Order::kReverse ? threads - 1 - i : i;
  uint64_t rng = 0x9e3779b97f4a7c15ull;  // splitmix64 state: the same permutations on every run

  Block* const outer = t_block;
  t_block = &block;
  for (unsigned bz = 0; bz < grid.z && block.error == cudaSuccess; ++bz) {
    for (unsigned by = 0; by < grid.y && block.error == cudaSuccess; ++by) {
      for (unsigned bx = 0; bx < grid.x && block.error == cudaSuccess; ++bx) {
        for (Fiber& f : block.fibers) {
          f.ctx.block_idx = uint3{bx, by, bz};
          start_fiber(block, f);
        }
        for (;;) {
          if (order == Order::kShuffle) {
            for (size_t i = threads - 1; i > 0; --i) {  // Fisher-Yates with splitmix64
              uint64_t z = (rng += 0x9e3779b97f4a7c15ull);
              z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
              z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
              std::swap(sequence[i], sequence[(z ^ (z >> 31)) % (i + 1)]);
            }
          }
          for (size_t i : sequence) {
            Fiber& f = block.fibers[i];
            if (f.state != State::kRunnable) continue;
            resume(block, f);
            if (block.error != cudaSuccess) break;
          }
          if (block.error != cudaSuccess) break;  // a fault: the block's other fibers are abandoned, as on a trap
          bool all_done = true;
          for (const Fiber& f : block.fibers) all_done = all_done && f.state == State::kDone;
          if (all_done) break;
          // Every fiber that could run has run until it blocked or ended: release a barrier, or nothing ever will.
          if (!release_barriers(block)) {
            record(block, cudaErrorLaunchFailure, deadlock_report(block));  // unless a divergence was recorded
            break;
          }
        }
      }
    }
  }
  t_block = outer;
  if (block.error != cudaSuccess && t_last_error == cudaSuccess) {
    t_last_error = block.error;
    t_last_message = "cuda_sim: " + block.message;
  }
  return block.error;
}

}  // namespace cuda_sim

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int) { return cudaSuccess; }

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_sim::t_last_error;
  cuda_sim::t_last_error = cudaSuccess;
  return e;
}

const char* cudaGetErrorString(cudaError_t error) {
  // The message of the launch that failed last on this thread (kept until the next failure), else a generic one.
  if (error != cudaSuccess && !cuda_sim::t_last_message.empty()) return cuda_sim::t_last_message.c_str();
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (bytes != 0 && ptr == nullptr) return cudaErrorInvalidValue;
  if (bytes != 0) std::memset(ptr, value, bytes);
  return cudaSuccess;
}
