// Backward of the ReFT edit, in three launches (no atomics; the summation order depends only on the shape):
//
// 1. rows kernel (M = 1 or 4 slots (b, j) per block; 16 on the tensor-core tile path), for the selected row h with
//    g = grad_out ⊙ mask / (1 − p):
//        u = h Pᵀ,  z = h Wᵀ + b,  t = g Qᵀ                       (block reductions, fixed order)
//        δ = act(z) − s·u,  dz = t ⊙ act'(z)
//        grad_h[row] = g + dz W − s·t P
//    and stores the per-slot coefficients δ, dz and −t (fp32, [3, n_slots, r]); slots with no position store zeros.
// 2. weight-gradient kernel over (column tile, row split, matrix; on the tile path at padded rank ≥ 16, its TF32
//    tensor-core version): per-split partial sums
//        dQ_s = Σ_{slots in s} δᵀ g,   dW_s = Σ dzᵀ h,   dP_s = Σ (−t)ᵀ h
//    over the split's slots in index order, written to a [n_matrices, splits, r, d] fp32 buffer.
// 3. reduction kernel: each gradient element = Σ_s partial_s in split order; db_k = Σ_slots dz[slot, k] (one warp
//    per k, lane-strided in slot order, then an xor butterfly).
// The dropout mask is regenerated from (seed, slot, column) in kernels 1 and 2 (see dropout_factors).
#include "edit_common.cuh"
#include "edit_tile.cuh"

namespace reft_fast {
namespace detail {

// Coefficient blocks of the per-slot buffer; also the weight-gradient "jobs": which matrix, from which source row.
enum CoefBlock : int { kCoefDelta = 0 /* dQ from g */, kCoefDz = 1 /* dW from h */, kCoefNegT = 2 /* dP from h */ };

// The per-slot coefficient blocks of the workspace, [3, n_slots, r]: δ (dQ's), dz (dW's and db's), −t (dP's).
struct SlotCoefs {
  float* delta;
  float* dz;
  float* negt;
  int rank;
  __device__ __forceinline__ SlotCoefs(float* coef, int n_slots, int r)
      : delta(coef + static_cast<int64_t>(kCoefDelta) * n_slots * r),
        dz(coef + static_cast<int64_t>(kCoefDz) * n_slots * r),
        negt(coef + static_cast<int64_t>(kCoefNegT) * n_slots * r),
        rank(r) {}
  __device__ __forceinline__ void set(int slot, int k, float delta_v, float dz_v, float negt_v) const {
    const int64_t i = static_cast<int64_t>(slot) * rank + k;
    delta[i] = delta_v;
    dz[i] = dz_v;
    negt[i] = negt_v;
  }
  // Zeros for the slots slot0 + m (m < M, below n_slots) for which selects(m) is false, so that kernels 2 and 3 may
  // read every slot's coefficients.
  template <int M, typename Selects>
  __device__ __forceinline__ void zero_empty(int slot0, int n_slots, Selects selects) const {
    for (int e = threadIdx.x; e < M * rank; e += blockDim.x) {
      const int m = e / rank, slot = slot0 + m;
      if (slot < n_slots && !selects(m)) set(slot, e % rank, 0.0f, 0.0f, 0.0f);
    }
  }
};

// minBlocksPerSM = 1: with the bare block-size bound ptxas aimed at 32/80 registers for occupancy and spilled a few
// bytes on the scalar dropout path; one-row blocks seldom share an SM on the shapes that matter (B * n ≲ #SMs).
// M slots per block (1 or 4, see rows_per_block): every parameter chunk a thread loads serves all M rows.
template <typename T, int R, int VEC, int M>
__global__ void __launch_bounds__(kThreads, 1)
    edit_backward_rows_kernel(RowArgs<T> a, const T* __restrict__ grad_out, T* __restrict__ grad_h,
                              float* __restrict__ coef) {
  const int r = a.rank;
  const int n_slots = a.n_slots;
  const int slot0 = static_cast<int>(blockIdx.x) * M;
  const SlotCoefs coefs(coef, n_slots, r);
  int64_t rows[M];
  const bool any = block_rows(a, rows);
  // (selected_row again rather than rows[m]: a dynamic index would put rows in local memory)
  coefs.zero_empty<M>(slot0, n_slots, [&](int m) {
    return selected_row(a.positions, slot0 + m, a.n_positions, a.seq_len, a.hidden) >= 0;
  });
  if (!any) return;  // whole block
  __shared__ float warp_sums[kMaxWarps * 2 * M * R];
  __shared__ float totals_h[2 * M * R];  // row m: [2mR, 2mR + R) u = h Pᵀ,  [2mR + R, 2mR + 2R) h Wᵀ
  __shared__ float totals_g[M * R];      // row m: t = g Qᵀ
  __shared__ float s_dz[M * R];
  __shared__ float s_t[M * R];
  const int d = a.hidden;
  const DropoutSpec dp = a.dropout;

  // backward's h is the compact copy of the selected rows, [B, n, d]: row `slot`
  auto load_h = [&](int m, int c, float (&x)[VEC]) {
    if (rows[m] >= 0) {
      load_vec<T, VEC>(a.h + static_cast<int64_t>(slot0 + m) * d + c, x);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) x[v] = 0.0f;
    }
  };
  // The gradient at o: grad_out times the forward's dropout factor (regenerated, same slot and columns).
  auto load_g = [&](int m, int c, float (&x)[VEC]) {
    if (rows[m] < 0) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) x[v] = 0.0f;
      return;
    }
    load_vec<T, VEC>(grad_out + rows[m] + c, x);
    if (dp.active) {
      float f[VEC];
      dropout_factors<VEC>(dp, slot0 + m, c, f);
#pragma unroll
      for (int v = 0; v < VEC; ++v) x[v] = __fmul_rn(x[v], f[v]);  // g rounded to fp32 (see the write pass)
    }
  };

  {
    float acc[2 * M][R] = {};
    const float* const mats[2] = {a.P, a.W};
    project_rows<R, VEC, M>(load_h, mats, r, d, acc);
    block_sum(acc, r, warp_sums, totals_h);
  }
  {
    float acc[M][R] = {};
    const float* const mats[1] = {a.Q};
    project_rows<R, VEC, M>(load_g, mats, r, d, acc);
    block_sum(acc, r, warp_sums, totals_g);
  }

  // Per-(row, k) scalars once per block, to the coefficient buffer and to shared memory.
  for (int e = threadIdx.x; e < M * r; e += blockDim.x) {
    const int m = e / r, k = e % r, slot = slot0 + m;
    if (slot >= n_slots) continue;
    const float z = (a.W != nullptr ? totals_h[(2 * m + 1) * R + k] : 0.0f) + (a.b != nullptr ? a.b[k] : 0.0f);
    const float t = totals_g[m * R + k];
    const float dz = t * activate_grad(a.activation, z);
    s_dz[m * R + k] = dz;
    s_t[m * R + k] = t;
    if (selected_row(a.positions, slot, a.n_positions, a.seq_len, a.hidden) < 0) continue;  // zeros written above
    coefs.set(slot, k, activate(a.activation, z) - (a.P != nullptr ? totals_h[2 * m * R + k] : 0.0f), dz, -t);
  }
  __syncthreads();

  // grad_h = g + dz W − s·t P, rounded as written: g = round(grad_out · f), then round(g + (dz W − s·t P)). With the
  // plain `x *= f` and `x += back`, nvcc fused the two into one fma, round(grad_out · f + back), in the scalar four-row
  // kernel only: there it unswitched the unrolled row loop on dp.active, which put the multiply and the add in one
  // basic block, while in the one-row kernel they stay on either side of the `if (dp.active)` join. fp32 grad_h then
  // differed in the last bit between M = 1 and M = 4 (d = 4097 on an H200; 16-bit h rounds it away). __fmul_rn and
  // __fadd_rn are never contracted, and the build's -fmad=false (cuda_build.NVCC_FLAGS) keeps every other expression
  // as written too, so each row's result is the same sequence of roundings whatever M.
  for (int c = threadIdx.x * VEC; c < d; c += blockDim.x * VEC) {
    float back[M][VEC] = {};
    if (a.W != nullptr) accumulate_rows<R, VEC, M, false>(a.W, s_dz, r, d, c, back);
    if (a.P != nullptr) accumulate_rows<R, VEC, M, true>(a.P, s_t, r, d, c, back);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (rows[m] < 0) continue;
      float x[VEC];
      load_g(m, c, x);
#pragma unroll
      for (int v = 0; v < VEC; ++v) x[v] = __fadd_rn(x[v], back[m][v]);
      store_vec<T, VEC>(grad_h + rows[m] + c, x);
    }
  }
}

// The tile path of kernel 1 (16-bit h, sm_80+, padded rank R ≥ 16; see edit_tile.cuh): 16 slots per block, the
// projections [u | hWᵀ] = h [P; W]ᵀ and t = g Qᵀ and the write-back [dz | −t] [W; P] as TF32 tensor-core products.
// Rank 64 is compiled for two blocks per SM: at three (80 registers) ptxas spills a register.
template <typename T, int R>
__global__ void __launch_bounds__(kThreads, R >= 64 ? 2 : kTileMinBlocks)
    edit_backward_tile_kernel(RowArgs<T> a, const T* __restrict__ grad_out, T* __restrict__ grad_h,
                              float* __restrict__ coef) {
#if REFT_FAST_TILE_ARCH
  constexpr int NPH = 2 * R;  // [u | hWᵀ]
  constexpr int KC = 2 * R;   // [dz | −t]
  constexpr int LDC = KC + kTilePad;
  constexpr int kStageH = tile_stage_floats(NPH, KC), kStageG = tile_stage_floats(R, KC);
  constexpr int kStage = kStageH > kStageG ? kStageH : kStageG;
  constexpr int kXH = tile_proj_cols(NPH), kXG = tile_proj_cols(R);
  constexpr int kX = kTileRows * ((kXH > kXG ? kXH : kXG) + kTilePad);
  alignas(32) __shared__ float pool[kStage + kX + kTileRows * (NPH + R) + kTileRows * LDC];
  __shared__ int64_t s_row[kTileRows];
  float* const s_stage = pool;
  float* const s_x = s_stage + kStage;
  float* const totals_h = s_x + kX;                  // [16][2R]
  float* const totals_g = totals_h + kTileRows * NPH;  // [16][R]
  float* const s_coef = totals_g + kTileRows * R;
  const int r = a.rank;
  const int d = a.hidden;
  const int n_slots = a.n_slots;
  const int slot0 = static_cast<int>(blockIdx.x) * kTileRows;
  const SlotCoefs coefs(coef, n_slots, r);
  const bool any = tile_rows(a, s_row);
  coefs.zero_empty<kTileRows>(slot0, n_slots, [&](int i) { return s_row[i] >= 0; });
  if (!any) return;  // whole block
  const DropoutSpec dp = a.dropout;

  // backward's h is the compact copy of the selected rows, [B, n, d]: row `slot`
  const float* const proj_h[2] = {a.P, a.W};
  tile_project<2, R>(
      [&](int i, int c, float (&x)[4]) {
        if (s_row[i] >= 0) {
          load4(a.h + static_cast<int64_t>(slot0 + i) * d + c, c, d, x);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) x[q] = 0.0f;
        }
      },
      proj_h, r, d, s_stage, s_x, totals_h);
  // The gradient at o: grad_out times the forward's dropout factor (regenerated, same slot and columns).
  auto load_g = [&](int i, int c, float (&x)[4]) {
    const int64_t row = s_row[i];
    if (row < 0) {
#pragma unroll
      for (int q = 0; q < 4; ++q) x[q] = 0.0f;
      return;
    }
    load4(grad_out + row + c, c, d, x);
    if (dp.active) {
      float f[4];
      dropout_factors<4>(dp, slot0 + i, c, f);
#pragma unroll
      for (int q = 0; q < 4; ++q) x[q] = __fmul_rn(x[q], f[q]);  // as the rows kernel: g rounded, never fused
    }
  };
  const float* const proj_g[1] = {a.Q};
  tile_project<1, R>(load_g, proj_g, r, d, s_stage, s_x, totals_g);

  // Per-(row, k) scalars once per block: to the coefficient buffer (full fp32) and, rounded to TF32, to the write
  // pass's [dz | −t] (zeros for k ≥ r and for an absent matrix).
  for (int e = threadIdx.x; e < kTileRows * R; e += kThreads) {
    const int i = e / R, k = e % R, slot = slot0 + i;
    float dz = 0.0f, t = 0.0f;
    if (k < r && slot < n_slots) {
      const float z = (a.W != nullptr ? totals_h[i * NPH + R + k] : 0.0f) + (a.b != nullptr ? a.b[k] : 0.0f);
      t = totals_g[i * R + k];
      dz = t * activate_grad(a.activation, z);
      if (s_row[i] >= 0)
        coefs.set(slot, k, activate(a.activation, z) - (a.P != nullptr ? totals_h[i * NPH + k] : 0.0f), dz, -t);
    }
    s_coef[i * LDC + k] = a.W != nullptr ? wmma::__float_to_tf32(dz) : 0.0f;
    s_coef[i * LDC + R + k] = a.P != nullptr ? wmma::__float_to_tf32(-t) : 0.0f;
  }
  __syncthreads();

  // grad_h = g + dz W − t P
  const float* const back[2] = {a.W, a.P};
  tile_write<2, R>(back, s_coef, r, d, s_stage, [&](int i, int c, const float (&v)[4]) {
    const int64_t row = s_row[i];
    if (row < 0) return;
    float x[4];
    load_g(i, c, x);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (c + q >= d) break;
      grad_h[row + c + q] = Convert<T>::from_float(__fadd_rn(x[q], v[q]));
    }
  });
#else
  __trap();  // built for an arch without TF32 tensor cores: a launch here is a host bug, not a silent no-op
#endif
}

template <typename T>
struct WeightGradArgs {
  const T* h;
  const T* grad_out;
  const int64_t* positions;
  const float* coef;  // [3, n_slots, r]
  float* partials;    // [n_jobs, splits, r, d]
  int64_t seq_len;
  int hidden;
  int n_positions;
  int n_slots;
  int rank;
  int splits;
  int job_coef[3];  // coefficient block (CoefBlock) of job blockIdx.z
  DropoutSpec dropout;
};

// What one block of a weight-gradient kernel works on: blockIdx.x a column tile of `tile_cols` columns, blockIdx.y a
// split of the slots ([first, last)), blockIdx.z a job (the matrix, its coefficient block and source).
template <typename T>
struct WgradBlock {
  const T* src;       // g (from grad_out, at the token rows) or h (the compact [B, n, d] rows)
  const float* coef;  // [n_slots, r] of the job's coefficient block
  bool from_grad;
  int tile0;
  int split;
  int first;
  int last;
  __device__ __forceinline__ WgradBlock(const WeightGradArgs<T>& a, int tile_cols) {
    const int job = blockIdx.z;
    // Ternaries, not a dynamic index into the parameter array (which would copy it to local memory).
    const int block = job == 0 ? a.job_coef[0] : job == 1 ? a.job_coef[1] : a.job_coef[2];
    from_grad = block == kCoefDelta;
    src = from_grad ? a.grad_out : a.h;
    coef = a.coef + static_cast<int64_t>(block) * a.n_slots * a.rank;
    tile0 = blockIdx.x * tile_cols;
    split = blockIdx.y;
    first = static_cast<int>(static_cast<int64_t>(a.n_slots) * split / a.splits);
    last = static_cast<int>(static_cast<int64_t>(a.n_slots) * (split + 1) / a.splits);
  }
  // Where this block's partial sums of gradient row k start: [job, split, k, 0] of the [jobs, splits, r, d] buffer.
  __device__ __forceinline__ float* partials(const WeightGradArgs<T>& a) const {
    return a.partials + (static_cast<int64_t>(blockIdx.z) * a.splits + split) * a.rank * a.hidden;
  }
};

// grid (column tiles, splits, jobs). Rows of the split are staged kRowsPerChunk at a time in shared memory (sources as
// fp32, masked for g; coefficients padded with zeros to R), then every thread accumulates its column against its
// rank group in slot order.
template <typename T, int R, int VEC>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(WeightGradArgs<T> a) {
  constexpr int kPerThread = wgrad_ranks_per_thread(R);
  constexpr int kTile = wgrad_tile_cols(R);
  constexpr int kVecsPerRow = kTile / VEC;
  static_assert(kTile % VEC == 0 && kTile >= 32, "a tile holds whole vectors, and a warp lies in one rank group");
  alignas(16) __shared__ float s_x[kRowsPerChunk][kTile];
  __shared__ float s_coef[kRowsPerChunk][R];
  __shared__ int64_t s_row[kRowsPerChunk];

  const WgradBlock<T> wb(a, kTile);
  const bool from_grad = wb.from_grad;
  const T* __restrict__ src = wb.src;
  const float* __restrict__ coef = wb.coef;
  const int d = a.hidden;
  const int r = a.rank;
  const int tile0 = wb.tile0;
  const int first = wb.first, last = wb.last;
  const int col = threadIdx.x % kTile;
  const int rank0 = (threadIdx.x / kTile) * kPerThread;

  float acc[kPerThread] = {};
  for (int base = first; base < last; base += kRowsPerChunk) {
    const int rows = last - base < kRowsPerChunk ? last - base : kRowsPerChunk;
    __syncthreads();  // the previous chunk is consumed
    for (int i = threadIdx.x; i < rows; i += blockDim.x)
      s_row[i] = selected_row(a.positions, base + i, a.n_positions, a.seq_len, d);
    for (int e = threadIdx.x; e < rows * R; e += blockDim.x) {
      const int i = e / R, k = e % R;
      s_coef[i][k] = k < r ? coef[static_cast<int64_t>(base + i) * r + k] : 0.0f;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < rows * kVecsPerRow; e += blockDim.x) {
      const int i = e / kVecsPerRow, v = e % kVecsPerRow;
      const int c = tile0 + v * VEC;
      const int64_t row = s_row[i];
      float x[VEC] = {};  // zero for a slot with no position and for columns past d
      if (row >= 0 && c < d) {
        // g is read at the token row of [B, T, d]; h from its compact [B, n, d] copy, at the slot's row
        load_vec<T, VEC>(src + (from_grad ? row : static_cast<int64_t>(base + i) * d) + c, x);
        if (from_grad && a.dropout.active) {
          float f[VEC];
          dropout_factors<VEC>(a.dropout, base + i, c, f);
#pragma unroll
          for (int q = 0; q < VEC; ++q) x[q] = __fmul_rn(x[q], f[q]);  // the rows kernel's g, bit for bit
        }
      }
      if constexpr (VEC % 4 == 0) {
#pragma unroll
        for (int q = 0; q < VEC / 4; ++q)
          *reinterpret_cast<float4*>(&s_x[i][v * VEC + 4 * q]) =
              make_float4(x[4 * q], x[4 * q + 1], x[4 * q + 2], x[4 * q + 3]);
      } else {
#pragma unroll
        for (int q = 0; q < VEC; ++q) s_x[i][v * VEC + q] = x[q];
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int i = 0; i < rows; ++i) {
      const float x = s_x[i][col];
#pragma unroll
      for (int kk = 0; kk < kPerThread; ++kk) acc[kk] = fmaf(s_coef[i][rank0 + kk], x, acc[kk]);
    }
  }

  const int c = tile0 + col;
  if (c < d) {
    float* out = wb.partials(a);
#pragma unroll
    for (int kk = 0; kk < kPerThread; ++kk)
      if (rank0 + kk < r) out[(rank0 + kk) * d + c] = acc[kk];
  }
}

// The tile path of kernel 2 (the launches whose rows kernel is the tile kernel, at padded rank R ≥ 16): the same
// per-split partial sums dM_s[k, c] = Σ_{slot ∈ s} coef[slot, k] · x_slot[c] over the same column tiles and splits,
// as a [R × slots] · [slots × columns] TF32 product. Chunks of kRowsPerChunk slots are staged in shared memory
// (coefficients rounded to TF32; sources as in weight_grad_kernel, masked for g, rounded to TF32), and each warp
// accumulates kPerWarp of the block's (R / 16) × (kTile / 16) output tiles over the split's chunks in slot order.
// Here the FMA kernel would do 3·r multiply-adds per source element, several times the time of reading it.
template <typename T, int R>
__global__ void __launch_bounds__(kThreads) weight_grad_tile_kernel(WeightGradArgs<T> a) {
#if REFT_FAST_TILE_ARCH
  constexpr int kTile = wgrad_tile_cols(R);  // the FMA kernel's column tiles: the same plan, splits and partials
  constexpr int kTilesN = kTile / 16;
  constexpr int kPerWarp = (R / 16) * kTilesN / kTileWarps;
  constexpr int LDX = kTile + kTilePadB;  // B, row-major
  constexpr int LDC = R + kTilePadB;      // Cᵀ as A, column-major: 4 ranks × 8 slots a warp access
  constexpr int LDO = kTile + kTilePadB;  // the accumulator tiles
  constexpr int kXFloats = tile_max(kRowsPerChunk * LDX, R * LDO);
  constexpr int kXGroups = kRowsPerChunk * kTile / 4;  // 4-column groups of a staged source chunk
  constexpr int kCoefs = kRowsPerChunk * R;
  static_assert(kPerWarp * kTileWarps == (R / 16) * kTilesN && kXGroups % kThreads == 0 && kCoefs % kThreads == 0,
                "tiling");
  alignas(32) __shared__ float s_x[kXFloats];              // [slot][column]; at the end, the output tile [R][kTile]
  alignas(32) __shared__ float s_c[kRowsPerChunk * LDC];  // [slot][k]

  const WgradBlock<T> wb(a, kTile);
  const bool from_grad = wb.from_grad;
  const T* __restrict__ src = wb.src;
  const float* __restrict__ coef = wb.coef;
  const int d = a.hidden;
  const int r = a.rank;
  const int tile0 = wb.tile0;
  const int first = wb.first, last = wb.last;
  const int warp = threadIdx.x >> 5;

  TileAcc acc[kPerWarp];
#pragma unroll
  for (int t = 0; t < kPerWarp; ++t) wmma::fill_fragment(acc[t], 0.0f);
  for (int base = first; base < last; base += kRowsPerChunk) {
    const int rows = last - base < kRowsPerChunk ? last - base : kRowsPerChunk;
    __syncthreads();  // the previous chunk's fragments are loaded
    // Every load of the chunk is independent (compile-time trip counts, unrolled): one round trip per chunk, not one
    // per element.
#pragma unroll
    for (int j = 0; j < kCoefs / kThreads; ++j) {
      const int e = static_cast<int>(threadIdx.x) + j * kThreads, i = e / R, k = e % R;
      s_c[i * LDC + k] = i < rows && k < r ? wmma::__float_to_tf32(coef[static_cast<int64_t>(base + i) * r + k]) : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kXGroups / kThreads; ++j) {
      const int e = static_cast<int>(threadIdx.x) + j * kThreads;
      const int i = e / (kTile / 4), cl = (e % (kTile / 4)) * 4, c = tile0 + cl;
      const int64_t row = i < rows ? selected_row(a.positions, base + i, a.n_positions, a.seq_len, d) : -1;
      float x[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // zero for a slot with no position, past the split, and past d
      if (row >= 0 && c < d) {
        // g is read at the token row of [B, T, d]; h from its compact [B, n, d] copy, at the slot's row
        load4(src + (from_grad ? row : static_cast<int64_t>(base + i) * d) + c, c, d, x);
        if (from_grad && a.dropout.active) {
          float f[4];
          dropout_factors<4>(a.dropout, base + i, c, f);
#pragma unroll
          for (int q = 0; q < 4; ++q) x[q] = __fmul_rn(x[q], f[q]);
        }
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) s_x[i * LDX + cl + q] = wmma::__float_to_tf32(x[q]);
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kPerWarp; ++t) {
      const int ti = warp * kPerWarp + t, tm = ti / kTilesN, tn = ti % kTilesN;
#pragma unroll
      for (int ks = 0; ks < kRowsPerChunk / 8; ++ks) {
        wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major> fa;
        TileBRow fb;
        wmma::load_matrix_sync(fa, s_c + ks * 8 * LDC + tm * 16, LDC);
        wmma::load_matrix_sync(fb, s_x + ks * 8 * LDX + tn * 16, LDX);
        wmma::mma_sync(acc[t], fa, fb, acc[t]);
      }
    }
  }
  __syncthreads();  // every warp is done with the staged chunk: s_x takes the block's output tile, [R][kTile]
#pragma unroll
  for (int t = 0; t < kPerWarp; ++t) {
    const int ti = warp * kPerWarp + t, tm = ti / kTilesN, tn = ti % kTilesN;
    wmma::store_matrix_sync(s_x + tm * 16 * LDO + tn * 16, acc[t], LDO, wmma::mem_row_major);
  }
  __syncthreads();
  float* out = wb.partials(a);
  for (int e = threadIdx.x; e < r * kTile; e += kThreads) {
    const int k = e / kTile, cl = e % kTile;
    if (tile0 + cl < d) out[k * d + tile0 + cl] = s_x[k * LDO + cl];
  }
#else
  __trap();  // built for an arch without TF32 tensor cores: a launch here is a host bug, not a silent no-op
#endif
}

struct ReduceArgs {
  const float* partials;  // [n_jobs, splits, r * d]
  int64_t matrix_elems;   // r * d
  int n_jobs;
  int splits;
  int64_t matrix_blocks;  // blocks [0, matrix_blocks) sum the partials; the rest compute db
  float* out[3];          // gradient of job 0, 1, 2
  const float* dz;        // [n_slots, r]
  int64_t n_slots;
  int rank;
  float* db;  // may be null (then no db blocks are launched)
};

__global__ void __launch_bounds__(kThreads) reduce_grads_kernel(ReduceArgs a) {
  if (blockIdx.x < a.matrix_blocks) {
    const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (e >= a.n_jobs * a.matrix_elems) return;
    const int job = static_cast<int>(e / a.matrix_elems);
    const int64_t i = e - job * a.matrix_elems;
    const float* p = a.partials + static_cast<int64_t>(job) * a.splits * a.matrix_elems + i;
    float s = 0.0f;
    for (int split = 0; split < a.splits; ++split) s += p[split * a.matrix_elems];
    float* out = job == 0 ? a.out[0] : job == 1 ? a.out[1] : a.out[2];
    out[i] = s;
    return;
  }
  const int lane = threadIdx.x & 31;
  const int64_t k = (static_cast<int64_t>(blockIdx.x) - a.matrix_blocks) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (k >= a.rank) return;  // warp-uniform
  float s = 0.0f;
  for (int64_t slot = lane; slot < a.n_slots; slot += 32) s += a.dz[slot * a.rank + k];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
  if (lane == 0) a.db[k] = s;
}

}  // namespace detail

namespace host {

// Blocks the weight-gradient grid aims at: two waves on a 132-SM H100. A constant rather than the device's SM count,
// so that the split count (and with it every bit of the gradients) depends on the shape only.
constexpr int64_t kTargetWgradBlocks = 264;
constexpr int64_t kMaxSplits = 64;

struct BackwardPlan {
  int n_jobs;
  int job_coef[3];
  int64_t tiles;
  int splits;
  int64_t coef_floats;
  int64_t partial_floats;
};

inline BackwardPlan make_plan(const EditProblem& p) {
  BackwardPlan plan{};
  const int64_t n_slots = p.batch * p.n_positions;
  plan.job_coef[plan.n_jobs++] = detail::kCoefDelta;
  if (p.W != nullptr) plan.job_coef[plan.n_jobs++] = detail::kCoefDz;
  if (p.P != nullptr) plan.job_coef[plan.n_jobs++] = detail::kCoefNegT;
  const int tile = detail::wgrad_tile_cols(padded_rank(p.rank));
  plan.tiles = (p.hidden + tile - 1) / tile;
  const int64_t for_occupancy = (kTargetWgradBlocks + plan.tiles * plan.n_jobs - 1) / (plan.tiles * plan.n_jobs);
  const int64_t for_rows = (n_slots + detail::kRowsPerChunk - 1) / detail::kRowsPerChunk;  // >= one chunk each
  int64_t splits = for_occupancy < for_rows ? for_occupancy : for_rows;
  splits = splits < 1 ? 1 : splits > kMaxSplits ? kMaxSplits : splits;
  plan.splits = static_cast<int>(splits);
  plan.coef_floats = 3 * n_slots * p.rank;
  plan.partial_floats = static_cast<int64_t>(plan.n_jobs) * plan.splits * p.rank * p.hidden;
  return plan;
}

}  // namespace host

int64_t edit_backward_workspace_floats(const EditProblem& p) {
  if (host::check_problem(p) != nullptr || p.batch * p.n_positions == 0) return 0;
  const host::BackwardPlan plan = host::make_plan(p);
  return plan.coef_floats + plan.partial_floats;
}

const char* launch_edit_backward(const EditProblem& p, const void* grad_out, void* grad_h, float* dQ, float* dP,
                                 float* dW, float* db, float* workspace) {
  if (const char* bad = host::check_problem(p)) return bad;
  if ((p.P != nullptr) != (dP != nullptr) || (p.W != nullptr) != (dW != nullptr) || (p.b != nullptr) != (db != nullptr))
    return "dP, dW and db must be given exactly when P, W and b are";
  const int64_t n_slots = p.batch * p.n_positions;
  host::DeviceGuard guard(p.device);
  if (const char* e = guard.error()) return e;
  auto stream = static_cast<cudaStream_t>(p.stream);
  const int64_t matrix_bytes = p.rank * p.hidden * static_cast<int64_t>(sizeof(float));

  if (n_slots == 0) {  // nothing selected: every weight gradient is zero and grad_h is already grad_out
    cudaMemsetAsync(dQ, 0, matrix_bytes, stream);
    if (dP != nullptr) cudaMemsetAsync(dP, 0, matrix_bytes, stream);
    if (dW != nullptr) cudaMemsetAsync(dW, 0, matrix_bytes, stream);
    if (db != nullptr) cudaMemsetAsync(db, 0, p.rank * sizeof(float), stream);
    return host::launch_status();
  }
  if (workspace == nullptr) return "the backward needs a workspace of edit_backward_workspace_floats() floats";

  const host::BackwardPlan plan = host::make_plan(p);
  const int rows = host::rows_per_block(p);
  float* coef = workspace;
  float* partials = workspace + plan.coef_floats;

  return host::dispatch(p.dtype, p.rank, [&](auto type_tag, auto rank_tag) -> const char* {
    using T = typename decltype(type_tag)::type;
    constexpr int R = decltype(rank_tag)::value;
    constexpr int V = detail::kVec16<T>;
    const auto row_args = host::row_args<T>(p);
    const T* g = static_cast<const T*>(grad_out);
    T* gh = static_cast<T*>(grad_h);

    detail::WeightGradArgs<T> wargs;
    wargs.h = row_args.h;
    wargs.grad_out = g;
    wargs.positions = p.positions;
    wargs.coef = coef;
    wargs.partials = partials;
    wargs.seq_len = p.seq_len;
    wargs.hidden = static_cast<int>(p.hidden);
    wargs.n_positions = static_cast<int>(p.n_positions);
    wargs.n_slots = static_cast<int>(n_slots);
    wargs.rank = static_cast<int>(p.rank);
    wargs.splits = plan.splits;
    for (int j = 0; j < 3; ++j) wargs.job_coef[j] = plan.job_coef[j];
    wargs.dropout = row_args.dropout;

    const bool vec = p.hidden % V == 0 && host::aligned16(p.h) && host::aligned16(grad_out) &&
                     host::aligned16(grad_h) && host::aligned16(p.Q) && host::aligned16(p.P) && host::aligned16(p.W);
    const dim3 wgrad_grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.splits),
                          static_cast<unsigned>(plan.n_jobs));
    // M = 4 is instantiated for padded ranks ≤ 8 only (rows_per_block never picks it above).
    auto launch_rows = [&](auto rows_tag) {
      constexpr int M = decltype(rows_tag)::value;
      const dim3 rows_grid(static_cast<unsigned>((n_slots + M - 1) / M));
      if (vec) {
        detail::edit_backward_rows_kernel<T, R, V, M>
            <<<rows_grid, host::row_threads(p.hidden, V), 0, stream>>>(row_args, g, gh, coef);
      } else {
        detail::edit_backward_rows_kernel<T, R, 1, M>
            <<<rows_grid, host::row_threads(p.hidden, 1), 0, stream>>>(row_args, g, gh, coef);
      }
    };
    bool launched = false;
    if constexpr (!std::is_same_v<T, float>) {
      if (rows == host::kTileRows) {
        constexpr int RT = R < detail::kTileMinRank ? detail::kTileMinRank : R;
        const dim3 tile_grid(static_cast<unsigned>((n_slots + host::kTileRows - 1) / host::kTileRows));
        detail::edit_backward_tile_kernel<T, RT><<<tile_grid, detail::kThreads, 0, stream>>>(row_args, g, gh, coef);
        launched = true;
      }
    }
    if constexpr (R <= host::kMaxRankMultiRow) {
      if (!launched && rows == host::kRowsPerBlock) {
        launch_rows(host::IntTag<host::kRowsPerBlock>{});
        launched = true;
      }
    }
    if (!launched) launch_rows(host::IntTag<1>{});
    if (const char* e = host::launch_status()) return e;
    bool wgrad_launched = false;
    if constexpr (!std::is_same_v<T, float> && R >= detail::kTileMinRank) {
      if (rows == host::kTileRows) {  // below rank 16 the FMA kernel is about as fast as reading its sources
        detail::weight_grad_tile_kernel<T, R><<<wgrad_grid, detail::kThreads, 0, stream>>>(wargs);
        wgrad_launched = true;
      }
    }
    if (!wgrad_launched) {
      if (vec) {
        detail::weight_grad_kernel<T, R, V><<<wgrad_grid, detail::kThreads, 0, stream>>>(wargs);
      } else {
        detail::weight_grad_kernel<T, R, 1><<<wgrad_grid, detail::kThreads, 0, stream>>>(wargs);
      }
    }
    if (const char* e = host::launch_status()) return e;

    detail::ReduceArgs rargs;
    rargs.partials = partials;
    rargs.matrix_elems = p.rank * p.hidden;
    rargs.n_jobs = plan.n_jobs;
    rargs.splits = plan.splits;
    rargs.matrix_blocks = (plan.n_jobs * rargs.matrix_elems + detail::kThreads - 1) / detail::kThreads;
    auto gradient_of = [&](int block) {
      return block == detail::kCoefDelta ? dQ : block == detail::kCoefDz ? dW : dP;
    };
    for (int j = 0; j < 3; ++j) rargs.out[j] = j < plan.n_jobs ? gradient_of(plan.job_coef[j]) : nullptr;
    rargs.dz = coef + detail::kCoefDz * n_slots * p.rank;
    rargs.n_slots = n_slots;
    rargs.rank = static_cast<int>(p.rank);
    rargs.db = db;
    const int64_t warps_per_block = detail::kThreads / 32;
    const int64_t db_blocks = db != nullptr ? (p.rank + warps_per_block - 1) / warps_per_block : 0;
    detail::reduce_grads_kernel<<<static_cast<unsigned>(rargs.matrix_blocks + db_blocks), detail::kThreads, 0,
                                  stream>>>(rargs);
    return host::launch_status();
  });
}

}  // namespace reft_fast
