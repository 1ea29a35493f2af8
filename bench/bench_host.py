"""What a ReFT step costs the host over the frozen model: the table of issue 15 as one command.

    python bench/bench_host.py                 # the table: 400 paired repetitions, one thread (a few minutes on a CPU)
    python bench/bench_host.py --smoke         # a few repetitions (the test suite runs this), same columns
    python bench/bench_host.py --base toy      # the same on layers that only add a vector: resolves microseconds

Model: a random tiny Llama (32 layers, hidden 64, vocabulary 256), batch 8 × 32 tokens, fp32, SDPA; LoReFT rank 8 at
all 32 layers, positions f7+l7 of the 16-token prompt, shared weights (one intervention per layer on 14 positions).
So small that the step is all host time: Python, dispatch, launches and synchronizations, the costs a ReFT
implementation adds to the frozen model.

Variants, each on a base of its own (bench/bench_e2e.py's set-ups):
  floor            forward + backward down to layer 0 with one trainable bias there (the least any ReFT step costs)
  reft-fast:torch  reft_fast.get_reft_model with the torch backend (the CPU default)
  hook-loreft      a plain forward hook: gather, edit with a plain R (torch's orthogonal parametrization), scatter
  pyreft           pyreft 0.1.0 on pyvene, when importable (its trainer's ``.tolist()`` of the locations included)
A step is zero_grad, forward with labels, backward and an AdamW step. Each repetition runs one step of every variant
in a shuffled order, and each variant's time is paired with the floor's of the same repetition: the table gives the
median of the paired differences (step − floor), robust to the load of other processes on a shared machine, which is
printed (load average) and written with the results.

The Triton path (reft-fast:triton) cannot be timed on a CPU: its kernels run in Triton's interpreter. Its launches are
counted for one step (tests/launch_count.py: Triton kernels and the aten ops that would be device kernels), and its
host time is measured with the kernel launches stubbed out (the kernels' outputs are then garbage; only the time
counts). On a CPU the stub replaces the interpreter's launch: the host cost of Triton's own JIT launcher (binding the
arguments, the cache lookup: it needs a GPU driver) is not in that figure.

    python bench/bench_host.py --device cuda   # on a GPU: the same table with reft-fast:triton timed for real

On a GPU (``--device cuda``) every variant runs there, reft-fast:triton among the timed ones, each step followed by a
synchronization inside its timed region. The shape is so small that the device finishes each kernel in microseconds,
so a step's time is the host's: step − floor of reft-fast:triton is its host cost with Triton's JIT launcher, and
the stubbed figure beside it the same without the launches (their difference: the launcher and the kernels).
reft-fast:triton-bound is the same step with its kernels bound once per launch plan (REFT_FAST_TRITON_LAUNCH=bound,
kernels/launch.py; reft-fast:triton runs with =jit whatever the environment says), timed in the same repetitions:
its ratio_to_triton_jit is its step − floor over reft-fast:triton's.

Captured steps (``--device cuda`` only; issue 15): floor-graph and reft-fast:triton-graph build the floor's and
reft-fast:triton's model and batch (its kernels launched bound, the default mode), capture one whole step in a CUDA
graph (torch's whole-network recipe: ``capture_step``) and time ``graph.replay()`` + synchronize, in repetitions of
their own after the eager table (which is printed first). reft-fast:triton-graph is paired with floor-graph: its step
− floor is what a replayed step costs over a replayed floor (ratio_to_triton_jit against the eager reft-fast:triton's).
Before timing, each checks ``GRAPH_CHECK_STEPS`` replays against as many eager steps from the same parameters and
optimizer state; its status says whether they match (losses and parameters), or why it was not run (``not run:
capture failed: ...``). floor-replayed and reft-fast:triton-replayed take the route of the recipe's
``training.cuda_graphs`` (``build_replayed_step``): the forward and backward replayed from graphs (reft-fast's through
``train.graphs.CapturedLoss``, given the host batch at every step), zero_grad and the AdamW step eager; the second is
paired with the first, and its status carries CapturedLoss's replay-against-eager figures.

Steps through DeepSpeed's engine (issue 15; ``build_ds_step``): reft-fast:triton-ds0 and -ds2, reft-fast:torch-ds0
and -ds2 are the plain variant's model and batch stepped as the recipe steps (reft_fast/train/recipe.py): an engine of
their own at ZeRO stage 0 or 2 built with the recipe's functions, the loss through ``engine(...)``,
``engine.backward``, the recipe's clipping at stage 0, ``engine.step()``; in a world of one made for them
(``process_group_of_one``: gloo on the CPU, NCCL on CUDA). Their ratio_to_plain is their step − floor over the plain
variant's, timed in the same repetitions (added to the table when not asked for). reft-fast:triton-ds0 is in the GPU
table; on the CPU they are opt-in (``--variants``), and those of the Triton path are timed with its launches stubbed,
with the plain reft-fast:triton so timed beside them (their status says so). Without deepspeed their status is ``not
run: deepspeed not installed``.

    python bench/bench_host.py --base toy --variants floor,reft-fast:triton-ds0,reft-fast:triton-ds2

Writes bench/results/<machine>_<date>/host_<machine>_<date>.csv (machine, versions, date, load in every row;
host_smoke_... with --smoke, host_toy_... with --base toy, and ..._ds_... when --variants names DeepSpeed variants).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before reft_fast's Triton kernels are decorated

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_e2e / bench_kernels: the variants' set-ups, the environment and CSV helpers
sys.path.insert(0, str(HERE.parent / "tests"))  # launch_count: the launch and host-sync counter
import bench_e2e  # noqa: E402
from bench_kernels import environment, print_table, result_path, results_folder, write_csv  # noqa: E402

from reft_fast.train.cli import positive_int  # noqa: E402

HOST_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=32, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
VARIANTS = ("floor", "reft-fast:torch", "hook-loreft", "pyreft")
# triton timed too, in both launch modes, and the step captured in a CUDA graph (with the floor's, its pair)
CUDA_VARIANTS = ("floor", "reft-fast:triton", "reft-fast:triton-bound", "reft-fast:triton-ds0", "reft-fast:torch",
                 "hook-loreft", "pyreft", "floor-graph", "reft-fast:triton-graph", "floor-replayed",
                 "reft-fast:triton-replayed")
LAUNCH_MODES = {"reft-fast:triton": "jit", "reft-fast:triton-bound": "bound"}  # REFT_FAST_TRITON_LAUNCH per variant
# Steps through the recipe's DeepSpeed engine (build_ds_step): the plain variant each one wraps, and its ZeRO stage.
# Opt-in on the CPU (--variants), where the plain variant is timed beside them (the Triton path's with its launches
# stubbed); reft-fast:triton-ds0 is in the GPU table.
# At stage 3 the base's parameters are partitioned too: its per-module gather and release hooks are in the step
# (one rank here), which the plain floor does not pay.
DS_VARIANTS = {f"reft-fast:{path}-ds{stage}": (f"reft-fast:{path}", stage)
               for path in ("triton", "torch") for stage in (0, 2, 3)}
STUBBED_STATUS = ("host time with the kernel launches stubbed (CPU: Triton's interpreter stubbed, the JIT launcher's "
                  "own cost not included)")
# Captured steps (CUDA only): the eager variant each one captures. Capture also takes the floor's own Python off the
# host, so the captured ReFT step is paired with the captured floor, not the eager one.
# *-graph: the whole step captured (capture_step); *-replayed: the recipe's training.cuda_graphs route, the forward
# and backward replayed from graphs (make_graphed_callables; reft-fast's through train.graphs.CapturedLoss, given the
# host batch at each step as the recipe does), the optimizer step eager (build_replayed_step).
GRAPH_VARIANTS = {"floor-graph": "floor", "reft-fast:triton-graph": "reft-fast:triton", "floor-replayed": "floor",
                  "reft-fast:triton-replayed": "reft-fast:triton"}
REPLAYED_VARIANTS = ("floor-replayed", "reft-fast:triton-replayed")
# the floor of a variant's paired differences (else floor)
PAIRED_FLOOR = {"reft-fast:triton-graph": "floor-graph", "reft-fast:triton-replayed": "floor-replayed"}
FLOORS = ("floor", "floor-graph", "floor-replayed")
GRAPH_CHECK_STEPS = 3  # replays compared with as many eager steps from the same parameters and optimizer state
# fp32 loss ≈ 5.5 here; the captured forward runs SDPA with a materialized causal mask where the eager one takes the
# is_causal shortcut (transformers reads no mask while a stream captures): rounding-level differences only
LOSS_TOLERANCE = 1e-4
# parameters after the replays against after the eager steps, relative to how far the eager steps moved them (AdamW
# moves each trained entry by ≈ lr per step, so a replay whose update or gradients were stale is far off)
PARAM_TOLERANCE = 0.01
FIELDS = ["machine", "torch", "triton", "transformers", "pyreft", "date", "threads", "load_1min", "reps", "base",
          "clock", "variant",
          "n_interventions", "step_ms", "minus_floor_ms", "minus_floor_q1_ms", "minus_floor_q3_ms",
          "per_intervention_ms", "ratio_to_hook", "ratio_to_triton_jit", "ratio_to_plain", "triton_launches",
          "aten_launches", "launches_per_intervention", "host_syncs", "stubbed_minus_floor_ms",
          "stubbed_per_intervention_ms", "status"]


def _row(variant: str, device: str = "cpu") -> dict:
    return dict(shape="host", config="b", method=variant, batch=8, seq_len=32, dtype="float32", device=device,
                checkpointing=False, fused=False)


def _in_launch_mode(step, mode: str):
    """The step with the Triton kernels launched in ``mode`` (kernels/launch.py; launch plans are kept per mode)."""
    from reft_fast.kernels import launch

    def step_in_mode():
        with launch.using(mode):
            return step()

    return step_in_mode


class ToyLayer(torch.nn.Module):
    """A decoder layer that adds a frozen vector to its hidden states, called exactly as a Llama layer is (same
    arguments, same hooks): ``--base toy`` puts 32 of them in the tiny Llama, whose step then costs the host about
    2 ms instead of about 60, so that step − floor resolves microseconds (for A/B measurements of host-path changes;
    the table itself is taken on the real layers)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("shift", torch.full((hidden_size,), 1e-3))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states + self.shift


def build_base(row: dict, base: str = "llama"):
    model = bench_e2e.build_base(row)
    if base == "toy":
        layers = model.model.layers
        for i in range(len(layers)):
            layers[i] = ToyLayer(model.config.hidden_size).to(row["device"])
    return model


def build_step(variant: str, device: str = "cpu", base: str = "llama"):
    """(one training step of the variant, its number of interventions, its trained parameters) on a base of its own
    (``base``: the tiny Llama, or its ``toy`` form: ToyLayer). On CUDA the step ends with a synchronization: its time
    is then that of the work it issued, done."""
    bench_e2e.SHAPES.setdefault("host", HOST_SHAPE)
    mode = LAUNCH_MODES.get(variant)
    row = _row("reft-fast:triton" if mode else variant, device)
    step, layers, _, params, _ = bench_e2e.training_step(build_base(row, base), row)
    if mode:
        step = _in_launch_mode(step, mode)
    return _synchronized(step, device), len(layers), params


def _synchronized(step, device: str):
    """The step, followed on CUDA by a synchronization (its time is then that of the work it issued, done)."""
    if device != "cuda":
        return step

    def synchronized_step():
        loss = step()
        torch.cuda.synchronize()
        return loss

    return synchronized_step


def build_ds_step(variant: str, device: str = "cpu", base: str = "llama"):
    """(one step of the DS_VARIANTS variant, its number of interventions, its DeepSpeed engine): the plain variant's
    model and batch on a base of its own, stepped as the recipe steps (``ReftTrainingRecipe._setup_engine`` and
    ``train_step``). The engine: the recipe's ``initialize_engine`` of the ReftModel at the variant's ZeRO stage (the
    package's TrainConfig defaults; micro-batch the bench's batch, no accumulation, the world of one
    ``process_group_of_one`` made; the recipe's AdamW and schedule in place of bench_e2e's AdamW). A step: the loss
    through ``engine(...)`` (the ReftModel's forward inside the engine's), ``engine.backward(loss)``, at stage 0 the
    recipe's clipping (``clip_gradients``), ``engine.step()`` (which also zeroes the gradients). Raises ImportError
    where deepspeed is not installed."""
    import deepspeed  # noqa: F401  (ImportError here where it is not installed: the variant's status says so)
    import torch.distributed as dist

    from reft_fast.train.ds_config import clip_gradients
    from reft_fast.train.recipe import initialize_engine
    from reft_fast.train.train_config import TrainConfig

    plain, stage = DS_VARIANTS[variant]
    bench_e2e.SHAPES.setdefault("host", HOST_SHAPE)
    row = _row(plain, device)
    loss_fn, _, layers, _, params, _ = bench_e2e.training_parts(build_base(row, base), row)
    cfg = TrainConfig()
    cfg.training.micro_batch_size, cfg.deepspeed.stage = row["batch"], stage
    engine, _, _, clip_norm, _ = initialize_engine(loss_fn.model, params, cfg, dist.get_world_size(), 1 << 30)
    engine.train()
    loss_fn.model = engine  # the loss calls the engine, which calls the ReftModel

    def step():
        loss = loss_fn()
        engine.backward(loss)
        if clip_norm is not None and engine.is_gradient_accumulation_boundary():
            clip_gradients(params, clip_norm, engine.device)
        engine.step()
        return loss

    mode = LAUNCH_MODES.get(plain)
    return _synchronized(_in_launch_mode(step, mode) if mode else step, device), len(layers), engine


@contextlib.contextmanager
def process_group_of_one():
    """A ``torch.distributed`` world of one inside the block, for the DeepSpeed variants, unless one exists: the
    product's (reft_fast.train.distributed: ``init_distributed`` on a free port, gloo on the CPU, NCCL on CUDA, as
    DeepSpeed picks; ``shutdown`` at the end), the rendezvous variables it sets put back as they were."""
    import torch.distributed as dist

    from reft_fast.train.distributed import init_distributed, shutdown

    if dist.is_initialized():
        yield
        return
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    saved = {name: os.environ.get(name) for name in names}
    try:
        init_distributed()
    except BaseException:
        _put_back(saved)
        raise
    try:
        yield
    finally:
        shutdown(wait_for_others=False)
        _put_back(saved)


def _put_back(environment_values: dict) -> None:
    for name, value in environment_values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def clock(device: str):
    """The timer of a step: on the CPU this thread's CPU time (what other processes take of a shared core is not
    counted: on 2 shared cores wall time swung the paired figure by 2×), on a GPU wall time (the step's end waits
    for the device)."""
    return time.thread_time if device == "cpu" else time.perf_counter


def paired_times(steps: dict, reps: int, seed: int = 0, device: str = "cpu") -> dict:
    """Milliseconds per step of every variant in each of ``reps`` repetitions, the order shuffled per repetition."""
    order, rng, now = list(steps), random.Random(seed), clock(device)
    times = {name: [] for name in steps}
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            start = now()
            steps[name]()
            times[name].append((now() - start) * 1e3)
    return times


def _quartiles(values: list) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return q1, median, q3


@contextlib.contextmanager
def stubbed_launches():
    """Triton kernel launches do nothing inside the block (their outputs keep whatever memory they had), those of
    kernels bound once (kernels/launch.py) included."""
    from launch_count import _kernel_classes

    from reft_fast.kernels import launch

    originals = [(cls, cls.run) for cls in _kernel_classes()]
    bound_run = launch.run_bound
    try:
        for cls, _ in originals:
            cls.run = lambda kernel, *args, **kwargs: None
        launch.run_bound = lambda *args, **kwargs: None
        yield
    finally:
        for cls, run in originals:
            cls.run = run
        launch.run_bound = bound_run


@contextlib.contextmanager
def zero_overflow_verdicts_ignored(ignored: bool = True):
    """DeepSpeed's ZeRO stage 1–2 optimizer checks its gradients as always inside the block (non-finite count, then
    the norm; each read on the host) but takes every step (``ignored``; a no-op where deepspeed's ZeRO optimizer is
    not imported). With the Triton launches stubbed the gradients are garbage, often non-finite, and a skipped step
    would leave out what a real step does: the AdamW step over the partition and the copies back to the parameters."""
    zero = sys.modules.get("deepspeed.runtime.zero.stage_1_and_2")
    if not ignored or zero is None:
        yield
        return
    optimizer, is_invalid_grad_norm = zero.DeepSpeedZeroOptimizer, zero.is_invalid_grad_norm
    has_overflow = optimizer.has_overflow

    def checked_has_overflow(self, *args, **kwargs):
        has_overflow(self, *args, **kwargs)
        return False

    def checked_is_invalid(norm):
        is_invalid_grad_norm(norm)
        return False

    optimizer.has_overflow, zero.is_invalid_grad_norm = checked_has_overflow, checked_is_invalid
    try:
        yield
    finally:
        optimizer.has_overflow, zero.is_invalid_grad_norm = has_overflow, is_invalid_grad_norm


def stubbed_differences(step, params, floor_step, reps: int, device: str = "cpu") -> list[float]:
    """Paired milliseconds (step − floor) with the Triton launches stubbed out. The stubbed kernels leave garbage in
    the gradients, so the parameters are put back after every step (outside the timed region)."""
    saved, now = [p.detach().clone() for p in params], clock(device)
    differences = []
    for _ in range(reps):
        start = now()
        floor_step()
        floor_ms = (now() - start) * 1e3
        with stubbed_launches():
            start = now()
            step()
            differences.append((now() - start) * 1e3 - floor_ms)
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)
    return differences


def launch_counts(step) -> dict:
    """Triton launches, aten ops that would be device kernels, and host syncs of one step (tests/launch_count.py)."""
    from launch_count import DeviceWork

    with DeviceWork() as work:
        step()
    triton = sum(v for k, v in work.kernels.items() if k.startswith("triton."))
    return dict(triton_launches=triton, aten_launches=work.launches - triton, host_syncs=len(work.syncs))


@contextlib.contextmanager
def _phase(name: str):
    """Exceptions leaving the block carry a note naming the phase of the capture they come from."""
    try:
        yield
    except Exception as error:
        error.add_note(f"in {name}")
        raise


def capture_step(loss_fn, optimizer, warmup: int):
    """(graph, static loss): one whole training step (forward with labels, backward, optimizer step) captured in a CUDA
    graph, by torch's whole-network recipe (torch.cuda.graph's documentation): ``warmup`` eager steps on a side
    stream, the gradients set to None, then one step captured on the graph's own stream. Backward then creates the
    .grad tensors in the graph's memory pool, and each replay writes them anew: no zero_grad between replays. The
    optimizer must be ``capturable`` (its step count on the device). What the step's Python computes on the host
    (ReFT's rotations and prepared edits, Triton's launch arguments, transformers' mask choices) is frozen at capture:
    a replay runs only the kernels, on the same input tensors and on the parameters the optimizer updates in place.

    Triton launch plans and their scratch buffers are kept per stream (kernels/low_rank_edit.py, ``stream_key``): the
    warm-up builds those of the side stream, the capture its own, allocated from the graph's pool (kept by the plan
    cache as long as the process runs)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not torch.cuda.is_available() or not params or any(p.device.type != "cuda" for p in params):
        raise RuntimeError(f"CUDA graphs need a CUDA device: the parameters are on "
                           f"{sorted({str(p.device) for p in params})} and torch "
                           f"{'sees' if torch.cuda.is_available() else 'sees no'} CUDA device")
    if not all(group.get("capturable") for group in optimizer.param_groups):
        raise ValueError("the optimizer must be built with capturable=True to be captured")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with _phase("warm-up"), torch.cuda.stream(side):
        for _ in range(warmup):
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with _phase("capture"), torch.cuda.graph(graph):
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    return graph, loss.detach()


def _eager_step_on_static_grads(loss_fn, optimizer):
    """An eager step of a captured model that keeps its .grad tensors (zeroed in place, then accumulated into): the
    graph reads and writes those very tensors."""
    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def replay_check(replay, static_loss, eager_step, params, optimizer, steps: int = GRAPH_CHECK_STEPS) -> tuple:
    """(matches, the row's status): whether ``steps`` calls of ``replay`` (a captured step, its loss in
    ``static_loss``) do what as many ``eager_step`` calls do from the same parameters and optimizer state. Both runs
    start from one snapshot, written back in place between them (the graph reads those very tensors); compared are the
    losses step by step and the parameters after the last step."""
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    start = [t.detach().clone() for t in (*params, *state)]
    replayed = []
    for _ in range(steps):
        replay()
        replayed.append(static_loss.detach().clone())
    after_replay = [p.detach().clone() for p in params]
    with torch.no_grad():
        for tensor, value in zip((*params, *state), start):
            tensor.copy_(value)
    eager = torch.stack([eager_step() for _ in range(steps)])
    d_loss = (torch.stack(replayed) - eager).abs().max().item()
    loss_moved = (eager[-1] - eager[0]).abs().item()
    d_param = max((p.detach() - q).abs().max().item() for p, q in zip(params, after_replay))
    moved = max((p.detach() - q).abs().max().item() for p, q in zip(params, start))
    matches = d_loss <= LOSS_TOLERANCE and d_param <= PARAM_TOLERANCE * moved + 1e-7
    return matches, (f"replay {'matches' if matches else 'DIFFERS from'} eager: max |Δloss| = {d_loss:.1e} over "
                     f"{steps} steps (loss moved {loss_moved:.1e}), max |Δparam| = {d_param:.1e} (moved {moved:.1e})")


def build_graph_step(variant: str, device: str = "cuda", base: str = "llama", warmup: int = 3):
    """(the captured step: replay, then synchronize; its number of interventions; its status; the list its calls
    append the host's milliseconds in ``graph.replay()`` to) of a GRAPH_VARIANTS variant: the eager variant's model
    and batch on a base of its own, its AdamW capturable, warmed up and captured (``capture_step``), then checked
    against eager steps (``replay_check``). The step's time is the device's (tiny kernels queued at once); the
    replay's own time is what it costs the host.

    The batch is the eager variant's, all-ones attention mask included: transformers (5.17 on the GPU image, 5.24
    here) reads the mask (``_ignore_causal_mask_sdpa``), or without one the position ids
    (``find_packed_sequence_indices``), on the host in eager steps only; while a stream captures, its ``is_tracing``
    skips both reads and it builds the causal mask instead. The LoReFT config has no dropout: a dropout seed is drawn
    on the host per forward (``ReftModel._seeds``) and would replay as a constant; the status says if the host RNG was
    drawn during warm-up or capture."""
    from reft_fast.kernels import launch

    if device != "cuda":
        raise RuntimeError(f"CUDA graphs need a CUDA device, not {device!r} (--device cuda)")
    bench_e2e.SHAPES.setdefault("host", HOST_SHAPE)
    row = _row(GRAPH_VARIANTS[variant], device)
    loss_fn, optimizer, layers, _, params, _ = bench_e2e.training_parts(build_base(row, base), row, capturable=True)
    host_rng = torch.random.get_rng_state()
    # bound, the default launch mode since 2026-11-30: a captured training step would capture bound launches (the
    # replay check below is their first check under capture; the replay's time does not depend on the mode)
    with launch.using("bound"), warnings.catch_warnings():
        # torch warns once that a capturable optimizer steps uncaptured (as the warm-up and the eager check do)
        warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
        graph, static_loss = capture_step(loss_fn, optimizer, warmup)
        drew = not torch.equal(host_rng, torch.random.get_rng_state())
        with _phase("the replay check"):
            _, status = replay_check(graph.replay, static_loss, _eager_step_on_static_grads(loss_fn, optimizer),
                                     params, optimizer)
    if drew:
        status += "; the host RNG was drawn during warm-up or capture (a dropout seed would replay as a constant)"

    issue_ms = []

    def replayed_step():
        start = time.perf_counter()
        graph.replay()
        issue_ms.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        return static_loss

    return replayed_step, (len(layers) if variant not in FLOORS else 0), status, issue_ms


def build_replayed_step(variant: str, device: str = "cuda", base: str = "llama", warmup: int = 3, capture=None):
    """(step, number of interventions, status, the host's milliseconds per step until synchronize) of a
    REPLAYED_VARIANTS variant: the recipe's ``training.cuda_graphs`` route on the eager variant's model and batch
    (``bench_e2e.replayed_training_step``, which bench_e2e's rows of the same names run on a 7B shape): the forward
    and backward replayed from graphs (reft-fast's through CapturedLoss, given the pinned host batch at every step),
    zero_grad and the AdamW step eager. Built by two steps (the capture, then CapturedLoss's replay-against-eager
    check, whose figures are the status). ``capture``: the graph maker (torch's make_graphed_callables, or a test's
    stand-in, which lets this run on the CPU)."""
    if device != "cuda" and capture is None:
        raise RuntimeError(f"CUDA graphs need a CUDA device, not {device!r} (--device cuda)")
    bench_e2e.SHAPES.setdefault("host", HOST_SHAPE)
    row = _row(variant, device)
    step, layers, _, _, status = bench_e2e.replayed_training_step(build_base(row, base), row, warmup, capture)
    for _ in range(2):  # reft-fast: the capture, then the replay check on the next call
        step()
    issue_ms = []

    def timed_step():
        start = time.perf_counter()
        loss = step()
        issue_ms.append((time.perf_counter() - start) * 1e3)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return timed_step, (len(layers) if variant not in FLOORS else 0), status(), issue_ms


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


def failure_status(error: BaseException, what: str = "capture failed") -> str:
    """``not run: <what>: <type>: <first line>``, with the phase noted (``_phase``) and the exception it was raised
    while handling, if any (torch.cuda.graph's exit ends the capture, which then fails on its own)."""
    text = f"not run: {what}: {type(error).__name__}: {_first_line(error)}"
    notes = getattr(error, "__notes__", None)
    if notes:
        text += f" [{'; '.join(notes)}]"
    cause = error.__cause__ or error.__context__
    if cause is not None:
        text += f" (after {type(cause).__name__}: {_first_line(cause)})"
    return text


def _graph_times(variants, device: str, reps: int, warmup: int, base: str, log, sizes: dict, statuses: dict) -> dict:
    """Milliseconds per replayed step of the captured ``variants`` in ``reps`` paired repetitions of their own, run
    after the eager table (an error here cannot cost it); each one's status says whether its capture worked and its
    replay matches eager steps. None is built off CUDA."""
    if device != "cuda":
        statuses.update({variant: "not run: CUDA graphs need --device cuda" for variant in variants})
        return {}
    steps, issue_ms = {}, {}
    for variant in variants:
        build = build_replayed_step if variant in REPLAYED_VARIANTS else build_graph_step
        try:
            steps[variant], sizes[variant], statuses[variant], issue_ms[variant] = build(variant, device, base,
                                                                                          warmup)
        except Exception as error:  # the captured step's failure is its row's status; the table goes on
            statuses[variant] = failure_status(error)
        log(f"{variant}: {statuses[variant]}")
    try:
        for step in steps.values():
            for _ in range(warmup):
                step()
        times = paired_times(steps, reps, device=device)
        for variant, issued in issue_ms.items():  # the timed replays' (the last reps of the list)
            what = "the step returns" if variant in REPLAYED_VARIANTS else "graph.replay() returns"
            statuses[variant] += f"; {what} in {statistics.median(issued[-reps:]):.3f} ms (host)"
        return times
    except Exception as error:
        statuses.update({variant: failure_status(error, "replay failed") for variant in steps})
        return {}


def _built_variants(variants, device: str, log, base: str, group: contextlib.ExitStack) -> tuple[dict, dict, dict]:
    """(steps, numbers of interventions, statuses) of the variants; pyreft, when it cannot be built, gets a status,
    and so do the DeepSpeed variants where deepspeed is not installed. The first DeepSpeed variant enters
    ``process_group_of_one`` into ``group``."""
    steps, sizes, statuses = {}, {}, {}
    for variant in variants:
        try:
            if variant == "pyreft" and bench_e2e.skip_reason(_row("pyreft", device)):
                raise ImportError("not importable here (pip install --no-deps pyreft==0.1.0 pyvene==0.1.8)")
            if variant in DS_VARIANTS:
                group.enter_context(process_group_of_one())  # a no-op once the group exists
                steps[variant], sizes[variant], _ = build_ds_step(variant, device, base)
                stubbed = device == "cpu" and _on_triton_path(variant)
                statuses[variant] = f"ok; {STUBBED_STATUS}" if stubbed else "ok"
            else:
                steps[variant], sizes[variant], _ = build_step(variant, device, base)
        except Exception as error:  # optional libraries: report, and time the others
            statuses[variant] = _not_run(variant, error)
            log(f"{variant}: {statuses[variant]}")
    return steps, sizes, statuses


def _not_run(variant: str, error: Exception) -> str:
    """The status of a variant whose optional library failed to import (pyreft's import pulls optional libraries; the
    DeepSpeed variants need deepspeed) or, for a DeepSpeed variant, whose engine or process group could not be made
    (on a GPU machine the rest of the table is worth more than a crash); ``error`` itself for any other failure."""
    if variant == "pyreft":
        return f"not run: pyreft: {type(error).__name__}: {error}"
    if variant in DS_VARIANTS and isinstance(error, ImportError) and (error.name or "").split(".")[0] == "deepspeed":
        return "not run: deepspeed not installed"
    if variant in DS_VARIANTS:
        return f"not run: {type(error).__name__}: {error}"
    raise error


def _on_triton_path(variant: str) -> bool:
    """Whether the variant's step launches Triton kernels (reft-fast:triton in either launch mode, or its engine)."""
    return variant in LAUNCH_MODES or DS_VARIANTS.get(variant, ("",))[0] in LAUNCH_MODES


def _with_plain_variants(variants) -> tuple:
    """``variants`` with the plain variant of each DeepSpeed one timed too (its ratio_to_plain's denominator), just
    before the first that wraps it."""
    out = []
    for variant in variants:
        plain = DS_VARIANTS.get(variant, (None,))[0]
        if plain and plain not in variants and plain not in out:
            out.append(plain)
        out.append(variant)
    return tuple(out)


def _triton_figures(steps: dict, device: str, reps: int, warmup: int, base: str) -> tuple[dict, int]:
    """The Triton path's launches per step (over the floor's, per intervention) and its host time with the launches
    stubbed: its columns, and its number of interventions."""
    # a base of its own: the stubbed steps leave garbage in its interventions (put back, but not in a timed variant's)
    triton_step, n_triton, triton_params = build_step("reft-fast:triton", device, base)
    for _ in range(warmup):
        triton_step()
    counts, floor_counts = launch_counts(triton_step), launch_counts(steps["floor"])
    # Over the floor's own: what the interventions add (helper ops and the optimizer over their parameters included).
    counts["launches_per_intervention"] = sum(counts[k] - floor_counts[k] for k in ("triton_launches",
                                                                                  "aten_launches")) / n_triton
    stub_median = statistics.median(stubbed_differences(triton_step, triton_params, steps["floor"],
                                                        max(reps // 4, 3), device))
    counts.update(stubbed_minus_floor_ms=stub_median, stubbed_per_intervention_ms=stub_median / n_triton)
    return counts, n_triton


def _timed_rows(variants, times: dict, sizes: dict, statuses: dict, common: dict) -> list[dict]:
    """One row per variant: its median step, and the median, quartiles and per-intervention figure of the paired
    differences with its floor (PAIRED_FLOOR: the captured floor for a captured step, else the floor); ratio_to_hook
    against hook-loreft's, ratio_to_triton_jit against reft-fast:triton's."""
    rows, hook_diff, jit_diff = [], None, None
    for variant in variants:
        row = dict(common, variant=variant, status=statuses.get(variant, "ok"))
        floor = PAIRED_FLOOR.get(variant, "floor")
        if variant in times:
            row.update(n_interventions=sizes[variant] if variant not in FLOORS else 0,
                       step_ms=statistics.median(times[variant]))
        if variant in times and variant not in FLOORS and floor in times:
            diffs = [t - f for t, f in zip(times[variant], times[floor])]
            q1, median, q3 = _quartiles(diffs)
            row.update(minus_floor_ms=median, minus_floor_q1_ms=q1, minus_floor_q3_ms=q3,
                       per_intervention_ms=median / sizes[variant])
            hook_diff = median if variant == "hook-loreft" else hook_diff
            jit_diff = median if variant == "reft-fast:triton" else jit_diff
        elif variant in times and variant not in FLOORS:
            row["status"] += f"; {floor} not timed: no paired figure"
        rows.append(row)
    _ratios_to_plain(rows)
    for row in rows:
        if hook_diff and "minus_floor_ms" in row:
            row["ratio_to_hook"] = row["minus_floor_ms"] / hook_diff
        compared_to_jit = row["variant"] in LAUNCH_MODES or row["variant"] in GRAPH_VARIANTS
        if jit_diff and compared_to_jit and "minus_floor_ms" in row:
            row["ratio_to_triton_jit"] = row["minus_floor_ms"] / jit_diff
    return rows


def _ratios_to_plain(rows: list[dict]) -> None:
    """ratio_to_plain of each DeepSpeed variant's row: its step − floor over that of the plain variant it wraps
    (DS_VARIANTS; timed in the same repetitions)."""
    plain = {row["variant"]: row.get("minus_floor_ms") for row in rows}
    for row in rows:
        wrapped = DS_VARIANTS.get(row["variant"], (None,))[0]
        if plain.get(wrapped) and "minus_floor_ms" in row:
            row["ratio_to_plain"] = row["minus_floor_ms"] / plain[wrapped]


def _table(variants, times: dict, sizes: dict, statuses: dict, common: dict, triton: dict, n_triton: int,
           device: str) -> list[dict]:
    """The rows of ``variants`` (``_timed_rows``) with the Triton path's launches and stubbed host time on
    reft-fast:triton's row (a row of its own when it is not among those timed)."""
    rows = _timed_rows(variants, times, sizes, statuses, common)
    stubbed = (f"launches counted; {STUBBED_STATUS}" if device == "cpu" else
               "timed with its kernels; launches counted; host time also with the kernel launches stubbed")
    timed_triton = [row for row in rows if row["variant"] == "reft-fast:triton"]
    if timed_triton:
        timed_triton[0].update(triton, status=stubbed)
    else:
        rows.append(dict(common, variant="reft-fast:triton", n_interventions=n_triton, **triton, status=stubbed))
    return rows


def _eager_times(variants, device: str, reps: int, warmup: int, base: str, log, common: dict) -> tuple:
    """(steps, numbers of interventions, statuses, milliseconds per step) of the eager ``variants``, warmed up and
    timed in paired repetitions; the DeepSpeed variants' world of one lasts as long as their timing. On the CPU the
    Triton path's steps are warmed up and timed with their launches stubbed (its kernels would run in Triton's
    interpreter; no other variant launches Triton kernels)."""
    with contextlib.ExitStack() as group:
        steps, sizes, statuses = _built_variants(variants, device, log, base, group)
        stubbed = device == "cpu" and any(_on_triton_path(variant) for variant in steps)
        with stubbed_launches() if stubbed else contextlib.nullcontext(), zero_overflow_verdicts_ignored(stubbed):
            for step in steps.values():
                for _ in range(warmup):
                    step()
            log(f"{reps} paired repetitions of {', '.join(steps)} on {device}; {common['threads']} thread(s), load "
                f"average {common['load_1min']} on {os.cpu_count()} cores")
            times = paired_times(steps, reps, device=device)
    return steps, sizes, statuses, times


def measure(reps: int, warmup: int, log=print, device: str = "cpu", variants: Optional[tuple] = None,
            base: str = "llama", on_eager_rows=None) -> list[dict]:
    """The table's rows: ``variants`` timed in pairs with the floor (default: CUDA_VARIANTS on cuda, VARIANTS on the
    CPU), and the Triton path's launches and stubbed host time (its own row unless it is among those timed), on the
    tiny Llama or its ``toy`` form (``base``). The captured variants (GRAPH_VARIANTS, CUDA only) come last, timed in
    repetitions of their own; ``on_eager_rows(rows)`` gets the table without them first (a run stopped during their
    capture keeps it)."""
    env = environment()
    versions = bench_e2e._versions()
    common = dict(machine=env["device"], torch=env["torch"], triton=env["triton"],
                  transformers=versions["transformers"], pyreft=versions["pyreft"], date=env["date"],
                  threads=torch.get_num_threads(), load_1min=round(os.getloadavg()[0], 2), reps=reps, base=base,
                  clock="thread" if device == "cpu" else "wall")
    variants = _with_plain_variants(variants or (CUDA_VARIANTS if device == "cuda" else VARIANTS))
    eager = [variant for variant in variants if variant not in GRAPH_VARIANTS]
    graphs = [variant for variant in variants if variant in GRAPH_VARIANTS]
    steps, sizes, statuses, times = _eager_times(eager, device, reps, warmup, base, log, common)
    triton, n_triton = _triton_figures(steps, device, reps, warmup, base)
    if not graphs:
        return _table(variants, times, sizes, statuses, common, triton, n_triton, device)
    if on_eager_rows is not None:
        on_eager_rows(_table(eager, times, sizes, statuses, common, triton, n_triton, device))
    times.update(_graph_times(graphs, device, reps, warmup, base, log, sizes, statuses))
    return _table(variants, times, sizes, statuses, common, triton, n_triton, device)


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few repetitions: checks that the script runs")
    parser.add_argument("--reps", type=positive_int, default=None, help="paired repetitions (default 400; smoke 4)")
    parser.add_argument("--warmup", type=positive_int, default=None,
                        help="steps per variant before timing (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSV (default bench/results/<machine>_"
                                                               "<date>/)")
    parser.add_argument("--base", choices=("llama", "toy"), default="llama",
                        help="the tiny Llama (the table), or its toy form whose layers only add a vector (ToyLayer: "
                             "resolves microseconds of host time for A/B measurements)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the steps run (default: cuda where there is a GPU; there reft-fast:triton is "
                             "timed with its kernels)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variants to time, floor among them (default: all of the device's: "
                             f"{','.join(CUDA_VARIANTS)} on cuda, {','.join(VARIANTS)} on a CPU; also: "
                             f"{','.join(DS_VARIANTS)}, the DeepSpeed engine's steps, and on a CPU reft-fast:triton, "
                             "its launches stubbed)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but torch sees no CUDA device here")
    if args.variants is not None:
        # opt-in on a CPU: the DeepSpeed variants, and the Triton path timed with its launches stubbed
        allowed = (*(CUDA_VARIANTS if args.device == "cuda" else (*VARIANTS, "reft-fast:triton")), *DS_VARIANTS)
        args.variants = tuple(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
        if "floor" not in args.variants or not set(args.variants) <= set(allowed):
            parser.error(f"argument --variants: {','.join(args.variants)!r}: give floor and others among "
                         f"{','.join(allowed)} (--device {args.device})")
    args.reps = args.reps or (4 if args.smoke else 400)
    args.warmup = args.warmup or (1 if args.smoke else 10)
    return args


def _write_and_print(rows: list[dict], args) -> Path:
    """The CSV of ``rows`` (written over) and their table on stdout."""
    env = {"device": rows[0]["machine"], "date": rows[0]["date"]}
    folder = args.out or results_folder(bench_e2e.RESULTS, env)
    # a smoke run's file is its own: its few repetitions must not replace the day's measurement
    name = "host_smoke" if args.smoke else "host_toy" if args.base == "toy" else "host"
    if args.variants and set(args.variants) & set(DS_VARIANTS):  # chosen variants with the engine's: a file of its own
        name += "_ds"
    path = write_csv(rows, result_path(folder, name, env, ".csv"), FIELDS)
    print_table(rows, ["variant", "n_interventions", "step_ms", "minus_floor_ms", "per_intervention_ms",
                       "ratio_to_hook", "ratio_to_triton_jit", "ratio_to_plain", "launches_per_intervention",
                       "stubbed_per_intervention_ms", "status"])
    print(f"wrote {path}", flush=True)
    return path


def main(argv=None) -> int:
    args = _parse_args(argv)
    torch.set_num_threads(1)  # OpenMP threads spin-waiting on a shared 2-core machine make tiny ops swing 100×

    def eager_rows(rows):  # printed before the captured variants are built: a run stopped during them keeps these
        print("the eager variants (the captured ones follow):")
        _write_and_print(rows, args)

    rows = measure(args.reps, args.warmup, device=args.device, base=args.base, variants=args.variants,
                   on_eager_rows=eager_rows)
    _write_and_print(rows, args)
    bad = [row["variant"] for row in rows if row["status"].startswith("ok") and not all(
        math.isfinite(row[key]) for key in ("step_ms",))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
