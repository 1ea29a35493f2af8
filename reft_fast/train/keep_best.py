"""``training.keep_best``: the run keeps the interventions (and a trained head) of its best evaluation, not those of
its last step, as the ReFT paper's GLUE runs do (pyreft's original code selects with the Hugging Face trainer's
``metric_for_best_model`` and ``load_best_model_at_end``).

    output_dir/best/   while training: what final/ holds (ReftModel.save, the trained head, train_config.yaml) for
                       the best evaluation so far, and its record in best.json ({"step", "metric", "value"});
                       published whole under a scratch name, then renamed (a kill leaves the old best/ or the new)
    output_dir/final/  at the end: best/ renamed (no copy); its best.json says which evaluation it is

The evaluation at step 0 (the untrained baseline) is not a candidate. A metric named like a loss is best when lowest,
any other when highest; a NaN score (a correlation over constant predictions) never beats a number. A resumed run
reads the record back from best/ (or from final/, when the run had finished), so the best evaluation before the
interruption still competes with the ones after it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

from reft_fast.core.saving import trainable_base_state
from reft_fast.train.distributed import barrier
from reft_fast.train.files import publish_directory
from reft_fast.train.run_dir import load_interventions, save_interventions
from reft_fast.train.train_config import ConfigError, TrainConfig

__all__ = ["BEST_DIR", "BEST_RECORD_FILE", "BestEvaluation", "lower_is_better"]

logger = logging.getLogger(__name__)
BEST_DIR = "best"
BEST_RECORD_FILE = "best.json"


def lower_is_better(metric: str) -> bool:
    """eval_loss (and any other loss) is best when lowest; scores (accuracy, mcc, pearson, rewards) when highest."""
    return "loss" in metric


class BestEvaluation:
    """The best evaluation of a run by ``metric`` and the interventions it scored, kept in ``output/best``; every
    rank holds one and makes the same calls (the metrics are the same on every rank, reduced over them)."""

    def __init__(self, output: Path, metric: str):
        self.output = Path(output)
        self.metric = metric
        self.record: Optional[dict] = None  # {"step", "metric", "value"} of the best evaluation so far
        # this process's host copy of the weights best/ holds (none when the best came from an earlier launch)
        self._weights: Optional[tuple[dict, dict]] = None

    @classmethod
    def resume(cls, output: Path, metric: str) -> "BestEvaluation":
        """The record an earlier launch of this run left (best/, else final/ of a finished run), or none."""
        best = cls(output, metric)
        for folder in (BEST_DIR, "final"):
            path = best.output / folder / BEST_RECORD_FILE
            if path.is_file():
                best.record = json.loads(path.read_text())
                break
        if best.record is not None and best.record["metric"] != metric:
            raise ConfigError(f"training.keep_best: the run in {output} kept its best evaluation by "
                              f"{best.record['metric']!r}, this launch asks for {metric!r}; resume with the same metric")
        return best

    def improves(self, metrics: dict) -> bool:
        """Whether ``metrics`` (one evaluation's) beat the record."""
        if self.metric not in metrics:
            raise ValueError(f"training.keep_best: the evaluation reported {sorted(metrics)}, not {self.metric!r}")
        if self.record is None:
            return True
        value, best = metrics[self.metric], self.record["value"]
        if math.isnan(value) or math.isnan(best):
            return math.isnan(best) and not math.isnan(value)
        return value < best if lower_is_better(self.metric) else value > best

    def keep_if_best(self, step: int, metrics: dict, reft_model, cfg: TrainConfig, rank: int) -> bool:
        """Save the interventions as best/ when the evaluation at ``step`` beats the record (every rank calls)."""
        if step == 0 or not self.improves(metrics):
            return False
        record = {"step": step, "metric": self.metric, "value": metrics[self.metric]}
        save_interventions(reft_model, self.output / BEST_DIR, cfg, rank,
                           extra_files={BEST_RECORD_FILE: json.dumps(record) + "\n"})
        self.record = record
        # Every rank holds the same weights (they train data-parallel): each keeps its own copy, so that restoring
        # them at the end reads no file that only rank 0 wrote.
        self._weights = ({name: t.detach().to("cpu", copy=True)
                          for name, t in reft_model.interventions.state_dict().items()},
                         trainable_base_state(reft_model.model))
        return True

    def restore(self, reft_model, final_dir: Path) -> None:
        """Put the kept weights back into ``reft_model`` (after ``publish_final``): this process's copy, or, when
        the best evaluation was an earlier launch's, final/'s files (read by every rank, like a resume)."""
        if self._weights is None:
            load_interventions(reft_model, final_dir)
            return
        interventions, base = self._weights
        reft_model.interventions.load_state_dict(interventions, strict=True)
        if base:
            reft_model.model.load_state_dict(base, strict=False)

    def publish_final(self, rank: int) -> bool:
        """Make best/ the run's final/ (a rename); False when there was no evaluation to keep (every rank calls).
        A resumed run that had finished already has its best evaluation in final/."""
        if self.record is None:
            return False
        best = self.output / BEST_DIR
        if rank == 0:
            if best.is_dir():
                publish_directory(best, self.output / "final")
            logger.info("final/ holds the interventions of step %d, the best evaluation by %s (%.6g)",
                        self.record["step"], self.metric, self.record["value"])
        barrier()
        return True
