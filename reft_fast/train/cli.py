"""``reft-fast train | generate | eval | demo | plan``.

    reft-fast train CONFIG.yaml [section.key=value ...] [--resume | --overwrite]
    reft-fast generate --reft DIR --model M "prompt" ["prompt" ...]
    reft-fast generate --reft NAME=DIR [--reft NAME=DIR ...] --prompts-file IN.jsonl [--output OUT.jsonl]
    reft-fast eval CONFIG.yaml|RUN_DIR [--data FILE] [--family F] [--out FILE] [--batch-size N] [--base-only]
    reft-fast demo [section.key=value ...] [--resume]
    reft-fast plan CONFIG.yaml --gpus N [section.key=value ...]

``section.key=value`` overrides may stand anywhere after the command, before or after its options.

``python -m reft_fast`` is the same program, so it runs under the launchers (the deepspeed launcher spells it
``--module``, torchrun ``-m``):

    deepspeed --num_gpus 8 --module reft_fast train CONFIG.yaml
    deepspeed --hostfile HOSTS --module reft_fast train CONFIG.yaml
    torchrun --nproc_per_node 8 -m reft_fast train CONFIG.yaml

The launchers set RANK/WORLD_SIZE; DeepSpeed's adds ``--local_rank``, which is accepted and ignored: LOCAL_RANK is in
the environment too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

from reft_fast.core.saving import CONFIG_NAME
from reft_fast.train.distributed import StaleBuildLock
from reft_fast.train.train_config import ConfigError, load_config

__all__ = ["main", "positive_int"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reft-fast", description="Representation finetuning on a DeepSpeed engine")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train interventions as a YAML config describes")
    train.add_argument("config", help="YAML config file")
    # default=[]: without it argparse names an empty nargs="*" positional among the "required" ones in its error
    train.add_argument("overrides", nargs="*", default=[],
                       help="section.key=value, e.g. training.lr=1e-3 deepspeed.stage=3")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="replace an earlier run's outputs in output_dir")

    gen = sub.add_parser("generate", help="answer prompts with trained interventions")
    gen.add_argument("--reft", required=True, action="append",
                     help="a run's output_dir or its final/ (the interventions); repeat as NAME=DIR to serve several "
                          "ReFTs in one batch, each prompt of --prompts-file naming its own")
    gen.add_argument("--model", default=None, help="base model (default: the one the interventions were trained on)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    gen.add_argument("--base-only", action="store_true", help="answer with the base model alone, for comparison")
    gen.add_argument("--prompts-file", default=None,
                     help='JSONL, one {"prompt": ..., "reft": NAME or null} per line (with NAME=DIR --reft)')
    gen.add_argument("--output", default=None, help="JSONL answers (default: stdout), with --prompts-file")
    gen.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch, with --prompts-file")
    gen.add_argument("prompts", nargs="*")

    _add_eval_parser(sub)

    demo = sub.add_parser("demo", help="the built-in demo: LoReFT teaches SmolLM2-135M-Instruct a pirate persona")
    demo.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides of the demo config")
    demo.add_argument("--resume", action="store_true",
                      help="continue an interrupted demo from its last checkpoint (with training.save_every)")

    plan = sub.add_parser("plan", help="per-GPU memory estimate of a config before launching it")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*", default=[])
    plan.add_argument("--gpus", type=positive_int, required=True, help="number of GPUs (data-parallel ranks)")
    plan.add_argument("--gpu-memory-gib", type=_positive_number, default=80.0,
                      help="memory of one GPU, for the fit check")
    return parser


def _add_eval_parser(sub) -> None:
    from reft_fast.train.evaluation import FAMILIES

    evaluate = sub.add_parser("eval", help="accuracy of the answers generated with trained interventions")
    evaluate.add_argument("target", help="a training config (its output_dir/final is evaluated) or a run directory "
                                         "(output_dir, or its final/)")
    evaluate.add_argument("overrides", nargs="*", default=[], help="section.key=value overrides of the config")
    evaluate.add_argument("--data", help="JSON/JSONL of prompts and gold answers (default: data.eval_file, else the "
                                         "held-out data.eval_fraction of data.train_file)")
    evaluate.add_argument("--split", help="the split of a Hugging Face dataset given as --data (default: test; for a "
                                          "folder written by Dataset.save_to_disk, the one split it holds)")
    evaluate.add_argument("--family", choices=FAMILIES, default=None,
                          help="how answers are read (default: data.eval_family, else guessed from the gold answers)")
    evaluate.add_argument("--out", help="predictions JSONL (default: output_dir/eval/<data>.jsonl, <data>-base.jsonl "
                                        "with --base-only, <data>-<folder>.jsonl for a folder of interventions other "
                                        "than the run's final/); a classification or preference run writes its "
                                        "metrics beside it, as .json")
    evaluate.add_argument("--batch-size", type=positive_int, default=None,
                          help="prompts per generate call and rank (default 8); a classification or preference run "
                               "is scored in batches of training.micro_batch_size")
    evaluate.add_argument("--max-new-tokens", type=positive_int, default=None,
                          help="default: training.max_new_tokens")
    evaluate.add_argument("--base-only", action="store_true", help="answer with the base model alone, for comparison")


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """argparse takes a positional list only in one run, so ``train cfg --resume k=v`` leaves ``k=v`` over: such
    ``key=value`` words are overrides wherever they stand, in the order given (a later one wins)."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides = [word for word in rest if "=" in word and not word.startswith("-")]
    unknown = [word for word in rest if word not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:
        args.overrides = list(args.overrides) + overrides
    return args


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


class RanksTimedOut(RuntimeError):
    """A rank waited longer than ``deepspeed.timeout_minutes`` for the others."""


class RankLost(RuntimeError):
    """A collective failed because another rank's end of the connection went away (that rank was killed or crashed)."""


# gloo: "Timed out waiting 5000ms for recv operation"; making a group: DistStoreError "wait timeout after 6000ms";
# NCCL (when its watchdog raises rather than aborts): "Watchdog caught collective operation timeout".
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
# gloo, when a peer process dies mid-collective (torch 2.13, seen 2026-11-29 after kill -9 of one rank): "Read error
# [127.0.0.1]:18600: Connection reset by peer", or "Connection closed by peer"; NCCL: "remote process exited".
_PEER_LOST = re.compile(r"connection (reset|closed) by peer|remote process exited", re.IGNORECASE)


@contextlib.contextmanager
def _distributed_job(timeout_minutes: float):
    """Leave the process group at the end of a command; on a failure leave at once, and explain a timeout."""
    from reft_fast.train.distributed import shutdown

    try:
        yield
    except BaseException as err:
        shutdown(wait_for_others=False)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, RuntimeError) and _PEER_LOST.search(str(err)):
            raise RankLost(f"rank {os.environ.get('RANK', '0')} lost its connection to another rank ({first_line}): "
                           "that rank stopped (killed, out of memory, an error: its output says which)") from err
        if isinstance(err, RuntimeError) and _TIMEOUT.search(str(err)):
            raise RanksTimedOut(
                f"rank {os.environ.get('RANK', '0')} waited more than deepspeed.timeout_minutes = {timeout_minutes:g} "
                f"for the other ranks ({first_line}). Another rank stopped or hangs: look in its output for an error "
                "or an out-of-memory kill, check that every rank runs the same config and data and that the nodes "
                "reach each other (MASTER_ADDR, MASTER_PORT, firewall); if a step or the model loading really takes "
                "that long, raise deepspeed.timeout_minutes.") from err
        raise
    shutdown()


class Interrupted(Exception):
    """ctrl-C (or SIGTERM) during a command, with what it kept."""


@contextlib.contextmanager
def _interrupted_keeps(kept: str):
    """ctrl-C or SIGTERM while answering (generate, eval) ends with one line saying what is kept, ``kept``, instead
    of a traceback per rank."""
    try:
        with _sigterm_as_ctrl_c():
            yield
    except KeyboardInterrupt:
        raise Interrupted(kept) from None


def _train(config_path: Optional[str], overrides: Sequence[str], resume: bool = False, overwrite: bool = False):
    from reft_fast.train.recipe import ReftTrainingRecipe

    cfg = load_config(config_path, list(overrides))
    cfg.resume = cfg.resume or resume
    cfg.overwrite_output_dir = cfg.overwrite_output_dir or overwrite
    try:
        with _sigterm_as_ctrl_c(), _distributed_job(cfg.deepspeed.timeout_minutes):
            return cfg, ReftTrainingRecipe(cfg).run()
    except KeyboardInterrupt:
        raise Interrupted(_what_an_interrupted_run_kept(cfg)) from None
    except (RankLost, RanksTimedOut) as err:  # the others of a job that lost a rank: say how it goes on
        raise type(err)(f"{err} The run stopped; {_what_an_interrupted_run_kept(cfg)}") from err.__cause__


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM unwinds like ctrl-C (closing the logs on the way) while the block runs in the main thread. DeepSpeed's
    launcher answers ctrl-C by sending each rank SIGTERM at once (0.19.8), which would end rank 0 before it says what
    the run kept, and a rank killed during the first CPU build of DeepSpeed's shared-memory op would leave the build's
    lock behind (torch removes it on the way out of an exception). Python sets handlers only from the main thread:
    elsewhere SIGTERM keeps its own."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _what_an_interrupted_run_kept(cfg) -> str:
    """ctrl-C in a terminal reaches every rank (the launcher's whole process group): each would print a traceback of
    where it was; one line instead, which says what is kept and how to go on (checkpoints are published whole, so a
    kill leaves none torn)."""
    from reft_fast.train.checkpoints import step_dirs

    saved = step_dirs(Path(cfg.output_dir) / "checkpoints")
    if not saved:  # the demo (which overwrites its run) said only "(training.save_every)": no way on
        every = cfg.training.save_every
        when = (f"the first comes at step {every}" if every else
                "training.save_every is 0, so this run writes none; training.save_every=N makes it resumable")
        again = "" if cfg.overwrite_output_dir else " with --resume"
        return f"no checkpoint was written yet ({when}): the same command{again} starts again at step 0"
    return f"the newest checkpoint is {saved[-1][1]}: the same command with --resume continues from it"


def _print_samples(title: str, samples) -> None:
    print(f"\n=== {title} ===")
    for prompt, answer in samples:
        print(f"Q: {prompt}\nA: {answer}\n")


def _print_run_samples(result, base_name: str) -> None:
    """Rank 0: the answers to training.sample_prompts before training (when the run made them; a resumed run's are
    its first launch's) and after."""
    if not _is_rank0():
        return
    if result.samples_before_resumed:  # not answered again by a launch that resumed
        title = f"before training ({base_name} alone, answered by the run's first launch)"
        if result.samples_before:
            _print_samples(title, result.samples_before)
        else:  # a first launch that kept no copy of them
            print(f"\n=== {title} ===\n(in that launch's output only)\n")
    elif result.samples_before:
        _print_samples(f"before training ({base_name} alone)", result.samples_before)
    if result.samples:
        _print_samples(f"after {result.steps} steps (interventions in {result.final_dir})", result.samples)


def _demo(overrides: Sequence[str], resume: bool = False) -> None:
    from reft_fast.demo import DEMO_CONFIG
    from reft_fast.train.run_dir import FinishedRunWithoutCheckpoint

    # The built-in job replaces its own earlier run (only that run's outputs), so the README's command can be re-run;
    # --resume continues it instead, as ctrl-C's message says (it was refused: "unrecognized arguments").
    try:
        _, result = _train(str(DEMO_CONFIG), overrides, resume=resume, overwrite=not resume)
    except FinishedRunWithoutCheckpoint as err:  # said "pass --overwrite", which the demo refuses as unrecognized
        raise ConfigError(f"resume: {err.output} holds a finished demo run but no checkpoint to continue from (the "
                          "demo writes checkpoints only with training.save_every=N): `reft-fast demo` without "
                          "--resume trains it again, replacing that run") from None
    _print_run_samples(result, "SmolLM2-135M-Instruct")


def _config_of_run(reft_dir: Path, overrides: Sequence[str] = (), model_path: Optional[str] = None):
    """The training config saved next to the final interventions (defaults where there is none), with ``overrides``;
    ``model_path`` replaces its base model."""
    import yaml

    from reft_fast.train.run_dir import TRAIN_CONFIG_FILE
    from reft_fast.train.train_config import apply_overrides, config_from_dict

    saved = reft_dir / TRAIN_CONFIG_FILE
    tree = yaml.safe_load(saved.read_text()) if saved.is_file() else {}
    base_dir = tree.pop("base_dir", None)
    if model_path:
        folder = Path(model_path).expanduser()
        if folder.is_dir() and not (folder / "config.json").is_file():  # was a tokenizer traceback
            raise ConfigError(f"--model {model_path}: a folder without config.json, so no model (a run directory? "
                              "--model names the base model, a directory or a Hub repo id; a run's own base needs "
                              "no --model)")
        tree.setdefault("model", {})["path"] = model_path
        base_dir = None  # a path given on the command line is relative to the working directory
    apply_overrides(tree, list(overrides))
    return config_from_dict(tree, base_dir)


@contextlib.contextmanager
def _prompt_errors(what: str):
    """A prompt that cannot be answered (``generation.PromptError``: no tokens, too long for the model) as a config
    error naming it, instead of a traceback from inside generate."""
    from reft_fast.train.generation import PromptError

    try:
        yield
    except PromptError as err:
        raise ConfigError(f"{what}: {err}") from None


@contextlib.contextmanager
def _reft_load_errors(what: str):
    """ReftModel.load's refusals (saved for another base, a damaged file, an unknown directory format) as config
    errors; any other error keeps its traceback."""
    from reft_fast.core.saving import ReftLoadError

    try:
        yield
    except ReftLoadError as err:
        raise ConfigError(f"{what}: {err}") from None


def _answering_model(cfg, reft_dir: Optional[Path], no_chat_template: bool = False):
    """The base on this rank's accelerator with the interventions of ``reft_dir`` (the base alone when None), its
    tokenizer, and the keyword arguments of the generation functions."""
    from deepspeed.accelerator import get_accelerator

    from reft_fast.core.model import ReftModel
    from reft_fast.train.loading import load_base_model, load_tokenizer, model_source

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    get_accelerator().set_device(local_rank)  # object collectives on NCCL run on the current device
    source = model_source(cfg)
    tokenizer = load_tokenizer(source, cfg.model.trust_remote_code)
    base, _ = load_base_model(source, cfg)
    base.config.use_cache = True
    base.to(get_accelerator().device_name(local_rank))
    if reft_dir is None:
        model = base
    else:
        with _reft_load_errors(str(reft_dir)):
            model = ReftModel.load(str(reft_dir), base)
    model.eval()
    saved = getattr(model, "reft_config", None)
    gen_kwargs = dict(positions=getattr(saved, "positions", None) or cfg.interventions.positions,
                      share_weights=getattr(saved, "share_weights", cfg.interventions.share_weights),
                      **_prompt_encoding(cfg, no_chat_template))
    return model, tokenizer, gen_kwargs


def _named_refts(values: Sequence[str]) -> Optional[dict]:
    """{name: directory} from NAME=DIR values; None for the single-ReFT form (one DIR, which may hold a "=":
    runs/lr=1e-3)."""
    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).exists()):
        return None
    named = {}
    for value in values:
        name, sep, directory = value.partition("=")
        if "/" in name or os.sep in name:  # a path with a "=" in it, not a name
            raise ConfigError(f"--reft {value}: no such directory")
        if not sep or not name or not directory:
            raise ConfigError(f"--reft {value!r}: with several ReFTs each is NAME=DIR")
        if name in named:
            raise ConfigError(f"--reft: the name {name!r} is given twice")
        named[name] = directory
    return named


def _generate(args) -> None:
    from reft_fast.train.distributed import init_distributed
    from reft_fast.train.generation import generate_answers
    from reft_fast.train.run_dir import TRAIN_CONFIG_FILE

    named = _named_refts(args.reft)
    if (named is None) == bool(args.prompts_file) or (named is not None and args.prompts):
        raise ConfigError("give prompts as arguments with one --reft DIR, or --prompts-file with --reft NAME=DIR")
    if args.output and named is None:
        raise ConfigError("--output: only with --prompts-file (answers to prompts given as arguments are printed)")
    if args.base_only and named is not None:
        raise ConfigError('--base-only: with --prompts-file, a line with "reft": null is answered by the base alone')
    if args.output and Path(args.output).is_dir():  # was found only when the answers were written
        raise ConfigError(f"--output {args.output}: a directory; give the path of the JSONL file to write")
    if args.output and args.prompts_file and Path(args.output).exists() and Path(args.prompts_file).exists() \
            and Path(args.output).samefile(args.prompts_file):
        raise ConfigError(f"--output {args.output}: the --prompts-file itself; the answers would replace it")
    if named is not None:
        named = {name: _saved_interventions(directory, given=f"{name}={directory}")
                 for name, directory in named.items()}
        records, lines = _read_prompts_file(args.prompts_file, named)
    reft_dir = (_saved_interventions(args.reft[0], args.base_only) if named is None
                else next(iter(named.values())))
    cfg = _config_of_run(reft_dir, model_path=args.model)
    if not cfg.model.path and not reft_dir.exists():  # not a local run: a Hub repo id, or a mistyped path
        raise ConfigError(f"--reft {args.reft[0]}: no such directory (a Hugging Face Hub repo id also needs --model, "
                          "its base model)")
    if not cfg.model.path:
        raise ConfigError(f"--model: required ({reft_dir} has no {TRAIN_CONFIG_FILE} naming the base model)")
    kept = f"no answers written ({args.output} is written whole, at the end)" if args.output else "no answers"
    with _interrupted_keeps(kept), _distributed_job(cfg.deepspeed.timeout_minutes):
        init_distributed(cfg.deepspeed.timeout_minutes)
        model, tokenizer, gen_kwargs = _answering_model(cfg, None if args.base_only or named else reft_dir,
                                                        args.no_chat_template)
        if named is not None:
            _serve_prompts_file(args, model, tokenizer, named, records, lines, gen_kwargs)
            return
        with _prompt_errors("generate"):
            answers = generate_answers(model, tokenizer, args.prompts, max_new_tokens=args.max_new_tokens,
                                       **gen_kwargs)
        for prompt, answer in zip(args.prompts, answers):
            print(f"Q: {prompt}\nA: {answer}\n")


def _final_dir(run_or_final: Path) -> Path:
    """The interventions' directory of a run: its output_dir's final/, or the directory itself."""
    return run_or_final / "final" if (run_or_final / "final").is_dir() else run_or_final


def _saved_interventions(value: str, base_only: bool = False, given: Optional[str] = None) -> Path:
    """A --reft DIR (a run's output_dir or its final/) as the directory holding the interventions, checked before
    any weight is read; a missing path that can be a Hub repo id is left to ReftModel.load. Errors quote ``given``
    (the whole NAME=DIR of several ReFTs), else ``value``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path, quoted = Path(value), given or value
    if not path.exists():
        try:
            validate_repo_id(value)
        except HFValidationError:
            raise ConfigError(f"--reft {quoted}: no such directory") from None
        return path
    found = _final_dir(path)
    if not base_only and not (found / CONFIG_NAME).is_file():
        raise ConfigError(f"--reft {quoted}: no trained interventions there (config.json, in it or in its final/); "
                          "give a run's output_dir or its final/")
    return found


def _read_prompts_file(path: str, named: dict) -> tuple[list[dict], list[int]]:
    """The records of --prompts-file, each {"prompt": ..., "reft": a name of ``named`` or null}, checked before any
    weight is read, and the line number of each."""
    from reft_fast.train.data import read_utf8

    try:
        text = read_utf8(Path(path))  # UTF-8 whatever the locale, a byte-order mark dropped
    except OSError as err:
        raise ConfigError(f"--prompts-file {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise ConfigError(f"--prompts-file {err}") from None
    records, lines = [], []
    # lines end at "\n" only: str.splitlines would also cut a prompt holding U+2028 (JSON writes it unescaped)
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}:{number}: not JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise ConfigError(f"{path}:{number}: expected {{\"prompt\": \"...\", \"reft\": NAME or null}}")
        if "reft" not in record:  # a misspelt key ("Reft", "adapter") was answered by the base alone, silently
            raise ConfigError(f"{path}:{number}: no \"reft\" field; name its ReFT, or \"reft\": null for the base "
                              "alone")
        reft = record["reft"]
        if reft is not None and (not isinstance(reft, str) or reft not in named):
            raise ConfigError(f"{path}:{number}: unknown ReFT {reft!r}; --reft gave {sorted(named)}")
        records.append(record)
        lines.append(number)
    if not records:
        raise ConfigError(f"--prompts-file {path}: no prompts in it (one JSON line per prompt: "
                          '{"prompt": "...", "reft": NAME or null})')
    return records, lines


def _prompt_encoding(cfg, no_chat_template: bool) -> dict:
    """How a run's prompts are encoded (``encode_prompt``'s keywords): its data section, or plain text."""
    return dict(chat_template=False if no_chat_template else cfg.data.chat_template,
                system_prompt=cfg.data.system_prompt)


def _serve_prompts_file(args, base, tokenizer, named: dict, records: list[dict], lines: list[int],
                        gen_kwargs: dict) -> None:
    """Answer each record of --prompts-file (read from ``lines``) with the ReFT it names, in mixed batches; JSONL to
    --output or stdout."""
    from reft_fast.core.model import DEFAULT_ADAPTER, ReftModel
    from reft_fast.train.files import write_jsonl_atomically
    from reft_fast.train.generation import mixed_answers

    first, *others = named
    if DEFAULT_ADAPTER in others:
        raise ConfigError(f"--reft {DEFAULT_ADAPTER}=...: that name is the first ReFT's (the one the model is loaded "
                          "with); give it first or choose another name")
    with _reft_load_errors(f"--reft {first}={named[first]}"):
        reft_model = ReftModel.load(named[first], base)  # held as DEFAULT_ADAPTER: loaded once, not again as `first`
    for name in others:
        with _reft_load_errors(f"--reft {name}={named[name]}"):
            reft_model.load_adapter(named[name], name)
    reft_model.eval()
    held_as = {first: DEFAULT_ADAPTER}
    # Each ReFT's prompts are encoded as its own run trained them (its system prompt, chat template or not); the
    # base's rows as the first ReFT's, whose run config gen_kwargs already holds.
    first_encoding = {key: gen_kwargs[key] for key in ("chat_template", "system_prompt")}
    encodings = {DEFAULT_ADAPTER: first_encoding}
    encodings.update({name: _prompt_encoding(_config_of_run(named[name]), args.no_chat_template) for name in others})
    with _prompt_errors("--prompts-file"):
        answers = mixed_answers(reft_model, tokenizer, [r["prompt"] for r in records],
                                [held_as.get(r.get("reft"), r.get("reft")) for r in records],
                                batch_size=args.batch_size, encodings=encodings, max_new_tokens=args.max_new_tokens,
                                names=[f"{args.prompts_file}:{line}" for line in lines], **first_encoding)
    rows = [{**record, "answer": answer} for record, answer in zip(records, answers)]
    if args.output:  # its folder made, as eval makes its own
        write_jsonl_atomically(Path(args.output), rows)
    else:
        print("\n".join(json.dumps(row) for row in rows))


def _eval_target(args):
    """(config, the interventions' directory or None for --base-only, the run's output directory)."""
    target = Path(args.target)
    if target.is_file():
        cfg = load_config(str(target), list(args.overrides))
        run_dir = Path(cfg.output_dir)
        reft_dir = run_dir / "final"
    elif target.is_dir():
        reft_dir = _final_dir(target)
        # final/ itself (interventions in it) writes into its run's eval/; an output_dir without final/ into its own
        run_dir = target.parent if reft_dir == target and (target / CONFIG_NAME).is_file() else target
        cfg = _config_of_run(reft_dir, args.overrides)
        if not cfg.model.path:
            raise ConfigError(f"{target}: not a run directory (no final/train_config.yaml naming the base model)")
    else:
        raise ConfigError(f"{target}: no such config file or run directory")
    if not args.base_only and not (reft_dir / CONFIG_NAME).is_file():
        raise ConfigError(f"{reft_dir}: no trained interventions (config.json); train first, or pass --base-only")
    return cfg, None if args.base_only else reft_dir, run_dir


def _eval_examples(cfg, args):
    """The examples to score and a name for them: --data, else the config's eval set as training made it
    (data.eval_file or the held-out data.eval_fraction), only its test part with data.selection_examples."""
    from reft_fast.train.data import saved_split
    from reft_fast.train.evaluation import eval_examples_from_rows, load_eval_examples

    d = cfg.data
    fields = dict(prompt_field=d.prompt_field, response_field=d.response_field, prompt_template=d.prompt_template,
                  response_template=d.response_template, family=args.family or d.eval_family)
    if not (args.data or d.eval_file or d.eval_fraction > 0):
        raise ConfigError("--data: required (the config has no data.eval_file and no data.eval_fraction to hold out)")
    try:
        if args.data:
            split = args.split or saved_split(args.data) or "test"
            return load_eval_examples(args.data, hf_split=split, **fields), Path(args.data).stem
        rows, where, name = _config_eval_rows(cfg)
        return eval_examples_from_rows(rows, where, default_task=name, **fields), name
    except ValueError as err:
        given = "--data" if args.data else "data.eval_file" if d.eval_file else "data.eval_fraction (held out)"
        raise ConfigError(f"{given}: {err}") from None


def _config_eval_rows(cfg) -> tuple[list, str, str]:
    """The rows of the config's eval set as training made it (``data.train_and_eval_examples``: the same file, or
    the same held-out fraction and seed; only the test part with data.selection_examples), where they come from, and
    a name for them."""
    from reft_fast.train.data import RowSource, load_rows, train_and_eval_examples, training_source
    from reft_fast.train.train_config import data_path_tried, resolve_data_path

    d = cfg.data
    if d.eval_file:
        where = resolve_data_path(d.eval_file, cfg.base_dir)
        if not Path(where).is_file():
            tried = data_path_tried(d.eval_file, cfg.base_dir)
            raise ValueError(f"evaluation data {d.eval_file}: no such file; {tried}")
        name = Path(where).stem
    else:
        source = training_source(d, cfg.base_dir)
        where = f"{source} (held out)"
        # a file's or a dataset folder's own name; a Hub dataset's id made a file name (nyu-mll/glue:sst2)
        stem = Path(source).stem if d.train_file or Path(source).is_dir() else re.sub(r"[/:]", "_", str(source))
        name = f"{stem}-heldout"
    read_sources = []  # (rows, RowSource) of what load_rows read

    def read(source, split):
        rows, named = load_rows(source, hf_split=split)
        read_sources.append((rows, named))
        return rows

    _, rows = train_and_eval_examples(d, cfg.base_dir, cfg.training.seed, read, eval_part="test", read_train=False)
    if d.selection_examples is not None:  # training evaluated on the selection part: this is the other one
        where, name = f"{where}, test part", f"{name}-test"
    read_rows, named = read_sources[-1]
    if named.lines is not None:  # a file: each row, held out or a part, is named by its own line, as training names it
        line_of = {id(row): line for row, line in zip(read_rows, named.lines)}
        if all(id(row) in line_of for row in rows):
            where = RowSource(str(named), [line_of[id(row)] for row in rows])
    return rows, where, name


def _evaluate(args) -> None:
    """Generate answers to every example (each rank a shard, in batches), score them and, on rank 0, write the
    predictions and print the table."""
    from reft_fast.train.distributed import init_distributed, ranks
    from reft_fast.train.evaluation import check_gold_answers, generate_and_score, infer_family, summary_table, \
        write_predictions
    from reft_fast.train.generation import check_prompts
    from reft_fast.train.task_eval import scored_part

    if args.split and not (args.data and not Path(args.data).is_file()):  # else silently unused
        given = f"--data {args.data} is a file" if args.data else "no --data is given"
        raise ConfigError(f"--split: picks the split of a Hugging Face dataset given as --data; {given}")
    cfg, reft_dir, run_dir = _eval_target(args)
    if cfg.task != "causal_lm":
        _evaluate_task(args, cfg, reft_dir, run_dir)
        return
    examples, data_name = _eval_examples(cfg, args)
    family = args.family or cfg.data.eval_family or infer_family(examples)
    try:
        check_gold_answers(examples, family)
    except ValueError as err:
        raise ConfigError(f"--family {family}: {err}") from None
    out = Path(args.out) if args.out else run_dir / "eval" / f"{data_name}{_evaluated_suffix(reft_dir, run_dir)}.jsonl"
    _check_out(out, cfg, args.data)
    with _interrupted_keeps(_eval_kept(out)), _distributed_job(cfg.deepspeed.timeout_minutes):
        rank, world = init_distributed(cfg.deepspeed.timeout_minutes)
        model, tokenizer, gen_kwargs = _answering_model(cfg, reft_dir)
        max_new_tokens = args.max_new_tokens or cfg.training.max_new_tokens
        with _prompt_errors("eval"):  # every rank checks every prompt, so all refuse together
            check_prompts(model, tokenizer, [example.prompt for example in examples], max_new_tokens=max_new_tokens,
                          chat_template=gen_kwargs["chat_template"], system_prompt=gen_kwargs["system_prompt"],
                          names=[example.where or f"example {i + 1}" for i, example in enumerate(examples)])
        predictions = generate_and_score(model, tokenizer, examples, family, rank=rank, world=world,
                                         batch_size=args.batch_size or 8,
                                         max_new_tokens=max_new_tokens, **gen_kwargs)
        if rank == 0:
            write_predictions(out, predictions)
            which = "the base model alone" if reft_dir is None else f"the interventions in {reft_dir}"
            scored = f"all of {args.data}" if args.data else scored_part(cfg)
            print(f"{family} accuracy of {which} on {len(predictions)} examples, {scored} ({ranks(world)}); "
                  f"predictions in {out}\n{summary_table(predictions)}")


def _evaluated_suffix(reft_dir: Optional[Path], run_dir: Path) -> str:
    """What the default predictions file of an eval adds to the data's name for what it evaluated: nothing for the
    run's final/ (or the directory itself), -base for the base alone, -<name> for any other folder of interventions
    (a run's best/, or two saved ReFTs side by side, which both wrote <parent>/eval/<data>.jsonl, the second
    replacing the first's predictions)."""
    if reft_dir is None:
        return "-base"
    return "" if reft_dir in (run_dir / "final", run_dir) else f"-{reft_dir.name}"


def _check_out(out: Path, cfg, data: Optional[str]) -> None:
    """Refuse, before any answer, an eval output that names a folder or one of the files evaluated or trained on
    (it was a traceback after every answer, or the data silently replaced by the predictions)."""
    from reft_fast.train.train_config import resolve_data_path

    if out.is_dir():
        raise ConfigError(f"--out {out}: a directory; give the path of the JSONL file to write")
    nearest = next(path for path in out.parents if path.exists())
    if not nearest.is_dir():
        raise ConfigError(f"--out {out}: cannot be created: {nearest} is a file, not a directory")
    inputs = [data] + [resolve_data_path(name, cfg.base_dir) for name in (cfg.data.eval_file, cfg.data.train_file)
                       if name]
    if out.exists() and any(name and Path(name).is_file() and out.samefile(name) for name in inputs):
        raise ConfigError(f"--out {out}: the data file itself; the predictions would replace it")


def _eval_kept(out: Path) -> str:
    """What an interrupted eval leaves at ``out``, for the line it ends with."""
    what = "holds an earlier eval's, untouched" if out.exists() else "was not written"
    return f"nothing scored: the results are written whole, at the end, and {out} {what}"


def _evaluate_task(args, cfg, reft_dir: Optional[Path], run_dir: Path) -> None:
    """A task scored by its own metrics (classification, preference), over its eval set, as training scored it."""
    from reft_fast.train.distributed import init_distributed, ranks
    from reft_fast.train.files import write_jsonl_atomically
    from reft_fast.train.task_eval import evaluate_run, metrics_table, scored_part, write_metrics

    if reft_dir is None:
        raise ConfigError(f"--base-only: a {cfg.task} run is scored with what it trained (a head, the policy against "
                          "its reference); evaluate the run itself")
    if args.family:
        raise ConfigError(f"--family: reads generated answers; a {cfg.task} run is scored by the task's own metrics")
    if args.batch_size:  # it was silently ignored
        raise ConfigError(f"--batch-size: sets generate's batch; a {cfg.task} run is scored in batches of "
                          "training.micro_batch_size, as training scored it")
    if args.data:
        _task_eval_data(args, cfg)
    split = f"-{cfg.classification.eval_split}" if args.data and Path(args.data).is_dir() else ""  # a folder's
    scored = f"all of {args.data}{split and f' (split {split[1:]})'}" if args.data else scored_part(cfg)
    name = Path(args.data).stem + split if args.data else "eval" if cfg.data.selection_examples is None else "test"
    out = Path(args.out) if args.out else run_dir / "eval" / f"{name}{_evaluated_suffix(reft_dir, run_dir)}.jsonl"
    for path in (out.with_suffix(".jsonl"), out.with_suffix(".json")):
        _check_out(path, cfg, args.data)
    kept = _eval_kept(out.with_suffix(".jsonl"))
    with _interrupted_keeps(kept), _distributed_job(cfg.deepspeed.timeout_minutes):
        rank, world = init_distributed(cfg.deepspeed.timeout_minutes)
        metrics, rows = evaluate_run(cfg, reft_dir, rank, world)
        if rank == 0:
            # A pair: the old metrics go first and the new ones come last, so that a kill in between never leaves
            # metrics beside per-example lines of another eval.
            out.with_suffix(".json").unlink(missing_ok=True)
            write_jsonl_atomically(out.with_suffix(".jsonl"), rows)
            write_metrics(out.with_suffix(".json"), metrics, reft_dir, scored)
            if set(metrics) == {"examples"}:  # a classification set without labels (a GLUE test split)
                print(f"{cfg.task} predictions of the interventions in {reft_dir} on {scored} ({ranks(world)}): "
                      f"the data has no labels, so nothing is scored; one line per example in "
                      f"{out.with_suffix('.jsonl')}\n{metrics_table(metrics)}")
                return
            print(f"{cfg.task} metrics of the interventions in {reft_dir} on {scored} ({ranks(world)}); metrics "
                  f"in {out.with_suffix('.json')}, one line per example in {out.with_suffix('.jsonl')}\n"
                  f"{metrics_table(metrics)}")


def _task_eval_data(args, cfg) -> None:
    """Point the config's eval set at --data: a file, or for a classification run also a dataset folder (written by
    ``save_to_disk``, a DatasetDict's included), of which --split is scored (default: test; a saved split's own)."""
    from reft_fast.train.data import saved_split
    from reft_fast.train.train_config import data_path_tried

    data = Path(args.data)
    if data.is_dir() and cfg.task == "classification":
        cfg.data.train_file, cfg.data.hf_dataset = None, str(data.resolve())
        cfg.data.eval_file, cfg.data.eval_fraction = None, 0.0
        cfg.classification.eval_split = args.split or saved_split(data) or "test"
    elif data.is_dir():
        raise ConfigError(f"--data {args.data}: a folder; a {cfg.task} run scores a JSON or JSONL file")
    elif not data.is_file():  # else taken for a Hugging Face dataset name, and a traceback from there
        raise ConfigError(f"--data {args.data}: no such file ({data_path_tried(args.data)})")
    else:
        cfg.data.eval_file, cfg.data.eval_fraction = str(data.resolve()), 0.0
        cfg.classification.eval_split = None
    cfg.data.selection_examples = None  # the data given is scored whole


def _plan(args) -> None:
    from reft_fast.train.plan import format_plan, plan_memory

    cfg = load_config(args.config, list(args.overrides))
    print(format_plan(plan_memory(cfg, args.gpus), gpu_memory_gib=args.gpu_memory_gib))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from reft_fast.ops.build_lock import use_environment_ninja

    use_environment_ninja()  # before any build of DeepSpeed's op and any process this one starts
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO if _is_rank0() else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "train":
            _, result = _train(args.config, args.overrides, args.resume, args.overwrite)
            _print_run_samples(result, "the base")
        elif args.command == "demo":
            _demo(args.overrides, args.resume)
        elif args.command == "generate":
            _generate(args)
        elif args.command == "eval":
            _evaluate(args)
        elif args.command == "plan":
            _plan(args)
    except ConfigError as err:
        print(f"reft-fast: config error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        if _is_rank0():
            print(f"reft-fast: stopped by ctrl-C or SIGTERM; {err}", file=sys.stderr)
        return 130  # as a shell reports a command that SIGINT ended
    except RuntimeError as err:
        from reft_fast.train.checkpoints import CheckpointWriteError

        if not isinstance(err, (CheckpointWriteError, RankLost, RanksTimedOut, StaleBuildLock)):
            raise
        print(f"reft-fast: {err}", file=sys.stderr)  # the message says what happened and what to do; no traceback
        return 1
    return 0
