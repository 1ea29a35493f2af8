// Forward of the ReFT edit: for each selected row h (one block per slot (b, j) of positions),
//     u = h Pᵀ,  z = h Wᵀ + b,  δ = act(z) − s·u,  out = dropout(h + δ Q)
// written back only at that row. Two passes over the row: the r-length projections u and z (per-thread partial dot
// products in registers, then one block reduction), then h + δQ column by column. h is re-read in the second pass
// (from L1/L2: a row is at most a few tens of KB) rather than held, so registers stay bounded for any d.
#include "edit_common.cuh"

namespace reft_fast {
namespace detail {

template <typename T, int R, int VEC>
__global__ void __launch_bounds__(kThreads) edit_forward_kernel(RowArgs<T> a, T* __restrict__ out) {
  const int slot = blockIdx.x;
  const int64_t row = selected_row(a.positions, slot, a.n_positions, a.seq_len, a.hidden);
  if (row < 0) return;  // whole block: the row is left as the caller's copy of h
  __shared__ float warp_sums[kMaxWarps * 2 * R];
  __shared__ float totals[2 * R];  // [0, R): u = h Pᵀ,  [R, 2R): h Wᵀ
  const int d = a.hidden;
  const int r = a.rank;
  const T* __restrict__ h = a.h + row;

  float acc[2][R] = {};
  const float* const mats[2] = {a.P, a.W};
  project_row<R, VEC>([&](int c, float (&x)[VEC]) { load_vec<T, VEC>(h + c, x); }, mats, r, d, acc);
  block_sum(acc, r, warp_sums, totals);

  // δ_k once per block (threads k < r: one activation per k, not per thread), then into every thread's registers
  // with compile-time indices.
  __shared__ float s_delta[R];
  for (int k = threadIdx.x; k < r; k += blockDim.x) {
    const float z = (a.W != nullptr ? totals[R + k] : 0.0f) + (a.b != nullptr ? a.b[k] : 0.0f);
    s_delta[k] = activate(a.activation, z) - (a.P != nullptr ? totals[k] : 0.0f);
  }
  __syncthreads();
  float delta[R];
#pragma unroll
  for (int k = 0; k < R; ++k) delta[k] = k < r ? s_delta[k] : 0.0f;

  T* __restrict__ out_row = out + row;
  for (int c = threadIdx.x * VEC; c < d; c += blockDim.x * VEC) {
    float x[VEC], edit[VEC] = {};
    load_vec<T, VEC>(h + c, x);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k >= r) break;
      float q[VEC];
      load_vec<float, VEC>(a.Q + k * d + c, q);
#pragma unroll
      for (int i = 0; i < VEC; ++i) edit[i] = fmaf(delta[k], q[i], edit[i]);
    }
    float o[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = x[i] + edit[i];
    if (a.dropout.active) {
      float f[VEC];
      dropout_factors<VEC>(a.dropout, slot, c, f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) o[i] *= f[i];
    }
    store_vec<T, VEC>(out_row + c, o);
  }
}

}  // namespace detail

const char* launch_edit_forward(const EditProblem& p, void* out) {
  if (const char* bad = host::check_problem(p)) return bad;
  const int64_t n_slots = p.batch * p.n_positions;
  if (n_slots == 0 || p.seq_len == 0) return nullptr;
  host::DeviceGuard guard(p.device);
  if (const char* e = guard.error()) return e;
  auto stream = static_cast<cudaStream_t>(p.stream);
  return host::dispatch(p.dtype, p.rank, [&](auto type_tag, auto rank_tag) -> const char* {
    using T = typename decltype(type_tag)::type;
    constexpr int R = decltype(rank_tag)::value;
    constexpr int V = detail::kVec16<T>;
    const auto args = host::row_args<T>(p);
    T* out_t = static_cast<T*>(out);
    const bool vec = p.hidden % V == 0 && host::aligned16(p.h) && host::aligned16(out) && host::aligned16(p.Q) &&
                     host::aligned16(p.P) && host::aligned16(p.W);
    const dim3 grid(static_cast<unsigned>(n_slots));
    if (vec) {
      detail::edit_forward_kernel<T, R, V><<<grid, host::row_threads(p.hidden, V), 0, stream>>>(args, out_t);
    } else {
      detail::edit_forward_kernel<T, R, 1><<<grid, host::row_threads(p.hidden, 1), 0, stream>>>(args, out_t);
    }
    return host::launch_status();
  });
}

}  // namespace reft_fast
