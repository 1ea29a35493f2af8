"""The training recipe: one ReFT fine-tuning job, as a class whose steps each fit on a screen; every rank runs it.

    result = ReftTrainingRecipe(cfg, callbacks=[...]).run()     # setup() → train() → finish(), cleanup() always

A short loop over a DeepSpeed engine that holds a ReftModel:

    batch (CPU, positions computed by the collator) → engine(...) → engine.backward → engine.step → metrics

DeepSpeed does ZeRO stage 0–3, CPU offload, gradient accumulation, clipping (except at stage 0 in fp32, where the
recipe clips: ``ds_config.take_gradient_clipping``), the optimizer step and the LR schedule (``ds_config``). One
process on a CPU or one GPU is the same loop at stage 0 with a world of one. The parts it is made of, one module of
``reft_fast.train`` per job:

    tasks         what differs per kind of job (``task:``): the base's Auto class, datasets, collator, loss, metrics
    distributed   joining the process group, barrier, the one reduction helper, leaving
    loading       tokenizer, the frozen base (precision; ZeRO-3 builds it inside zero.Init), the ReftModel over it
    ds_config     the DeepSpeed config (why the interventions stay whole under ZeRO-3) and the LR schedule
    loss          a batch's loss, trimmed to its labelled tail; the mean loss over an eval set
    metrics       counted FLOPs, MFU, peak memory, the metrics line
    generation    greedy answers to the sample prompts
    graphs        training.cuda_graphs: each micro-batch's forward and backward replayed from a CUDA graph
    checkpoints   one-file checkpoints any rank count resumes, and resume itself
    run_dir       the output directory: the guard against overwriting a run, its files, the final interventions

Resume: the batch order depends only on (seed, step) (data.StepSampler) and the random state is reseeded from
(seed, step) before every step, so a run resumed from a checkpoint at step k replays steps k+1… exactly as an
uninterrupted run does. ``metrics.jsonl`` gets each step's line before the next checkpoint and is cut back to step
k on resume, so the file always shows one trajectory.

No host sync inside a step: ``train_step`` only queues work (its batches were collated ahead on a thread, pinned for a
GPU, and are copied without waiting), and its loss stays on the device. The metrics of the steps since the last read
are read together (``read_metrics``: one reduction, one ``.tolist()``) every ``training.log_every`` steps and before
every evaluation, checkpoint and the end: so a checkpoint at step k always has the lines of steps 1…k before it, and a
kill loses only unread steps after the newest checkpoint, which the resume replays. The host waits for the device once
more, after a launch's first step, which it times apart: that step's warm-up is kept out of the other steps' rates
(``read_metrics``).

Collectives: every reduction goes through ``distributed.all_reduce_sum``, on the accelerator's device (NCCL reduces no
host tensors).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

from reft_fast.core.hf import num_layers_of
from reft_fast.train.checkpoints import resume_from_checkpoint, save_trainer_checkpoint, step_dirs
from reft_fast.train.data import PrefetchedBatches, StepSampler
from reft_fast.train.distributed import all_reduce_sum, announced_world_size, barrier, init_distributed, ranks
from reft_fast.train.ds_config import (build_ds_config, client_adamw, clip_gradients, lr_lambda,
                                       reduce_only_trained_gradients, skip_one_rank_gradient_allreduce,
                                       take_gradient_clipping, warmup_steps_of, zero_only_trained_gradients)
from reft_fast.train.fused_base import COMPILE_BREAKING_OPS, apply_fused_base_ops, fused_ops_wanted
from reft_fast.train.generation import generate_answers
from reft_fast.train.graphs import CapturedLoss, plan_layouts
from reft_fast.train.keep_best import BestEvaluation
from reft_fast.train.loading import build_reft_model, compile_layers, enable_gradient_checkpointing, \
    load_base_model, load_tokenizer, model_source
from reft_fast.train.loss import to_device
from reft_fast.train.metrics import MetricsLog, count_step_flops, full_numel, log_metrics, numel_on_this_rank, \
    open_tensorboard, peak_memory_gib, peak_tflops
from reft_fast.train.run_dir import check_output_dir, prepare_output_dir, read_samples_before, rewind_metrics, \
    save_interventions, write_samples_before
from reft_fast.train.tasks import make_task, task_datasets
from reft_fast.train.train_config import ConfigError, TrainConfig, gradient_accumulation_steps, layer_list, \
    padding_multiple, validate

__all__ = ["ReftTrainingRecipe", "TrainResult", "UnreadStep"]

logger = logging.getLogger(__name__)

# training.cuda_graphs: how many of a rank's coming micro-batches are built on the host to count their layouts (the
# most frequent are captured). A host batch of 8 examples of 40–400 tokens with 32 interventions takes 0.5 ms to
# build on a 2-core x86-64 CPU (2026-11-30): about 2 s for the count at most. Over 1000 such micro-batches padded to
# 64 tokens there were 8 layouts; the 4 most frequent held 95 % of the micro-batches.
GRAPH_CENSUS_LIMIT = 4096


@dataclass
class TrainResult:
    """What a run returns on every rank (the files it wrote are in ``cfg.output_dir``)."""

    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, as logged
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    eval_metrics: list[dict] = field(default_factory=list)  # {"step": k, "eval_loss": ..., the task's other metrics}
    final_dir: Optional[str] = None
    samples: list[tuple[str, str]] = field(default_factory=list)
    samples_before: list[tuple[str, str]] = field(default_factory=list)
    # a resumed run does not answer again: True when samples_before are the first launch's (read from output_dir,
    # or empty where that launch saved none)
    samples_before_resumed: bool = False
    base_numel_at_load: int = 0  # base elements materialized right after loading (ZeRO-3: only unpartitioned ones)
    fused_ops: tuple[str, ...] = ()  # the liger-kernel operations fused into the base (model.fused_ops)
    best: Optional[dict] = None  # training.keep_best: {"step", "metric", "value"} of the evaluation final/ holds
    # training.cuda_graphs: {"layouts": captured, "replayed": micro-batches, "eager": micro-batches, "checks": [...],
    # "planned": {"layouts": met among the counted micro-batches, "counted": micro-batches, "covered": share replayed}}
    cuda_graphs: Optional[dict] = None


@dataclass
class UnreadStep:
    """A trained step whose metrics are still on the device (``read_metrics`` reads all unread steps at once)."""

    step: int  # optimizer steps done
    lr: float  # the rate this step used
    loss_sum: torch.Tensor  # float64 on the device: this rank's sum of the micro-batches' losses
    host_stats: list  # this rank's micro-batches, real tokens, counted FLOPs and token slots
    grad_norm: Any  # a device tensor, a float (DeepSpeed read it already), or None (not computed at this stage)


class ReftTrainingRecipe:
    """Fine-tune ReFT interventions on a frozen base for the configured task (``reft_fast.train.tasks``); every rank
    builds one and runs the same methods.

    Features:
    - Early validation: the config and the model's own config are checked, and a non-empty output_dir is refused
      unless the launch resumes or overwrites it, before any rank joins the process group or reads a weight.
    - Data: a JSONL/JSON/CSV file or a Hugging Face dataset, an eval file or a held-out fraction, chat templates;
      the batch order depends only on (seed, step) (``StepSampler``).
    - DeepSpeed: ZeRO stage 0–3, CPU offload, gradient accumulation, clipping, the optimizer step (torch AdamW over
      the intervention parameters only) and the LR schedule (warmup, then cosine, linear or constant).
    - ZeRO-3: the base is built inside zero.Init in ``model.dtype``; the interventions stay whole on every rank.
    - Fused base operations (liger-kernel, ``model.fused_ops``) and gradient checkpointing of the base.
    - No host sync inside a step: batches collated ahead on a thread (pinned for a GPU), the loss summed on the device;
      the metrics of the steps since the last read are read at once every ``log_every`` steps and before every
      evaluation, checkpoint and the end (one reduction, one host sync).
    - Metrics: ``metrics.jsonl`` (one line per step, fsynced every ``METRICS_FSYNC_EVERY`` lines and before each
      checkpoint), TensorBoard, a tqdm bar, tokens/s, MFU, peak memory, gradient norm. Times and rates are means over
      the steps of one read: a step's own host time means nothing while the device runs behind the host. A launch's
      first step (the warm-up) is timed alone and its line marked ``"warmup": true``; the other steps' rates exclude it.
    - Evaluation (the task's metrics, ``eval_loss`` among them): at step 0 (the baseline), every ``eval_every`` steps
      and at the last step; with ``keep_best``, final/ holds the interventions of the best one (``keep_best``).
    - Checkpoints every ``save_every`` steps (``reft_fast.train.checkpoints``: one file, published atomically by rank 0,
      the newest ``keep_checkpoints`` kept); resume from the newest intact one replays the uninterrupted run.
    - Samples: greedy answers to ``sample_prompts`` before training (base alone) and after (with the interventions).
    - Every collective goes through ``distributed.all_reduce_sum`` on the accelerator's device.

    ``callback(step, metrics, engine)`` runs on every rank for each optimizer step, in order, once that step's
    metrics are read (every ``log_every`` steps, and at evaluations, checkpoints and the end; after the checkpoint, if
    any, was written); ``engine`` is in the state of the read, and ``engine.module`` is the ReftModel.
    """

    def __init__(self, cfg: TrainConfig, *, callbacks: Sequence[Callable[[int, dict, Any], None]] = ()):
        self.cfg = cfg
        self.task = make_task(cfg)
        self.callbacks = tuple(callbacks)
        self.output = Path(cfg.output_dir)
        self.ckpt_dir = self.output / "checkpoints"
        self.metrics_path = self.output / "metrics.jsonl"
        self.result: Optional[TrainResult] = None
        self.start_step = 0
        self.best: Optional[BestEvaluation] = None  # with training.keep_best
        self._hf_ds = None  # transformers holds the HfDeepSpeedConfig weakly: alive until cleanup
        self._metrics_log = self._writer = self._bar = self._batches = None
        self._unread: list[UnreadStep] = []
        self.captured: Optional[CapturedLoss] = None  # training.cuda_graphs
        self.layout_plan = None  # training.cuda_graphs: the layouts counted before training (graphs.LayoutPlan)
        self._started = self._window_started = 0.0
        self._warm_up_ended: Optional[float] = None  # when the device finished this launch's first step, until read

    def run(self) -> TrainResult:
        """The whole job: setup, train, finish; cleanup after success and failure alike, then wait for every rank."""
        try:
            self.setup()
            self.train()
            result = self.finish()
        finally:
            self.cleanup()
        barrier()
        return result

    # ----------------------------------------------------------------------------------------------------------------
    # setup
    # ----------------------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Validate, join the process group, load data and model, build the DeepSpeed engine, resume, open the logs."""
        model_config = self._join()
        self._setup_data()
        self._setup_base()
        self._setup_engine(model_config)
        self._prepare_output_dir()
        self._load_checkpoint()
        self._open_logs()
        keys = [(step, micro_step) for step in range(self.start_step, self.total_steps)
                for micro_step in range(self.accumulation)]
        if self.captured is not None:
            self._plan_layouts(keys)
        self._batches = PrefetchedBatches(self._host_batch, keys, self.engine.device)

    def _join(self):
        """Everything the config and the model's own config can tell is checked before any rank joins the process
        group or reads a weight: a mistake costs a second, not a model load on every GPU."""
        import torch.distributed as dist

        cfg = self.cfg
        announced_world = announced_world_size()
        model_config = validate(cfg, announced_world)
        check_output_dir(cfg)  # after the values: a wrong one is said first, not after the folder is cleared
        self.rank, self.world = init_distributed(cfg.deepspeed.timeout_minutes)
        if self.world != announced_world:  # an MPI launch learns its size only now
            validate(cfg, self.world, check_model=False, check_data=False)
        if self.rank == 0:
            logger.info("%s over %s; a rank waits at most deepspeed.timeout_minutes = %g for the others",
                        ranks(self.world), dist.get_backend(), cfg.deepspeed.timeout_minutes)
        self.accumulation = gradient_accumulation_steps(cfg, self.world)
        if cfg.training.cuda_graphs:  # before any weight is read
            self._check_graph_device()
        return model_config

    def _check_graph_device(self) -> None:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cuda":
            raise ConfigError(f"training.cuda_graphs: needs CUDA devices; this run's accelerator is "
                              f"{get_accelerator().device_name()!r}")

    def _setup_data(self) -> None:
        cfg, d, t = self.cfg, self.cfg.data, self.cfg.training
        self.source = model_source(cfg)
        self.tokenizer = load_tokenizer(self.source, cfg.model.trust_remote_code)
        self.train_set, self.eval_set = task_datasets(self.task, self.tokenizer, t.seed)
        self.sampler = StepSampler(len(self.train_set), t.micro_batch_size, self.world, self.accumulation, t.seed)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * self.sampler.steps_per_epoch))
        self.gen_kwargs = dict(positions=cfg.interventions.positions, share_weights=cfg.interventions.share_weights,
                               chat_template=d.chat_template, system_prompt=d.system_prompt,
                               max_new_tokens=t.max_new_tokens)

    def _setup_base(self) -> None:
        """The frozen base on its device, fused, sampled once (before training) and checkpointed as configured."""
        from deepspeed.accelerator import get_accelerator

        cfg, t = self.cfg, self.cfg.training
        # A first config only for HfDeepSpeedConfig (zero.Init); the final one knows the interventions' sizes.
        ds_config = build_ds_config(cfg, self.world)
        # A head the checkpoint lacks (roberta-base's classifier, a Llama's score) is drawn at load: seeded, so that a
        # run repeats with its seed and every rank starts from the same head.
        torch.manual_seed(t.seed)
        base, self._hf_ds = load_base_model(self.source, cfg, ds_config, auto_class=self.task.auto_class,
                                            model_kwargs=self.task.base_kwargs)
        if ds_config["zero_optimization"]["stage"] < 3:
            # deepspeed.initialize would move it there anyway (zero.Init already placed a ZeRO-3 base): moving it now
            # lets "auto" see the device the base will run on, and runs the samples before training there.
            base.to(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
        # Before checkpointing and the ReftModel wrap the base: liger patches its modules' forwards in place.
        try:
            fused_ops = apply_fused_base_ops(base, cfg.model.fused_ops,
                                             ops=fused_ops_wanted(cfg.model.fused_ops, cfg.model.compile,
                                                                  captured=t.cuda_graphs))
        except ValueError as err:  # "on" where it cannot be (no CUDA, no liger, an unsupported architecture)
            raise ConfigError(f"model.fused_ops: {err}") from None
        self.result = TrainResult(steps=self.total_steps, base_numel_at_load=sum(p.numel() for p in base.parameters()),
                                  fused_ops=fused_ops)
        if self.rank == 0:
            logger.info("base loaded: %d of %d parameters on this rank",
                        sum(numel_on_this_rank(p) for p in base.parameters()),
                        sum(full_numel(p) for p in base.parameters()))
            logger.info("fused base operations (model.fused_ops=%s): %s", cfg.model.fused_ops,
                        ", ".join(fused_ops) or "none")
            broken = [name for name in fused_ops if cfg.model.compile and name in COMPILE_BREAKING_OPS]
            if broken:  # "on": the user's choice, said once
                logger.warning("model.fused_ops=on with model.compile: liger-kernel runs %s outside torch.compile, so "
                               "each compiled decoder layer breaks its graph there; fused_ops auto leaves them out",
                               " and ".join(broken))
        self.task.bind_base(base)
        if self.task.generates and t.sample_prompts and cfg.deepspeed.stage < 3:  # ZeRO-3: only inside the engine
            self._answer_before_training(base)
        if t.gradient_checkpointing:
            enable_gradient_checkpointing(base, reentrant=t.checkpointing_reentrant)
        self.base = base

    def _answer_before_training(self, base) -> None:
        """The base's answers to training.sample_prompts, once per run: a launch that resumes from a checkpoint
        takes the first launch's from output_dir (answering again cost a minute on a CPU), or none where that launch
        saved none (``TrainResult.samples_before_resumed`` says which)."""
        t = self.cfg.training
        if self.cfg.resume and step_dirs(self.ckpt_dir):  # resume_from_checkpoint continues from one (or refuses)
            self.result.samples_before = read_samples_before(self.output) or []
            self.result.samples_before_resumed = True
            return
        answers = generate_answers(base, self.tokenizer, t.sample_prompts, **self.gen_kwargs)
        self.result.samples_before = list(zip(t.sample_prompts, answers))

    def _setup_engine(self, model_config) -> None:
        """The ReftModel over the base, its AdamW and schedule, wrapped by ``deepspeed.initialize``."""
        cfg, t = self.cfg, self.cfg.training
        torch.manual_seed(t.seed)  # the interventions' initial weights: identical on every rank
        self.layers = layer_list(cfg.interventions.layers, num_layers_of(model_config))
        self.reft_model = build_reft_model(self.base, cfg, self.layers)
        if cfg.model.compile:
            compile_layers(self.reft_model)
        params = list(self.reft_model.trainable_parameters()) + list(self.task.trainable_base_parameters(self.base))
        self.trainable_params = params
        built = initialize_engine(self.reft_model, params, cfg, self.world, self.total_steps)
        self.engine, self.optimizer, self.scheduler, self.clip_norm = built[:4]
        self.engine.train()
        # training.cuda_graphs: each micro-batch's forward and backward replayed from a graph of its layout
        self.captured = self._captured_loss(params) if t.cuda_graphs else None
        self.collator = self.task.collator(self.tokenizer, len(self.reft_model.interventions))
        self.data_order = {"seed": t.seed, "global_batch": self.sampler.global_batch,
                           "num_examples": len(self.train_set)}
        # what a resume compares with and logs
        self.saved_by = {"ranks": self.world, "zero_stage": built.zero_stage,
                         "total_steps": self.total_steps}

    def _captured_loss(self, params: list, capture: Optional[Callable] = None) -> CapturedLoss:
        """The captured loss of ``training.cuda_graphs`` (``capture``: torch's ``make_graphed_callables`` if None)."""
        if not hasattr(self.task, "model_loss"):
            raise ConfigError(f"training.cuda_graphs: task {self.cfg.task!r} ({type(self.task).__name__}) has no "
                              "model_loss(reft_model, batch), the loss a captured step calls with the ReftModel "
                              "(reft_fast.train.tasks lists a task's methods); set training.cuda_graphs: false")
        return CapturedLoss(self.reft_model, params, self.engine.device, max_shapes=self.cfg.training.cuda_graph_shapes,
                            capture=capture, before_capture=lambda: self._batches.settle(),
                            loss_fn=self.task.model_loss, padding_mask=self.task.padding_mask)

    def _plan_layouts(self, keys: list) -> None:
        """training.cuda_graphs: the layouts of this rank's coming micro-batches (the first ``GRAPH_CENSUS_LIMIT``,
        built on the host as the batch thread will build them); the most frequent are the ones captured."""
        started = time.perf_counter()
        layouts = (self.captured.layout_key(self._host_batch(key)[0]) for key in keys[:GRAPH_CENSUS_LIMIT])
        self.layout_plan = plan_layouts(layouts, self.cfg.training.cuda_graph_shapes, total=len(keys))
        self.captured.capture_only(self.layout_plan.chosen)
        if self.rank == 0:
            logger.info("training.cuda_graphs: %s (counted in %.1f s)", self.layout_plan.describe(
                padding_multiple(self.cfg)), time.perf_counter() - started)

    def _prepare_output_dir(self) -> None:
        if self.rank == 0:
            prepare_output_dir(self.cfg, self.result.fused_ops)
            if self.result.samples_before and not self.result.samples_before_resumed:  # after --overwrite's removal
                write_samples_before(self.output, self.result.samples_before)

    def _load_checkpoint(self) -> None:
        """Resume (``resume: true``) from the newest intact checkpoint, and cut metrics.jsonl back to its step."""
        if self.cfg.resume:
            self.start_step = resume_from_checkpoint(
                self.ckpt_dir, self.engine, self.reft_model, self.optimizer, self.scheduler, self.data_order, self.rank,
                lambda: [to_device(self._host_batch((0, a))[0], self.engine.device) for a in range(self.accumulation)],
                self.saved_by, loss=self.task.loss)
        if self.rank == 0:
            rewind_metrics(self.metrics_path, self.start_step)
        barrier()
        if self.cfg.training.keep_best:  # after any earlier run's best/ was removed (overwrite_output_dir)
            self.best = BestEvaluation.resume(self.output, self.cfg.training.keep_best)

    def _open_logs(self) -> None:
        t = self.cfg.training
        self.peak_tflops = peak_tflops(t.peak_tflops)
        if self.rank != 0:
            return
        self._writer = open_tensorboard(self.output)
        if t.progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", dynamic_ncols=True)
        self._metrics_log = MetricsLog(self.metrics_path)

    # ----------------------------------------------------------------------------------------------------------------
    # the loop
    # ----------------------------------------------------------------------------------------------------------------
    def train(self) -> None:
        """Steps start_step+1 … total_steps: each one trained; its metrics read, logged and handed to the callbacks every
        ``log_every`` steps and whenever an evaluation or a checkpoint is due (before them)."""
        t = self.cfg.training
        self._started = time.perf_counter()
        before_training = getattr(self.task, "before_training", None)  # a task written before the hook has none
        if before_training is not None:
            before_training(self.engine)
        if self.eval_set is not None and self.start_step == 0:  # the baseline the eval losses are compared with
            baseline = {"step": 0, **self.evaluate(0)}
            self.result.eval_losses.append((0, baseline["eval_loss"]))
            self.result.eval_metrics.append(baseline)
            if self.rank == 0:
                self._metrics_log.write(baseline)
        self._window_started = time.perf_counter()
        for step in range(self.start_step, self.total_steps):
            done = step + 1
            self._unread.append(self.train_step(step))
            if self._bar is not None:  # count and rate every step; its loss only when read (no device read here)
                self._bar.update(1)
            if step == self.start_step:
                self._end_warm_up()
            last = done == self.total_steps
            evaluate = self.eval_set is not None and (bool(t.eval_every and done % t.eval_every == 0) or last)
            save = bool(t.save_every) and done % t.save_every == 0
            if evaluate or save or last or done % t.log_every == 0:
                self._log_read_steps(evaluate, save)
        self._close_bar()

    def _end_warm_up(self) -> None:
        """Note when the device has finished this launch's first step, which ``read_metrics`` times apart: it pays
        for the warm-up (Triton's autotuning, the allocator's growth, DeepSpeed's lazy initialization, the first
        captures of ``training.cuda_graphs``), and in the first read's mean it made that read's rates misleadingly
        low. The one wait for the device outside a read, once per launch, between two steps (DeepSpeed's CPU
        accelerator waits for nothing)."""
        from deepspeed.accelerator import get_accelerator

        get_accelerator().synchronize()
        self._warm_up_ended = time.perf_counter()

    def _close_bar(self) -> None:
        """Leave the bar as it stands, on a line of its own: at the end of training, and on ctrl-C or an error (what
        is printed then landed after the bar, on its line)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _log_read_steps(self, evaluate: bool, save: bool) -> None:
        """Read the unread steps, evaluate and save when due, then hand the steps to the callbacks."""
        rows = self.read_metrics()
        done = rows[-1]["step"]
        if evaluate:
            metrics = self.evaluate(done)
            rows[-1].update(metrics)
            self.result.eval_losses.append((done, metrics["eval_loss"]))
            self.result.eval_metrics.append({"step": done, **metrics})
            if self.best is not None:  # before the checkpoint of this step: its resume has the record
                self.best.keep_if_best(done, metrics, self.reft_model, self.cfg, self.rank)
        if self.rank == 0:  # before the checkpoint: a kill during the save keeps these lines
            for row in rows:
                log_metrics(row, self._metrics_log, self._writer, self._bar, row is rows[-1], self.total_steps)
            if save:
                self._metrics_log.sync()
        if save:
            self.save_checkpoint(done)
        for row in rows:
            for callback in self.callbacks:
                callback(row["step"], row, self.engine)
        self._window_started = time.perf_counter()  # evaluations and checkpoints are not training time

    def _host_batch(self, key: tuple[int, int]) -> tuple[dict, list[int]]:
        """The host batch this rank takes at (step, micro_step), trimmed to its labels, and its sequence lengths."""
        step, micro_step = key
        items = [self.train_set[i] for i in self.sampler.indices(step, micro_step, self.rank)]
        return self.task.host_batch(self.collator(items)), [self.task.item_tokens(item) for item in items]

    def train_step(self, step: int) -> UnreadStep:
        """One optimizer step (``accumulation`` micro-batches), only queued on the device: nothing is read back (the
        loss is summed there), so the host runs ahead to the next step. Steps must come in order (the batches were
        prepared ahead in that order)."""
        t, engine = self.cfg.training, self.engine
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (DeepSpeed advances the schedule in step())
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        grad_norm = None
        seq_lens: list[int] = []
        slots = 0  # token slots the micro-batches occupy (real tokens and padding)
        for micro_step in range(self.accumulation):
            # Dropout masks depend on (seed, step, micro-batch): a resumed run replays them, and R ranks draw what
            # one rank accumulating R micro-batches draws.
            torch.manual_seed(t.seed * 1_000_003 + step * 65_536 + micro_step * self.world + self.rank)
            key, batch, lengths = next(self._batches)
            if key != (step, micro_step):
                raise RuntimeError(f"train_step({step}) out of order: the next prepared batch is for step {key[0]}")
            if self.captured is not None:
                loss = self.captured(batch)
            else:
                loss = self.task.loss(engine, to_device(batch, engine.device))
            engine.backward(loss)
            if self.clip_norm is not None and engine.is_gradient_accumulation_boundary():
                grad_norm = self._clip_gradients()
            engine.step()
            loss_sum += loss.detach()
            seq_lens += lengths
            slots += batch["input_ids"].numel()
        flops = count_step_flops(self.base, min(self.layers), seq_lens, t.gradient_checkpointing)
        if self.clip_norm is None:
            grad_norm = engine.get_global_grad_norm()
        return UnreadStep(step + 1, lr, loss_sum, [self.accumulation, sum(seq_lens), flops, slots],
                          grad_norm.detach() if isinstance(grad_norm, torch.Tensor) else grad_norm)

    def _clip_gradients(self) -> torch.Tensor:
        """Clip the (reduced) gradients of this optimizer step to ``clip_norm``: ``ds_config.clip_gradients``."""
        return clip_gradients(self.trainable_params, self.clip_norm, self.engine.device)

    def read_metrics(self) -> list[dict]:
        """The metrics lines of the steps trained since the last read: one reduction over the ranks and one
        ``.tolist()``, the loop's host sync. Times and rates (``tokens_per_s``, ``step_time_s``, ``mfu``) are those of
        all these steps together: the host measures the device's time only when it waits for it. The first step of a
        launch is the exception (``_end_warm_up``): its line has its own, marked ``"warmup": true``, and the other
        steps of its read are timed from its end, so their rates exclude the warm-up. The loop's total time (the
        "trained N steps in S s" of ``finish``) includes it."""
        unread, self._unread = self._unread, []
        losses = torch.stack([u.loss_sum for u in unread]).unsqueeze(1)
        host_stats = torch.tensor([u.host_stats for u in unread], dtype=torch.float64).to(losses.device)
        # Summed over ranks, per step: loss over micro-batches, micro-batches, real tokens, FLOPs, token slots; then
        # the gradient norm, the same on every rank (taken after the gradients were reduced), not summed.
        totals = all_reduce_sum(torch.cat([losses, host_stats], dim=1))
        totals = torch.cat([totals, _grad_norm_column(unread, totals)], dim=1).tolist()
        now = time.perf_counter()
        timed = [(unread, totals, self._window_started, now, False)]  # (steps, their totals, start, end, warm-up)
        if self._warm_up_ended is not None:  # this launch's first step is unread[0]: timed alone, the others after it
            split, self._warm_up_ended = self._warm_up_ended, None
            timed = [(unread[:1], totals[:1], self._window_started, split, True),
                     (unread[1:], totals[1:], split, now, False)]
        rows = []
        for steps, stats, started, ended, warm_up in timed:
            shared = self._window_rates(stats, ended - started) if steps else {}
            if warm_up:
                shared["warmup"] = True
            for u, (loss, micro_batches, _, _, _, device_norm) in zip(steps, stats):
                rows.append({"step": u.step, "loss": loss / micro_batches, "lr": u.lr, **shared})
                grad_norm = device_norm if isinstance(u.grad_norm, torch.Tensor) else u.grad_norm
                if grad_norm is not None:
                    rows[-1]["grad_norm"] = float(grad_norm)
                self.result.losses.append(rows[-1]["loss"])
        return rows

    def _window_rates(self, totals: list[list[float]], elapsed: float) -> dict[str, float]:
        """The rates of steps timed together over ``elapsed`` seconds, from their ``totals`` rows (``read_metrics``)."""
        tokens, flops = sum(row[2] for row in totals), sum(row[3] for row in totals)
        # packing_efficiency: real tokens / token slots (with data.packing off, the padded batches' share of real
        # tokens)
        rates = {"tokens_per_s": tokens / elapsed, "step_time_s": elapsed / len(totals),
                 "packing_efficiency": tokens / sum(row[4] for row in totals), "peak_mem_gib": peak_memory_gib()}
        if self.peak_tflops:
            rates["mfu"] = flops / (elapsed * self.peak_tflops * 1e12 * self.world)
        return rates

    def evaluate(self, step: int) -> dict[str, float]:
        """The task's metrics over the eval set, ``eval_loss`` among them (every rank takes part). Rank 0 says so while
        it runs (the baseline at step 0 comes before any step: on a CPU it took 38 s of a bar standing at 0): the bar's
        label, or without a bar one logged line."""
        if self.rank == 0:
            what = f"evaluating {'the untrained interventions' if step == 0 else f'step {step}'} on " \
                   f"{len(self.eval_set)} examples"
            if self._bar is not None:
                self._bar.set_description_str("eval", refresh=False)
                self._bar.set_postfix_str(what)
            else:
                logger.info("%s", what)
        try:
            return self.task.evaluate(self.engine, self.eval_set, self.collator, self.rank, self.world)
        finally:
            if self._bar is not None:  # the step figures come back with the next read (log_metrics)
                self._bar.set_description_str("train", refresh=False)
                self._bar.set_postfix_str("")

    def save_checkpoint(self, step: int) -> None:
        """The whole trainable state as ``checkpoints/step<step>`` (every rank gathers, rank 0 writes and prunes)."""
        save_trainer_checkpoint(self.ckpt_dir, step, self.reft_model, self.optimizer, self.scheduler, self.rank,
                                self.cfg.training.keep_checkpoints,
                                extra={"data_order": self.data_order, "saved_by": self.saved_by})

    # ----------------------------------------------------------------------------------------------------------------
    # the end
    # ----------------------------------------------------------------------------------------------------------------
    def finish(self) -> TrainResult:
        """Save the final interventions (with keep_best, the best evaluation's become final/ and the model holds
        them again), answer the sample prompts with what final/ holds, and return the run's result."""
        t, cfg = self.cfg.training, self.cfg
        if self.rank == 0:  # the training loop's time (its evaluations and checkpoints included), not what follows
            steps = self.total_steps - self.start_step
            logger.info("trained %d step%s in %.1f s", steps, "" if steps == 1 else "s",
                        time.perf_counter() - self._started)
        if self.captured is not None:
            c = self.captured
            self.result.cuda_graphs = {"layouts": len(c.graphs), "replayed": c.replayed_micro_steps,
                                       "eager": c.eager_micro_steps, "checks": list(c.checks),
                                       "planned": self.layout_plan.summary()}
            if self.rank == 0:
                logger.info("training.cuda_graphs: %d batch layout%s captured; %d micro-batches replayed, %d eager",
                            len(c.graphs), "" if len(c.graphs) == 1 else "s", c.replayed_micro_steps,
                            c.eager_micro_steps)
        final_dir = self.output / "final"
        if self.best is not None and self.best.publish_final(self.rank):
            self.result.best = dict(self.best.record)
            self.best.restore(self.reft_model, final_dir)
        else:
            save_interventions(self.reft_model, final_dir, cfg, self.rank)
        self.result.final_dir = str(final_dir)
        if self.task.generates and t.sample_prompts:
            synced = cfg.deepspeed.stage == 3 and self.world > 1
            self.engine.eval()
            answers = generate_answers(self.reft_model, self.tokenizer, t.sample_prompts, synced_gpus=synced,
                                       **self.gen_kwargs)
            self.result.samples = list(zip(t.sample_prompts, answers))
        return self.result

    def cleanup(self) -> None:
        """Stop the batch thread, close the log files (metrics.jsonl synced) and release the HfDeepSpeedConfig; runs
        after success and failure alike."""
        self._close_bar()
        if self._batches is not None:
            self._batches.close()
        if self._metrics_log is not None:
            self._metrics_log.close()
        if self._writer is not None:
            self._writer.close()
        self._metrics_log = self._writer = self._batches = None
        self._hf_ds = None


class BuiltEngine(NamedTuple):
    engine: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    clip_norm: Optional[float]  # the recipe clips to it at ZeRO stage 0 (``clip_gradients``); None: DeepSpeed clips
    zero_stage: int


def initialize_engine(model: torch.nn.Module, params: list, cfg: TrainConfig, world: int,
                      total_steps: int) -> BuiltEngine:
    """``deepspeed.initialize`` of ``model`` training ``params`` as the recipe trains them: the config of
    ``build_ds_config``, the client AdamW (``client_adamw``) with its LambdaLR schedule over ``total_steps``, and no
    gradient all-reduce where there is one process (``skip_one_rank_gradient_allreduce``) and the trained gradients
    handed to it as one flat tensor where there are several (``reduce_only_trained_gradients``), the end-of-step
    zeroing of the trained gradients only (``zero_only_trained_gradients``, or the flat tensor zeroed in place).
    bench_host's DeepSpeed variants build their engines with it too."""
    import deepspeed

    t = cfg.training
    ds_config = build_ds_config(cfg, world, max(p.numel() for p in params), sum(p.numel() for p in params))
    clip_norm = take_gradient_clipping(ds_config)
    optimizer = client_adamw(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay)
    warmup = warmup_steps_of(t.warmup_steps, t.warmup_ratio, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.schedule, warmup, total_steps,
                                                                       t.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           model_parameters=params, config=ds_config)
    if skip_one_rank_gradient_allreduce(engine) or not reduce_only_trained_gradients(engine):
        # replayed steps (training.cuda_graphs) keep each gradient a tensor of their own (train.graphs)
        zero_only_trained_gradients(engine, set_to_none=not t.cuda_graphs)
    return BuiltEngine(engine, optimizer, scheduler, clip_norm, ds_config["zero_optimization"]["stage"])


def _grad_norm_column(unread: Sequence[UnreadStep], like: torch.Tensor) -> torch.Tensor:
    """[steps, 1] on ``like``'s device: each step's gradient norm where it is a device tensor, NaN where it is a float
    DeepSpeed read already or None (the caller takes those from the step itself)."""
    column = [u.grad_norm.detach().to(like.device, like.dtype).reshape(()) if isinstance(u.grad_norm, torch.Tensor)
              else like.new_full((), math.nan) for u in unread]
    return torch.stack(column).unsqueeze(1)
