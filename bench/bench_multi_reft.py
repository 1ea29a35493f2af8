"""Serving several ReFTs: one mixed batch (adapter_names) against the same prompts grouped by ReFT, one call each.

    python bench/bench_multi_reft.py --new-tokens 8 --rounds 1   # SmolLM2-135M-Instruct, CPU (the recorded run)
    python bench/bench_multi_reft.py --tiny     # a tiny random Llama, seconds

Four ReFTs of different types, ranks, layers and position specs (LoReFT r4 at layers 8 and 16 f3+l3 shared, NoReFT
r8 at 12 l2, DiReFT r2 at 4 f1, ConsReFT r4 at 20 l1; random weights: the speed does not depend on them) over one
base; 8 prompts (2 per ReFT, random token ids, 24–64 tokens, left padded), greedy, ``--new-tokens`` each. Mixed: one
``generate`` over the 8 rows with ``adapter_names``. Grouped: for each ReFT, ``set_adapter`` and a ``generate`` over its
2 rows. Rounds in ABBA order (a drifting load weighs on both); tokens/s = generated tokens / wall time, median over
rounds. Both modes' tokens are checked equal row by row where the batches give the same greedy result (reported).

Writes bench/results/<machine>_<date>/multi_reft.csv (multi_reft_tiny.csv with --tiny) with the machine, versions and
date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import environment, results_folder  # noqa: E402
from bench_orthogonal_convergence import load_smollm2  # noqa: E402

from reft_fast.core.config import ReftConfig  # noqa: E402
from reft_fast.core.model import ReftModel  # noqa: E402
from reft_fast.core.positions import intervention_locations  # noqa: E402
from reft_fast.train.cli import positive_int  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REFTS = {
    "lo": ([{"layer": 8, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 4},
            {"layer": 16, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 4}],
           "f3+l3", True),
    "no": ([{"layer": 12, "component": "block_output", "intervention": "noreft", "low_rank_dimension": 8}], "l2", True),
    "di": ([{"layer": 4, "component": "mlp_output", "intervention": "direft", "low_rank_dimension": 2}], "f1", True),
    "cons": ([{"layer": 20, "component": "block_output", "intervention": "consreft", "low_rank_dimension": 4}],
             "l1", True),
}
FIELDS = ["machine", "processor", "torch", "transformers", "date", "threads", "model", "rows", "refts", "new_tokens",
          "rounds", "mixed_s", "grouped_s", "mixed_tokens_per_s", "grouped_tokens_per_s", "ratio", "rows_equal"]


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=24, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(config).eval()


def _served(base, directory: Path) -> ReftModel:
    """A ReftModel over ``base`` holding the four ReFTs (saved and loaded back, as a server would)."""
    for index, (name, (representations, positions, share)) in enumerate(REFTS.items()):
        torch.manual_seed(index)
        reft = ReftModel(base, ReftConfig(representations, positions=positions, share_weights=share))
        reft.save(directory / name)
        reft.remove_hooks()
    served = ReftModel.load(directory / "lo", base)
    for name in REFTS:
        served.load_adapter(directory / name, name)
    return served.eval()


def _prompts(vocab: int, rows: int):
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(24, 65, (rows,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    mask = (torch.arange(width)[None, :] >= (width - lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _mixed(served, base_inputs, names, new_tokens):
    return served.generate(base_inputs, adapter_names=names, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=0, eos_token_id=None)[1]


def _grouped(served, base_inputs, names, new_tokens):
    outputs = {}
    for name in dict.fromkeys(names):
        rows = [i for i, given in enumerate(names) if given == name]
        group = {key: value[rows] for key, value in base_inputs.items()}
        served.set_adapter(name)  # the single-ReFT path, its positions from its spec and the group's padding
        representations, positions, share = REFTS[name]
        lengths = group["attention_mask"].sum(1)
        locations = intervention_locations(lengths, positions, len(representations), share_weights=share,
                                           offsets=group["attention_mask"].shape[1] - lengths)
        _, out = served.generate(group, intervention_locations=locations, max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
        outputs.update(zip(rows, out))
    served.set_adapter("default")
    return torch.stack([outputs[i] for i in range(len(names))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2")
    parser.add_argument("--new-tokens", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=2, help="ABBA rounds (each: mixed, grouped, grouped, mixed)")
    parser.add_argument("--out", default=None, help="CSV path (default: bench/results/<machine>_<date>/)")
    args = parser.parse_args()
    base = _tiny() if args.tiny else load_smollm2()[0].eval()
    names = [name for name in REFTS for _ in range(2)]
    inputs = _prompts(base.config.vocab_size, len(names))
    with tempfile.TemporaryDirectory() as directory:
        served = _served(base, Path(directory))
        mixed_out, grouped_out = _mixed(served, inputs, names, 2), _grouped(served, inputs, names, 2)  # warm-up
        times = {"mixed": [], "grouped": []}
        for _ in range(args.rounds):
            for mode in ("mixed", "grouped", "grouped", "mixed"):
                start = time.perf_counter()
                out = (_mixed if mode == "mixed" else _grouped)(served, inputs, names, args.new_tokens)
                times[mode].append(time.perf_counter() - start)
                if mode == "mixed":
                    mixed_out = out
                else:
                    grouped_out = out
    generated = len(names) * args.new_tokens
    mixed_s, grouped_s = statistics.median(times["mixed"]), statistics.median(times["grouped"])
    rows_equal = sum(bool(torch.equal(a[-args.new_tokens:], b[-args.new_tokens:]))
                     for a, b in zip(mixed_out, grouped_out))
    row = dict(machine=environment()["device"],  # as its folder and the other benches name it; threads: its own column
               processor=_cpu_name(), torch=torch.__version__, transformers=_version("transformers"), date=_today(),
               threads=torch.get_num_threads(), model="tiny-llama" if args.tiny else "SmolLM2-135M-Instruct",
               rows=len(names), refts=len(REFTS), new_tokens=args.new_tokens, rounds=args.rounds,
               mixed_s=round(mixed_s, 3), grouped_s=round(grouped_s, 3),
               mixed_tokens_per_s=round(generated / mixed_s, 1), grouped_tokens_per_s=round(generated / grouped_s, 1),
               ratio=round(grouped_s / mixed_s, 2), rows_equal=f"{rows_equal}/{len(names)}")
    out = Path(args.out) if args.out else default_out(args.tiny)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerow(row)
    print(row)
    print(f"wrote {out}")


def _today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def default_out(tiny: bool) -> Path:
    """bench/results/<machine>_<today>/multi_reft[_tiny].csv: a run never overwrites another day's, another machine's
    or the other model's measurement."""
    return results_folder(RESULTS, environment()) / ("multi_reft_tiny.csv" if tiny else "multi_reft.csv")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
