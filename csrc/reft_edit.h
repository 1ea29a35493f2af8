// Host interface of the CUDA kernels for the ReFT edit (see csrc/README.md for the math and the kernel layout).
//
// Raw pointers and explicit shapes only: no CUDA and no torch headers, so that binding.cpp (the torch side) compiles
// with a plain C++ compiler and the .cu files compile without torch. The stream travels as an opaque pointer.
#pragma once

#include <cstdint>

namespace reft_fast {

// dtype of h, out, grad_out and grad_h; every parameter and gradient is float32.
enum class HDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Activation codes, as reft_fast.ops.ACTIVATIONS numbers them.
enum Activation : int { kIdentity = 0, kRelu = 1, kGelu = 2, kSilu = 3, kTanh = 4 };

// Largest rank the kernels keep in registers (ranks are padded up to 4, 8, 16, 32 or 64).
constexpr int64_t kMaxRank = 64;

struct EditProblem {
  HDType dtype;
  int64_t batch;        // B
  int64_t seq_len;      // T
  int64_t hidden;       // d
  int64_t n_positions;  // n: positions per example
  int64_t rank;         // r, 1..kMaxRank
  const void* h;                // forward: [B, T, d] contiguous, dtype; backward: the compact [B, n, d] copy of the
                                //   selected rows (h[b, positions[b, j]] at [b, j]), which is all backward reads of h
  const int64_t* positions;     // [B, n] contiguous; -1 = no position, no repeats within a row
  const float* Q;               // [r, d]
  const float* P;               // [r, d] or nullptr (s = 0)
  const float* W;               // [r, d] or nullptr (z = b)
  const float* b;               // [r] or nullptr; W and b are never both null
  int activation;               // Activation
  float dropout;                // p in [0, 1)
  uint64_t seed;                // keys the counter-based dropout stream
  int rows_per_block = 0;       // slots per block of the rows kernels: 0 = chosen from the shape; 1 = one; 2..15 = four
                                //   where the padded rank is ≤ 8 (one otherwise); ≥ 16 = the tensor-core tile kernels
                                //   for 16-bit h on sm_80+ (as 4 otherwise). For A/B timing (host::rows_per_block).
  int device;                   // CUDA device ordinal of every pointer
  void* stream;                 // cudaStream_t the kernels are queued on
};

// Each launcher returns nullptr on success, or a static message (a CUDA error string or a bad-argument description).

// out[b, positions[b, j]] = dropout(h + δQ) for every selected row; nothing else of `out` is written.
const char* launch_edit_forward(const EditProblem& p, void* out);

// Size in floats of the scratch buffer launch_edit_backward needs (per-row coefficients + per-split partial sums).
int64_t edit_backward_workspace_floats(const EditProblem& p);

// Writes grad_h at the selected rows and the float32 gradients dQ [r, d], dP [r, d] (when P), dW [r, d] (when W),
// db [r] (when b), which are overwritten, not accumulated into. `workspace` holds edit_backward_workspace_floats(p)
// floats and needs no initialization. Deterministic: no atomics, fixed summation order for a given shape.
const char* launch_edit_backward(const EditProblem& p, const void* grad_out, void* grad_h, float* dQ, float* dP,
                                 float* dW, float* db, float* workspace);

}  // namespace reft_fast
