"""No host synchronization inside a training step of the recipe, and the parts that make it so.

A training step that reads a value back from the device makes the host wait until the device has drained its queue:
the next step's launches cannot be queued while the device runs, and on a GPU the step pays the launch latency of its
first kernels again. The recipe's step only queues work; the metrics of the steps since the last read are read at once
(``read_metrics``). Counted here on the CPU, at ZeRO stage 0 on one process, with a dispatch-mode counter
(tests/launch_count.py): every op that reads a value (``_local_scalar_dense`` behind ``.item()``/``float()``/
``bool()``), whose output shape depends on the data (``nonzero``, ...), or ``Tensor.tolist``.

What the CPU cannot show, and is checked otherwise:
  * ``torch.linalg.eigh`` (the "polar" orthogonalization) synchronizes on CUDA inside its kernel (torch documents it;
    there is no ``eigh_ex``): it is flagged by name, as the one sync of a polar step.
  * Blocking host→device copies. On CUDA, ``torch.tensor(values, device="cuda")`` waits for the stream; on the CPU it
    is no copy at all. DeepSpeed 0.19.8's ``clip_grad_norm_`` (deepspeed/runtime/utils.py, lines 422 and 424: the
    ``max_norm`` and ``1.0`` tensors), which its engine runs at ZeRO stage 0 in fp32 when gradient_clipping > 0, makes
    two such copies per optimizer step: the recipe clips there itself (``ds_config.take_gradient_clipping``), which
    is checked below by DeepSpeed's clipping being off and the norm arriving as a device tensor.
  * ZeRO stages 1–2 read values inside DeepSpeed's step: the overflow check (``overflow_gpu[0].item()``,
    deepspeed/runtime/zero/stage_1_and_2.py:3248) and ``is_invalid_grad_norm`` (``bool(...)`` on the norm,
    deepspeed/runtime/utils.py:233). Also DeepSpeed's own, and not covered by this stage-0 test.
Host reads that stay host reads on a GPU are allowed by where they happen: the ReftModel checks the intervention
locations while they are still on the host (``check_locations``; the recipe keeps them there for it), and the dropout
seeds come from torch's CPU generator (``draw_seed``).
"""

import math
import os
import traceback

import pytest
import torch

from dist.tiny import make_run
from launch_count import DeviceWork

# Reads of host tensors, on a GPU too, by a function on the stack (path suffix, function): the ReftModel checks the
# intervention locations on the host (the recipe leaves them there for it); dropout seeds come from torch's CPU
# generator. (The recipe's AdamW is fused, ``ds_config.client_adamw``: its step counter stays on the parameters'
# device and reads none; torch's other AdamW implementations keep it on the host and read it every step.)
HOST_ONLY_READS = {("reft_fast/core/positions.py", "check_locations"), ("reft_fast/ops/__init__.py", "draw_seed")}
# Syncs of a library the step calls, real on a GPU, excluded here by name (path suffix, function): transformers 5.24
# reads the position ids of a forward given no attention mask and no cache (a padded causal batch in training:
# ``loss.causal_model_inputs``) once, to see whether they restart (packed sequences). Given a padding mask it read
# that twice instead, to decide whether SDPA may run without it (``_ignore_causal_mask_sdpa``).
LIBRARY_SYNCS = {("transformers/masking_utils.py", "find_packed_sequence_indices"),
                 ("transformers/masking_utils.py", "_ignore_causal_mask_sdpa")}
# Ops that synchronize inside their CUDA kernel (invisible on the CPU): name → why.
CUDA_SYNCING_OPS = {"_linalg_eigh": "torch.linalg.eigh waits for the device on CUDA (torch's documentation)",
                    "_linalg_check_errors": "reads the info tensor of a factorization (torch.linalg.cholesky, ...)"}


class _SyncsWithStack(list):
    """DeviceWork's list of host syncs, each recorded with its stack as (path, function) pairs and its thread."""

    def append(self, name):
        import threading

        stack = [(frame.filename, frame.name) for frame in traceback.extract_stack()[:-1]]
        super().append((name, stack, threading.current_thread().name))


def _on_stack(stack, places) -> bool:
    return any(path.endswith(suffix) and function == name for path, function in stack for suffix, name in places)


def _count(fn):
    """(fn's result, the host syncs a GPU would make as (op, innermost frame), the in-kernel CUDA syncs, the
    library syncs excluded)."""
    work = DeviceWork()
    work.syncs = _SyncsWithStack()
    with work:
        result = fn()
    cuda_syncs = [name for name in work.kernels if name.removeprefix("aten.") in CUDA_SYNCING_OPS]
    device_syncs, library_syncs = [], []
    for name, stack, thread in work.syncs:
        # The batch thread builds host batches only (reft_fast.train.data.PrefetchedBatches): never a device read.
        if thread.startswith("reft-batches") or _on_stack(stack, HOST_ONLY_READS):
            continue
        (library_syncs if _on_stack(stack, LIBRARY_SYNCS) else device_syncs).append((name, stack[-1]))
    return result, device_syncs, cuda_syncs, library_syncs


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    folder = tmp_path_factory.mktemp("sync")
    config = make_run(folder, n_examples=24)
    cfg = load_config(str(config), ["training.max_steps=6", "training.global_batch_size=8", "data.eval_fraction=0",
                                    "interventions.dropout=0.1", "interventions.orthogonalization=polar",
                                    "training.max_grad_norm=1.0", f"output_dir={folder / 'out'}"])
    recipe = ReftTrainingRecipe(cfg)
    try:
        recipe.setup()
        recipe._unread.append(recipe.train_step(0))  # the first step creates AdamW's state
        yield recipe
    finally:
        recipe.cleanup()
        shutdown()


def test_a_training_step_never_waits_for_the_device(recipe):
    assert recipe.engine.zero_optimization_stage() == 0 and recipe.world == 1 and recipe.accumulation == 2
    unread, device_syncs, cuda_syncs, library_syncs = _count(lambda: recipe.train_step(1))
    assert device_syncs == [], device_syncs
    # transformers' packed-sequence check: 1 read per forward, 2 micro-batches (a sync per forward on a GPU).
    assert len(library_syncs) == 2, library_syncs
    # The polar map's eigh is the one sync of a polar step on CUDA; the cholesky map has none at all.
    assert cuda_syncs == ["aten._linalg_eigh"]
    assert isinstance(unread.loss_sum, torch.Tensor) and unread.step == 2
    # The recipe clips (DeepSpeed does not) and keeps the norm on the device.
    assert recipe.engine.gradient_clipping() == 0.0 and recipe.clip_norm == 1.0
    assert isinstance(unread.grad_norm, torch.Tensor)
    recipe._unread.append(unread)

    for intervention in recipe.reft_model.interventions.values():
        intervention.orthogonalization = "cholesky"  # the same parameter, mapped without eigh
    try:
        unread, device_syncs, cuda_syncs, _ = _count(lambda: recipe.train_step(2))
    finally:
        for intervention in recipe.reft_model.interventions.values():
            intervention.orthogonalization = "polar"
    assert device_syncs == [] and cuda_syncs == [], (device_syncs, cuda_syncs)
    recipe._unread.append(unread)

    # Reading is where the host waits, once for all unread steps (and the counter does see reads).
    rows, device_syncs, _, _ = _count(recipe.read_metrics)
    assert [row["step"] for row in rows] == [1, 2, 3] and recipe._unread == []
    assert [name for name, _ in device_syncs] == ["tolist"], device_syncs
    assert all(math.isfinite(row["loss"]) and row["tokens_per_s"] > 0 for row in rows)
    assert all(math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0 for row in rows)


def _train_tiny_run(folder, *overrides):
    """(losses, grad norms) of the metrics lines of a tiny stage-0 run with accumulation 2, trained in this process
    (in its process group: DeepSpeed keeps a clone of the first group it saw, so the group must outlive the runs)."""
    import json

    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    config = make_run(folder, n_examples=24)
    cfg = load_config(str(config), ["training.max_steps=4", "training.global_batch_size=8", "data.eval_fraction=0",
                                    "interventions.dropout=0.1", f"output_dir={folder / 'out'}", *overrides])
    ReftTrainingRecipe(cfg).run()
    rows = [json.loads(line) for line in (folder / "out" / "metrics.jsonl").read_text().splitlines()]
    rows = [row for row in rows if "loss" in row]
    return [row["loss"] for row in rows], [row.get("grad_norm") for row in rows]


def test_deepspeed_never_synchronizes_the_device_inside_a_step(tmp_path, monkeypatch):
    """DeepSpeed 0.19.8's throughput timer (on by default; started by the engine's forward hook when the engine has no
    dataloader) synchronized the device at every forward from the third step on: a host wait per micro-batch that the
    dispatch counter cannot see (a CPU accelerator's synchronize reaches no op), and an error inside a CUDA graph
    capture. Counted here at the accelerator, over 4 steps of 2 micro-batches."""
    from deepspeed.accelerator import get_accelerator

    from reft_fast.train.distributed import shutdown

    accelerator, in_steps = get_accelerator(), []
    synchronize = accelerator.synchronize

    def counted(*args, **kwargs):
        in_steps.extend(name for _, _, name, _ in traceback.extract_stack() if name == "train_step")
        return synchronize(*args, **kwargs)

    monkeypatch.setattr(accelerator, "synchronize", counted)
    try:
        losses, _ = _train_tiny_run(tmp_path)
    finally:
        shutdown()
    assert len(losses) == 4 and in_steps == []


CLIP_NORMS = (0.05, 0.0)  # clipping at every step; none (the norm only measured)


@pytest.fixture(scope="module")
def clipped_runs(tmp_path_factory):
    """{max_grad_norm: ((losses, norms) clipped by the recipe, (losses, norms) clipped by DeepSpeed)}: the same run
    with DeepSpeed's clipping (``take_gradient_clipping`` answering None: DeepSpeed clips)."""
    from reft_fast.train import recipe as recipe_module
    from reft_fast.train.distributed import shutdown

    folder, runs = tmp_path_factory.mktemp("clip"), {}
    try:
        for max_norm in CLIP_NORMS:
            setting = f"training.max_grad_norm={max_norm}"
            ours = _train_tiny_run(folder / f"ours{max_norm}", setting)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(recipe_module, "take_gradient_clipping", lambda config: None)
                runs[max_norm] = ours, _train_tiny_run(folder / f"deepspeed{max_norm}", setting)
    finally:
        shutdown()
    return runs


@pytest.mark.parametrize("max_grad_norm", CLIP_NORMS, ids=["clipping", "no clipping"])
def test_stage_0_clips_as_deepspeed_did_and_logs_the_norm(clipped_runs, max_grad_norm):
    """The recipe's clipping at stage 0 trains as DeepSpeed's did: equal losses to rounding (the two sum the squares
    of the parameters' norms in a different order), bit for bit without clipping; every line has the norm."""
    (losses, norms), (deepspeed_losses, deepspeed_norms) = clipped_runs[max_grad_norm]
    assert all(norm is not None and norm > 0 for norm in norms), norms
    assert deepspeed_norms == [None] * len(norms)  # DeepSpeed reports none for a client torch AdamW at stage 0
    if max_grad_norm:
        assert all(norm > max_grad_norm for norm in norms), norms  # the clipping acts at every step
        assert losses == pytest.approx(deepspeed_losses, rel=1e-6, abs=1e-7)
    else:
        assert losses == deepspeed_losses


def test_householder_rows_never_wait_for_the_device():
    from reft_fast.core.orthogonal import HouseholderOrthogonal, orthonormal_rows

    layer = HouseholderOrthogonal(4, 16, n=3, generator=torch.Generator().manual_seed(0))
    A = torch.randn(3, 4, 16, requires_grad=True)
    for compute in (lambda: layer().sum().backward(), lambda: orthonormal_rows(A, "cholesky").sum().backward()):
        _, device_syncs, cuda_syncs, _ = _count(compute)
        assert device_syncs == [] and cuda_syncs == [], (device_syncs, cuda_syncs)
    _, _, cuda_syncs, _ = _count(lambda: torch.linalg.cholesky(A.detach() @ A.detach().mT))
    assert cuda_syncs == ["aten._linalg_check_errors"]  # the counter sees the checking variant's sync


def test_batches_are_built_ahead_on_a_thread_in_order():
    import threading

    from reft_fast.train.data import PrefetchedBatches

    built = []

    def make_batch(key):
        built.append((key, threading.current_thread().name))
        if key == 4:
            raise ValueError("bad example 4")
        return {"x": torch.full((2,), key)}, key * 10

    batches = PrefetchedBatches(make_batch, range(6), "cpu", depth=2)
    try:
        key, batch, extra = next(batches)
        assert (key, extra) == (0, 0) and batch["x"].tolist() == [0, 0] and not batch["x"].is_pinned()
        assert [next(batches)[0] for _ in range(3)] == [1, 2, 3]
        while len(built) < 6:  # keys 4 and 5 are built ahead of being taken
            threading.Event().wait(0.01)
        assert all(name.startswith("reft-batches") for _, name in built)
        with pytest.raises(ValueError, match="bad example 4"):
            next(batches)
        assert next(batches)[0] == 5
        with pytest.raises(StopIteration):
            next(batches)
    finally:
        batches.close()


def test_the_step_copies_the_batch_but_leaves_the_locations_on_the_host():
    from reft_fast.train.loss import to_device

    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "intervention_locations": torch.zeros(1, 2, 1)}
    moved = to_device(batch, "meta")
    assert moved["input_ids"].device.type == "meta"
    assert moved["intervention_locations"] is batch["intervention_locations"]  # checked and moved by the ReftModel


def test_metrics_lines_reach_the_os_at_once_and_the_disk_every_n_lines(tmp_path, monkeypatch):
    from reft_fast.train.metrics import MetricsLog

    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, fsync_every=3)
    for step in range(1, 8):
        log.write({"step": step})
        assert path.read_text().count("\n") == step  # flushed: a killed process loses no written line
    assert len(synced) == 2  # after lines 3 and 6
    log.sync()
    log.sync()  # nothing new: no second fsync
    log.close()
    assert len(synced) == 3
    with pytest.raises(ValueError, match="fsync_every"):
        MetricsLog(tmp_path / "other.jsonl", fsync_every=0)


def test_a_torn_tail_of_metrics_is_dropped_on_resume(tmp_path):
    from reft_fast.train.run_dir import rewind_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "eval_loss": 2.0}\n{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n{"step": 3, "lo')
    rewind_metrics(path, 2)
    assert path.read_text() == '{"step": 0, "eval_loss": 2.0}\n{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'


def test_the_recipe_adamw_is_fused_where_torch_can_and_steps_like_the_default():
    from reft_fast.train.ds_config import client_adamw

    torch.manual_seed(0)
    start = [torch.randn(8, 64), torch.randn(8, 64), torch.randn(8)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    results = []
    for make in (client_adamw, torch.optim.AdamW):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = make(params, **hyper)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        results.append((optimizer, params))
    (fused, fused_params), (default, default_params) = results
    assert fused.defaults["fused"] is True and not default.defaults["fused"]
    for a, b in zip(fused_params, default_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Where torch has no fused kernel (here: meta tensors), torch's default implementation.
    assert not client_adamw([torch.nn.Parameter(torch.empty(3, device="meta"))], lr=1e-3).defaults["fused"]


def test_the_progress_bar_moves_every_step_and_shows_the_loss_only_when_it_is_read(tmp_path, monkeypatch):
    """The bar's count moved only when the metrics were read, every log_every steps ("1/10 [05:20<48:04]" in a
    finished run): it moves after each step now, reading nothing; its loss comes with each read, and it ends at n/n."""
    import tqdm.auto

    from reft_fast.train import recipe as recipe_module
    from reft_fast.train.distributed import shutdown

    events = []

    class Bar(tqdm.auto.tqdm):  # the recipe's bar ("train") records what it shows; any other bar is left alone
        def update(self, n=1):
            shown = super().update(n)
            if self.desc == "train":
                events.append(("bar", self.n))
            return shown

        def set_postfix(self, *args, **kwargs):
            if self.desc == "train":
                events.append(("loss", self.n))
            super().set_postfix(*args, **kwargs)

        def close(self):
            if self.desc == "train" and not self.disable:  # not closed yet
                events.append(("close", f"{self.n}/{self.total}"))
            super().close()

    read_metrics = recipe_module.ReftTrainingRecipe.read_metrics

    def read(recipe):
        rows = read_metrics(recipe)
        events.append(("read", [row["step"] for row in rows]))
        return rows

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(recipe_module.ReftTrainingRecipe, "read_metrics", read)
    try:
        _train_tiny_run(tmp_path, "training.max_steps=5", "training.log_every=3", "training.progress_bar=true")
    finally:
        shutdown()
    assert events == [("bar", 1), ("bar", 2), ("bar", 3), ("read", [1, 2, 3]), ("loss", 3),
                      ("bar", 4), ("bar", 5), ("read", [4, 5]), ("loss", 5), ("close", "5/5")], events
