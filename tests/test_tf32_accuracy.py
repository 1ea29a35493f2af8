"""The Triton kernels' accuracy with the dot precision they compile with on a GPU, checked on the CPU.

On CUDA, 16-bit h takes TF32 tensor-core dots (kernels/low_rank_edit.py, launch_config); Triton's interpreter, which
runs the kernels here, computes every dot in fp32 whatever its precision. These tests give the interpreter the GPU's
precision choice and round each fp32 operand of a TF32 dot to TF32 (10-bit mantissa, round to nearest even, as
Triton's own interpreter rounds TF32 tensor-map loads), then hold the outputs and every gradient to the float64
reference with the tolerances the GPU runs use (tests/test_ops.py: TF32_WEIGHT_TOL for the weight gradients).
"""

import numpy as np
import pytest
import torch

import test_kernels
import test_multi_reft_triton
import test_ops
from reference import FAMILY

from reft_fast.kernels import low_rank_edit as kernels

interpreter = pytest.importorskip("triton.runtime.interpreter")

pytestmark = pytest.mark.skipif(not kernels._INTERPRETED, reason="emulates TF32 in Triton's interpreter")


def _to_tf32(handle):
    if handle.data.dtype != np.float32:
        return handle  # bf16/fp16 operands are exact in TF32
    return interpreter.TensorHandle(interpreter._round_f32_to_tf32(handle.data), handle.dtype)


@pytest.fixture
def gpu_precision(monkeypatch):
    """The interpreter with the GPU's dot precision: launch_config's compiled choice, TF32 operands rounded. Yields
    the list of dot precisions the kernels asked for."""
    asked = []
    dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        name = str(input_precision).rsplit(".", 1)[-1].upper()
        asked.append(name)
        if name == "TF32":
            a, b = _to_tf32(a), _to_tf32(b)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreted_config = kernels.launch_config

    def launch_config(d, r, h_dtype, interpreted=kernels._INTERPRETED):
        block_m, block_d, block_r, warps, _ = interpreted_config(d, r, h_dtype, interpreted)
        return block_m, block_d, block_r, warps, interpreted_config(d, r, h_dtype, interpreted=False)[4]

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(kernels, "launch_config", launch_config)
    kernels._plan.cache_clear()  # the plans hold the precision
    yield asked
    kernels._plan.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", list(FAMILY))
@pytest.mark.parametrize("r,d", [(4, 130), (8, 1031), (32, 130)])
def test_tf32_products_stay_within_the_gpu_tolerances(gpu_precision, family, dtype, r, d):
    act = "gelu" if FAMILY[family][0] else None
    test_ops.check_against_reference("triton", family, act, dtype, B=3, T=6, n=3, r=r, d=d)
    assert gpu_precision and set(gpu_precision) == {"TF32"}, set(gpu_precision)


def test_the_emulation_rounds(gpu_precision):
    """The emulated run differs from the exact one (so the test above checks TF32, not fp32), and fp32 h keeps exact
    fp32 products."""
    params = test_ops.make_params("loreft", 8, 130)
    positions = test_ops.make_positions(2, 5, 3)
    h = torch.randn(2, 5, 130).to(torch.bfloat16)
    emulated = test_ops.run_op(h, positions, {**params, "P": params["Q"]}, "triton").float()
    assert set(gpu_precision) == {"TF32"}
    with pytest.MonkeyPatch.context() as exact:
        exact.setattr(interpreter, "_round_f32_to_tf32", lambda data: data)
        kernels._plan.cache_clear()
        test_ops.run_op(h.float(), positions, {**params, "P": params["Q"]}, "triton")  # fp32 h: "ieee" dots
        unrounded = test_ops.run_op(h, positions, {**params, "P": params["Q"]}, "triton").float()
    assert not torch.equal(emulated, unrounded)
    assert "IEEE" in gpu_precision and test_ops.triton_on_tf32("triton", torch.float32) is False


@pytest.mark.parametrize("family", ["loreft", "nodireft", "lobireft"])
def test_the_kernel_tests_hold_at_tf32(gpu_precision, fresh_seed, family):
    """tests/test_kernels.py's checks of the launch functions at bf16 (poisoned outputs, the copy of unselected rows),
    which run at TF32 on a GPU."""
    test_kernels.test_poisoned_outputs_forward_and_backward(torch.bfloat16, family)
    test_kernels.test_copy_unselected_writes_every_row_once(torch.bfloat16, "few" if family == "loreft" else "many")
    assert set(gpu_precision) == {"TF32"}


def test_the_mixed_batch_kernel_holds_at_tf32(gpu_precision, fresh_seed):
    """tests/test_multi_reft_triton.py's bf16 checks of the one-launch mixed batch (its dots take TF32 on a GPU)."""
    test_multi_reft_triton.test_one_launch_writes_every_row_of_a_poisoned_output(torch.bfloat16)
    test_multi_reft_triton.test_triton_backend_each_example_its_own_entry_in_one_launch(torch.bfloat16)
    assert set(gpu_precision) == {"TF32"}
