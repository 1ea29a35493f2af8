"""Backend ``triton``: the fused Triton kernels of ``kernels/low_rank_edit.py``, the default on CUDA.

On the CPU they run only through Triton's interpreter (TRITON_INTERPRET=1, read by Triton at import), which the
tests use. The kernels are imported on the first edit, so importing reft_fast does not import Triton.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch

from reft_fast.ops.backend import EditGrads, EditParams, MultiEdit, register_backend

__all__ = ["TritonBackend"]


class TritonBackend:
    name = "triton"
    kernel_module = "reft_fast.kernels.low_rank_edit"

    def prefers(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        # (checked on every edit: once triton is imported, sys.modules answers without a search of the path)
        if "triton" not in sys.modules and importlib.util.find_spec("triton") is None:
            return "backend 'triton' needs the triton package (pip install triton; Linux x86_64 wheels)"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return (f"backend 'triton' needs CUDA tensors (h is on {device}); on the CPU it runs only through Triton's "
                    "interpreter: set TRITON_INTERPRET=1 before importing reft_fast")
        return None

    _kernels = None

    def kernels(self):
        """The module of launch functions (``edit_forward``, ``edit_backward``, ``multi_edit_forward``), imported on
        first use and kept (``import_module`` costs a microsecond on each of the two calls per edit)."""
        if self._kernels is None:
            self._kernels = importlib.import_module(self.kernel_module)
        return self._kernels

    def forward(self, h, positions, edit: EditParams):
        # The kernels write all of out (edited rows, and a copy of the others) and the rows backward needs.
        out = torch.empty_like(h)
        h_rows = h.new_empty(positions.shape[0], positions.shape[1], h.shape[2])
        self.kernels().edit_forward(h, positions, edit.Q, edit.P, edit.W, edit.b, edit.act, edit.dropout, edit.seed,
                                    out, h_rows=h_rows, copy_unselected=True)
        return out, h_rows

    def forward_in_place(self, h, positions, edit: EditParams) -> torch.Tensor:
        # The write programs read each selected row before writing it (and keep it in h_rows); no other program
        # touches that row, so out may be h.
        h_rows = h.new_empty(positions.shape[0], positions.shape[1], h.shape[2])
        self.kernels().edit_forward(h, positions, edit.Q, edit.P, edit.W, edit.b, edit.act, edit.dropout, edit.seed,
                                    h, h_rows=h_rows)
        return h_rows

    def backward_in_place(self, h_rows, grad_out, positions, edit: EditParams) -> EditGrads:
        grads = self.kernels().edit_backward(h_rows, grad_out, positions, edit.Q, edit.P, edit.W, edit.b, edit.act,
                                             edit.dropout, edit.seed, grad_out)
        return EditGrads(grad_out, *grads)

    def forward_multi(self, h, multi: MultiEdit) -> torch.Tensor:
        # One launch writes every row of out: each example's rows edited by its own entry, the others copied.
        out = torch.empty_like(h)
        entries = [(e.Q, e.P, e.W, e.b, e.act, positions) for e, positions in zip(multi.entries, multi.positions)]
        self.kernels().multi_edit_forward(h, multi.edit_index, entries, out)
        return out

    def backward(self, h_rows, grad_out, positions, edit: EditParams) -> EditGrads:
        grad_h = torch.empty_like(grad_out)  # the kernels write every row: dh at the selected, grad_out elsewhere
        grads = self.kernels().edit_backward(h_rows, grad_out, positions, edit.Q, edit.P, edit.W, edit.b, edit.act,
                                             edit.dropout, edit.seed, grad_h, copy_unselected=True)
        return EditGrads(grad_h, *grads)


register_backend(TritonBackend())
