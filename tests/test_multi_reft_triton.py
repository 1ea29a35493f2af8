"""Several ReFTs in one batch on the Triton backend: one launch edits each example with its own entry.

The reference of an example is the torch backend's single edit with that example's entry alone (``low_rank_edit``):
the entries differ in member of the family, rank and activation, some examples have no entry (−1), and the hidden
size is odd and spans two column tiles of the interpreter. Tolerances: fp32 1e-5 (the kernel sums its products in
another order); bf16 one unit in the last place (2⁻⁷ relative: Triton's interpreter truncates fp32 → bf16 where
torch rounds).
"""

import pytest
import torch

from reft_fast import ops
from reft_fast.kernels import low_rank_edit as kernels

from launch_count import DeviceWork
from reference import DEVICE, make_params, make_positions, triton_on_tf32

pytestmark = pytest.mark.usefixtures("fresh_seed")

B, T, D = 6, 9, 301
# (family, rank, activation, positions per example): 6 examples × 7 positions = 42 slots, two slot blocks of the
# interpreter for the first entry
ENTRIES = [("loreft", 5, "relu", 7), ("lobireft", 2, None, 3), ("nodireft", 3, "tanh", 2)]
EDIT_INDEX = [0, 2, -1, 1, 0, -1]
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2**-7, atol=1e-5)}
# On a GPU, 16-bit h takes TF32 products (reference.triton_on_tf32): the parameters' 2^-11 rounding moves an output by
# up to ~4e-4 absolute (seen under emulation), which near zero is more than a bf16 ulp (tests/test_tf32_accuracy.py
# runs these at TF32).
TF32_TOLERANCE = dict(rtol=2**-7, atol=1e-3)


def _tolerance(dtype: torch.dtype) -> dict:
    return TF32_TOLERANCE if triton_on_tf32("triton", dtype) else TOLERANCE[dtype]


BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


def _mixed_batch(dtype):
    """(h, positions per entry, edit_index, edits): an unedited example's first row holds NaN and −0.0."""
    edits, positions = [], []
    for family, rank, act, n in ENTRIES:
        params = make_params(family, rank, D)
        edits.append(dict(params, act=act))
        positions.append(make_positions(B, T, n, empty_row=False))
    h = torch.randn(B, T, D, device=DEVICE).to(dtype)
    h[2, 0, :2] = torch.tensor([float("nan"), -0.0])
    return h, positions, torch.tensor(EDIT_INDEX, device=DEVICE), edits


def _check_rows(out, h, positions, edit_index, edits):
    """Each example equals its entry's single torch edit (within TOLERANCE); −1 examples are h, bit for bit."""
    bits = BITS[h.dtype]
    for b, k in enumerate(edit_index.tolist()):
        if k < 0:
            assert torch.equal(out[b].view(bits), h[b].view(bits)), f"example {b} (no entry) was written"
            continue
        alone = ops.low_rank_edit(h, positions[k], **edits[k], backend="torch")[b]
        torch.testing.assert_close(out[b], alone, **_tolerance(h.dtype), msg=f"example {b}, entry {k}")
        unselected = torch.ones(T, dtype=torch.bool, device=DEVICE)
        unselected[positions[k][b][positions[k][b] >= 0]] = False
        assert torch.equal(out[b, unselected].view(bits), h[b, unselected].view(bits)), f"example {b}"
        assert not torch.equal(out[b], h[b]), f"entry {k} left example {b} unedited"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_launch_writes_every_row_of_a_poisoned_output(dtype):
    h, positions, edit_index, edits = _mixed_batch(dtype)
    before = h.clone()
    out = torch.full_like(h, float("nan"))
    positions[1] = positions[1].int()  # any integer dtype, as the single edit takes
    entries = [(e["Q"], e.get("P"), e.get("W"), e["b"], ops.ACTIVATIONS[e["act"]], p) for e, p in zip(edits, positions)]
    with torch.no_grad():
        kernels.multi_edit_forward(h, edit_index, entries, out)
    assert torch.equal(h.view(BITS[dtype]), before.view(BITS[dtype])), "h was modified"
    assert torch.isnan(out).sum() == 1, "a row of out was left unwritten"  # the NaN h holds, copied
    _check_rows(out, h, positions, edit_index, edits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backend_each_example_its_own_entry_in_one_launch(dtype):
    h, positions, edit_index, edits = _mixed_batch(dtype)
    with torch.no_grad(), DeviceWork() as work:
        out = ops.multi_low_rank_edit(h, positions, edit_index, edits, backend="triton", validate=False)
    # on a GPU the entry table (K rows of addresses and sizes) also travels host → device, without a sync
    table_copy = {"aten._to_copy": 1} if h.is_cuda else {}
    assert dict(work.kernels) == {"triton._multi_edit_forward_kernel": 1, **table_copy}, dict(work.kernels)
    assert work.syncs == [], work.syncs
    _check_rows(out, h, positions, edit_index, edits)
    with torch.no_grad():  # the torch backend's mixed batch agrees, and an entry of no example changes nothing
        torch.testing.assert_close(out, ops.multi_low_rank_edit(h, positions, edit_index, edits, backend="torch"),
                                   **_tolerance(dtype), equal_nan=True)
        unused = ops.multi_low_rank_edit(h, [*positions, positions[0]], edit_index, [*edits, edits[1]],
                                         backend="triton")
        assert torch.equal(unused.view(BITS[dtype]), out.view(BITS[dtype]))
    with pytest.raises(RuntimeError, match="inference only"):
        ops.multi_low_rank_edit(h, positions, edit_index, [{**edits[0], "b": edits[0]["b"].clone().requires_grad_()},
                                                           *edits[1:]], backend="triton")
