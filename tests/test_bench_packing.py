"""bench/bench_packing.py in its tiny mode (a tiny random Llama, two child processes, seconds): the CSV has its
columns, finite positive rates, and packed and padded losses per example agree."""

import csv
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_packing  # noqa: E402


def test_bench_packing_tiny_writes_one_row_per_mode(tmp_path, capsys):
    path = bench_packing.main(["--tiny", "--warmup", "2", "--steps", "2", "--micro-batch", "6", "--max-length", "96", "--threads", "1",
                               "--out", str(tmp_path)])
    assert path.parent.parent == tmp_path and path.name == "packing_tiny_len96.csv"
    assert f"wrote {path}" in capsys.readouterr().out  # where the CSV went, as the other scripts say
    with open(path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench_packing.FIELDS
        rows = {row["mode"]: row for row in reader}
    assert rows.keys() == {"padded", "packed"}
    for row in rows.values():
        assert row["model"] == "tiny-llama" and row["torch"] and row["transformers"] and row["machine"]
        for field in ("tokens_per_s", "time_s", "peak_mib", "loss_max_rel_diff", "ratio_vs_padded"):
            assert math.isfinite(float(row[field])), field
        assert float(row["tokens_per_s"]) > 0 and float(row["peak_mib"]) >= 0
        assert row["losses_equal"] == "True"
        assert int(row["real_tokens"]) <= int(row["slot_tokens"])
        # every step's time, run after run (two rounds), each run's two warm-ups first; the timed ones sum to time_s
        steps = [float(t) for t in row["step_s"].split(";")]
        assert len(steps) == 8 and row["warmup_steps"] == "2" and all(t > 0 for t in steps)
        assert math.isclose(sum(steps[2:4] + steps[6:]), float(row["time_s"]), abs_tol=4e-3)
    # the same examples in both modes, in fewer slots when packed
    assert rows["packed"]["real_tokens"] == rows["padded"]["real_tokens"]
    assert int(rows["packed"]["slot_tokens"]) < int(rows["padded"]["slot_tokens"])
    assert float(rows["padded"]["ratio_vs_padded"]) == 1.0


def test_example_lengths_follow_the_log_normal_and_the_cap():
    pairs = bench_packing.example_lengths(2000, max_length=512, seed=0)
    totals = sorted(p + r for p, r in pairs)
    assert 135 <= totals[len(totals) // 2] <= 165  # median about 150
    assert max(totals) == 512 and min(totals) >= 8  # the long tail reaches the cap
    assert all(p >= 4 and r >= 1 for p, r in pairs)
