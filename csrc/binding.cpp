// Torch binding of the CUDA kernels: checks the tensors, allocates the gradients and the backward workspace, and calls
// the launchers of reft_edit.h. It includes no CUDA header (the stream arrives from Python as an integer and the
// launchers select the device), so it also compiles against a CPU-only torch: CI compiles it without a GPU.
//
// Built with REFT_FAST_CUDA_SIM defined, the same kernels run on the CPU through csrc/sim (cuda_sim.h): the binding then
// takes CPU tensors, and fills every buffer it allocates with NaN first, so an element no kernel writes shows up.
#include <torch/extension.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "reft_edit.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

reft_fast::HDType h_dtype(const at::Tensor& h) {
  if (h.scalar_type() == at::kBFloat16) return reft_fast::HDType::kBFloat16;
  if (h.scalar_type() == at::kHalf) return reft_fast::HDType::kFloat16;
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat, "h must be float32, bfloat16 or float16, got ", h.scalar_type());
  return reft_fast::HDType::kFloat32;
}

void check_on_device_of_h(const char* name, const at::Tensor& t, const at::Tensor& h) {
  TORCH_CHECK_VALUE(t.device() == h.device(), name, " is on ", t.device(), " but h is on ", h.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

void check_param(const char* name, const at::Tensor& t, const at::Tensor& h, at::IntArrayRef shape) {
  check_on_device_of_h(name, t, h);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// A tensor shaped and typed like h, in its own memory: the kernels read `source` after writing `name`.
void check_like_h(const char* name, const at::Tensor& t, const at::Tensor& h, const char* source_name,
                  const at::Tensor& source) {
  check_on_device_of_h(name, t, h);
  TORCH_CHECK_TYPE(t.scalar_type() == h.scalar_type(), name, " must have h's dtype ", h.scalar_type(), ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == h.sizes(), name, " must have h's shape ", h.sizes(), ", got ", t.sizes());
  TORCH_CHECK_VALUE(!t.is_alias_of(source), name, " must not share memory with ", source_name,
                    " (pass a copy: only the selected rows are overwritten)");
}

const float* float_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// A float32 buffer the kernels overwrite; NaN-filled under the simulator (see the top of this file).
at::Tensor output_buffer(at::IntArrayRef shape, const at::TensorOptions& opts) {
#ifdef REFT_FAST_CUDA_SIM
  return at::full(shape, std::numeric_limits<float>::quiet_NaN(), opts);
#else
  return at::empty(shape, opts);
#endif
}

reft_fast::EditProblem make_problem(const at::Tensor& h, const at::Tensor& positions, const at::Tensor& Q,
                                    const OptTensor& P, const OptTensor& W, const OptTensor& b, int64_t act,
                                    double dropout, int64_t seed, int64_t stream, int64_t rows_per_block) {
#ifdef REFT_FAST_CUDA_SIM
  TORCH_CHECK_VALUE(h.is_cpu(), "the cuda backend's CPU simulator (REFT_FAST_CUDA_SIM) needs CPU tensors, but h is on ",
                    h.device());
#else
  TORCH_CHECK_VALUE(h.is_cuda(), "the cuda backend needs CUDA tensors, but h is on ", h.device());
#endif
  TORCH_CHECK_VALUE(h.dim() == 3, "h must be 3-D [batch, seq, hidden], got shape ", h.sizes());
  TORCH_CHECK_VALUE(h.is_contiguous(), "h must be contiguous");
  const auto dtype = h_dtype(h);
  check_on_device_of_h("positions", positions, h);
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kLong, "positions must be int64, got ", positions.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == h.size(0),
                    "positions must be [batch, n_positions] with h's batch ", h.size(0), ", got ", positions.sizes());
  TORCH_CHECK_VALUE(Q.dim() == 2 && Q.size(1) == h.size(2), "Q must be [rank, ", h.size(2), "], got ", Q.sizes());
  const int64_t r = Q.size(0), d = h.size(2);
  TORCH_CHECK_VALUE(r >= 1 && r <= reft_fast::kMaxRank, "the cuda backend supports rank 1 to ", reft_fast::kMaxRank,
                    ", got ", r);
  check_param("Q", Q, h, {r, d});
  if (P) check_param("P", *P, h, {r, d});
  if (W) check_param("W", *W, h, {r, d});
  if (b) check_param("b", *b, h, {r});
  TORCH_CHECK_VALUE(W.has_value() || b.has_value(), "the learned source needs W, b or both");
  TORCH_CHECK_VALUE(act >= reft_fast::kIdentity && act <= reft_fast::kTanh, "unknown activation code ", act);
  TORCH_CHECK_VALUE(dropout >= 0.0 && dropout < 1.0, "dropout must be in [0, 1), got ", dropout);
  TORCH_CHECK_VALUE(rows_per_block >= 0 && rows_per_block <= 64, "rows_per_block must be 0 (from the shape) or 1..64, got ",
                    rows_per_block);

  reft_fast::EditProblem p;
  p.dtype = dtype;
  p.batch = h.size(0);
  p.seq_len = h.size(1);
  p.hidden = d;
  p.n_positions = positions.size(1);
  p.rank = r;
  p.h = h.data_ptr();
  p.positions = positions.data_ptr<int64_t>();
  p.Q = Q.data_ptr<float>();
  p.P = float_ptr(P);
  p.W = float_ptr(W);
  p.b = float_ptr(b);
  p.activation = static_cast<int>(act);
  p.dropout = static_cast<float>(dropout);
  p.seed = static_cast<uint64_t>(seed);
  p.rows_per_block = static_cast<int>(rows_per_block);
  p.device = h.get_device();
  p.stream = reinterpret_cast<void*>(static_cast<uintptr_t>(stream));
  return p;
}

void edit_forward(const at::Tensor& h, const at::Tensor& positions, const at::Tensor& Q, const OptTensor& P,
                  const OptTensor& W, const OptTensor& b, int64_t act, double dropout, int64_t seed, at::Tensor& out,
                  int64_t stream, int64_t rows_per_block) {
  const auto p = make_problem(h, positions, Q, P, W, b, act, dropout, seed, stream, rows_per_block);
  check_like_h("out", out, h, "h", h);
  if (const char* error = reft_fast::launch_edit_forward(p, out.data_ptr())) {
    TORCH_CHECK(false, "reft_fast cuda backend, forward: ", error);
  }
}

// h_rows is the compact copy of the selected rows of h, [B, n, d] (h[b, positions[b, j]] at [b, j]): all that the
// backward reads of h. grad_out gives the problem's shape [B, T, d].
std::tuple<at::Tensor, OptTensor, OptTensor, OptTensor> edit_backward(
    const at::Tensor& h_rows, const at::Tensor& grad_out, const at::Tensor& positions, const at::Tensor& Q,
    const OptTensor& P, const OptTensor& W, const OptTensor& b, int64_t act, double dropout, int64_t seed,
    at::Tensor& grad_h, int64_t stream, int64_t rows_per_block) {
  auto p = make_problem(grad_out, positions, Q, P, W, b, act, dropout, seed, stream, rows_per_block);
  check_on_device_of_h("h_rows", h_rows, grad_out);
  TORCH_CHECK_TYPE(h_rows.scalar_type() == grad_out.scalar_type(), "h_rows must have grad_out's dtype ",
                   grad_out.scalar_type(), ", got ", h_rows.scalar_type());
  const std::vector<int64_t> rows_shape{p.batch, p.n_positions, p.hidden};
  TORCH_CHECK_VALUE(h_rows.sizes() == at::IntArrayRef(rows_shape), "h_rows must have shape ",
                    at::IntArrayRef(rows_shape), " [batch, n_positions, hidden], got ", h_rows.sizes());
  p.h = h_rows.data_ptr();
  check_like_h("grad_h", grad_h, grad_out, "grad_out", grad_out);
  const auto opts = grad_out.options().dtype(at::kFloat);
  at::Tensor dQ = output_buffer({p.rank, p.hidden}, opts);
  OptTensor dP, dW, db;
  if (P) dP = output_buffer({p.rank, p.hidden}, opts);
  if (W) dW = output_buffer({p.rank, p.hidden}, opts);
  if (b) db = output_buffer({p.rank}, opts);
  const int64_t workspace_floats = reft_fast::edit_backward_workspace_floats(p);
  at::Tensor workspace = output_buffer({workspace_floats}, opts);
  if (const char* error = reft_fast::launch_edit_backward(
          p, grad_out.data_ptr(), grad_h.data_ptr(), dQ.data_ptr<float>(), dP ? dP->data_ptr<float>() : nullptr,
          dW ? dW->data_ptr<float>() : nullptr, db ? db->data_ptr<float>() : nullptr,
          workspace_floats > 0 ? workspace.data_ptr<float>() : nullptr)) {
    TORCH_CHECK(false, "reft_fast cuda backend, backward: ", error);
  }
  return {dQ, dP, dW, db};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of the ReFT edit (reft_fast backend 'cuda'); see csrc/README.md";
  m.def("edit_forward", &edit_forward,
        "Overwrite out[b, positions[b, j]] with dropout(h + δQ) at every selected row; out is a copy of h.",
        py::arg("h"), py::arg("positions"), py::arg("Q"), py::arg("P"), py::arg("W"), py::arg("b"), py::arg("act"),
        py::arg("dropout"), py::arg("seed"), py::arg("out"), py::arg("stream"), py::arg("rows_per_block") = 0);
  m.def("edit_backward", &edit_backward,
        "Overwrite grad_h (a copy of grad_out) at the selected rows; return (dQ, dP, dW, db) in float32.",
        py::arg("h"), py::arg("grad_out"), py::arg("positions"), py::arg("Q"), py::arg("P"), py::arg("W"),
        py::arg("b"), py::arg("act"), py::arg("dropout"), py::arg("seed"), py::arg("grad_h"), py::arg("stream"),
        py::arg("rows_per_block") = 0);
}
