// The tensor-core tile path of the forward and backward rows kernels (16-bit h, sm_80+; see csrc/README.md):
// kTileRows = 16 slots per block, their r-length projections formed as a small GEMM on TF32 tensor cores
// (wmma m16n16k8, fp32 accumulation), the write pass (δQ, dz W − t P) likewise. Every parameter element a block stages
// serves 16 rows, against 1 or 4 in the per-row kernels, which read the whole of P, W and Q for each of their rows.
//
// Shared memory is one pool per kernel, carved into regions (every offset a multiple of 8 floats, so every wmma pointer
// is 32-byte aligned, and every leading dimension a multiple of 4 floats, as wmma requires):
//   stage   the staged parameter chunk (projection: NP × (BK + 4); write pass: KC × (BN + 8)); after each chunk's
//           products it holds the warp groups' partial output tiles, [G][16][width + 8]
//   x       the staged source chunk, 16 × (BK + 4) (projection only)
//   totals  the projections, 16 × NP per source
//   coef    the write pass's coefficients, 16 × (KC + 4), rounded to TF32
// Global loads for chunk k + 1 are issued into registers before chunk k's products, so their latency overlaps the
// tensor-core work and the write-out of chunk k.
#pragma once

#include <mma.h>

#include "edit_common.cuh"

// wmma's TF32 fragments exist from sm_80 on; the host never launches a tile kernel on an older GPU
// (host::rows_per_block), and for such an arch the kernels compile to a __trap().
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define REFT_FAST_TILE_ARCH 0
#else
#define REFT_FAST_TILE_ARCH 1
#endif

namespace reft_fast {
namespace detail {

// Floats of padding per shared-memory row. A warp's wmma access touches 8 rows × 4 columns of the array at once
// (row-major A, column-major B) or 4 rows × 8 columns (row-major B, accumulator tiles): a row stride ≡ 4 (mod 32)
// banks keeps the first conflict-free, ≡ 8 the second. Both keep rows 16-byte multiples, as wmma needs.
constexpr int kTilePad = 4;
constexpr int kTilePadB = 8;
constexpr int kTileWarps = kThreads / 32;
constexpr int kTileMinRank = 16;  // ranks below are padded to 16 (the n of the mma); zero rows are never loaded
// Blocks per SM the rows tile kernels are compiled for (≤ 80 registers a thread, no spills; ≤ 33 KiB of shared
// memory a block; the rank-64 backward takes 2): 24 warps keep the staged loads of several blocks in flight.
constexpr int kTileMinBlocks = 3;

// Projection chunk width (columns of d per step) for NP outputs: 64, or 32 for NP = 128 (rank 64 with P and W), which
// keeps the staged chunk at ≤ 16 KiB.
__host__ __device__ constexpr int tile_proj_cols(int NP) { return NP >= 128 ? 32 : 64; }
// Write-pass chunk width for KC coefficients: KC × BN = 4096 floats staged (BN ≤ 128).
__host__ __device__ constexpr int tile_write_cols(int KC) { return KC <= 32 ? 128 : 4096 / KC; }
// Floats of the partial tiles of an output [16][width]: one [16][width + kTilePadB] tile per warp group.
__host__ __device__ constexpr int tile_partial_floats(int width) {
  return kTileWarps / (width / 16) * 16 * (width + kTilePadB);
}
__host__ __device__ constexpr int tile_max(int a, int b) { return a > b ? a : b; }
// Floats of the stage region: the larger staged chunk, or the larger set of partial tiles.
__host__ __device__ constexpr int tile_stage_floats(int NP, int KC) {
  return tile_max(tile_max(NP * (tile_proj_cols(NP) + kTilePad), KC * (tile_write_cols(KC) + kTilePadB)),
                  tile_max(tile_partial_floats(NP), tile_partial_floats(tile_write_cols(KC))));
}

#if REFT_FAST_TILE_ARCH
namespace wmma = nvcuda::wmma;
using TileA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TileBCol = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using TileBRow = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using TileAcc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// The element offset of the row each of the block's 16 slots selects (-1: none, or past the last slot), into s_row.
// Returns whether any slot selects a row (the same answer for every thread). Ends with a barrier.
template <typename T>
__device__ __forceinline__ bool tile_rows(const RowArgs<T>& a, int64_t* s_row) {
  if (threadIdx.x < kTileRows) {
    const int slot = static_cast<int>(blockIdx.x) * kTileRows + static_cast<int>(threadIdx.x);
    s_row[threadIdx.x] = slot < a.n_slots ? selected_row(a.positions, slot, a.n_positions, a.seq_len, a.hidden) : -1;
  }
  __syncthreads();
  bool any = false;
#pragma unroll
  for (int i = 0; i < kTileRows; ++i) any = any || s_row[i] >= 0;
  return any;
}

// Each warp's accumulator becomes its group's partial tile in the stage ([G][16][kWidth + kTilePadB]: tile columns
// [16·tile, 16·tile + 16) of group `group`), between two barriers: every warp is done reading the staged chunk before
// any writes, and every partial is visible to all threads after.
template <int kWidth>
__device__ __forceinline__ void store_partial_tile(const TileAcc& acc, float* s_stage, int group, int tile) {
  constexpr int LD = kWidth + kTilePadB;
  __syncthreads();
  wmma::store_matrix_sync(s_stage + group * 16 * LD + tile * 16, acc, LD, wmma::mem_row_major);
  __syncthreads();
}

// Σ over the kGroups partial tiles of element (i, j) of a [16][kWidth] output, in group order.
template <int kGroups, int kWidth>
__device__ __forceinline__ float sum_partials(const float* s_stage, int i, int j) {
  constexpr int LD = kWidth + kTilePadB;
  float s = s_stage[i * LD + j];
#pragma unroll
  for (int g = 1; g < kGroups; ++g) s += s_stage[(g * kTileRows + i) * LD + j];
  return s;
}

// The parameter part of a staged chunk: the NM stacked matrices of mats (each padded to R rows) at columns
// [c0, c0 + W), as this thread's share: thread t holds column t % W of the stacked rows t / W + j · (kThreads / W),
// j < kPer, rounded to TF32 (zeros for rows ≥ r, columns ≥ d and null matrices, which are never loaded).
// store<LD> puts them at stage[row · LD + column].
template <int NM, int R, int W>
struct ParamChunk {
  static constexpr int kRowStep = kThreads / W;
  static constexpr int kPerMatrix = R / kRowStep;
  static constexpr int kPer = NM * kPerMatrix;
  static_assert(kThreads % W == 0 && R % kRowStep == 0, "whole rows per pass of the block");
  float v[kPer];

  __device__ __forceinline__ void fetch(const float* const (&mats)[NM], int r, int d, int c0) {
    const int k0 = threadIdx.x / W, c = c0 + threadIdx.x % W;
#pragma unroll
    for (int i = 0; i < NM; ++i) {
      const float* m = mats[i];
#pragma unroll
      for (int j = 0; j < kPerMatrix; ++j) {
        const int k = k0 + j * kRowStep;
        v[i * kPerMatrix + j] =
            (m != nullptr && k < r && c < d) ? wmma::__float_to_tf32(__ldg(m + k * d + c)) : 0.0f;
      }
    }
  }

  template <int LD>
  __device__ __forceinline__ void store(float* stage) const {
    const int k0 = threadIdx.x / W, col = threadIdx.x % W;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int n = (j / kPerMatrix) * R + k0 + (j % kPerMatrix) * kRowStep;
      stage[n * LD + col] = v[j];
    }
  }
};

// out[i * NP + n] = Σ_c x_i[c] · M[n, c] for the block's 16 rows i, where M stacks the NM matrices of mats, each
// padded to R rows ([r, d] read; rows ≥ r and null matrices are zeros, never loaded), NP = NM · R. On tensor cores:
// the source and parameter chunks are staged in shared memory rounded to TF32, warp w accumulates output tile
// w % (NP / 16) over the k-steps (8 columns) s with s % G = w / (NP / 16), G = 8 / (NP / 16) warp groups, and the G
// partial tiles are added in group order: the order of every sum depends on the shape only.
// load_x(i, c, x) fills x[0..4) with row i's fp32 values at columns c..c+3 (c a multiple of 4; zeros at columns ≥ d
// and for a row that selects nothing). blockDim.x must be kThreads. Ends with a barrier; out is then visible to all.
template <int NM, int R, typename LoadX>
__device__ __forceinline__ void tile_project(LoadX load_x, const float* const (&mats)[NM], int r, int d,
                                             float* s_stage, float* s_x, float* out) {
  constexpr int NP = NM * R;
  constexpr int BK = tile_proj_cols(NP);
  constexpr int LD = BK + kTilePad;
  constexpr int kTilesN = NP / 16;
  constexpr int kGroups = kTileWarps / kTilesN;
  constexpr int kXGroups = kTileRows * BK / 4;      // 4-column groups of the source chunk (≤ kThreads)
  static_assert(kTilesN * kGroups == kTileWarps && kXGroups <= kThreads, "tiling");
  const int warp = threadIdx.x >> 5;
  const int tile = warp % kTilesN, group = warp / kTilesN;
  const int xi = threadIdx.x / (BK / 4), xc = (threadIdx.x % (BK / 4)) * 4;  // this thread's source group

  float xv[4];
  ParamChunk<NM, R, BK> mv;
  auto fetch = [&](int c0) {  // global → registers, rounded to TF32
    if (static_cast<int>(threadIdx.x) < kXGroups) {
      load_x(xi, c0 + xc, xv);
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = wmma::__float_to_tf32(xv[q]);
    }
    mv.fetch(mats, r, d, c0);
  };

  TileAcc acc;
  wmma::fill_fragment(acc, 0.0f);
  fetch(0);
  int step = 0;  // k-step index over the whole of d
  for (int c0 = 0; c0 < d; c0 += BK) {
    __syncthreads();  // the previous chunk's fragments are loaded
    if (static_cast<int>(threadIdx.x) < kXGroups) {
#pragma unroll
      for (int q = 0; q < 4; ++q) s_x[xi * LD + xc + q] = xv[q];
    }
    mv.template store<LD>(s_stage);
    __syncthreads();
    if (c0 + BK < d) fetch(c0 + BK);  // in flight during the products
#pragma unroll
    for (int ks = 0; ks < BK / 8; ++ks, ++step) {
      if (step % kGroups != group) continue;  // warp-uniform
      TileA fa;
      TileBCol fb;
      wmma::load_matrix_sync(fa, s_x + ks * 8, LD);
      wmma::load_matrix_sync(fb, s_stage + tile * 16 * LD + ks * 8, LD);
      wmma::mma_sync(acc, fa, fb, acc);
    }
  }
  store_partial_tile<NP>(acc, s_stage, group, tile);
  for (int e = threadIdx.x; e < kTileRows * NP; e += kThreads)
    out[e] = sum_partials<kGroups, NP>(s_stage, e / NP, e % NP);
  __syncthreads();
}

// The write pass: for every column chunk, v[i][c] = Σ_k coef[i][k] · M[k, c] over KC = NM · R coefficients, M the
// stacked matrices of mats as in tile_project (coef in shared memory, [16][KC + 4], TF32, zero where unused), then
// write(i, c, v) for the block's rows i and the 4 columns c..c+3 (c a multiple of 4; write checks c + q < d and
// whether row i selects anything). Warp w computes output tile w % (BN / 16) over the k-steps s ≡ w / (BN / 16)
// (mod G); partial tiles are added in group order.
template <int NM, int R, typename Write>
__device__ __forceinline__ void tile_write(const float* const (&mats)[NM], const float* s_coef, int r, int d,
                                           float* s_stage, Write write) {
  constexpr int KC = NM * R;
  constexpr int BN = tile_write_cols(KC);
  constexpr int LD = BN + kTilePadB;  // B is read row-major
  constexpr int LDC = KC + kTilePad;
  constexpr int kTilesN = BN / 16;
  constexpr int kGroups = kTileWarps / kTilesN;
  constexpr int kSteps = KC / 8;
  constexpr int kOutGroups = kTileRows * BN / 4;  // 4-column groups of the output chunk
  static_assert(kTilesN * kGroups == kTileWarps && kSteps % kGroups == 0, "tiling");
  const int warp = threadIdx.x >> 5;
  const int tile = warp % kTilesN, group = warp / kTilesN;

  ParamChunk<NM, R, BN> mv;
  auto fetch = [&](int c0) { mv.fetch(mats, r, d, c0); };

  fetch(0);
  for (int c0 = 0; c0 < d; c0 += BN) {
    __syncthreads();  // the previous chunk's partial tiles are read
    mv.template store<LD>(s_stage);
    __syncthreads();
    if (c0 + BN < d) fetch(c0 + BN);
    TileAcc acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll
    for (int s = group; s < kSteps; s += kGroups) {
      TileA fa;
      TileBRow fb;
      wmma::load_matrix_sync(fa, s_coef + s * 8, LDC);
      wmma::load_matrix_sync(fb, s_stage + s * 8 * LD + tile * 16, LD);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    store_partial_tile<BN>(acc, s_stage, group, tile);
#pragma unroll 1  // ≤ 2 trips; unrolled, the epilogue spills at 80 registers
    for (int e0 = 0; e0 < kOutGroups; e0 += kThreads) {
      const int e = e0 + static_cast<int>(threadIdx.x);
      const int i = e / (BN / 4), cc = (e % (BN / 4)) * 4;
      if ((kOutGroups % kThreads != 0 && e >= kOutGroups) || c0 + cc >= d) continue;
      float v[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = sum_partials<kGroups, BN>(s_stage, i, cc + q);
      write(i, c0 + cc, v);
    }
  }
}

// x[q] = p[q] as floats for the columns c + q < d, zero beyond: the tile kernels' element access (any alignment).
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ p, int c, int d, float (&x)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) x[q] = c + q < d ? Convert<T>::to_float(p[q]) : 0.0f;
}
#endif  // REFT_FAST_TILE_ARCH

}  // namespace detail

}  // namespace reft_fast
