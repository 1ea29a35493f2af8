// Forward of the ReFT edit: for each selected row h (M slots (b, j) per block, M = 1 or 4, or 16 on the tensor-core
// tile path; see rows_per_block),
//     u = h Pᵀ,  z = h Wᵀ + b,  δ = act(z) − s·u,  out = dropout(h + δQ)
// written back only at that row. Two passes over the block's rows: the r-length projections u and z (per-thread
// partial dot products in registers, then one block reduction), then h + δQ column by column. h is re-read in the
// second pass (from L1/L2: a row is at most a few tens of KB) rather than held, so registers stay bounded for any d.
// Each parameter chunk a thread loads serves all M rows.
#include "edit_common.cuh"
#include "edit_tile.cuh"

namespace reft_fast {
namespace detail {

template <typename T, int R, int VEC, int M>
__global__ void __launch_bounds__(kThreads, 1) edit_forward_kernel(RowArgs<T> a, T* __restrict__ out) {
  int64_t rows[M];
  if (!block_rows(a, rows)) return;  // whole block: the rows are left as the caller's copy of h
  __shared__ float warp_sums[kMaxWarps * 2 * M * R];
  __shared__ float totals[2 * M * R];  // row m: [2mR, 2mR + R) u = h Pᵀ,  [2mR + R, 2mR + 2R) h Wᵀ
  __shared__ float s_delta[M * R];
  const int d = a.hidden;
  const int r = a.rank;

  auto load_h = [&](int m, int c, float (&x)[VEC]) {
    if (rows[m] >= 0) {
      load_vec<T, VEC>(a.h + rows[m] + c, x);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) x[v] = 0.0f;
    }
  };
  float acc[2 * M][R] = {};
  const float* const mats[2] = {a.P, a.W};
  project_rows<R, VEC, M>(load_h, mats, r, d, acc);
  block_sum(acc, r, warp_sums, totals);

  // δ once per block (one activation per (row, k), not per thread), read back from shared memory by every thread.
  for (int e = threadIdx.x; e < M * r; e += blockDim.x) {
    const int m = e / r, k = e % r;
    const float z = (a.W != nullptr ? totals[(2 * m + 1) * R + k] : 0.0f) + (a.b != nullptr ? a.b[k] : 0.0f);
    s_delta[m * R + k] = activate(a.activation, z) - (a.P != nullptr ? totals[2 * m * R + k] : 0.0f);
  }
  __syncthreads();

  for (int c = threadIdx.x * VEC; c < d; c += blockDim.x * VEC) {
    float edit[M][VEC] = {};
    accumulate_rows<R, VEC, M, false>(a.Q, s_delta, r, d, c, edit);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      if (rows[m] < 0) continue;
      float o[VEC];
      load_vec<T, VEC>(a.h + rows[m] + c, o);
      // round(round(h + δQ) · f), spelled out as in the backward's write pass (never contracted, whatever M).
#pragma unroll
      for (int v = 0; v < VEC; ++v) o[v] = __fadd_rn(o[v], edit[m][v]);
      if (a.dropout.active) {
        float f[VEC];
        dropout_factors<VEC>(a.dropout, static_cast<int>(blockIdx.x) * M + m, c, f);
#pragma unroll
        for (int v = 0; v < VEC; ++v) o[v] = __fmul_rn(o[v], f[v]);
      }
      store_vec<T, VEC>(out + rows[m] + c, o);
    }
  }
}


// The tile path (16-bit h, sm_80+, padded rank R ≥ 16; see edit_tile.cuh): the same two passes for 16 slots at once,
// the projections [u | hWᵀ] = h [P; W]ᵀ and the edit δQ as TF32 tensor-core products.
template <typename T, int R>
__global__ void __launch_bounds__(kThreads, kTileMinBlocks)
    edit_forward_tile_kernel(RowArgs<T> a, T* __restrict__ out) {
#if REFT_FAST_TILE_ARCH
  constexpr int NP = 2 * R;  // [u | hWᵀ]
  constexpr int LDC = R + kTilePad;
  constexpr int kStage = tile_stage_floats(NP, R);
  constexpr int kX = kTileRows * (tile_proj_cols(NP) + kTilePad);
  constexpr int kTotals = kTileRows * NP;
  alignas(32) __shared__ float pool[kStage + kX + kTotals + kTileRows * LDC];
  __shared__ int64_t s_row[kTileRows];
  float* const s_stage = pool;
  float* const s_x = s_stage + kStage;
  float* const totals = s_x + kX;
  float* const s_coef = totals + kTotals;
  if (!tile_rows(a, s_row)) return;  // whole block: the rows are left as the caller's copy of h
  const int d = a.hidden;
  const int r = a.rank;
  const int slot0 = static_cast<int>(blockIdx.x) * kTileRows;

  const float* const proj[2] = {a.P, a.W};
  tile_project<2, R>(
      [&](int i, int c, float (&x)[4]) {
        const int64_t row = s_row[i];
        if (row >= 0) {
          load4(a.h + row + c, c, d, x);
        } else {
#pragma unroll
          for (int q = 0; q < 4; ++q) x[q] = 0.0f;
        }
      },
      proj, r, d, s_stage, s_x, totals);

  // δ once per (row, k), rounded to TF32 for the products; zero for k ≥ r.
  for (int e = threadIdx.x; e < kTileRows * R; e += kThreads) {
    const int i = e / R, k = e % R;
    float delta = 0.0f;
    if (k < r) {
      const float z = (a.W != nullptr ? totals[i * NP + R + k] : 0.0f) + (a.b != nullptr ? a.b[k] : 0.0f);
      delta = activate(a.activation, z) - (a.P != nullptr ? totals[i * NP + k] : 0.0f);
    }
    s_coef[i * LDC + k] = wmma::__float_to_tf32(delta);
  }
  __syncthreads();

  const float* const q_mat[1] = {a.Q};
  tile_write<1, R>(q_mat, s_coef, r, d, s_stage, [&](int i, int c, const float (&v)[4]) {
    const int64_t row = s_row[i];
    if (row < 0) return;
    float o[4];
    load4(a.h + row + c, c, d, o);  // all four loads before the first store (out may alias h for all nvcc knows)
    float f[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (a.dropout.active) dropout_factors<4>(a.dropout, slot0 + i, c, f);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (c + q >= d) break;
      out[row + c + q] = Convert<T>::from_float(__fmul_rn(__fadd_rn(o[q], v[q]), f[q]));
    }
  });
#else
  __trap();  // built for an arch without TF32 tensor cores: a launch here is a host bug, not a silent no-op
#endif
}

}  // namespace detail

const char* launch_edit_forward(const EditProblem& p, void* out) {
  if (const char* bad = host::check_problem(p)) return bad;
  const int64_t n_slots = p.batch * p.n_positions;
  if (n_slots == 0 || p.seq_len == 0) return nullptr;
  host::DeviceGuard guard(p.device);
  if (const char* e = guard.error()) return e;
  auto stream = static_cast<cudaStream_t>(p.stream);
  const int rows = host::rows_per_block(p);
  return host::dispatch(p.dtype, p.rank, [&](auto type_tag, auto rank_tag) -> const char* {
    using T = typename decltype(type_tag)::type;
    constexpr int R = decltype(rank_tag)::value;
    constexpr int V = detail::kVec16<T>;
    const auto args = host::row_args<T>(p);
    T* out_t = static_cast<T*>(out);
    const bool vec = p.hidden % V == 0 && host::aligned16(p.h) && host::aligned16(out) && host::aligned16(p.Q) &&
                     host::aligned16(p.P) && host::aligned16(p.W);
    if constexpr (!std::is_same_v<T, float>) {
      if (rows == host::kTileRows) {
        constexpr int RT = R < detail::kTileMinRank ? detail::kTileMinRank : R;
        const dim3 grid(static_cast<unsigned>((n_slots + host::kTileRows - 1) / host::kTileRows));
        detail::edit_forward_tile_kernel<T, RT><<<grid, detail::kThreads, 0, stream>>>(args, out_t);
        return host::launch_status();
      }
    }
    // M = 4 is instantiated for padded ranks ≤ 8 only (rows_per_block never picks it above).
    auto launch = [&](auto rows_tag) {
      constexpr int M = decltype(rows_tag)::value;
      const dim3 grid(static_cast<unsigned>((n_slots + M - 1) / M));
      if (vec) {
        detail::edit_forward_kernel<T, R, V, M><<<grid, host::row_threads(p.hidden, V), 0, stream>>>(args, out_t);
      } else {
        detail::edit_forward_kernel<T, R, 1, M><<<grid, host::row_threads(p.hidden, 1), 0, stream>>>(args, out_t);
      }
    };
    if constexpr (R <= host::kMaxRankMultiRow) {
      if (rows == host::kRowsPerBlock) {
        launch(host::IntTag<host::kRowsPerBlock>{});
        return host::launch_status();
      }
    }
    launch(host::IntTag<1>{});
    return host::launch_status();
  });
}

}  // namespace reft_fast
