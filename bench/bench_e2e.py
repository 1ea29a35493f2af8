"""End-to-end ReFT training steps against the frozen-base floor, pyreft, a plain hook LoReFT and LoRA.

    python bench/bench_e2e.py                      # CUDA: Llama-2-7B shape, the full grid below (one command)
    python bench/bench_e2e.py --shape 13b          # larger shapes for larger GPUs: 13b, 34b
    python bench/bench_e2e.py --smoke              # CPU: a tiny Llama, 2 steps per row, every row that runs on a CPU

The base is built from a config (random init, nothing downloaded), bf16, SDPA attention, batch 8 × 512 tokens, the loss
on the second half of every sequence (the first half is the "prompt" whose tokens are edited). Configurations:
  (a) layers 3, 9, 18, 24, LoReFT rank 4, positions f5+l5 (the first 5 and last 5 prompt tokens, each layer listed
      twice as pyreft's scripts do: one intervention for the first positions, one for the last), as pyreft's
      instruction-tuning recipe;
  (b) all layers, rank 8, f7+l7, shared weights (one intervention per layer on all 14 positions), as its
      commonsense recipe;
each without and with gradient checkpointing, and each both without and with the fused base operations
(liger-kernel's RoPE, RMSNorm, SwiGLU and fused linear cross-entropy, ``reft_fast.train.fused_base``).

Rows (methods), each measured in a process of its own (forked from a server that imported the libraries once, so no
row sees another's memory, CUDA context or compiled kernels in memory):
  floor         forward + backward down to the lowest intervened layer with one trainable bias there: the least any
                ReFT step can cost
  reft-fast     reft_fast.get_reft_model, backend triton, cuda (when reft_fast.ops.cuda_build imports) and, with
                --methods, torch (the unfused reference)
  hook-loreft   LoReFT written as a plain PyTorch forward hook (gather, edit, scatter; torch's orthogonal
                parametrization), what a user would write by hand
  pyreft        pyreft 0.1.0 on pyvene (when importable; its interventions in the base dtype, its default)
  lora          PEFT LoRA r8 on q_proj and v_proj (when importable)
  floor-replayed, reft-fast:triton-replayed
                the floor's and reft-fast:triton's model, batch and optimizer stepped as the recipe steps under
                ``training.cuda_graphs: true`` (``replayed_training_step``): the forward and backward replayed from
                CUDA graphs (reft-fast's through ``train.graphs.CapturedLoss``, given the pinned host batch at every
                step), zero_grad in place and AdamW eager. Their ratio_floor is against floor-replayed; their status
                carries CapturedLoss's replay-against-eager figures. Only where the recipe can capture: CUDA, no
                gradient checkpointing, no fused cross-entropy (the rows with the fused base are skipped: liger's
                fused cross-entropy reads the labelled-token count on the host, ``fused_base.CAPTURE_BREAKING_OPS``)
A step is zero_grad, forward with labels, backward and an AdamW step over the trainable parameters (the recipe's
AdamW, ``ds_config.client_adamw``: fused where torch has the kernel, for every method). Reported: the
median step time after warm-up, tokens/s, the ratio to the floor of the same configuration (ratio_floor) and to the
floor without fused operations (ratio_plain_floor), peak GPU memory, TFLOP/s and MFU (FLOPs counted by
reft_fast.train.metrics.count_step_flops, divided by the bf16 matrix-product peak measured in its own process), and for the
ReFT rows the orthogonalization cost per step (R for every intervention, forward + backward) and the time of one
layer's edit (forward + backward on a [B, T, d] hidden state).

``--plan session`` runs SESSION_ROWS instead of the grid, in their order (bench/gpu_session.sh). Each row also reports
``cpu_issue_s``: the median time until the step's Python call returns, before the synchronize (the host's share).

Writes bench/results/e2e_<device>_<date>.csv (e2e_smoke_... with --smoke; device, library versions and date in every
row) and a PNG beside it, and prints a markdown table for the README. ``--deadline-s`` stops starting rows when the time is spent: the rows left
are written with status "not run: deadline", so a partial run is still a valid file.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import math
import multiprocessing
import multiprocessing.connection
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

# Every row runs in a process forked from a server process. A process forked from one that has asked the CUDA runtime
# for its device count cannot use CUDA ("Cannot re-initialize CUDA in forked subprocess"), and
# torch.cuda.is_available() asks it, here and in liger-kernel's import-time device check. With this variable set,
# is_available() asks NVML instead, which leaves CUDA alone; the server inherits it from this process.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import torch  # noqa: E402

# Triton kernels run on a CPU only through the interpreter, which must be chosen before they are decorated; the
# forkserver inherits the environment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_kernels: the shared timing and CSV helpers
from bench_kernels import environment, measure_ms, result_path, write_csv  # noqa: E402

from reft_fast.train.cli import _positive_number, positive_int  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Llama-2 7B / 13B and CodeLlama-34B shapes; "tiny" is the smoke test's.
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "34b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
# layers None = all; the smoke test's tiny model has 4 layers, so (a) sits at two of them.
CONFIGS = {
    "a": dict(layers=(3, 9, 18, 24), rank=4, positions="f5+l5", share_weights=False),
    "b": dict(layers=None, rank=8, positions="f7+l7", share_weights=True),
}
SMOKE_LAYERS_A = (1, 2)
# The recipe's training.cuda_graphs route (reft_fast/train/graphs.py) on the model, batch and optimizer of an eager
# method (replayed_training_step). reft-fast:torch-replayed is opt-in (--methods): on a CPU the tests run it through
# their capture stand-in, a make_fx trace, which cannot trace the Triton path's in-place kernels in Triton's
# interpreter (NotImplementedError on an UntypedStorage argument; torch 2.13 CPU, triton 3.9, 2026-11-30).
REPLAYED_METHODS = {"floor-replayed": "floor", "reft-fast:triton-replayed": "reft-fast:triton",
                    "reft-fast:torch-replayed": "reft-fast:torch"}
FLOORS = ("floor", "floor-replayed")
METHODS = ("floor", "reft-fast:triton", "reft-fast:cuda", "reft-fast:torch", "hook-loreft", "pyreft", "lora",
           *REPLAYED_METHODS)
DEFAULT_METHODS = ("floor", "reft-fast:triton", "reft-fast:cuda", "pyreft", "hook-loreft", "lora", "floor-replayed",
                   "reft-fast:triton-replayed")
SMOKE_METHODS = ("floor", "reft-fast:triton", "reft-fast:torch", "hook-loreft", "pyreft", "lora")
LORA_RANK = 8
# --plan session (bench/gpu_session.sh): the rows of one GPU command, most wanted first, as (config, checkpointing,
# fused base ops, method). The headline (b) against its floors; (b) on the plain base through training.cuda_graphs'
# replayed forward and backward, with the eager reft-fast:triton of that base (the plain floor is the headline's);
# (a); checkpointing; the cuda backend last (its nvcc build costs about a minute). The replayed rows are on the plain
# base because the recipe captures no fused cross-entropy. Each costs about an eager row: its capture adds 3 warm-up
# passes, 1 captured and 1 replay checked against an eager pass, ≈ 5 forward + backward passes (the plain floor's
# step: 0.258 s on the H200, 2026-11-28), so ≈ 1.5 s and the graphs' instantiation (not measured), against the eager
# rows' extras (orth_ms, edit_ms: do_bench runs of a few seconds), which a replayed row skips.
SESSION_ROWS = (
    ("b", False, True, "floor"), ("b", False, True, "reft-fast:triton"), ("b", False, True, "pyreft"),
    ("b", False, True, "hook-loreft"), ("b", False, False, "floor"),
    ("b", False, False, "floor-replayed"), ("b", False, False, "reft-fast:triton-replayed"),
    ("b", False, False, "reft-fast:triton"),
    ("a", False, True, "floor"), ("a", False, True, "reft-fast:triton"), ("a", False, True, "pyreft"),
    ("a", False, True, "hook-loreft"),
    ("b", True, True, "floor"), ("b", True, True, "reft-fast:triton"),
    ("a", False, False, "floor"),
    ("b", False, True, "reft-fast:cuda"),
)
# The libraries rows import, imported once by the server the rows are forked from (the module SERVER_PRELOAD).
ROW_LIBRARIES = ("transformers.models.llama.modeling_llama", "reft_fast.core.model", "reft_fast.train.loading",
                 "reft_fast.train.metrics", "reft_fast.train.fused_base", "reft_fast.train.graphs",
                 "liger_kernel.transformers", "peft", "pyreft")
SERVER_PRELOAD = "e2e_preload"

FIELDS = ["device", "torch", "triton", "transformers", "liger_kernel", "pyreft", "peft", "date", "timer", "shape",
          "dtype", "config", "checkpointing", "fused", "fused_ops", "method", "batch", "seq_len", "layers", "rank",
          "positions", "n_interventions", "trainable_params", "warmup", "steps", "step_s", "step_s_min",
          "cpu_issue_s", "tokens_per_s", "ratio_floor", "ratio_plain_floor", "first_loss", "peak_gib", "tflops", "mfu", "peak_tflops",
          "orth_ms", "edit_ms", "status"]
TABLE = [("method", "method"), ("config", "config"), ("ckpt", "checkpointing"), ("fused", "fused"),
         ("step s", "step_s"), ("issue s", "cpu_issue_s"), ("× floor", "ratio_floor"), ("× plain floor", "ratio_plain_floor"),
         ("tokens/s", "tokens_per_s"), ("peak GiB", "peak_gib"), ("MFU", "mfu"), ("orth ms", "orth_ms"),
         ("edit ms", "edit_ms"), ("status", "status")]


# --------------------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------------------
def _layers(config: str, shape: str) -> list[int]:
    n = SHAPES[shape]["num_hidden_layers"]
    spec = CONFIGS[config]["layers"]
    if spec is None:
        return list(range(n))
    return list(SMOKE_LAYERS_A) if shape == "tiny" else list(spec)


def plan_rows(args) -> list[dict]:
    """Every row of the run, most wanted first (a deadline then cuts the least wanted): per configuration, without
    checkpointing before with it, the floor first (the others' ratios need it), fused before plain. With --plan
    session, SESSION_ROWS in their order (on a CPU, where liger's kernels cannot run, with the base unfused)."""
    if args.plan == "session":
        cells = [(c, k, f and args.device == "cuda", m) for c, k, f, m in SESSION_ROWS]
        cells = list(dict.fromkeys(cells))  # the CPU twin of a fused row may already be planned
    else:
        methods = sorted(args.methods, key=lambda m: m not in FLOORS)
        cells = [(config, checkpointing, fused, method) for checkpointing in sorted(args.checkpointing)
                 for config in args.configs for fused in args.fused for method in methods]
    return [dict(shape=args.shape, config=config, checkpointing=checkpointing, fused=fused, method=method,
                 batch=args.batch, seq_len=args.seq_len, dtype=args.dtype, warmup=args.warmup, steps=args.steps,
                 reps=args.reps, device=args.device) for config, checkpointing, fused, method in cells]


def skip_reason(row: dict, capture=None) -> str | None:
    """Why a row cannot run here, decided without starting it (None: run it). ``capture``: what captures a replayed
    row's graphs in place of torch's make_graphed_callables (the tests' CPU stand-in)."""
    method = row["method"]
    if method in REPLAYED_METHODS:
        reason = _capture_refused(row, capture)
        if reason:
            return reason
    if row["fused"] and row["device"] != "cuda":
        return "skipped: fused base operations need CUDA (liger-kernel's Triton kernels)"
    if row["fused"] and importlib.util.find_spec("liger_kernel") is None:
        return "skipped: liger-kernel not importable"
    if method == "reft-fast:cuda":
        if row["device"] != "cuda":
            return "skipped: the cuda backend needs CUDA"
        if importlib.util.find_spec("reft_fast.ops.cuda_build") is None:
            return "skipped: reft_fast.ops.cuda_build not importable"
    if method == "pyreft" and importlib.util.find_spec("pyreft") is None:
        return "skipped: pyreft not importable"
    if method == "lora" and importlib.util.find_spec("peft") is None:
        return "skipped: peft not importable"
    return None


def _capture_refused(row: dict, capture) -> str | None:
    """Why training.cuda_graphs cannot step this row (what reft_fast/train/train_config.py ``_check_cuda_graphs``
    refuses, for this bench's rows), or None."""
    if row["device"] != "cuda" and capture is None:
        return "skipped: CUDA graphs need CUDA (torch's make_graphed_callables; on a CPU only the tests' stand-in)"
    if row["checkpointing"]:
        return "skipped: CUDA graphs with gradient checkpointing: not captured (training.cuda_graphs refuses it)"
    if row["fused"]:
        return ("skipped: CUDA graphs with the fused base: liger-kernel's fused cross-entropy reads the labelled-token "
                "count on the host (.item()), which a capture refuses (fused_base.CAPTURE_BREAKING_OPS)")
    return None


# --------------------------------------------------------------------------------------------------------------------
# One row, in its own process
# --------------------------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build_base(row: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, row["dtype"])
    config = LlamaConfig(**SHAPES[row["shape"]], max_position_embeddings=max(4096, row["seq_len"]),
                         rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(row["device"]):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model


def make_batch(row: dict, n_interventions: int) -> dict:
    """Random tokens, labels on the second half, and the locations [n_interventions, B, P] of the configuration."""
    from reft_fast.core.positions import intervention_locations

    cfg = CONFIGS[row["config"]]
    batch, seq_len, device = row["batch"], row["seq_len"], row["device"]
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, SHAPES[row["shape"]]["vocab_size"], (batch, seq_len), generator=generator)
    labels = input_ids.clone()
    labels[:, : seq_len // 2] = -100
    locations = intervention_locations([seq_len // 2] * batch, cfg["positions"], n_interventions,
                                       share_weights=cfg["share_weights"])
    if bool((locations < 0).any()):
        raise ValueError(f"seq_len {seq_len} is too short for positions {cfg['positions']}: some slots are empty")
    return dict(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                labels=labels.to(device), locations=locations.to(device))


def _interventions_per_layer(row: dict) -> tuple[list[int], int]:
    """Intervened layers, one entry per intervention, and the lowest one."""
    from reft_fast.core.positions import intervention_layers

    cfg = CONFIGS[row["config"]]
    layers = intervention_layers(_layers(row["config"], row["shape"]), cfg["positions"], cfg["share_weights"])
    return layers, min(layers)


def _setup_floor(base, row, batch, layers):
    from reft_fast.core.hf import find_decoder_layers

    _, decoder = find_decoder_layers(base)
    bias = torch.nn.Parameter(torch.zeros(base.config.hidden_size, device=row["device"]))

    def add_bias(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + bias.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    decoder[min(layers)].register_forward_hook(add_bias)

    def loss():
        return base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    return loss, [bias], {}


def _setup_reft_fast(base, row, batch, layers):
    from reft_fast import ReftConfig, get_reft_model
    from reft_fast.core.interventions import compute_rotations

    backend = row["method"].split(":")[1]
    cfg = CONFIGS[row["config"]]
    reft_config = ReftConfig([{"layer": layer, "component": "block_output", "low_rank_dimension": cfg["rank"],
                               "intervention": "loreft"} for layer in layers],
                             positions=cfg["positions"], share_weights=cfg["share_weights"])
    reft_model = get_reft_model(base, reft_config, backend=backend)
    reft_model.train()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def loss():
        _, output = loss.model(inputs, intervention_locations=batch["locations"], labels=batch["labels"])
        return output.loss

    loss.model = reft_model  # what the loss calls: bench_host's DeepSpeed variants put their engine around it there
    interventions = list(reft_model.interventions.values())
    params = reft_model.trainable_parameters()

    def orthogonalize():
        rotations = compute_rotations(interventions[0].orthogonalization,
                                      [iv.rotation_inputs() for iv in interventions])
        sum(R.sum() for R in rotations).backward()

    hidden = _random_hidden(base, row)
    rotation = compute_rotations(interventions[0].orthogonalization, [interventions[0].rotation_inputs()])[0].detach()
    positions = batch["locations"][0]

    def edit():
        out = interventions[0].edit(hidden, positions, rotation=rotation, backend=backend, validate=False)
        out.backward(hidden.detach())

    return loss, params, dict(orth=(orthogonalize, params), edit=(edit, [hidden, *params]))


def _random_hidden(base, row) -> torch.Tensor:
    dtype = next(base.parameters()).dtype
    return torch.randn(row["batch"], row["seq_len"], base.config.hidden_size, device=row["device"], dtype=dtype,
                       requires_grad=True)


class _HookLoReFT(torch.nn.Module):
    """LoReFT by hand: h[b, p] += (W h + b − R h) Rᵀ at given positions; R: torch's orthogonal parametrization."""

    def __init__(self, hidden: int, rank: int, positions: torch.Tensor):
        super().__init__()
        self.rotate = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(rank, hidden, bias=False))
        self.source = torch.nn.Linear(hidden, rank)
        self.positions = positions  # [B, P], all valid

    def edit(self, hidden: torch.Tensor) -> torch.Tensor:
        index = self.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        x = hidden.gather(1, index).float()
        R = self.rotate.weight  # [d, r], orthonormal columns
        edited = x + (self.source(x) - x @ R) @ R.T
        return hidden.scatter(1, index, edited.to(hidden.dtype))

    def hook(self, module, args, output):
        if isinstance(output, tuple):
            return (self.edit(output[0]), *output[1:])
        return self.edit(output)


def _setup_hook(base, row, batch, layers):
    from reft_fast.core.hf import find_decoder_layers

    _, decoder = find_decoder_layers(base)
    rank = CONFIGS[row["config"]]["rank"]
    torch.manual_seed(2)
    hooks = []
    for index, layer in enumerate(layers):
        intervention = _HookLoReFT(base.config.hidden_size, rank, batch["locations"][index]).to(row["device"])
        decoder[layer].register_forward_hook(intervention.hook)
        hooks.append(intervention)
    params = [p for h in hooks for p in h.parameters()]

    def loss():
        return base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def orthogonalize():
        sum(h.rotate.weight.sum() for h in hooks).backward()

    hidden = _random_hidden(base, row)

    def edit():
        hooks[0].edit(hidden).backward(hidden.detach())

    return loss, params, dict(orth=(orthogonalize, params), edit=(edit, [hidden, *params]))


def _setup_pyreft(base, row, batch, layers):
    import pyreft

    rank = CONFIGS[row["config"]]["rank"]
    dtype = next(base.parameters()).dtype
    torch.manual_seed(2)
    representations = [{"layer": layer, "component": "block_output", "low_rank_dimension": rank,
                         "intervention": pyreft.LoreftIntervention(embed_dim=base.config.hidden_size,
                                                                   low_rank_dimension=rank, dtype=dtype)}
                        for layer in layers]
    reft_model = pyreft.get_reft_model(base, pyreft.ReftConfig(representations=representations))
    reft_model.train()
    interventions = [iv for iv in reft_model.interventions.values()]
    params = [p for iv in interventions for p in iv.parameters() if p.requires_grad]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def loss():
        # pyreft's trainer converts the locations with .tolist() every step; so does this.
        locations = batch["locations"].tolist()
        _, output = reft_model(inputs, unit_locations={"sources->base": (None, locations)}, labels=batch["labels"],
                               use_cache=False)
        return output.loss

    def orthogonalize():
        # pyreft's LoReFT reads rotate_layer.weight twice per forward, each read recomputing the parametrization.
        sum(iv.rotate_layer.weight.sum() + iv.rotate_layer.weight.sum() for iv in interventions).backward()

    return loss, params, dict(orth=(orthogonalize, params))


def _setup_lora(base, row, batch, layers):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    return loss, params, {}


_SETUPS = {"floor": _setup_floor, "reft-fast": _setup_reft_fast, "hook-loreft": _setup_hook, "pyreft": _setup_pyreft,
           "lora": _setup_lora}


def training_parts(base, row: dict, **adamw_options):
    """(loss function, optimizer, intervention layers, lowest intervened layer, trained parameters, the method's
    extras) of the row's method on ``base``, with the row's batch and interventions; ``adamw_options`` go to the
    optimizer (bench_host's captured steps need ``capturable=True``)."""
    layers, lowest = _interventions_per_layer(row)
    batch = make_batch(row, len(layers))
    loss_fn, params, extras = _SETUPS[row["method"].split(":")[0]](base, row, batch, layers)
    base.train()  # checkpointing and the fused cross-entropy act in training mode (Llama has no dropout)
    from reft_fast.train.ds_config import client_adamw

    # the recipe's AdamW (fused where torch has the kernel) for every method: the rows compare the edit paths
    optimizer = client_adamw(params, lr=1e-4, **adamw_options)
    return loss_fn, optimizer, layers, lowest, params, extras


def training_step(base, row: dict):
    """(step, intervention layers, lowest intervened layer, trained parameters, the method's extras): one AdamW step
    of the row's method on ``base`` (its loss returned), with the row's batch and interventions."""
    loss_fn, optimizer, layers, lowest, params, extras = training_parts(base, row)
    return functools.partial(optimizer_step, optimizer, loss_fn), layers, lowest, params, extras


def optimizer_step(optimizer, loss_fn, set_to_none: bool = True):
    """One training step: zero_grad (``set_to_none``), the loss, its backward, the optimizer's step; the loss."""
    optimizer.zero_grad(set_to_none=set_to_none)
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    return loss


class FloorLoss(torch.nn.Module):
    """The floor's loss as a module of its batch tensors (what make_graphed_callables takes): the base (held, not
    registered: its frozen weights are no graph inputs) with the floor's bias hook; the bias is the one parameter.
    Its batch is given as CapturedLoss gives reft-fast's (one segment per row: one additive causal mask for all
    layers, ``packing.packed_model_inputs``), so that the pair differs only by the interventions."""

    def __init__(self, base, bias: torch.nn.Parameter):
        super().__init__()
        self.bias = bias
        object.__setattr__(self, "base", base)

    def forward(self, input_ids, labels, position_ids, segment_ids) -> torch.Tensor:
        from reft_fast.train.packing import packed_model_inputs

        batch = {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids}
        return self.base(**packed_model_inputs(batch, self.base), labels=labels).loss


def replayed_training_step(base, row: dict, warmup: int = 3, capture=None):
    """(step, intervention layers, lowest intervened layer, trained parameters, status) of a REPLAYED_METHODS row: the
    recipe's ``training.cuda_graphs`` route on the eager method's model, batch and optimizer (``training_parts``).
    reft-fast's loss is ``train.graphs.CapturedLoss`` given the host batch (pinned on CUDA) at every step, as the
    recipe's loop gives it: checked on the host, copied into the graph's inputs, the forward replayed; ``backward``
    replays the backward graph and autograd accumulates the gradients; zero_grad (in place: the .grad tensors
    CapturedLoss gives each parameter, ``graphs._own_gradients``) and the AdamW step run eagerly. The floor's loss (no
    mask, as the recipe's causal batches) is graphed here, at once, by the same capture (``warmup`` passes first).
    reft-fast's first step captures (``warmup`` passes, then the capture), its second checks a replay against an eager
    pass: ``status()`` says how it compared (call it after the second step). ``capture``: the graph maker (torch's
    make_graphed_callables, or the tests' CPU stand-in)."""
    from reft_fast.train.graphs import CapturedLoss

    device = row["device"]
    eager_row = dict(row, method=REPLAYED_METHODS[row["method"]])
    loss_fn, optimizer, layers, lowest, params, _ = training_parts(base, eager_row)
    batch = make_batch(eager_row, len(layers))  # the same tensors' values as training_parts' (a seeded generator)
    make_graphed = capture or torch.cuda.make_graphed_callables
    floor = eager_row["method"] == "floor"
    if floor:
        module = FloorLoss(base, params[0])
        rows, length = batch["input_ids"].shape
        inputs = (batch["input_ids"], batch["labels"],
                  torch.arange(length, device=device).expand(rows, length).contiguous(),
                  torch.ones_like(batch["input_ids"]))
        graphed = make_graphed(module, inputs, num_warmup_iters=warmup)
        with torch.no_grad():
            replayed, eager = float(graphed(*inputs)), float(module(*inputs))
        floor_status = (f"forward and backward graphed; replayed loss − eager {abs(replayed - eager):.3g} "
                        f"(loss {eager:.4g})")

        def loss_of():
            return graphed(*inputs)
    else:
        host = {"input_ids": batch["input_ids"].cpu(), "labels": batch["labels"].cpu(),
                "intervention_locations": batch["locations"].cpu()}
        host = {k: v.pin_memory() for k, v in host.items()} if device == "cuda" else host
        captured = CapturedLoss(loss_fn.model, params, device, max_shapes=1, capture=capture, warmup=warmup)

        def loss_of():
            return captured(host)

    def status() -> str:
        if floor:
            return floor_status
        return "forward and backward replayed (CapturedLoss): " + ("; ".join(captured.checks) or "not checked yet")

    # The floor's bias: set to None, so that autograd takes the graph's static gradient as the .grad (read by this
    # step's AdamW, dropped before the next replay rewrites it). reft-fast's: zeroed in place, as the recipe's engine
    # does (CapturedLoss gives each parameter a .grad of its own, which autograd adds into).
    step = functools.partial(optimizer_step, optimizer, loss_of, set_to_none=floor)
    return step, layers, lowest, params, status


def run_row(row: dict, capture=None) -> dict:
    """Build the base and the method, warm up, time the steps; returns the row's measurements (``note``: what its
    status adds to "ok"). ``capture``: a replayed row's graph maker (default torch's make_graphed_callables)."""
    from reft_fast.train.fused_base import apply_fused_base_ops
    from reft_fast.train.loading import enable_gradient_checkpointing
    from reft_fast.train.metrics import count_step_flops

    device = row["device"]
    base = build_base(row)
    fused = apply_fused_base_ops(base, "on") if row["fused"] else ()
    if row["checkpointing"]:
        enable_gradient_checkpointing(base, reentrant=False)
    replayed = row["method"] in REPLAYED_METHODS
    if replayed:  # its extras are its eager method's (the same interventions)
        step, layers, lowest, params, status = replayed_training_step(base, row, capture=capture)
        extras = {}
    else:
        step, layers, lowest, params, extras = training_step(base, row)
    # The first step's loss: the same for rows whose edit is a no-op at initialization (floor, LoRA), the same across
    # ReFT implementations given the same parameters; a check that every row does the work it claims. (A replayed
    # reft-fast row captures in its first step and checks the replay against eager in its second: neither is timed.)
    first_loss = step().detach().item()
    for _ in range(max(row["warmup"] - 1, 1 if replayed else 0)):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, issue_times = [], []
    for _ in range(row["steps"]):
        start = time.perf_counter()
        loss = step()
        # The host has issued the step's work when step() returns (CUDA runs behind it): an issue time close to
        # the step time means the GPU waited on the host (or a sync inside the step).
        issue_times.append(time.perf_counter() - start)
        _sync(device)
        times.append(time.perf_counter() - start)
    final_loss = loss.detach().item()
    if not math.isfinite(final_loss):
        raise FloatingPointError(f"the loss is {final_loss}")
    step_s = statistics.median(times)
    result = dict(step_s=step_s, step_s_min=min(times), cpu_issue_s=statistics.median(issue_times), first_loss=first_loss, fused_ops="+".join(fused) or "none",
                  trainable_params=sum(p.numel() for p in params), n_interventions=len(layers),
                  tokens_per_s=row["batch"] * row["seq_len"] / step_s,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else math.nan)
    # LoRA trains adapters in every layer: its backward goes all the way down.
    flops = count_step_flops(base, 0 if row["method"] == "lora" else lowest, [row["seq_len"]] * row["batch"],
                             row["checkpointing"])
    result["tflops"] = flops / step_s / 1e12
    for name, (fn, grads) in extras.items():
        result[f"{name}_ms"] = measure_ms(fn, grad_to_none=grads, reps=row["reps"])
    if replayed:
        result["note"] = status()
    return result


def measure_matmul_peak(device: str) -> dict:
    """The bf16 matrix-product peak of this GPU, MFU's denominator. Measured on 8192³ products, the shape of the
    H100 80GB anchor of bench/NOTES.md (798 TFLOP/s, torch 2.11, 2026-11-23)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = measure_ms(lambda: a @ b)
    return dict(peak_tflops=2 * n**3 / (ms * 1e-3) / 1e12)


def row_result(kind: str, row: dict, capture=None) -> dict:
    """What a row process sends back: the row's measurements (``kind`` "row") or the matrix-product peak ("peak"),
    with a status: "ok" (then "; " and what the row adds, a replayed row its replay-against-eager figures), "oom" or
    "error: ...". ``capture``: run_row's."""
    try:
        result = measure_matmul_peak(row["device"]) if kind == "peak" else run_row(row, capture)
        note = result.pop("note", "")
        result["status"] = f"ok; {note}" if note else "ok"
    except torch.cuda.OutOfMemoryError:
        result = dict(status="oom")
    except Exception as error:  # the row's failure is its result; the run goes on
        traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0][:200]
        result = dict(status=f"error: {type(error).__name__}: {first_line}")
    return result


def is_ok(status: str) -> bool:
    """Whether a row's status is a measurement ("ok", or "ok; " and what the row adds)."""
    return status == "ok" or status.startswith("ok; ")


def _child(kind: str, row: dict, connection) -> None:
    connection.send(row_result(kind, row))
    connection.close()


# --------------------------------------------------------------------------------------------------------------------
# The parent: one process per row, then the CSV, the plot and the table
# --------------------------------------------------------------------------------------------------------------------
def _import_row_libraries() -> None:
    """Import ROW_LIBRARIES, printing (not raising) any failure: a library that cannot be imported fails the rows that
    need it, not the server every row is forked from (multiprocessing's own preload lets any error but ImportError
    end the server, and every row with it)."""
    for name in ROW_LIBRARIES:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        before = torch.cuda.is_initialized()
        try:
            importlib.import_module(name)
        except Exception as error:
            print(f"preload: import {name} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        if torch.cuda.is_initialized() and not before:  # the rows forked from here cannot use CUDA (H200, 2026-11-30)
            print(f"preload: import {name} initialized CUDA: the rows will be spawned instead", file=sys.stderr,
                  flush=True)


def _context(start_method: str):
    """forkserver: the server, started with the first row, imports this file and ROW_LIBRARIES (bench/e2e_preload.py),
    then every row is a fresh fork of it, with the libraries already imported. spawn: every row imports them itself
    (seconds more per row)."""
    context = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        context.set_forkserver_preload([SERVER_PRELOAD])
        # The server does not take this process's sys.path (Python 3.11, and 3.12 before 3.12.8), and its preload
        # must find e2e_preload.py here: this folder on the PYTHONPATH it inherits.
        here, previous = str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH")
        if here not in (previous or "").split(os.pathsep):
            os.environ["PYTHONPATH"] = here + (os.pathsep + previous if previous else "")
    return context


FORK_POISONED = "Cannot re-initialize CUDA in forked subprocess"


class _RowProcess:
    """One row running in a process of its own; ``result()`` waits for it (up to the row's time limit)."""

    def __init__(self, context, kind: str, row: dict, timeout_s: float):
        self.row, self.timeout_s, self.started = row, timeout_s, time.monotonic()
        self.receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=_child, args=(kind, row, sender))
        self.process.start()
        sender.close()  # the child holds the only sending end: its exit without a result reads as EOF

    def result(self) -> dict:
        left = max(0.0, self.timeout_s - (time.monotonic() - self.started))
        result = None
        if self.receiver.poll(left):
            try:
                result = self.receiver.recv()
            except EOFError:  # the process died (a crash, the OOM killer) before sending
                pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        if result is None:
            return dict(status=f"error: no result (exit code {self.process.exitcode}, limit {self.timeout_s:.0f} s)")
        return result


def run_in_process(context, kind: str, row: dict, timeout_s: float) -> dict:
    return _RowProcess(context, kind, row, timeout_s).result()


def run_rows(context, rows: list[dict], jobs: int, timeout_s: float, deadline: float | None, on_row=None) -> None:
    """Run the rows whose status is empty, ``jobs`` at a time, filling in each row's results (then ``on_row(row)``)."""
    queue = [row for row in rows if not row["status"]]
    running: list[_RowProcess] = []
    while queue or running:
        while queue and len(running) < jobs:
            row = queue.pop(0)
            if deadline is not None and time.monotonic() > deadline:
                row["status"] = "not run: deadline"
                continue
            running.append(_RowProcess(context, "row", row, timeout_s))
        if not running:
            continue
        ready = multiprocessing.connection.wait([r.receiver for r in running] + [r.process.sentinel for r in running],
                                                timeout=1.0)
        for item in list(running):
            timed_out = time.monotonic() - item.started > item.timeout_s
            if item.receiver in ready or item.process.sentinel in ready or timed_out:
                item.row.update(item.result())
                running.remove(item)
                _report(item.row)
                if on_row is not None:
                    on_row(item.row)


def _versions() -> dict:
    found = {}
    for field, dist in (("transformers", "transformers"), ("liger_kernel", "liger-kernel"), ("pyreft", "pyreft"),
                        ("peft", "peft")):
        try:
            found[field] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[field] = "-"
    return found


def records(rows: list[dict], env: dict, peak_tflops: float) -> list[dict]:
    """The CSV records of the rows so far: labels, versions, the ratios to the floors and MFU."""
    def floor_of(row, fused):
        # a replayed row's floor is the replayed floor (capture takes the floor's own host time off too)
        floor = "floor-replayed" if row["method"] in REPLAYED_METHODS else "floor"
        for other in rows:
            if (other["method"] == floor and is_ok(other["status"]) and other["config"] == row["config"]
                    and other["checkpointing"] == row["checkpointing"] and other["fused"] == fused):
                return other["step_s"]
        return math.nan

    out = []
    for row in rows:
        cfg = CONFIGS[row["config"]]
        layers = _layers(row["config"], row["shape"])
        record = {**row, **env, "fused": "on" if row["fused"] else "off",
                  "checkpointing": "on" if row["checkpointing"] else "off",
                  "layers": ";".join(map(str, layers)) if len(layers) < 8 else f"all {len(layers)}",
                  "rank": cfg["rank"], "positions": cfg["positions"] + (" shared" if cfg["share_weights"] else "")}
        if is_ok(row["status"]):
            record["ratio_floor"] = row["step_s"] / floor_of(row, row["fused"])
            record["ratio_plain_floor"] = row["step_s"] / floor_of(row, False)
            record["peak_tflops"] = peak_tflops
            record["mfu"] = row["tflops"] / peak_tflops
        out.append({field: record.get(field, "") for field in FIELDS})
    return out


def markdown_table(rows: list[dict]) -> str:
    def cell(value):
        if isinstance(value, float):
            return "–" if math.isnan(value) else f"{value:.3g}"
        return str(value).replace("|", "\\|")  # a replayed row's status has |Δloss|

    lines = ["| " + " | ".join(title for title, _ in TABLE) + " |", "|" + "---|" * len(TABLE)]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(key, "")) for _, key in TABLE) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["config"], r["checkpointing"]) for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4.5), squeeze=False)
    width = 0.4
    for ax, (config, checkpointing) in zip(axes[0], groups):
        variants = [v for v in ("off", "on") if any(r["fused"] == v for r in rows)]
        for offset, fused in zip((-width / 2, width / 2) if len(variants) == 2 else (0.0,), variants):
            heights = []
            for method in methods:
                match = [r for r in rows if (r["config"], r["checkpointing"], r["method"], r["fused"])
                         == (config, checkpointing, method, fused) and is_ok(r["status"])]
                heights.append(match[0]["step_s"] if match else 0.0)
            ax.bar([i + offset for i in range(len(methods))], heights, width,
                   label="fused base ops" if fused == "on" else "plain base")
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"config ({config}){', checkpointing' if checkpointing == 'on' else ''}")
        ax.set_ylabel("median step (s)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny Llama on the CPU, 2 steps per row (for CI)")
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"], default="7b")
    parser.add_argument("--plan", choices=("grid", "session"), default="grid",
                        help="grid: configs × checkpointing × fused × methods; session: SESSION_ROWS in their order "
                        "(bench/gpu_session.sh; --configs, --methods, --checkpointing and --fused do not apply)")
    parser.add_argument("--start-method", choices=("forkserver", "spawn"), default="forkserver",
                        help="how the row processes start (default forkserver: the libraries are imported once)")
    parser.add_argument("--configs", default="b,a", help="comma-separated from a,b (default b,a)")
    parser.add_argument("--methods", default=None, help=f"comma-separated from {','.join(METHODS)}")
    parser.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    parser.add_argument("--fused", default=None, help="fused base operations: on, off or on,off (default: on,off "
                        "on CUDA, off on a CPU, where liger's kernels cannot run)")
    parser.add_argument("--batch", type=positive_int, default=None)
    parser.add_argument("--seq-len", type=positive_int, default=None)
    parser.add_argument("--warmup", type=positive_int, default=None)
    parser.add_argument("--steps", type=positive_int, default=None)
    parser.add_argument("--deadline-s", type=float, default=None, help="start no row after this many seconds")
    parser.add_argument("--row-timeout-s", type=_positive_number, default=None,
                        help="seconds a row may take before it is stopped (default 120 on a CPU, 420 on CUDA)")
    parser.add_argument("--jobs", type=positive_int, default=None, help="rows at a time (CPU only; CUDA rows run alone)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and PNG (default bench/results)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    def listed(text, allowed, name):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            parser.error(f"--{name}: {bad or text!r} not among {list(allowed)}")
        return values

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        parser.error("the full grid needs a CUDA GPU (a 7B-shape model); on a CPU use --smoke")
    args.device = "cuda" if cuda and not args.smoke else "cpu"
    if args.smoke:
        args.shape = "tiny"
    args.configs = listed(args.configs, CONFIGS, "configs")
    default_methods = SMOKE_METHODS if args.device == "cpu" else DEFAULT_METHODS
    args.methods = listed(args.methods, METHODS, "methods") if args.methods else list(default_methods)
    args.checkpointing = [v == "on" for v in listed(args.checkpointing, ("off", "on"), "checkpointing")]
    fused = listed(args.fused or ("on,off" if args.device == "cuda" else "off"), ("on", "off"), "fused")
    if "on" in fused and args.device != "cuda":
        parser.error(f"argument --fused: {args.fused!r}: the fused base operations (liger-kernel's Triton kernels) "
                     "need CUDA; on a CPU use --fused off")
    args.fused = [v == "on" for v in fused]
    small = args.device == "cpu"
    args.batch = args.batch or (2 if small else 8)
    args.seq_len = args.seq_len or (32 if small else 512)
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if small else 3))
    args.steps = args.steps or (1 if small else 10)
    args.reps = 1 if small else 5  # CPU timings of the extras: wall clock (CUDA: do_bench, which ignores reps)
    args.row_timeout_s = args.row_timeout_s or (120 if small else 420)
    args.jobs = 1 if args.device == "cuda" else (args.jobs or 2)
    args.dtype = "bfloat16"
    return args


NOT_FINISHED = "not run: the run was stopped before this row finished"


def main(argv=None) -> int:
    args = _parse_args(argv)
    started = time.monotonic()
    env = {**environment(), **_versions(),
           "timer": "step: median of synchronized wall-clock steps; extras: " + environment()["timer"]}
    context = _context(args.start_method)
    peak_tflops = math.nan
    if args.device == "cuda":
        # The first process: the matrix-product peak, and the proof that a forked row can use CUDA. If the server
        # initialized CUDA after all (an import this file does not know of), the rows are spawned instead.
        peak = run_in_process(context, "peak", dict(device="cuda"), args.row_timeout_s)
        if FORK_POISONED in peak["status"] and args.start_method != "spawn":
            print(f"forked rows cannot use CUDA ({peak['status']}): starting every row with spawn", flush=True)
            context = _context("spawn")
            peak = run_in_process(context, "peak", dict(device="cuda"), args.row_timeout_s)
        peak_tflops = peak.get("peak_tflops", math.nan)
        print(f"bf16 matrix-product peak: {peak_tflops:.0f} TFLOP/s ({peak['status']})", flush=True)

    rows = plan_rows(args)
    for row in rows:
        row["status"] = skip_reason(row) or ""
    csv_path = result_path(args.out, "e2e_smoke" if args.smoke else "e2e", env, ".csv")  # smoke: never the measurement

    def save(_row=None):  # after every row, so that a run cut short still leaves its measurements
        # Rows still queued or running say so: if the run is killed now, that is what the file must tell.
        unfinished = [{**row, "status": row["status"] or NOT_FINISHED} for row in rows]
        write_csv(records(unfinished, env, peak_tflops), csv_path, FIELDS)

    deadline = started + args.deadline_s if args.deadline_s is not None else None
    run_rows(context, rows, args.jobs, args.row_timeout_s, deadline, on_row=save)
    save()
    table = records(rows, env, peak_tflops)
    print(f"\nwrote {csv_path}")
    if not args.no_plot:
        title = (f"ReFT step, {args.shape} shape, {args.dtype}, batch {args.batch}×{args.seq_len}, {env['device']}, "
                 f"torch {env['torch']}, transformers {env['transformers']}, liger {env['liger_kernel']}, "
                 f"{env['date']}")
        print(f"wrote {plot(table, csv_path.with_suffix('.png'), title)}")
    print(f"\n{args.shape} shape, {args.dtype}, batch {args.batch} × {args.seq_len}, {env['device']}, {env['date']}\n")
    print(markdown_table(table))
    return 0


def _report(row: dict) -> None:
    ok = is_ok(row.get("status", ""))
    detail = f"{row['step_s']:.4f} s" + row["status"][2:] if ok else row.get("status")
    print(f"[{row['config']} ckpt={'on' if row['checkpointing'] else 'off'} fused={'on' if row['fused'] else 'off'}] "
          f"{row['method']}: {detail}", flush=True)


if __name__ == "__mp_main__":
    # This file in a row process (a spawned one, or a fork of the server, where they are imported already): import
    # what the rows need.
    _import_row_libraries()

if __name__ == "__main__":
    sys.exit(main())
