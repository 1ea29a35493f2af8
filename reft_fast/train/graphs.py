"""The training step's forward and backward replayed from CUDA graphs (``training.cuda_graphs: true``).

Why. What a ReFT step costs over its frozen base is mostly host time: Python in autograd, in the hooks, in R's map and
in Triton's launches, ≈ 0.8 ms per intervention on an H200's host against a device time of a few µs per kernel
(bench/bench_host.py, tiny 32-layer Llama, LoReFT r8 at 32 layers, 2026-11-30: eager 0.78 ms per intervention over
the floor with bound launches; the same step captured whole, 0.037 ms). Captured, a micro-batch's forward is one
graph launch and its backward another, whatever the number of interventions.

What is captured. Per batch layout (every tensor's shape and dtype, and the kept logits' count), the loss of one
micro-batch (the ReftModel's forward with its hooks, R's map, the frozen base and the task's loss: causal LM,
classification with its padding mask and head, or a preference pair's, its reference table built before training) and
its backward to the trained parameters (a trained head's too), by torch's ``make_graphed_callables``: calling it
replays the forward graph, and ``backward`` replays the backward graph, which hands the gradients to autograd; autograd
accumulates them into ``.grad`` as after an eager backward. DeepSpeed's ``engine.backward`` and ``engine.step``, the
recipe's clipping and the schedule stay eager: their host cost is per optimizer step (the fused AdamW is one launch),
not per intervention.

Inputs. A replay reads the tensors it was captured with and nothing the step's Python computed since: each batch is
checked on the host (its locations, where reading them is free), then copied into the graph's own input tensors without
waiting (from pinned memory). The layouts are few because the collator pads every batch to a multiple of
``data.pad_to_multiple_of`` tokens (64 when cuda_graphs is on and it is not set) and the kept logits are rounded up the
same way (``loss.trim_to_labels``). Before training, the recipe counts the layouts of the coming micro-batches on the
host (``plan_layouts``); the ``training.cuda_graph_shapes`` most frequent are captured when first met (three warm-up
passes on a side stream, then the capture), the others run eagerly (``capture_only``; without a plan, the first layouts
met are captured, later new ones run eagerly, said once). All graphs share one memory pool: layouts replay one at a
time (a micro-batch's forward, then its backward, then the next micro-batch), so what one graph's step frees another's
may reuse, and the pool holds about the largest layout's activations plus each graph's input, loss and gradient
tensors. The eager pass of each layout's check (below) takes as much again once, from torch's ordinary cache. Under
SDPA or eager attention a padded batch is given as one packed segment per row (``_as_one_segment``): one additive
causal mask for all layers.

Checked. The first time a captured layout meets a batch other than the one it was captured with, its replay is
compared with an eager pass over that batch (the loss and every trained gradient, neither accumulated): a value frozen
at capture that should have followed the batch shows there, and stops the run with both figures. The tolerance
allows what capture itself changes: transformers builds an explicit causal mask while a stream captures (its
``is_tracing``) where it gives SDPA ``is_causal`` eagerly, so 16-bit bases round differently. A step that draws random
numbers (dropout in the base) is not compared (the two passes draw different masks), which is said.

Gradients. A replayed backward hands autograd the graph's own gradient tensors; each trained parameter is given a
``.grad`` of its own first (``_own_gradients``), and the recipe's engine zeroes them in place.

What cannot be captured is refused when the config is read (``train_config``): ZeRO stages 1–3 (DeepSpeed's ZeRO
optimizers start each backward from hooks of the engine's forward, which a replay does not run), gradient
checkpointing, ``model.compile``, dropout in the interventions (its seed is drawn on the host per forward), liger's
fused cross-entropy (liger-kernel 0.8.5 reads the labelled-token count with ``.item()``), polar orthogonalization
(``eigh`` waits for the device), packing through flash attention's varlen lengths or flex attention's documents (host
ints per batch), DeepSpeed's autocast, timers and profiler (started in its engine's forward), a padding mask under
flash attention (a classifier's, a router loss's: transformers reads it on the host). A device other than CUDA
is refused before the model is loaded. Flash attention with one row per micro-batch is captured: the row reaches it
as varlen lengths made on the device (``loss.one_row_varlen_inputs``), so transformers reads no position ids.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from reft_fast.core.positions import check_locations
from reft_fast.train.loss import model_loss
from reft_fast.train.packing import replay_shares_one_mask

__all__ = ["CapturedLoss", "GRAPH_CHECK_TOLERANCE", "LayoutPlan", "batch_layout", "plan_layouts"]

logger = logging.getLogger(__name__)

# The replay-against-eager check: |Δloss| and each gradient's largest |Δ| relative to the eager value's largest
# magnitude (at least 1 for the loss). A value frozen at capture changes them by O(1); what capture itself changes
# (another SDPA kernel for an explicit causal mask, in 16-bit) by rounding.
GRAPH_CHECK_TOLERANCE = 5e-2
# Entries of a packed batch that only flash attention's varlen route reads (refused under cuda_graphs).
_VARLEN_ONLY = ("cu_seq_lens", "max_segment_length")
# What ``_as_one_segment`` adds: the same for every batch of a layout
_ONE_SEGMENT = ("position_ids", "segment_ids")


def batch_layout(batch: dict) -> tuple[tuple, tuple[str, ...], dict]:
    """(key, tensor names, constants) of a batch: the key is every tensor's name, shape and dtype and the other
    entries' values (``logits_to_keep``); a graph captured for one key replays any batch of that key."""
    names = tuple(sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor)))
    constants = {k: v for k, v in batch.items() if not isinstance(v, torch.Tensor)}
    key = (tuple((k, tuple(batch[k].shape), batch[k].dtype) for k in names), tuple(sorted(constants.items())))
    return key, names, constants


class _BatchLoss(nn.Module):
    """The loss of batches of one layout as a module taking only tensors (what ``make_graphed_callables`` takes).
    Its parameters are the trained ones; the ReftModel is held, not registered, so the frozen base's tensors are
    no inputs of the graph."""

    def __init__(self, reft_model: nn.Module, params: list, names: tuple, constants: dict, loss_fn: Callable):
        super().__init__()
        self.trained = nn.ParameterList(params)
        object.__setattr__(self, "reft_model", reft_model)
        self.names, self.constants, self.loss_fn = names, constants, loss_fn

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.reft_model, {**dict(zip(self.names, tensors)), **self.constants})


class _Graph:
    """One captured layout: the graphed loss, the input tensors it reads, and whether a replay was checked."""

    def __init__(self, loss: Callable, inputs: tuple, module: _BatchLoss):
        self.loss, self.inputs, self.module = loss, inputs, module
        self.checked = False
        self.replays = 0


class CapturedLoss:
    """``loss = captured(host_batch)``: a micro-batch's loss (a device scalar whose backward gives the trained
    parameters their gradients), replayed from a CUDA graph of its layout where one is captured.

    ``capture(module, sample_args, **kwargs)`` is ``torch.cuda.make_graphed_callables``; the CPU tests give a stand-in.
    ``before_capture()`` runs before each capture: the recipe waits there for its batch thread to finish pinning
    (torch captures in its "global" mode, where another thread's pinned allocation invalidates the capture).
    ``loss_fn(reft_model, batch)`` is the task's loss of a batch on the device (``loss.model_loss``: causal LM);
    ``padding_mask``: the task's batches keep their padding mask (an encoder attends both ways), so a padded batch is
    not turned into one causal segment per row."""

    def __init__(self, reft_model: nn.Module, params: list, device, *, max_shapes: int,
                 capture: Optional[Callable] = None, warmup: int = 3,
                 before_capture: Callable[[], None] = lambda: None, loss_fn: Callable = model_loss,
                 padding_mask: bool = False):
        device = torch.device(device)
        if capture is None and device.type != "cuda":
            raise ValueError(f"training.cuda_graphs needs a CUDA device; this rank trains on {device}")
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be ≥ 1, got {max_shapes}")
        self.reft_model, self.params, self.device = reft_model, list(params), device
        self.max_shapes, self.warmup, self.before_capture, self.loss_fn = max_shapes, warmup, before_capture, loss_fn
        self._capture = capture or torch.cuda.make_graphed_callables
        self._pool = torch.cuda.graph_pool_handle() if capture is None else None
        # SDPA or eager attention: a padded batch is given as one segment per row, so that its causal mask is one
        # additive tensor all layers share (``_as_one_segment``; where not: ``packing.replay_shares_one_mask``)
        config = getattr(reft_model.model, "config", None)
        self._one_mask = replay_shares_one_mask(config, getattr(config, "_attn_implementation", None), padding_mask)
        self.graphs: dict[Any, _Graph] = {}
        self.checks: list[str] = []  # each layout's replay-against-eager figures
        self.eager_micro_steps = 0
        self.wanted: Optional[set] = None  # capture_only
        self._said_full = False

    @property
    def replayed_micro_steps(self) -> int:
        return sum(graph.replays for graph in self.graphs.values())

    def layout_key(self, batch: dict):
        """The key of the graph that would replay ``batch`` (a host batch, as ``__call__`` takes)."""
        return batch_layout(self._prepared(batch)[0])[0]

    def capture_only(self, keys) -> None:
        """Capture only the layouts of ``keys`` (at most ``max_shapes`` of them; ``plan_layouts`` picks the most
        frequent), as they come; a batch of any other layout runs eagerly. Without it, the first ``max_shapes``
        layouts met are captured."""
        keys = list(keys)
        if len(keys) > self.max_shapes:
            raise ValueError(f"{len(keys)} layouts to capture, more than max_shapes={self.max_shapes}")
        self.wanted = set(keys)

    def _prepared(self, batch: dict) -> tuple[dict, tuple]:
        """(the batch as the graph takes it, the names of its tensors the layout alone determines)."""
        batch = {k: v for k, v in batch.items() if k not in _VARLEN_ONLY}
        if self._one_mask and "segment_ids" not in batch:
            return _as_one_segment(batch), _ONE_SEGMENT
        return batch, ()

    def __call__(self, batch: dict) -> torch.Tensor:
        # fixed: inputs that the layout determines: in the graph's tensors since its capture, never copied again
        batch, fixed = self._prepared(batch)
        locations = batch["intervention_locations"]
        # The ReftModel reads CPU locations itself; the graph's copies are on the device, so they are checked here.
        check_locations(locations, len(self.reft_model.interventions), locations.shape[1],
                        seq_len=batch["input_ids"].shape[1])
        key, names, constants = batch_layout(batch)
        graph = self.graphs.get(key)
        if graph is None and self._captures(key):
            graph = self.graphs[key] = self._capture_layout(batch, key, names, constants)
        elif graph is None:
            return self._eager(batch, key, fixed)
        else:
            self._copy_in(graph, batch, names, fixed)
            if not graph.checked:
                self._check(graph, key)
        graph.replays += 1
        _own_gradients(self.params)
        return graph.loss(*graph.inputs)

    def _captures(self, key) -> bool:
        if self.wanted is not None:
            return key in self.wanted
        return len(self.graphs) < self.max_shapes

    @staticmethod
    def _copy_in(graph: _Graph, batch: dict, names: tuple, fixed: tuple) -> None:
        """The batch's tensors into the graph's, without waiting: from pinned memory (the recipe's batches) the copy
        is queued; a pageable tensor would make the host wait for the device first, which is why the layout's own
        ``fixed`` tensors (built here, pageable) are not copied."""
        for static, name in zip(graph.inputs, names):
            if name not in fixed:
                static.copy_(batch[name], non_blocking=True)

    def _eager(self, batch: dict, key, fixed: tuple) -> torch.Tensor:
        """A micro-batch of a layout not captured, run eagerly: its tensors moved without waiting, the ``fixed`` ones
        (``_as_one_segment``'s, built pageable on the host: a copy of those waits for the device) made again on the
        device."""
        if not self._said_full and self.wanted is None:  # a plan (capture_only) said what runs eagerly beforehand
            self._said_full = True
            logger.warning("training.cuda_graphs: %d batch layouts captured (training.cuda_graph_shapes); a new one "
                           "(%s) and any later ones run eagerly", len(self.graphs), _describe(key))
        self.eager_micro_steps += 1
        moved = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items() if k not in fixed}
        return self.loss_fn(self.reft_model, _as_one_segment(moved) if fixed else moved)

    def _capture_layout(self, batch: dict, key, names: tuple, constants: dict) -> _Graph:
        module = _BatchLoss(self.reft_model, self.params, names, constants, self.loss_fn)
        inputs = tuple(batch[name].to(self.device, copy=True) for name in names)
        kwargs = {"num_warmup_iters": self.warmup}
        if self._pool is not None:  # torch's own capture: one pool for all layouts; a trained tensor may go unused
            kwargs.update(pool=self._pool, allow_unused_input=True)
        self.before_capture()
        try:
            loss = self._capture(module, inputs, **kwargs)
        except Exception as err:
            raise RuntimeError(f"training.cuda_graphs: capturing the step of batch layout {_describe(key)} "
                               f"failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                               "set training.cuda_graphs: false to train eagerly") from err
        logger.info("training.cuda_graphs: captured batch layout %d of at most %d: %s", len(self.graphs) + 1,
                    self.max_shapes, _describe(key))
        return _Graph(loss, inputs, module)

    def _check(self, graph: _Graph, key) -> None:
        """Compare a replay over the batch now in the graph's inputs with an eager pass over the same tensors; not
        where the step draws random numbers (dropout in the base: the two draw different masks), which is said."""
        replayed = _loss_and_grads(graph.loss(*graph.inputs), self.params)
        before = _rng_state(self.device)
        eager = _loss_and_grads(graph.module(*graph.inputs), self.params)
        graph.checked = True
        if not torch.equal(before, _rng_state(self.device)):
            self.checks.append("not compared: the step draws random numbers (dropout in the base), which a replay "
                               "and an eager pass draw differently")
            logger.warning("training.cuda_graphs: batch layout %s: %s", _describe(key), self.checks[-1])
            return
        loss_diff, grad_diff = _differences(replayed, eager)
        loss_scale = max(1.0, abs(eager[0]))
        figures = f"|Δloss| = {loss_diff:.3g} (loss {eager[0]:.4g}), largest |Δgrad| / |grad| = {grad_diff:.3g}"
        if not (loss_diff <= GRAPH_CHECK_TOLERANCE * loss_scale and grad_diff <= GRAPH_CHECK_TOLERANCE):
            raise RuntimeError(f"training.cuda_graphs: the replayed step of batch layout {_describe(key)} differs from "
                               f"the eager step over the same batch: {figures} (tolerance {GRAPH_CHECK_TOLERANCE}); "
                               "something the step computes on the host was frozen at capture. Set "
                               "training.cuda_graphs: false to train eagerly")
        self.checks.append(f"replay matches eager: {figures}")
        logger.info("training.cuda_graphs: replay matches eager on a new batch of layout %s: %s", _describe(key),
                    figures)


@dataclass
class LayoutPlan:
    """Which batch layouts a run captures (``plan_layouts``): the micro-batches of each layout among those counted,
    and the ``max_shapes`` most frequent, which are captured."""

    counts: collections.Counter
    chosen: list
    counted: int  # micro-batches whose layout was counted
    total: int  # micro-batches the run has left on this rank

    @property
    def covered(self) -> float:
        """The share of the counted micro-batches that replay (the rest run eagerly)."""
        return sum(self.counts[key] for key in self.chosen) / max(1, self.counted)

    def summary(self) -> dict:
        return {"layouts": len(self.counts), "counted": self.counted, "covered": round(self.covered, 4)}

    def describe(self, multiple: Optional[int]) -> str:
        among = f"the {self.counted} micro-batches" if self.counted == self.total else \
            f"the first {self.counted} of {self.total} micro-batches"
        said = (f"{among} this rank trains fall into {len(self.counts)} batch layout"
                f"{'' if len(self.counts) == 1 else 's'}; the {len(self.chosen)} most frequent are captured and "
                f"replay {self.covered:.0%} of them")
        if len(self.chosen) < len(self.counts):
            said += (f", the rest run eagerly (fewer layouts: a larger data.pad_to_multiple_of, now {multiple}; more "
                     "graphs: training.cuda_graph_shapes)")
        return said


def plan_layouts(keys: Iterable, max_shapes: int, total: Optional[int] = None) -> LayoutPlan:
    """The plan of a run whose micro-batches have the layouts ``keys`` (``CapturedLoss.layout_key``, in training
    order): capture the ``max_shapes`` most frequent (ties: the first met). Capturing the first layouts met instead
    leaves a run whose first batches are unusual (or whose layouts are many) mostly eager."""
    counts = collections.Counter(keys)  # insertion-ordered, and most_common keeps that order among ties
    counted = sum(counts.values())
    return LayoutPlan(counts, [key for key, _ in counts.most_common(max_shapes)], counted,
                      counted if total is None else total)


def _as_one_segment(batch: dict) -> dict:
    """A padded batch as packed rows of one segment each (``segment_ids`` of ones, positions 0…T−1): the same
    attention (causal; a padded tail attends to what precedes it, and no real token to it). While a stream captures,
    transformers builds the causal mask itself, a boolean one that SDPA converts to the hidden states' dtype in every
    layer, each layer keeping its copy for backward (measured for packing on the CPU, 2026-11-29: 4 MiB per layer at 4
    rows of 512); from segment ids the batch gets one additive mask that every layer shares
    (``packing.packed_model_inputs``)."""
    rows, length = batch["input_ids"].shape
    # made where the batch is: on the host for a capture's inputs, on the device for an eager micro-batch
    positions = torch.arange(length, dtype=torch.long, device=batch["input_ids"].device).expand(rows, length)
    positions = positions.contiguous()
    # the padding mask goes: the segments take its place (``loss.causal_model_inputs`` reads no mask beside them), and
    # a graph input nothing reads would still be copied in at every micro-batch
    kept = {k: v for k, v in batch.items() if k != "attention_mask"}
    return {**kept, "segment_ids": torch.ones_like(batch["input_ids"]), "position_ids": positions}


def _own_gradients(params: list) -> None:
    """Give every trained parameter a ``.grad`` of its own where it has none. A replayed backward hands autograd the
    graph's static gradient tensors (detached views, which the next replay overwrites), and autograd's AccumulateGrad
    takes such a tensor as the ``.grad`` itself when there is none yet: the next micro-batch's replay would then
    rewrite that ``.grad`` before adding into it (2·g₂ in place of g₁ + g₂; caught on the CPU by a stand-in capture
    that hands out its buffers the same way). With a ``.grad`` already there, AccumulateGrad adds into it. (The
    recipe's engine zeroes them in place under cuda_graphs: they are made once.)"""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _rng_state(device: torch.device) -> torch.Tensor:
    """The state of ``device``'s default generator (a host copy; CUDA's is read from the host-side generator, without
    waiting for the device): it moves when the step draws random numbers."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _loss_and_grads(loss: torch.Tensor, params: list) -> tuple[float, list]:
    """The loss's value and its gradients to ``params`` (cloned: a replay's are the graph's own tensors), without
    accumulating into ``.grad``. Reads the loss: once per captured layout."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return float(loss.detach()), [None if g is None else g.detach().clone() for g in grads]


def _differences(replayed: tuple, eager: tuple) -> tuple[float, float]:
    """|Δloss|, and the largest over the parameters of max |Δgrad| / max |eager grad| (NaN where a gradient is
    missing on one side only or is not finite)."""
    worst = 0.0
    for a, b in zip(replayed[1], eager[1]):
        if a is None and b is None:
            continue
        if a is None or b is None:
            return abs(replayed[0] - eager[0]), float("nan")
        scale = float(b.abs().max()) or 1.0
        ratio = float((a - b).abs().max()) / scale
        if not ratio <= float("inf"):  # NaN: max() would pass it over
            return abs(replayed[0] - eager[0]), float("nan")
        worst = max(worst, ratio)
    return abs(replayed[0] - eager[0]), worst


def _describe(key) -> str:
    shapes, constants = key
    parts = [f"{name} {'×'.join(map(str, shape))}" for name, shape, _ in shapes]
    parts += [f"{name}={value}" for name, value in constants]
    return ", ".join(parts)
