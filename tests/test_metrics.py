"""The training recipe's metrics lines (``ReftTrainingRecipe.read_metrics``): rates are means over the steps read
together, except a launch's first step, which pays the warm-up and is timed alone."""

import json
import logging
import re
import time

import pytest

from dist.tiny import make_run

SLOW_FIRST_STEP_S = 3.0


def test_the_first_steps_warm_up_is_kept_out_of_the_first_reads_rates(tmp_path, caplog):
    """The first read's tokens/s, step time and MFU were means over its steps, the first one included: its warm-up
    (Triton's autotuning, the allocator's growth, DeepSpeed's lazy initialization) made that window's rates
    misleadingly low. Here the first step takes SLOW_FIRST_STEP_S longer (a sleep) in a run read every 4 steps: its
    line has its own figures, marked as the warm-up; steps 2-4 are timed from its end and have the rates of their
    own steps; the log's total time still counts everything."""
    from reft_fast.train.distributed import shutdown
    from reft_fast.train.metrics import MetricsLog, log_metrics
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    timed, ended, reads = {}, {}, []  # timed: step -> (seconds of its train_step, the sleep included; host_stats)

    class SlowFirstStep(ReftTrainingRecipe):
        def train_step(self, step):
            started = time.perf_counter()
            if step == self.start_step:
                time.sleep(SLOW_FIRST_STEP_S)
            unread = super().train_step(step)
            ended[unread.step] = time.perf_counter()
            timed[unread.step] = (ended[unread.step] - started, unread.host_stats)
            return unread

        def read_metrics(self):
            rows = super().read_metrics()
            reads.append(time.perf_counter())
            return rows

    config = make_run(tmp_path, n_examples=24)
    cfg = load_config(str(config), ["training.max_steps=6", "training.log_every=4", "training.global_batch_size=8",
                                    "data.eval_fraction=0", "training.peak_tflops=1.0",
                                    f"output_dir={tmp_path / 'out'}"])
    caplog.set_level(logging.INFO, logger="reft_fast")
    try:
        SlowFirstStep(cfg).run()
    finally:
        shutdown()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    first, window = rows[0], rows[1:4]

    # Steps 2-4 (one read's means): their own tokens and FLOPs over a time that holds their train_steps and starts
    # after step 1 ended, so without the sleep (exact bounds: no tolerance for a loaded machine to break).
    assert len({(row["tokens_per_s"], row["step_time_s"], row["mfu"]) for row in window}) == 1
    seconds = window[0]["step_time_s"] * 3
    tokens, flops = (sum(timed[step][1][column] for step in (2, 3, 4)) for column in (1, 2))
    assert window[0]["tokens_per_s"] * seconds == pytest.approx(tokens, rel=1e-9)
    assert window[0]["mfu"] * seconds * 1e12 == pytest.approx(flops, rel=1e-9)  # peak_tflops 1, one rank
    assert sum(timed[step][0] for step in (2, 3, 4)) <= seconds <= reads[0] - ended[1], (seconds, first)

    # Step 1: its own figures, the warm-up in them, marked.
    assert first["warmup"] is True and first["step_time_s"] >= timed[1][0] >= SLOW_FIRST_STEP_S
    assert first["tokens_per_s"] == pytest.approx(timed[1][1][1] / first["step_time_s"], rel=1e-9)
    assert all("warmup" not in row for row in rows[1:])
    again = MetricsLog(tmp_path / "again.jsonl")
    log_metrics(first, again, None, None, True, 6)  # shown: a bar's figures, or without one a logged line
    again.close()
    assert caplog.records[-1].getMessage().endswith(", warm-up yes"), caplog.records[-1].getMessage()

    total = float(re.search(r"trained 6 steps in ([0-9.]+) s", caplog.text).group(1))
    assert total >= sum(s for s, _ in timed.values()) - 0.05  # the summary keeps the warm-up (the sleep among them)
