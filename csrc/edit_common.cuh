// Device helpers shared by the forward and backward kernels: dtype conversion, 16-byte vector access, the dropout
// stream, activations, the block reduction, and the host-side dispatch over (h dtype, padded rank, vector width).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "reft_edit.h"

namespace reft_fast {
namespace detail {

// Threads of the per-row kernels (at most; small d gets fewer) and of the weight-gradient kernel (exactly).
constexpr int kThreads = 256;
constexpr int kMaxWarps = kThreads / 32;
// Slots per block of the tensor-core tile kernels (edit_tile.cuh): the m of the 16 × 16 × 8 TF32 mma.
constexpr int kTileRows = 16;

// Weight-gradient tiling for padded rank R: each thread owns one column of a tile and min(R, 16) rank indices, so the
// block covers R ranks x kThreads / (R / min(R, 16)) columns with at most 16 accumulators per thread.
__host__ __device__ constexpr int wgrad_ranks_per_thread(int R) { return R < 16 ? R : 16; }
__host__ __device__ constexpr int wgrad_tile_cols(int R) { return kThreads / (R / wgrad_ranks_per_thread(R)); }
// Rows staged in shared memory at a time by the weight-gradient kernel.
constexpr int kRowsPerChunk = 32;

// ------------------------------------------------------------------------------------------------------------------
// dtype conversion. torch's extension build defines __CUDA_NO_HALF_CONVERSIONS__ and friends, so every conversion is an
// explicit intrinsic; stores round to nearest even.
// ------------------------------------------------------------------------------------------------------------------
template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Elements of T in one 16-byte access: the vector width of the aligned path.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// x[0..VEC) = p[0..VEC) as floats. When VEC elements span whole 16-byte words the caller guarantees p is 16-byte
// aligned and the loads are 16 bytes wide (ld.global.nc: every buffer read this way is read-only in the kernel).
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&x)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      alignas(16) T raw[kPer];
      *reinterpret_cast<uint4*>(raw) = __ldg(reinterpret_cast<const uint4*>(p) + q);
#pragma unroll
      for (int i = 0; i < kPer; ++i) x[q * kPer + i] = Convert<T>::to_float(raw[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) x[i] = Convert<T>::to_float(p[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&x)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / static_cast<int>(sizeof(T));
#pragma unroll
    for (int q = 0; q < kBytes / 16; ++q) {
      alignas(16) T raw[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) raw[i] = Convert<T>::from_float(x[q * kPer + i]);
      reinterpret_cast<uint4*>(p)[q] = *reinterpret_cast<const uint4*>(raw);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) p[i] = Convert<T>::from_float(x[i]);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Dropout: Philox4x32-10 (Salmon et al., SC'11), counter = (c / 4, slot, 0, 0), key = seed. Element
// (slot, c) uses word c % 4 of its block, so the mask depends only on (seed, slot = b * n + j, column c): the vector
// and scalar paths, the forward and the backward kernels all draw the same mask without storing it.
// ------------------------------------------------------------------------------------------------------------------
struct DropoutSpec {
  float p;         // drop probability
  float scale;     // 1 / (1 - p)
  uint32_t key_lo;
  uint32_t key_hi;
  bool active;     // p > 0
};

__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kBump0 = 0x9E3779B9u, kBump1 = 0xBB67AE85u;  // key schedule (golden ratio, sqrt(3) - 1)
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kMul0, ctr.x), lo0 = kMul0 * ctr.x;
    const uint32_t hi1 = __umulhi(kMul1, ctr.z), lo1 = kMul1 * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0);
    k0 += kBump0;
    k1 += kBump1;
  }
  return ctr;
}

__device__ __forceinline__ uint4 dropout_block(const DropoutSpec& dp, int slot, int group) {
  return philox4x32_10(make_uint4(static_cast<uint32_t>(group), static_cast<uint32_t>(slot), 0u, 0u), dp.key_lo,
                       dp.key_hi);
}

// 0 (dropped) or 1/(1-p) (kept); uniform in [0, 1) from the top 24 bits, kept when uniform >= p (as torch.rand >= p).
__device__ __forceinline__ float keep_factor(const DropoutSpec& dp, uint32_t word) {
  const float uniform = static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
  return uniform >= dp.p ? dp.scale : 0.0f;
}

// f[i] = the dropout factor of column c + i of this slot. The caller only calls it when dp.active; on the vector path
// c is a multiple of VEC, hence of 4 when VEC is.
template <int VEC>
__device__ __forceinline__ void dropout_factors(const DropoutSpec& dp, int slot, int c, float (&f)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const uint4 w = dropout_block(dp, slot, c / 4 + q);
      f[4 * q + 0] = keep_factor(dp, w.x);
      f[4 * q + 1] = keep_factor(dp, w.y);
      f[4 * q + 2] = keep_factor(dp, w.z);
      f[4 * q + 3] = keep_factor(dp, w.w);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const uint4 w = dropout_block(dp, slot, (c + i) / 4);
      const int lane = (c + i) % 4;
      f[i] = keep_factor(dp, lane == 0 ? w.x : lane == 1 ? w.y : lane == 2 ? w.z : w.w);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Activations and their derivatives, matching torch: relu'(0) = 0, exact-erf gelu, NaN passes through relu.
// ------------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float activate(int act, float z) {
  switch (act) {
    case kRelu: return z < 0.0f ? 0.0f : z;
    case kGelu: return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case kSilu: return z / (1.0f + expf(-z));
    case kTanh: return tanhf(z);
    default: return z;
  }
}

__device__ __forceinline__ float activate_grad(int act, float z) {
  switch (act) {
    case kRelu: return z > 0.0f ? 1.0f : 0.0f;
    case kGelu:  // Φ(z) + z φ(z)
      return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) + z * 0.39894228040143268f * expf(-0.5f * z * z);
    case kSilu: {
      const float sig = 1.0f / (1.0f + expf(-z));
      return sig * (1.0f + z * (1.0f - sig));
    }
    case kTanh: {
      const float th = tanhf(z);
      return 1.0f - th * th;
    }
    default: return 1.0f;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Rows
// ------------------------------------------------------------------------------------------------------------------

// Element offset of the row that slot (b, j) = (slot / n, slot % n) selects, or -1 when it selects none. Positions are
// validated upstream (reft_fast.ops); out-of-range values count as "none", so a bad index never writes outside h.
// Slots and columns are 32-bit (the launchers check B * n and r * d fit); row offsets are 64-bit.
__device__ __forceinline__ int64_t selected_row(const int64_t* __restrict__ positions, int slot, int n_positions,
                                                int64_t seq_len, int hidden) {
  const int64_t pos = positions[slot];
  if (pos < 0 || pos >= seq_len) return -1;
  return (static_cast<int64_t>(slot / n_positions) * seq_len + pos) * hidden;
}

// What the per-row kernels need of the problem, with h typed.
template <typename T>
struct RowArgs {
  const T* h;
  const int64_t* positions;
  const float* Q;
  const float* P;  // may be null
  const float* W;  // may be null
  const float* b;  // may be null
  int64_t seq_len;
  int hidden;
  int n_positions;
  int n_slots;  // batch * n_positions
  int rank;
  int activation;
  DropoutSpec dropout;
};

// The M slots of block blockIdx.x: rows[m] = element offset of the row slot blockIdx.x * M + m selects, or -1 (no
// position, or past the last slot). Returns whether any of them selects a row (the same answer for every thread).
template <int M, typename T>
__device__ __forceinline__ bool block_rows(const RowArgs<T>& a, int64_t (&rows)[M]) {
  bool any = false;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const int slot = blockIdx.x * M + m;
    rows[m] = slot < a.n_slots ? selected_row(a.positions, slot, a.n_positions, a.seq_len, a.hidden) : -1;
    any = any || rows[m] >= 0;
  }
  return any;
}

// acc[m * NM + i][k] += Σ_c x_m[c] mats[i][k, c] for the block's M rows, over the columns c this thread owns (chunks
// of VEC, strided by the block); null matrices contribute nothing. load_x(m, c, x) fills x with the VEC source values
// of row m from column c (zeros for a row that selects nothing). Each parameter chunk is loaded once for all M rows:
// M rows per block read the parameters M times less per row.
template <int R, int VEC, int M, int NM, typename LoadX>
__device__ __forceinline__ void project_rows(LoadX load_x, const float* const (&mats)[NM], int r, int d,
                                             float (&acc)[M * NM][R]) {
  for (int c = threadIdx.x * VEC; c < d; c += blockDim.x * VEC) {
    float x[M][VEC];
#pragma unroll
    for (int m = 0; m < M; ++m) load_x(m, c, x[m]);
    // Matrix loop outside the rank loop: the null test is taken once per chunk, and the compiler does not version the
    // unrolled rank loop per combination of present matrices.
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      if (mats[i] == nullptr) continue;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        if (k >= r) break;
        float w[VEC];
        load_vec<float, VEC>(mats[i] + k * d + c, w);
#pragma unroll
        for (int m = 0; m < M; ++m) {
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[m * NM + i][k] = fmaf(x[m][v], w[v], acc[m * NM + i][k]);
        }
      }
    }
  }
}

// acc[m][v] += ±coef[m * R + k] · mat[k, c + v] over k < r, for the block's M rows: the write passes' δQ, dz W and
// −t P. coef is the per-(row, k) vector in shared memory; each parameter chunk is loaded once for all M rows.
template <int R, int VEC, int M, bool NEGATE>
__device__ __forceinline__ void accumulate_rows(const float* mat, const float* coef, int r, int d, int c,
                                                float (&acc)[M][VEC]) {
#pragma unroll
  for (int k = 0; k < R; ++k) {
    if (k >= r) break;
    float w[VEC];
    load_vec<float, VEC>(mat + k * d + c, w);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float s = NEGATE ? -coef[m * R + k] : coef[m * R + k];
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[m][v] = fmaf(s, w[v], acc[m][v]);
    }
  }
}

// totals[m * R + k] = Σ over the block of acc[m][k], for k < r, visible to every thread on return. Fixed order: an xor
// butterfly inside each warp, then the warps in index order, so the sums are bitwise reproducible. blockDim.x must be a
// multiple of 32 and at most kThreads; warp_sums holds kMaxWarps * M * R floats and may be reused after return.
template <int M, int R>
__device__ __forceinline__ void block_sum(float (&acc)[M][R], int r, float* warp_sums, float* totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k >= r) break;
      float v = acc[m][k];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
      if (lane == 0) warp_sums[(warp * M + m) * R + k] = v;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < M * R; i += blockDim.x) {
    if (i % R >= r) continue;
    float s = 0.0f;
    for (int w = 0; w < n_warps; ++w) s += warp_sums[w * M * R + i];
    totals[i] = s;
  }
  __syncthreads();
}

}  // namespace detail

// ------------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------------
namespace host {

template <typename T>
struct TypeTag {
  using type = T;
};
template <int N>
using IntTag = std::integral_constant<int, N>;

// Ranks are padded to the next of 4, 8, 16, 32, 64: the register arrays are sized at compile time; the unused tail
// is skipped by `k < r` guards.
inline int padded_rank(int64_t r) { return r <= 4 ? 4 : r <= 8 ? 8 : r <= 16 ? 16 : r <= 32 ? 32 : 64; }

// Calls f(TypeTag<T>{}, IntTag<R>{}) for h's dtype and the padded rank.
template <typename F>
const char* dispatch(HDType dtype, int64_t rank, F&& f) {
  auto by_rank = [&](auto type_tag) -> const char* {
    switch (padded_rank(rank)) {
      case 4: return f(type_tag, IntTag<4>{});
      case 8: return f(type_tag, IntTag<8>{});
      case 16: return f(type_tag, IntTag<16>{});
      case 32: return f(type_tag, IntTag<32>{});
      default: return f(type_tag, IntTag<64>{});
    }
  };
  switch (dtype) {
    case HDType::kFloat32: return by_rank(TypeTag<float>{});
    case HDType::kBFloat16: return by_rank(TypeTag<__nv_bfloat16>{});
    case HDType::kFloat16: return by_rank(TypeTag<__half>{});
  }
  return "h has an unsupported dtype";
}

inline bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Checks the binding also makes, repeated so a direct caller of the launchers gets a message, not a fault.
inline const char* check_problem(const EditProblem& p) {
  if (p.rank < 1 || p.rank > kMaxRank) return "rank must be between 1 and 64 for the cuda backend";
  if (p.batch < 0 || p.seq_len < 0 || p.hidden < 1 || p.n_positions < 0) return "negative or zero size";
  if (p.hidden * kMaxRank > INT32_MAX) return "hidden size too large for the cuda backend (64 * d must fit in 32 bits)";
  // (with room for a chunk of slots past the last one: the kernels' slot loops stay in 32 bits)
  if (p.batch * p.n_positions > INT32_MAX - 64)
    return "batch * n_positions must be below 2^31 - 64 for the cuda backend";
  if (p.W == nullptr && p.b == nullptr) return "W and b are both null";
  if (p.activation < kIdentity || p.activation > kTanh) return "unknown activation code";
  if (!(p.dropout >= 0.0f && p.dropout < 1.0f)) return "dropout must be in [0, 1)";
  if (p.rows_per_block < 0) return "rows_per_block must be 0 (from the shape), 1 or more";
  return nullptr;
}

inline detail::DropoutSpec dropout_spec(const EditProblem& p) {
  detail::DropoutSpec dp;
  dp.p = p.dropout;
  dp.scale = static_cast<float>(1.0 / (1.0 - static_cast<double>(p.dropout)));
  dp.key_lo = static_cast<uint32_t>(p.seed);
  dp.key_hi = static_cast<uint32_t>(p.seed >> 32);
  dp.active = p.dropout > 0.0f;
  return dp;
}

template <typename T>
detail::RowArgs<T> row_args(const EditProblem& p) {
  detail::RowArgs<T> a;
  a.h = static_cast<const T*>(p.h);
  a.positions = p.positions;
  a.Q = p.Q;
  a.P = p.P;
  a.W = p.W;
  a.b = p.b;
  a.seq_len = p.seq_len;
  a.hidden = static_cast<int>(p.hidden);
  a.n_positions = static_cast<int>(p.n_positions);
  a.n_slots = static_cast<int>(p.batch * p.n_positions);
  a.rank = static_cast<int>(p.rank);
  a.activation = p.activation;
  a.dropout = dropout_spec(p);
  return a;
}

// Whether the current device has TF32 tensor cores (sm_80+), which the tile kernels (edit_tile.cuh) need.
inline bool tile_capable(int device) {
  if (cudaPeekAtLastError() != cudaSuccess) return false;  // someone else's error: left for launch_status to report
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();  // clear our own: the per-row kernels run instead
    return false;
  }
  return major >= 8;
}

// Slots (rows) per block of the rows kernels, a function of the shape (and of the GPU having tensor cores) only, so
// results stay reproducible for a shape:
//   kTileRows (16): the tensor-core tile kernels, for 16-bit h on sm_80+ when there are at least kTileMinSlots slots
//       (a wave of 132 tile blocks); each block stages every parameter chunk once for 16 rows. Below that the tile
//       kernel's chunk loop is latency-bound with one block per SM, and the per-row kernels spread the rows over more
//       SMs (a prediction, bench/NOTES.md).
//   kRowsPerBlock (4): per-row kernels with four slots a block, for padded ranks ≤ kMaxRankMultiRow when there are
//       enough slots to keep kTargetRowBlocks blocks (two waves on a 132-SM H100): M · 2 · R accumulators per thread
//       bound the rank.
//   1: otherwise.
// p.rows_per_block forces a choice for A/B timing: 1 → 1; 2..15 → 4 where the rank allows it, else 1; ≥ 16 → the tile
// kernels where h is 16-bit and the GPU has tensor cores, else as 4.
constexpr int kRowsPerBlock = 4;
constexpr int kMaxRankMultiRow = 8;
constexpr int kTileRows = detail::kTileRows;
constexpr int64_t kTargetRowBlocks = 264;
constexpr int64_t kTileMinSlots = kTileRows * kTargetRowBlocks / 2;
inline int rows_per_block(const EditProblem& p) {
  const int64_t n_slots = p.batch * p.n_positions;
  const bool four_ok = padded_rank(p.rank) <= kMaxRankMultiRow;
  if (p.rows_per_block == 1) return 1;
  if (p.rows_per_block > 1 && p.rows_per_block < kTileRows) return four_ok ? kRowsPerBlock : 1;
  const bool tile_ok = p.dtype != HDType::kFloat32 && tile_capable(p.device);
  if (p.rows_per_block >= kTileRows) return tile_ok ? kTileRows : four_ok ? kRowsPerBlock : 1;
  if (tile_ok && n_slots >= kTileMinSlots) return kTileRows;
  return four_ok && n_slots >= kRowsPerBlock * kTargetRowBlocks ? kRowsPerBlock : 1;
}

// Threads of a per-row kernel: one VEC-wide chunk per thread up to kThreads, a whole number of warps.
inline int row_threads(int64_t hidden, int vec) {
  const int64_t chunks = (hidden + vec - 1) / vec;
  const int64_t warps = (chunks + 31) / 32;
  return static_cast<int>(warps >= detail::kMaxWarps ? detail::kThreads : warps * 32);
}

// Makes `device` current for the launches and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) : target_(device) {
    error_ = cudaGetDevice(&previous_);
    if (error_ == cudaSuccess && previous_ != target_) error_ = cudaSetDevice(target_);
  }
  ~DeviceGuard() {
    if (error_ == cudaSuccess && previous_ != target_) cudaSetDevice(previous_);
  }
  const char* error() const { return error_ == cudaSuccess ? nullptr : cudaGetErrorString(error_); }

 private:
  int target_;
  int previous_ = -1;
  cudaError_t error_;
};

inline const char* launch_status() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace host
}  // namespace reft_fast
