// Self-test of csrc/sim (tests/test_cuda_sim.py): small kernels that exercise what the simulator promises, in CUDA
// syntax, translated and compiled for the CPU the way reft_fast.cuda_backend builds csrc/. One case per run:
//   selftest CASE [FILE]
// prints "ok ..." or "FAIL ..." for the semantic cases, the launch error for the fault cases, and for `convert` reads
// float32 bit patterns (uint32, little endian) from FILE and writes their __half and __nv_bfloat16 bits to stdout
// (`tf32` likewise, their wmma::__float_to_tf32 bits).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <vector>

// out[blockIdx.x * n + i] = in[blockIdx.x * n + n - 1 - i] through shared memory: needs the barrier.
__global__ void reverse_kernel(const float* in, float* out) {
  __shared__ float s[1024];
  const int n = blockDim.x, base = blockIdx.x * n;
  s[threadIdx.x] = in[base + threadIdx.x];
  __syncthreads();
  out[base + threadIdx.x] = s[n - 1 - threadIdx.x];
}

// out[i] = the sum over i's warp (xor butterfly), and lane-exchange check: swapped[i] = in[i ^ 5].
__global__ void butterfly_kernel(const float* in, float* out, float* swapped) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = in[i];
  swapped[i] = __shfl_xor_sync(0xffffffffu, v, 5);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[i] = v;
}

// Lane 0 waits at __syncthreads while the rest of its warp waits in a full-mask shuffle: undefined on a GPU, an error
// here. (Threads that have exited do not hold a barrier up, as on the device.)
__global__ void divergent_kernel(float* out) {
  float v = 1.0f;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Two warps at two different __syncthreads call sites: undefined on a GPU (they may pass each other), an error here.
__global__ void two_sites_kernel(float* out) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = s[63 - threadIdx.x];
}

// Half a warp shuffles at one call site, the other half at another: undefined on a GPU, an error here.
__global__ void split_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 16);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 16);
  }
  out[threadIdx.x] = v;
}

// A 16-byte load 4 bytes past an aligned address.
__global__ void misaligned_kernel(const float* in, float* out) {
  const uint4 w = __ldg(reinterpret_cast<const uint4*>(in + 1));
  out[threadIdx.x] = static_cast<float>(w.x);
}

// Reads one element past the end of `in` (n elements): only AddressSanitizer sees it.
__global__ void out_of_bounds_kernel(const float* in, float* out, int n) {
  out[threadIdx.x] = in[threadIdx.x + 1 == blockDim.x ? n : threadIdx.x];
}

// ---------------------------------------------------------------------------------------------------------------------
// __syncwarp and wmma
// ---------------------------------------------------------------------------------------------------------------------

// out[i] = in[i ^ 1] through shared memory, ordered by __syncwarp only.
__global__ void syncwarp_kernel(const float* in, float* out) {
  __shared__ float s[128];
  s[threadIdx.x] = in[threadIdx.x];
  __syncwarp();
  out[threadIdx.x] = s[threadIdx.x ^ 1];
}

// Half a warp at one __syncwarp, the other half at another: undefined on a GPU, an error here.
__global__ void split_syncwarp_kernel(float* out) {
  if (threadIdx.x % 32 < 16) {
    __syncwarp();
  } else {
    __syncwarp();
  }
  out[threadIdx.x] = 1.0f;
}

// A partial mask: not in the simulated subset.
__global__ void syncwarp_mask_kernel(float* out) {
  __syncwarp(0x0000ffffu);
  out[threadIdx.x] = 1.0f;
}

namespace wmma = nvcuda::wmma;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragACol = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// The GEMM case: D = (A B + C0) / 2 with A 32 x 24, B 24 x 48, C0 and D 32 x 48; warp w of 6 computes the 16 x 16 tile
// (w / 3, w % 3) over 3 k-steps. Every operand is in memory in both layouts (the t-suffixed copies are column-major),
// and the warps vary which they load: B col-major for even tile columns, row-major for odd ones; A column-major for
// warp 5 only; C0 column-major for the second tile row; D is stored in both layouts. A is rounded to TF32 elementwise
// in the fragments; B is not, so mma_sync truncates it.
constexpr int kM = 32, kN = 48, kK = 24;
struct GemmArgs {
  const float *a, *at, *b, *bt, *c0, *c0t;
  float *d, *dt;
};

// acc += A B for k-step ks, A in `a` (rounded to TF32 here, elementwise), B loaded in tile column tn's layout.
template <typename FragAny>
__device__ void gemm_step(FragC& acc, FragAny& a, const GemmArgs& g, int tn, int ks) {
  for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
  if (tn % 2 == 0) {
    FragB b;
    wmma::load_matrix_sync(b, g.bt + tn * 16 * kK + ks * 8, kK);
    wmma::mma_sync(acc, a, b, acc);
  } else {
    FragBRow b;
    wmma::load_matrix_sync(b, g.b + ks * 8 * kN + tn * 16, kN);
    wmma::mma_sync(acc, a, b, acc);
  }
}

__global__ void wmma_gemm_kernel(GemmArgs g) {
  const int warp = threadIdx.x / 32, tm = warp / 3, tn = warp % 3;
  FragC acc;
  if (tm == 1) {
    wmma::load_matrix_sync(acc, g.c0t + tn * 16 * kM + tm * 16, kM, wmma::mem_col_major);
  } else {
    wmma::load_matrix_sync(acc, g.c0 + tm * 16 * kN + tn * 16, kN, wmma::mem_row_major);
  }
  for (int ks = 0; ks < kK / 8; ++ks) {
    if (warp == 5) {
      FragACol a;
      wmma::load_matrix_sync(a, g.at + ks * 8 * kM + tm * 16, kM);
      gemm_step(acc, a, g, tn, ks);
    } else {
      FragA a;
      wmma::load_matrix_sync(a, g.a + tm * 16 * kK + ks * 8, kK);
      gemm_step(acc, a, g, tn, ks);
    }
  }
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 0.5f;
  wmma::store_matrix_sync(g.d + tm * 16 * kN + tn * 16, acc, kN, wmma::mem_row_major);
  wmma::store_matrix_sync(g.dt + tn * 16 * kM + tm * 16, acc, kM, wmma::mem_col_major);
}

// Which element each (lane, i) holds: loads operands whose elements are distinct indices (A and the accumulator
// row-major: their row-major index) and writes every lane's x[] out (A at out[0..128), B at out[128..256), the
// accumulator at out[256..512)); before that, a filled accumulator at out[512..768).
__global__ void wmma_mapping_kernel(const float* index, float* out) {
  const int lane = threadIdx.x;
  FragA a;
  FragB b;
  FragC c;
  wmma::fill_fragment(c, -1.5f);
  for (int i = 0; i < 8; ++i) out[512 + lane * 8 + i] = c.x[i];
  wmma::load_matrix_sync(a, index, 8);
  wmma::load_matrix_sync(b, index, 8);  // col-major 8 x 16: element (k, n) at index[n * 8 + k]
  wmma::load_matrix_sync(c, index, 16, wmma::mem_row_major);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = a.x[i];
  for (int i = 0; i < 4; ++i) out[128 + lane * 4 + i] = b.x[i];
  for (int i = 0; i < 8; ++i) out[256 + lane * 8 + i] = c.x[i];
}

// A load 16 bytes past a 32-byte aligned address.
__global__ void wmma_misaligned_kernel(const float* in, float* out) {
  FragA a;
  wmma::load_matrix_sync(a, in + 4, 8);
  out[threadIdx.x] = a.x[0];
}

// ldm 6: rows 24 bytes apart.
__global__ void wmma_bad_ldm_kernel(const float* in, float* out) {
  FragC c;
  wmma::load_matrix_sync(c, in, 6, wmma::mem_row_major);
  out[threadIdx.x] = c.x[0];
}

// Odd and even lanes pass different (aligned) pointers.
__global__ void wmma_pointers_kernel(const float* in, float* out) {
  FragA a;
  wmma::load_matrix_sync(a, in + (threadIdx.x % 2) * 8, 8);
  out[threadIdx.x] = a.x[0];
}

// Only lanes < 16 reach the mma; the others exit.
__global__ void wmma_half_warp_kernel(const float* in, float* out) {
  FragA a;
  FragB b;
  FragC c;
  wmma::fill_fragment(a, 1.0f);
  wmma::fill_fragment(b, 1.0f);
  wmma::fill_fragment(c, 0.0f);
  if (threadIdx.x % 32 < 16) {
    wmma::mma_sync(c, a, b, c);
    out[threadIdx.x] = c.x[0] + in[0];
  }
}

// The two halves of a warp at two mma call sites.
__global__ void wmma_split_kernel(float* out) {
  FragA a;
  FragB b;
  FragC c;
  wmma::fill_fragment(a, 1.0f);
  wmma::fill_fragment(b, 1.0f);
  wmma::fill_fragment(c, 0.0f);
  if (threadIdx.x % 32 < 16) {
    wmma::mma_sync(c, a, b, c);
  } else {
    wmma::mma_sync(c, a, b, c);
  }
  out[threadIdx.x] = c.x[0];
}

namespace {

int report(const char* name) {
  const cudaError_t e = cudaGetLastError();
  std::printf("%s: %s [%d]\n", name, e == cudaSuccess ? "no error" : cudaGetErrorString(e), static_cast<int>(e));
  return 0;
}

// Storage aligned as cudaMalloc's (256 bytes), which wmma's 32-byte rule needs.
struct Buffer {
  explicit Buffer(size_t n) : p(static_cast<float*>(std::aligned_alloc(256, (n * sizeof(float) + 255) / 256 * 256))) {
    std::memset(p, 0, n * sizeof(float));
  }
  ~Buffer() { std::free(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* p;
};

uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float float_of(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
// The reference's TF32 operand as the tensor cores read it: the low 13 bits dropped, a NaN kept.
float truncate_tf32(float x) { return std::isnan(x) ? x : float_of(bits_of(x) & 0xffffe000u); }
bool same(float x, float y) { return bits_of(x) == bits_of(y) || (std::isnan(x) && std::isnan(y)); }

// Every value of [0, n) exactly once.
bool bijection(const float* v, int n) {
  std::vector<int> seen(n, 0);
  for (int i = 0; i < n; ++i) {
    const int e = static_cast<int>(v[i]);
    if (static_cast<float>(e) != v[i] || e < 0 || e >= n || seen[e]++) return false;
  }
  return true;
}

int check(bool ok, const char* what) {
  std::printf("%s %s\n", ok ? "ok" : "FAIL", what);
  return ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return 2;
  const std::string_view which = argv[1];
  if (which == "reverse") {
    const int blocks = 3, n = 96;
    std::vector<float> in(blocks * n), out(blocks * n, -1.0f);
    for (int i = 0; i < blocks * n; ++i) in[i] = static_cast<float>(i);
    reverse_kernel<<<blocks, n>>>(in.data(), out.data());
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int b = 0; b < blocks; ++b)
      for (int i = 0; i < n; ++i) ok = ok && out[b * n + i] == in[b * n + n - 1 - i];
    return check(ok, "reverse through shared memory");
  }
  if (which == "butterfly") {
    const int blocks = 2, n = 64;
    std::vector<float> in(blocks * n), out(blocks * n), swapped(blocks * n);
    for (int i = 0; i < blocks * n; ++i) in[i] = static_cast<float>(i * i % 97);
    butterfly_kernel<<<dim3(blocks), dim3(n), 0, nullptr>>>(in.data(), out.data(), swapped.data());
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int i = 0; i < blocks * n; ++i) {
      float warp_sum = 0.0f;
      for (int j = i / 32 * 32; j < i / 32 * 32 + 32; ++j) warp_sum += in[j];
      ok = ok && out[i] == warp_sum && swapped[i] == in[i ^ 5];
    }
    return check(ok, "xor butterfly and lane exchange");
  }
  if (which == "divergent") {
    std::vector<float> out(64);
    divergent_kernel<<<1, 64>>>(out.data());
    return report("divergent");
  }
  if (which == "two_sites") {
    std::vector<float> out(64);
    two_sites_kernel<<<1, 64>>>(out.data());
    return report("two_sites");
  }
  if (which == "split_shuffle") {
    std::vector<float> out(32);
    split_shuffle_kernel<<<1, 32>>>(out.data());
    return report("split_shuffle");
  }
  if (which == "misaligned") {
    alignas(16) float in[8] = {};
    std::vector<float> out(32);
    misaligned_kernel<<<1, 32>>>(in, out.data());
    return report("misaligned");
  }
  if (which == "out_of_bounds") {
    const int n = 32;
    std::vector<float> out(n);
    float* in = new float[n]();
    out_of_bounds_kernel<<<1, n>>>(in, out.data(), n);
    delete[] in;
    return report("out_of_bounds");
  }
  if (which == "syncwarp") {
    const int n = 128;
    std::vector<float> in(n), out(n, -1.0f);
    for (int i = 0; i < n; ++i) in[i] = static_cast<float>(3 * i + 1);
    syncwarp_kernel<<<1, n>>>(in.data(), out.data());
    bool ok = cudaGetLastError() == cudaSuccess;
    for (int i = 0; i < n; ++i) ok = ok && out[i] == in[i ^ 1];
    return check(ok, "__syncwarp orders a warp's shared memory");
  }
  if (which == "split_syncwarp" || which == "syncwarp_mask") {
    std::vector<float> out(64);
    if (which == "split_syncwarp") {
      split_syncwarp_kernel<<<1, 64>>>(out.data());
    } else {
      syncwarp_mask_kernel<<<1, 64>>>(out.data());
    }
    return report(argv[1]);
  }
  if (which == "attributes") {
    int major = -1, minor = -1, other = -1;
    bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0) == cudaSuccess && major == 9;
    ok = ok && cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0) == cudaSuccess && minor == 0;
    ok = ok && cudaGetLastError() == cudaSuccess;
    ok = ok && cudaDeviceGetAttribute(&other, static_cast<cudaDeviceAttr>(16), 0) == cudaErrorInvalidValue;
    ok = ok && other == -1 && cudaGetLastError() == cudaErrorInvalidValue && cudaGetLastError() == cudaSuccess;
    // The binding passes torch's device index of h, -1 for the simulation's CPU tensors.
    ok = ok && cudaDeviceGetAttribute(&other, cudaDevAttrComputeCapabilityMajor, -1) == cudaSuccess && other == 9;
    return check(ok, "cudaDeviceGetAttribute: sm_90");
  }
  if (which == "wmma_gemm") {
    Buffer a(kM * kK), at(kM * kK), b(kK * kN), bt(kK * kN), c0(kM * kN), c0t(kM * kN), d(kM * kN), dt(kM * kN);
    uint64_t state = 12345;
    auto next = [&state] {  // full-mantissa values in (-2, 2), so that TF32 rounding and truncation both matter
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      return static_cast<float>(static_cast<int64_t>(state >> 33) - (int64_t{1} << 30)) * 0x1.0p-29f;
    };
    for (int m = 0; m < kM; ++m)
      for (int k = 0; k < kK; ++k) a.p[m * kK + k] = at.p[k * kM + m] = next();
    for (int k = 0; k < kK; ++k)
      for (int n = 0; n < kN; ++n) b.p[k * kN + n] = bt.p[n * kK + k] = next();
    for (int m = 0; m < kM; ++m)
      for (int n = 0; n < kN; ++n) c0.p[m * kN + n] = c0t.p[n * kM + m] = next() * 4.0f;
    // NaN and inf propagate: a NaN whose payload is in the low 13 bits only (truncation must not make it inf), an inf.
    a.p[3 * kK + 5] = at.p[5 * kM + 3] = INFINITY;
    b.p[7 * kN + 40] = bt.p[40 * kK + 7] = float_of(0x7f800001u);
    wmma_gemm_kernel<<<1, 6 * 32>>>(GemmArgs{a.p, at.p, b.p, bt.p, c0.p, c0t.p, d.p, dt.p});
    bool ok = cudaGetLastError() == cudaSuccess;
    int bad = 0, nans = 0;
    for (int m = 0; m < kM; ++m) {
      for (int n = 0; n < kN; ++n) {
        float acc = c0.p[m * kN + n];
        for (int k = 0; k < kK; ++k)
          acc = fmaf(wmma::__float_to_tf32(a.p[m * kK + k]), truncate_tf32(b.p[k * kN + n]), acc);
        acc *= 0.5f;
        nans += std::isnan(acc);
        bad += !same(d.p[m * kN + n], acc) || !same(dt.p[n * kM + m], acc);
      }
    }
    ok = ok && bad == 0 && nans > 0;
    std::printf("%s wmma tf32 GEMM, both layouts of every operand (%d of %d elements differ, %d NaN)\n",
                ok ? "ok" : "FAIL", bad, kM * kN, nans);
    return ok ? 0 : 1;
  }
  if (which == "wmma_mapping") {
    Buffer index(256), out(768);
    for (int i = 0; i < 256; ++i) index.p[i] = static_cast<float>(i);
    wmma_mapping_kernel<<<1, 32>>>(index.p, out.p);
    bool ok = cudaGetLastError() == cudaSuccess;
    ok = ok && bijection(out.p, 128) && bijection(out.p + 128, 128) && bijection(out.p + 256, 256);
    // Not the obvious orders: lane-major row-major or column-major.
    int row_major = 0, col_major = 0;
    for (int s = 0; s < 256; ++s) {
      row_major += out.p[256 + s] == static_cast<float>(s);
      col_major += out.p[256 + s] == static_cast<float>(s % 16 * 16 + s / 16);
    }
    ok = ok && row_major < 8 && col_major < 8;
    for (int s = 512; s < 768; ++s) ok = ok && out.p[s] == -1.5f;
    return check(ok, "wmma fragments: a scrambled bijection; fill_fragment");
  }
  if (which == "wmma_misaligned" || which == "wmma_bad_ldm" || which == "wmma_pointers" ||
      which == "wmma_half_warp") {
    Buffer in(512);
    std::vector<float> out(64);
    if (which == "wmma_misaligned") wmma_misaligned_kernel<<<1, 32>>>(in.p, out.data());
    if (which == "wmma_bad_ldm") wmma_bad_ldm_kernel<<<1, 32>>>(in.p, out.data());
    if (which == "wmma_pointers") wmma_pointers_kernel<<<1, 32>>>(in.p, out.data());
    if (which == "wmma_half_warp") wmma_half_warp_kernel<<<1, 64>>>(in.p, out.data());
    return report(argv[1]);
  }
  if (which == "wmma_split") {
    std::vector<float> out(32);
    wmma_split_kernel<<<1, 32>>>(out.data());
    return report("wmma_split");
  }
  if (which == "tf32" && argc == 3) {
    FILE* f = std::fopen(argv[2], "rb");
    if (f == nullptr) return 2;
    uint32_t u;
    while (std::fread(&u, 4, 1, f) == 1) std::printf("%08x\n", bits_of(wmma::__float_to_tf32(float_of(u))));
    std::fclose(f);
    return 0;
  }
  if (which == "convert" && argc == 3) {
    FILE* f = std::fopen(argv[2], "rb");
    if (f == nullptr) return 2;
    std::vector<uint32_t> bits;
    uint32_t u;
    while (std::fread(&u, 4, 1, f) == 1) bits.push_back(u);
    std::fclose(f);
    for (uint32_t b : bits) {
      float x;
      std::memcpy(&x, &b, 4);
      const __half h = __float2half_rn(x);
      const __nv_bfloat16 bf = __float2bfloat16_rn(x);
      const float h_back = __half2float(h), bf_back = __bfloat162float(bf);
      uint32_t hb, bb;
      std::memcpy(&hb, &h_back, 4);
      std::memcpy(&bb, &bf_back, 4);
      std::printf("%04x %04x %08x %08x\n", h.bits, bf.bits, hb, bb);
    }
    return 0;
  }
  return 2;
}
