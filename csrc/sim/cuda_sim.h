// cuda_sim: runs the kernels of csrc/ on the CPU with CUDA's execution semantics, the way Triton's interpreter runs the
// Triton kernels, so that CI without a GPU executes (not only compiles) the CUDA twin and checks it against the float64
// reference. It covers exactly the CUDA subset csrc/ uses and nothing more.
//
// How: every CUDA thread of a block is a fiber (its own stack, cooperative switching on one OS thread); blocks run one
// after another. __syncthreads() parks the fiber until every live thread of the block has arrived; the warp-wide calls
// (__shfl_xor_sync, __syncwarp, the wmma operations) deposit per-lane data in a per-warp scratch between two warp
// barriers. Divergent barriers (a thread waiting at __syncthreads() while a lane of its warp waits in a shuffle,
// threads waiting at different __syncthreads() or warp-wide call sites, a warp-wide call with an exited lane) are
// reported as launch errors, as are a misaligned 16-byte __ldg and a misaligned wmma load or store. __shared__
// variables become function statics: with one block at a time on one OS thread, a static is exactly one block's
// shared memory. REFT_FAST_CUDA_SIM_ORDER (forward, reverse, shuffle) sets the order in which a block's threads are
// resumed: race-free kernels give the same bits under each.
//
// Use: compile the .cu sources as C++ with -I csrc/sim/include (these stand-ins for cuda_runtime.h, cuda_fp16.h,
// cuda_bf16.h and mma.h include this file) after rewriting each `kernel<<<grid, block, smem, stream>>>(args)` into
// `::cuda_sim::Launch(grid, block, smem, stream).run(kernel, args)`; reft_fast/cuda_backend.py does both
// (REFT_FAST_CUDA_SIM=1), and links cuda_sim.cpp, which holds the scheduler and the runtime calls.
#pragma once

#ifdef __CUDACC__
#error "cuda_sim.h is the CPU stand-in for the CUDA headers; nvcc must use the real ones"
#endif

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------------------------
// Qualifiers and built-in types
// ---------------------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// ---------------------------------------------------------------------------------------------------------------------
// Runtime API (the calls csrc/ makes). Launch errors are sticky until cudaGetLastError() reads them, as on a device.
// ---------------------------------------------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// The device attributes csrc/ queries (CUDA's enumerator values): the simulation presents itself as sm_90.
enum cudaDeviceAttr : int {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
};

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);

namespace cuda_sim {

// What the current fiber sees as threadIdx, blockIdx, blockDim and gridDim.
struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
const ThreadContext& context();

// Where a barrier is called from: threads that wait at different call sites of one barrier kind are a divergence.
struct Site {
  const char* file;
  int line;
};
void syncthreads(Site site);
// Exchanges `bits` between the 32 lanes of the calling warp: returns the bits that lane (lane ^ lane_mask) passed.
uint32_t shfl_xor_bits(unsigned mask, uint32_t bits, int lane_mask, int width, Site site);
// Waits until every lane of the calling (full) warp has arrived at the same call site; the full mask only.
void syncwarp(unsigned mask, Site site);

// The wmma m16n16k8 TF32 operands (below, nvcuda::wmma): A 16 x 8, B 8 x 16, accumulator 16 x 16, held as 4, 4 and 8
// floats per lane. Each call is warp-collective; `x` is the calling lane's fragment storage, `col_major` the layout
// in memory, `ldm` its leading dimension in elements.
enum class WmmaUse : int { kMatrixA, kMatrixB, kAccumulator };
void wmma_fill(Site site);
void wmma_load(WmmaUse use, float* x, const float* p, unsigned ldm, bool col_major, Site site);
void wmma_store(float* p, const float* x, unsigned ldm, bool col_major, Site site);
// d = a * b + c on the accumulator storage of d and c (which may alias), a and b the A and B storage.
void wmma_mma(float* d, const float* a, const float* b, const float* c, Site site);
// Records a device-side fault (reported by the launch through cudaGetLastError) and ends the calling thread's kernel.
[[noreturn]] void fault(cudaError_t error, const char* what);

// Runs `body` once per thread of every block of the grid (blocks in order x, y, z; threads as fibers). Returns the
// launch's error, which is also left for cudaGetLastError().
cudaError_t launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t shared_bytes = 0, cudaStream_t = nullptr)
      : grid_(grid), block_(block), shared_bytes_(shared_bytes) {}

  // The kernel's parameters are copied once, like a launch's parameter buffer; every thread calls the kernel with
  // its own copies of them.
  template <typename... Params, typename... Args>
  void run(void (*kernel)(Params...), Args&&... args) const {
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    launch(grid_, block_, shared_bytes_, [&] { std::apply(kernel, params); });
  }

 private:
  dim3 grid_, block_;
  size_t shared_bytes_;
};

}  // namespace cuda_sim

#define threadIdx (::cuda_sim::context().thread_idx)
#define blockIdx (::cuda_sim::context().block_idx)
#define blockDim (::cuda_sim::context().block_dim)
#define gridDim (::cuda_sim::context().grid_dim)

// The call site comes in through default arguments (__builtin_FILE/LINE are evaluated where the call is written).
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuda_sim::syncthreads({file, line});
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuda_sim::syncwarp(mask, {file, line});
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  static_assert(sizeof(T) == 4, "cuda_sim shuffles 32-bit values only");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = ::cuda_sim::shfl_xor_bits(mask, bits, lane_mask, width, {file, line});
  std::memcpy(&value, &bits, 4);
  return value;
}

// Read-only global load; a 16-byte vector load must be 16-byte aligned, as on the device.
template <typename T>
inline T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0)
    ::cuda_sim::fault(cudaErrorMisalignedAddress, "__ldg of a misaligned address");
  return *p;
}

inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}

// fp32 add and multiply rounded to nearest even, never fused into an fma: the plain operators, as the simulation is
// compiled with -ffp-contract=off (reft_fast.ops.cuda_build).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }

// ---------------------------------------------------------------------------------------------------------------------
// Half and bfloat16: storage types with the explicit conversion intrinsics only (as under __CUDA_NO_HALF_CONVERSIONS__),
// float -> 16-bit rounding to nearest even, NaN kept NaN.
// ---------------------------------------------------------------------------------------------------------------------
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float cuda_sim_bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t cuda_sim_float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float __bfloat162float(__nv_bfloat16 x) { return cuda_sim_bits_to_float(static_cast<uint32_t>(x.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = cuda_sim_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x0040u)};  // quiet NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(rounded >> 16)};
}

inline float __half2float(__half x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exp = (x.bits >> 10) & 0x1fu, mant = x.bits & 0x3ffu;
  if (exp == 0x1f) return cuda_sim_bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp != 0) return cuda_sim_bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-08f;  // subnormal: mant * 2^-24, exact
  return sign ? -magnitude : magnitude;
}

inline __half __float2half_rn(float f) {
  const uint32_t u = cuda_sim_float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (abs >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                                                       // below 2^-14: subnormal or zero
    // value / 2^-24 rounded to nearest even, by float arithmetic (exact: the quotient has at most 24 bits)
    const float scaled = cuda_sim_bits_to_float(abs) * 16777216.0f;
    const float rounded = nearbyintf(scaled);  // default rounding mode: nearest even
    return __half{static_cast<uint16_t>(sign | static_cast<uint16_t>(rounded))};
  }
  // normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even (a carry may bump the exponent)
  const uint32_t rebased = abs - (112u << 23);
  const uint32_t rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
  return __half{static_cast<uint16_t>(sign | (rounded >> 13))};
}

// ---------------------------------------------------------------------------------------------------------------------
// Warp matrix multiply-accumulate (<mma.h>): the m16n16k8 TF32 fragments only, with an fp32 accumulator; any other
// shape or type is an incomplete fragment and does not compile. Which matrix element a lane's x[i] holds is unspecified
// in CUDA; here it is a scrambled bijection (cuda_sim.cpp), so code assuming a layout gets wrong results while
// elementwise code over x[] works. load/store/mma/fill are warp-collective (all 32 lanes at one call site; load, store
// and mma with the same pointer, ldm and layout in every lane; pointers 32-byte aligned, ldm a multiple of 4 floats).
// mma_sync reads only the TF32 part of A and B (low 13 bits dropped, as the tensor cores do) and accumulates each
// element in fp32 in k order: d = fmaf(a_k, b_k, ...fmaf(a_0, b_0, c)).
// ---------------------------------------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
namespace precision {
struct tf32;
}  // namespace precision

enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to TF32's 10 explicit mantissa bits; the result is a float
// whose low 13 bits are zero. Infinities stay; a finite value that rounds past FLT_MAX becomes an infinity; NaN stays
// a (quiet) NaN.
inline float __float_to_tf32(float in) {
  const uint32_t u = cuda_sim_float_to_bits(in);
  if ((u & 0x7fffffffu) > 0x7f800000u) return cuda_sim_bits_to_float((u | 0x00400000u) & 0xffffe000u);
  return cuda_sim_bits_to_float((u + 0x1000u) & 0xffffe000u);  // sign-magnitude: the carry rounds away from zero
}

// A fragment's storage, as CUDA's __frag_base: num_elements values per lane in x (TF32 elements are stored as float).
template <typename T, int size>
struct alignas(8) cuda_sim_fragment_base {
  enum { num_elements = size, num_storage_elements = size };
  typedef T element_type;
  typedef float storage_element_type;
  float x[size];
};

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment;  // only the specializations below are complete
template <>
class fragment<matrix_a, 16, 16, 8, precision::tf32, row_major> : public cuda_sim_fragment_base<precision::tf32, 4> {};
template <>
class fragment<matrix_a, 16, 16, 8, precision::tf32, col_major> : public cuda_sim_fragment_base<precision::tf32, 4> {};
template <>
class fragment<matrix_b, 16, 16, 8, precision::tf32, row_major> : public cuda_sim_fragment_base<precision::tf32, 4> {};
template <>
class fragment<matrix_b, 16, 16, 8, precision::tf32, col_major> : public cuda_sim_fragment_base<precision::tf32, 4> {};
template <>
class fragment<accumulator, 16, 16, 8, float> : public cuda_sim_fragment_base<float, 8> {};

// Every element set to v (as in CUDA, not rounded to TF32). Warp-collective here: the mapping of elements to lanes is
// unspecified, so only a call by the whole warp is meaningful.
template <typename T, int size>
inline void fill_fragment(cuda_sim_fragment_base<T, size>& f, const float& v, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  ::cuda_sim::wmma_fill({file, line});
  for (int i = 0; i < size; ++i) f.x[i] = v;
}

// A (16 x 8) or B (8 x 16) from p, row i at p + i * ldm (row_major) or column j at p + j * ldm (col_major).
template <typename Use, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 8, precision::tf32, Layout>& f, const float* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuda_sim::wmma_load(std::is_same<Use, matrix_a>::value ? ::cuda_sim::WmmaUse::kMatrixA
                                                           : ::cuda_sim::WmmaUse::kMatrixB,
                        f.x, p, ldm, std::is_same<Layout, col_major>::value, {file, line});
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 8, float>& f, const float* p, unsigned ldm,
                             layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuda_sim::wmma_load(::cuda_sim::WmmaUse::kAccumulator, f.x, p, ldm, layout == mem_col_major, {file, line});
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 8, float>& f, unsigned ldm,
                              layout_t layout, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cuda_sim::wmma_store(p, f.x, ldm, layout == mem_col_major, {file, line});
}

template <typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 8, float>& d,
                     const fragment<matrix_a, 16, 16, 8, precision::tf32, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 8, precision::tf32, LayoutB>& b,
                     const fragment<accumulator, 16, 16, 8, float>& c, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  ::cuda_sim::wmma_mma(d.x, a.x, b.x, c.x, {file, line});
}

}  // namespace wmma
}  // namespace nvcuda
