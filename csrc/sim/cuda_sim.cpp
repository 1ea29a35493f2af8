// cuda_sim runtime: the fiber scheduler behind cuda_sim::launch, the barriers, the warp-collective calls (shuffles,
// __syncwarp, wmma), and the runtime calls of cuda_sim.h. See cuda_sim.h for what it is and what it covers.
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
constexpr size_t kMaxDeposit = 64;  // bytes per lane of one warp-collective call (a wmma mma's three fragments)

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
  const char* what = "";  // and what waits there (__syncthreads, __shfl_xor_sync, wmma::mma_sync, ...)
  int warp = 0;
  int lane = 0;
  Stack* stack = nullptr;
#if defined(CUDA_SIM_ASM_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

using Deposits = unsigned char[kWarpSize][kMaxDeposit];

struct Warp {
  int lanes = 0;  // threads of the block in this warp
  // What each lane passes to a warp-collective call (a shuffled value, wmma operands), read between two warp barriers.
  alignas(16) Deposits deposit = {};
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
// at each launch: forward (default), reverse, or shuffle (a fresh pseudo-random permutation per pass, fixed seed);
// or warps: forward order, but warp-wide waits (shuffles, wmma, __syncwarp) are released one warp at a time, the
// highest-numbered first, so that warp runs ahead through all its warp-wide calls up to the next __syncthreads while
// the others stay parked. The other orders release every waiting warp after each pass, which keeps the warps in
// step and hides a missing __syncthreads between one warp's reads of shared memory and another's next writes.
// Race-free kernels give bitwise the same results under every order; a missing barrier shows up as a difference.
enum class Order { kForward, kReverse, kShuffle, kWarps };

Order schedule_order() {
  const char* value = std::getenv("REFT_FAST_CUDA_SIM_ORDER");
  if (value == nullptr || *value == 0 || std::strcmp(value, "forward") == 0) return Order::kForward;
  if (std::strcmp(value, "reverse") == 0) return Order::kReverse;
  if (std::strcmp(value, "shuffle") == 0) return Order::kShuffle;
  if (std::strcmp(value, "warps") == 0) return Order::kWarps;
  std::fprintf(stderr, "cuda_sim: REFT_FAST_CUDA_SIM_ORDER=%s is not forward, reverse, shuffle or warps; %s\n", value,
               "using forward");
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

// "wmma::mma_sync at file:line (block ..., thread ...)": what a waiting fiber waits in, and where.
std::string waiting_text(const Fiber& f) { return std::string(f.what) + " at " + site_text(f.site) + where(f); }

// Releases whatever barrier every live thread has reached (with one_warp, the warp-wide wait of the highest-numbered
// warp whose lanes have all arrived, and no other). Returns false when nothing can move (a deadlock), and records a
// divergence when the threads of one barrier wait at different call sites.
bool release_barriers(Block& block, bool one_warp) {
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
             "barrier divergence: threads wait at different __syncthreads: " + waiting_text(*first_waiting) + " and " +
                 waiting_text(f));
      return false;
    }
  }
  if (live > 0 && at_block == live) {
    for (Fiber& f : block.fibers)
      if (f.state == State::kAtBlockBarrier) f.state = State::kRunnable;
    return true;
  }
  bool released = false;
  for (size_t ww = 0; ww < block.warps.size(); ++ww) {
    const size_t w = one_warp ? block.warps.size() - 1 - ww : ww;
    const size_t first = w * kWarpSize, last = first + block.warps[w].lanes;
    const Fiber* waiting = nullptr;  // the first lane at a warp barrier
    const Fiber* exited = nullptr;   // the first lane that has ended
    bool all_waiting = true;         // every live lane waits at a warp barrier
    for (size_t i = first; i < last; ++i) {
      const Fiber& f = block.fibers[i];
      if (f.state == State::kDone) {
        if (exited == nullptr) exited = &f;
      } else if (f.state != State::kAtWarpBarrier) {
        all_waiting = false;
      } else if (waiting == nullptr) {
        waiting = &f;
      } else if (!same_site(f.site, waiting->site) || std::strcmp(f.what, waiting->what) != 0) {
        // Nothing is runnable when this runs: lanes at two warp-wide call sites can never meet.
        record(block, cudaErrorLaunchFailure,
               "barrier divergence: the lanes of a warp wait at different warp-wide call sites: " +
                   waiting_text(*waiting) + " and " + waiting_text(f));
        return false;
      }
    }
    if (!all_waiting || waiting == nullptr) continue;
    if (exited != nullptr) {  // a warp-wide call (full mask) waits for a lane that will never come
      record(block, cudaErrorLaunchFailure,
             "barrier divergence: " + waiting_text(*waiting) + " waits for lanes of its warp that have exited" +
                 where(*exited) + "; a warp-wide call needs all 32 lanes");
      return false;
    }
    for (size_t i = first; i < last; ++i) block.fibers[i].state = State::kRunnable;
    released = true;
    if (one_warp) break;
  }
  return released;
}

std::string deadlock_report(const Block& block) {
  std::string report = "barrier divergence: threads wait at different barriers and none can proceed;";
  int shown = 0;
  for (const Fiber& f : block.fibers) {
    if (f.state == State::kDone || shown == 4) continue;
    report += " " + waiting_text(f) + ";";
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

void warp_barrier(Fiber& self, Site site, const char* what) {
  self.state = State::kAtWarpBarrier;
  self.site = site;
  self.what = what;
  yield_to_scheduler();
}

[[noreturn]] void fault(cudaError_t error, const std::string& what) { ::cuda_sim::fault(error, what.c_str()); }

Warp& full_warp(const Fiber& self, const char* what) {
  Warp& warp = t_block->warps[self.warp];
  if (warp.lanes != kWarpSize)
    fault(cudaErrorLaunchFailure, std::string(what) + " needs a full warp (a block size that is a multiple of 32)");
  return warp;
}

// A warp-collective call: every lane of the calling warp (which must be full) deposits `bytes` bytes and waits until
// all 32 lanes have arrived at the same call site; then each lane runs body(deposits, lane), and the warp leaves only
// once every lane has run it. As on the device, where the warp executes the instruction at once, a lane's body sees
// what every lane did before the call and nothing any lane does after it.
template <typename Body>
void warp_collective(const char* what, const void* mine, size_t bytes, Site site, Body&& body) {
  Fiber& self = current_fiber();
  Warp& warp = full_warp(self, what);
  std::memcpy(warp.deposit[self.lane], mine, bytes);
  warp_barrier(self, site, what);  // every lane has deposited
  body(static_cast<const Deposits&>(warp.deposit), self.lane);
  warp_barrier(self, site, what);  // every lane has read before any deposits again
}

template <typename T>
T deposited(const Deposits& deposits, int lane, size_t offset = 0) {
  T value;
  std::memcpy(&value, deposits[lane] + offset, sizeof value);
  return value;
}

// The layout of a wmma fragment: slot i of lane `lane` holds element e = ((lane * per_lane + i) * mul + add) mod
// (rows * cols) of the rows x cols operand, row-major numbered (row e / cols, column e % cols). With mul odd and
// rows * cols a power of two this is a bijection, and a scrambled one: CUDA leaves the mapping unspecified, and code
// that assumes some mapping must fail here. One mapping per operand, whatever the memory layout, so that elementwise
// code over fragments of one type (d = alpha * acc + c) works, as on the device.
struct FragmentShape {
  int rows, cols, per_lane, mul, add;
};
constexpr FragmentShape kFragmentShapes[3] = {{16, 8, 4, 45, 7}, {8, 16, 4, 77, 29}, {16, 16, 8, 139, 101}};

int fragment_element(const FragmentShape& s, int lane, int i) {
  return ((lane * s.per_lane + i) * s.mul + s.add) % (s.rows * s.cols);
}

// The element at (row, col) of a rows x cols operand at p with leading dimension ldm.
size_t element_offset(int row, int col, unsigned ldm, bool col_major) {
  return col_major ? static_cast<size_t>(col) * ldm + row : static_cast<size_t>(row) * ldm + col;
}

// What every lane of a wmma load or store must pass alike.
struct WmmaAccess {
  const void* p;
  unsigned ldm;
  unsigned col_major;
};

// CUDA: "mptr must be a 256-bit aligned pointer", "ldm must be a multiple of 4 for float"; on the device a violation is
// a misaligned vector access. Lanes passing different arguments are undefined on the device and a fault here.
void check_access(const char* what, const WmmaAccess& mine, const Deposits& deposits) {
  if (reinterpret_cast<uintptr_t>(mine.p) % 32 != 0)
    fault(cudaErrorMisalignedAddress, std::string(what) + " of a misaligned address (wmma needs 32-byte alignment)");
  if (mine.ldm % 4 != 0)
    fault(cudaErrorMisalignedAddress, std::string(what) + " with ldm " + std::to_string(mine.ldm) +
                                          ", not a multiple of 4 floats: misaligned rows");
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const auto other = deposited<WmmaAccess>(deposits, lane);
    if (other.p != mine.p || other.ldm != mine.ldm || other.col_major != mine.col_major)
      fault(cudaErrorLaunchFailure, std::string(what) + ": the lanes of a warp pass different pointers, ldm or " +
                                        "layouts (lane " + std::to_string(lane) + " differs)");
  }
}

// The TF32 part of an mma operand, as the tensor cores read it: the low 13 mantissa bits dropped (NaN kept NaN).
float tf32_truncate(float v) {
  const uint32_t u = cuda_sim_float_to_bits(v);
  return (u & 0x7fffffffu) > 0x7f800000u ? v : cuda_sim_bits_to_float(u & 0xffffe000u);
}

struct MmaOperands {  // one lane's deposit for wmma::mma_sync
  float a[4], b[4], c[8];
};
static_assert(sizeof(MmaOperands) <= kMaxDeposit, "deposit too small");

struct Slot {
  uint8_t lane, i;
};
// (lane, slot) of every element of A and of B, for mma_sync.
struct MmaInverse {
  Slot a[16 * 8], b[8 * 16];
  MmaInverse() {
    for (int lane = 0; lane < kWarpSize; ++lane) {
      for (int i = 0; i < 4; ++i) {
        a[fragment_element(kFragmentShapes[0], lane, i)] = Slot{static_cast<uint8_t>(lane), static_cast<uint8_t>(i)};
        b[fragment_element(kFragmentShapes[1], lane, i)] = Slot{static_cast<uint8_t>(lane), static_cast<uint8_t>(i)};
      }
    }
  }
};

}  // namespace

const ThreadContext& context() { return current_fiber().ctx; }

void syncthreads(Site site) {
  Fiber& self = current_fiber();
  self.state = State::kAtBlockBarrier;
  self.site = site;
  self.what = "__syncthreads";
  yield_to_scheduler();
}

uint32_t shfl_xor_bits(unsigned mask, uint32_t bits, int lane_mask, int width, Site site) {
  if (width != kWarpSize) fault(cudaErrorLaunchFailure, "cuda_sim supports shuffles of width 32 only");
  if (mask != 0xffffffffu || t_block->warps[current_fiber().warp].lanes != kWarpSize)
    fault(cudaErrorLaunchFailure, "__shfl_xor_sync needs a full warp and the full mask in csrc/ (UB otherwise)");
  uint32_t got = 0;
  warp_collective("__shfl_xor_sync", &bits, sizeof bits, site, [&](const Deposits& deposits, int lane) {
    got = deposited<uint32_t>(deposits, (lane ^ lane_mask) & (kWarpSize - 1));
  });
  return got;
}

void syncwarp(unsigned mask, Site site) {
  if (mask != 0xffffffffu) fault(cudaErrorLaunchFailure, "__syncwarp needs the full mask in csrc/ (cuda_sim)");
  Fiber& self = current_fiber();
  full_warp(self, "__syncwarp");
  warp_barrier(self, site, "__syncwarp");
}

void wmma_fill(Site site) {
  Fiber& self = current_fiber();
  full_warp(self, "wmma::fill_fragment");
  warp_barrier(self, site, "wmma::fill_fragment");
}

void wmma_load(WmmaUse use, float* x, const float* p, unsigned ldm, bool col_major, Site site) {
  const char* what = "wmma::load_matrix_sync";
  const WmmaAccess mine{p, ldm, col_major};
  warp_collective(what, &mine, sizeof mine, site, [&](const Deposits& deposits, int lane) {
    check_access(what, mine, deposits);
    const FragmentShape& s = kFragmentShapes[static_cast<int>(use)];
    for (int i = 0; i < s.per_lane; ++i) {
      const int e = fragment_element(s, lane, i);
      x[i] = p[element_offset(e / s.cols, e % s.cols, ldm, col_major)];
    }
  });
}

void wmma_store(float* p, const float* x, unsigned ldm, bool col_major, Site site) {
  const char* what = "wmma::store_matrix_sync";
  const WmmaAccess mine{p, ldm, col_major};
  warp_collective(what, &mine, sizeof mine, site, [&](const Deposits& deposits, int lane) {
    check_access(what, mine, deposits);
    const FragmentShape& s = kFragmentShapes[static_cast<int>(WmmaUse::kAccumulator)];
    for (int i = 0; i < s.per_lane; ++i) {
      const int e = fragment_element(s, lane, i);
      p[element_offset(e / s.cols, e % s.cols, ldm, col_major)] = x[i];
    }
  });
}

// D[m][n] = fmaf(A[m][7], B[7][n], ... fmaf(A[m][0], B[0][n], C[m][n])) with A and B truncated to TF32: every product
// of two TF32 values is exact in fp32, so this is C + the products added in k order, rounding after each addition
// (fmaf, not a * b + c, only so that no compiler contraction setting can change a bit; the two differ only where a
// product leaves fp32's normal range). Each lane computes its own 8 elements of D from the deposited operands.
void wmma_mma(float* d, const float* a, const float* b, const float* c, Site site) {
  static const MmaInverse inverse;
  MmaOperands mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, c, sizeof mine.c);
  warp_collective("wmma::mma_sync", &mine, sizeof mine, site, [&](const Deposits& deposits, int lane) {
    const FragmentShape& s = kFragmentShapes[static_cast<int>(WmmaUse::kAccumulator)];
    for (int i = 0; i < s.per_lane; ++i) {
      const int e = fragment_element(s, lane, i), m = e / 16, n = e % 16;
      float acc = mine.c[i];  // C and D are fragments of one type: one mapping
      for (int k = 0; k < 8; ++k) {
        const Slot sa = inverse.a[m * 8 + k], sb = inverse.b[k * 16 + n];
        const float av = deposited<float>(deposits, sa.lane, offsetof(MmaOperands, a) + sa.i * sizeof(float));
        const float bv = deposited<float>(deposits, sb.lane, offsetof(MmaOperands, b) + sb.i * sizeof(float));
        acc = fmaf(tf32_truncate(av), tf32_truncate(bv), acc);
      }
      d[i] = acc;
    }
  });
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
          if (!release_barriers(block, order == Order::kWarps)) {
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

// Any device ordinal, as cudaSetDevice: the simulation's tensors are CPU tensors, whose torch device index is -1.
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;  // sm_90
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
  }
  // As the runtime, a failed call also leaves its error for cudaGetLastError().
  if (cuda_sim::t_last_error == cudaSuccess) {
    cuda_sim::t_last_error = cudaErrorInvalidValue;
    cuda_sim::t_last_message = "cuda_sim: cudaDeviceGetAttribute: attribute " + std::to_string(static_cast<int>(attr)) +
                               " is not simulated (only the compute capability)";
  }
  return cudaErrorInvalidValue;
}

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_sim::t_last_error;
  cuda_sim::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return cuda_sim::t_last_error; }

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
