// Self-test of csrc/sim (tests/test_cuda_sim.py): small kernels that exercise what the simulator promises, in CUDA
// syntax, translated and compiled for the CPU the way reft_fast.cuda_backend builds csrc/. One case per run:
//   selftest CASE [FILE]
// prints "ok ..." or "FAIL ..." for the semantic cases, the launch error for the fault cases, and for `convert` reads
// float32 bit patterns (uint32, little endian) from FILE and writes their __half and __nv_bfloat16 bits to stdout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
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

namespace {

int report(const char* name) {
  const cudaError_t e = cudaGetLastError();
  std::printf("%s: %s\n", name, e == cudaSuccess ? "no error" : cudaGetErrorString(e));
  return 0;
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
