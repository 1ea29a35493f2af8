"""Backend ``cuda``: the CUDA C++ twin of the Triton kernels (``csrc/``), built on first use by
``reft_fast.ops.cuda_build``; with REFT_FAST_CUDA_SIM=1 the same kernels run on CPU tensors through csrc/sim."""

from __future__ import annotations

from typing import Optional

import torch

from reft_fast.ops import cuda_build
from reft_fast.ops.backend import EditGrads, EditParams, register_backend, selected_rows

__all__ = ["CudaBackend"]


class CudaBackend:
    name = "cuda"

    def prefers(self, device: torch.device) -> bool:
        return False  # opt-in: triton is the default on CUDA

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        simulated = cuda_build.simulation() is not None
        if simulated and device.type != "cpu":
            return (f"backend 'cuda' under {cuda_build.SIM_ENV} (the CPU simulation) needs CPU tensors, "
                    f"h is on {device}")
        if not simulated and device.type != "cuda":
            return (f"backend 'cuda' needs CUDA tensors, but h is on {device} (or set {cuda_build.SIM_ENV}=1 to run "
                    "its kernels on the CPU through csrc/sim)")
        return None

    def kernels(self):
        """The module of launch functions (``edit_forward``, ``edit_backward``), built on first use."""
        return cuda_build

    def forward(self, h, positions, edit: EditParams):
        out = h.clone()  # the one copy: unselected rows are this copy of h, the kernels overwrite the selected ones
        cuda_build.edit_forward(h, positions, edit.Q, edit.P, edit.W, edit.b, edit.act, edit.dropout, edit.seed, out)
        return out, selected_rows(h, positions)

    def backward(self, h_rows, grad_out, positions, edit: EditParams) -> EditGrads:
        grad_h = grad_out.clone()  # unselected rows pass the gradient straight through
        dQ, dP, dW, db = cuda_build.edit_backward(h_rows, grad_out, positions, edit.Q, edit.P, edit.W, edit.b,
                                                  edit.act, edit.dropout, edit.seed, grad_h)
        if edit.P is edit.Q:  # one tensor: its whole gradient in Q (see EditGrads)
            dQ, dP = dQ + dP, None
        return EditGrads(grad_h, dQ, dP, dW, db)


register_backend(CudaBackend())
