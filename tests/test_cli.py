"""The CLI: bad configs fail before any rank joins a process group or any model is loaded, with a message naming the
field; overrides stand anywhere on the line; `python -m reft_fast` runs under the launchers exactly as the README and
the example configs spell them; a hung rank fails the others after the configured timeout."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import deepspeed
import pytest
import torch.distributed
import transformers
import yaml

from reft_fast.train.cli import main

from dist.tiny import make_run, subprocess_env

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def _no_model_loading(*args, **kwargs):
    raise AssertionError("model weights were loaded before the config was checked")


def _no_process_group(*args, **kwargs):
    raise AssertionError("a process group was started before the config was checked")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cli"))


@pytest.fixture
def nothing_starts(monkeypatch):
    """"Fails before anything starts": loading weights or joining a process group is an error during the call."""
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_model_loading)
    monkeypatch.setattr(deepspeed, "init_distributed", _no_process_group)
    monkeypatch.setattr(torch.distributed, "init_process_group", _no_process_group)


@pytest.mark.parametrize("override, field", [
    ("training.nonsense=1", "training.nonsense"),
    ("data.train_file=absent.jsonl", "data.train_file"),
    ("interventions.layers=[1, 9]", "interventions.layers"),  # the tiny model has 4 layers: read from its config
    ("interventions.low_rank_dimension=65", "interventions.low_rank_dimension"),  # above its hidden size (64)
    ("interventions.positions=f0+l0", "interventions.positions"),
    ("model.path=./no/such/model", "model.path"),
    ("training.global_batch_size=6", "training.global_batch_size"),
    ("training.lr=[1]", "training.lr"),
    ("deepspeed.timeout_minutes=0", "deepspeed.timeout_minutes"),
])
def test_train_with_bad_config_fails_fast_naming_the_field(config, capsys, nothing_starts, override, field):
    assert main(["train", str(config), override]) == 2
    err = capsys.readouterr().err
    assert f"config error: {field}:" in err, err
    assert not (config.parent / "out").exists()  # nothing was started


def test_overrides_stand_anywhere_and_the_last_one_wins(config, capsys, nothing_starts):
    # low_rank_dimension=0 alone would be the error; the later =2 replaces it, so the error is the positions after it.
    line = ["train", str(config), "interventions.low_rank_dimension=0", "--resume",
            "interventions.low_rank_dimension=2", "interventions.positions=f0+l0"]
    assert main(line) == 2
    assert "config error: interventions.positions:" in capsys.readouterr().err
    assert main(["plan", str(config), "--gpus", "2", "interventions.low_rank_dimension=0"]) == 2
    assert "config error: interventions.low_rank_dimension:" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a word that is neither an option nor key=value is still refused
        main(["train", str(config), "--resume", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "repeat : red", "output": "red"}\n{"instruction": "repeat : blue",\n',
     r"train.jsonl:2:\d+: not valid JSON"),
    ('[{"instruction": "repeat : red", "output": "red"},\n {"instruction": ]\n', r"train.jsonl:2:\d+: not valid JSON"),
    ('{"prompt": "repeat : red", "output": "red"}\n', r"train.jsonl:1: no field 'instruction'"),
    # the line in the file, blank lines counted
    ('\n{"instruction": "repeat : red", "output": "red"}\n\n{"prompt": "repeat : cat", "output": "cat"}\n',
     r"train.jsonl:4: no field 'instruction'"),
])
def test_a_bad_data_file_is_a_config_error_not_a_traceback(config, tmp_path, capsys, content, message):
    """The data's content is the user's to fix, like the config: one line naming the file and line, exit status 2."""
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    code = main(["train", str(config), f"data.train_file={data}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(rf"config error: data: .*{message}", err), err
    assert "Traceback" not in err


def test_a_training_set_smaller_than_one_step_is_a_config_error(config, tmp_path, capsys):
    """Fewer examples than one optimizer step takes (micro 4 here) is the user's to fix: exit status 2, no traceback."""
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"repeat : {w}", "output": w}) + "\n"
                            for w in ("red", "blue", "cat")))
    code = main(["train", str(config), f"data.train_file={data}", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and "config error: training.global_batch_size: 4 examples per step" in err, err
    assert "training set has only 3" in err and not (tmp_path / "out").exists()


def test_a_wrong_value_is_said_before_a_used_output_dir(config, tmp_path, capsys):
    """A folder of an earlier run and a wrong value: the value is named first (it was hidden behind "output_dir is
    not empty", and a user who cleared the folder for it then met the value)."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("{}\n")
    assert main(["train", str(config), "training.max_steps=-3", f"output_dir={used}"]) == 2
    err = capsys.readouterr().err
    assert "config error: training.max_steps" in err and "not empty" not in err, err


def test_train_prints_the_answers_to_its_sample_prompts(config, tmp_path, capsys):
    """training.sample_prompts are answered before and after training: `reft-fast train` shows both."""
    code = main(["train", str(config), 'training.sample_prompts=["repeat : red cat"]', "training.max_new_tokens=2",
                 f"output_dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert code == 0
    before, after = out.split("=== before training (the base alone) ===")[1].split(
        f"=== after 4 steps (interventions in {tmp_path / 'out' / 'final'}) ===")
    assert before.count("Q: repeat : red cat\nA: ") == after.count("Q: repeat : red cat\nA: ") == 1, out


def test_a_resumed_run_shows_the_first_launchs_answers_before_training_without_answering_again(config, tmp_path,
                                                                                               capsys, monkeypatch):
    """--resume answered the sample prompts before training again (a minute on a CPU): it shows the first launch's
    answers now, which that launch saved in output_dir, or says where they are when it saved none."""
    from reft_fast.train import recipe

    out = tmp_path / "out"
    line = ["train", str(config), 'training.sample_prompts=["repeat : red cat"]', "training.max_new_tokens=2",
            "training.save_every=2", f"output_dir={out}"]
    assert main(line + ["training.max_steps=2"]) == 0
    first = capsys.readouterr().out.split("=== before training (the base alone) ===\n")[1].split("\n===")[0]
    assert first.startswith("Q: repeat : red cat\nA: ") and (out / "samples_before.json").is_file(), first
    answered = []
    generate_answers = recipe.generate_answers

    def answering(model, *args, **kwargs):
        answered.append(type(model).__name__)
        return generate_answers(model, *args, **kwargs)

    monkeypatch.setattr(recipe, "generate_answers", answering)
    assert main(line + ["training.max_steps=4", "--resume"]) == 0
    assert answered == ["ReftModel"], answered  # after training only
    printed = capsys.readouterr().out
    assert "=== before training (the base alone, answered by the run's first launch) ===\n" + first in printed, printed
    (out / "samples_before.json").unlink()  # a first launch of a version that saved none
    assert main(line + ["training.max_steps=6", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "answered by the run's first launch) ===\n(in that launch's output only)" in printed, printed
    assert answered == ["ReftModel"] * 2 and "Q: repeat : red cat" in printed.split("=== after 6 steps")[1]


def test_without_a_progress_bar_the_log_shows_each_logged_step(config, tmp_path, caplog):
    """training.progress_bar: false (a batch job's log) used to show nothing of the training at all: the figures went
    only to metrics.jsonl. Now each log_every step is one logged line."""
    import logging

    caplog.set_level(logging.INFO, logger="reft_fast")
    assert main(["train", str(config), "training.progress_bar=false", "training.log_every=2",
                 f"output_dir={tmp_path / 'out'}"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "reft_fast.train.metrics"]
    assert [line.split(":")[0] for line in lines] == ["step 2/4", "step 4/4"], lines
    assert re.fullmatch(r"step 4/4: loss \d+\.\d{4}, tok/s \d+, mem \d+\.\dGiB(, .*)?", lines[-1]), lines


def test_generate_takes_a_run_directory_as_eval_does_and_names_a_wrong_one(config, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", str(config), f"output_dir={out}"]) == 0
    with_equals = shutil.copytree(out, tmp_path / "lr=1e-2")  # a path with "=" in it: one DIR, not NAME=DIR
    answers = []
    for reft in (out, out / "final", with_equals):
        capsys.readouterr()
        assert main(["generate", "--reft", str(reft), "--max-new-tokens", "3", "repeat : red cat"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] == answers[2] and "Q: repeat : red cat\nA: " in answers[0]
    for wrong, problem in ((tmp_path / "absent", "no such directory"), (config.parent, "no trained interventions"),
                           (tmp_path / "lr=1e-3", "no such directory")):
        assert main(["generate", "--reft", str(wrong), "repeat : red"]) == 2
        assert f"config error: --reft {wrong}: {problem}" in capsys.readouterr().err
    damaged = shutil.copytree(out / "final", tmp_path / "damaged")
    (damaged / "interventions.safetensors").write_text("cut short")  # was safetensors' traceback, after the base loaded
    assert main(["generate", "--reft", str(damaged), "repeat : red"]) == 2
    assert f"config error: {damaged}: {damaged / 'interventions.safetensors'} cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("command, missing", [("plan", "config, --gpus"), ("train", "config"), ("eval", "target")])
def test_a_command_without_its_arguments_names_only_the_required_ones(capsys, command, missing):
    # argparse listed the optional overrides among them: "required: config, overrides, --gpus"
    with pytest.raises(SystemExit) as exit_info:
        main([command])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.rstrip().endswith(f"the following arguments are required: {missing}")


@pytest.mark.parametrize("gpus, message", [("0", "must be at least 1, got 0"), ("two", "expected a whole number")])
def test_plan_refuses_a_gpu_count_below_one(config, capsys, gpus, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(config), "--gpus", gpus])
    assert exit_info.value.code == 2
    assert f"argument --gpus: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("memory", ["0", "-5", "nan", "inf"])
def test_plan_refuses_a_gpu_memory_that_is_not_a_positive_number(config, capsys, memory):
    # it printed a table with "fit = under 90%: -4.5 GiB" (or nan GiB)
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", str(config), "--gpus", "1", "--gpu-memory-gib", memory])
    assert exit_info.value.code == 2
    assert f"argument --gpu-memory-gib: must be a finite number above 0, got {memory}" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "-1"])
def test_generate_refuses_a_new_token_count_below_one(config, capsys, count):
    # it was passed on to transformers' generate, which raised its ValueError after the base had loaded
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--reft", str(config.parent), "--max-new-tokens", count, "a prompt"])
    assert exit_info.value.code == 2
    assert f"argument --max-new-tokens: must be at least 1, got {count}" in capsys.readouterr().err


def test_python_m_entry_point_accepts_launcher_local_rank(config):
    proc = subprocess.run([PY, "-m", "reft_fast", "--local_rank=0", "train", str(config),
                           "interventions.low_rank_dimension=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config error: interventions.low_rank_dimension:" in proc.stderr, proc.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------------------
# Launch lines
# --------------------------------------------------------------------------------------------------------------------
def _documented_launch_lines() -> list[tuple[str, list[str]]]:
    """(where, words) of every `deepspeed ...` / `torchrun ...` command in the README, the CLI's help and the example
    configs."""
    found = []
    for path in [ROOT / "README.md", ROOT / "reft_fast" / "train" / "cli.py", *sorted((ROOT / "configs").rglob("*.yaml"))]:
        # a config's comment lines lose their "#"; a README line its trailing comment; "\" continues a line
        text = "\n".join(line.lstrip("# ").split("  #")[0] for line in path.read_text().splitlines())
        for number, line in enumerate(text.replace("\\\n", " ").splitlines(), 1):
            if line.startswith(("deepspeed ", "torchrun ")):
                found.append((f"{path.name}:{number}", shlex.split(line)))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PATH_AT_MAIN = """
import os, sys
from reft_fast.train import cli

def parsed(argv):  # main's first step after the PATH: report it and stop
    print(os.environ["PATH"])
    sys.exit(0)

cli._parse_args = parsed
cli.main(["train", "config.yaml"])
"""


@pytest.mark.skipif(shutil.which("ninja", path=str(Path(PY).parent)) is None,
                    reason=f"no ninja installed beside {PY}")
def test_the_cli_builds_with_the_environments_ninja_whatever_path_holds(tmp_path):
    """torch builds DeepSpeed's CPU op with the ninja on PATH. `.venv/bin/reft-fast` run without activating the
    environment could not build it on a machine without a ninja; on one with its own (1.11 beside the environment's
    1.13), the op was rebuilt (a minute) each time an activated run followed a plain `.venv/bin/reft-fast` one or the
    other way round, each ninja taking the other's build for out of date. main puts the environment's folder first."""
    env_bin = str(Path(PY).parent)
    bare = tmp_path / "bare"
    bare.mkdir()
    machine = tmp_path / "machine"
    machine.mkdir()
    (machine / "ninja").write_text("#!/bin/sh\necho 1.11.1\n")
    (machine / "ninja").chmod(0o755)
    env = subprocess_env()
    for path, expected in ((str(bare), f"{env_bin}{os.pathsep}{bare}"),  # no ninja anywhere on it
                           (f"{bare}{os.pathsep}{machine}", f"{env_bin}{os.pathsep}{bare}{os.pathsep}{machine}"),
                           (f"{env_bin}{os.pathsep}{machine}", f"{env_bin}{os.pathsep}{machine}")):  # as activated
        env["PATH"] = path
        proc = subprocess.run([PY, "-c", _PATH_AT_MAIN], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.strip() == expected, (path, proc.stdout)


@pytest.mark.skipif(shutil.which("ninja", path=str(Path(PY).parent)) is None,
                    reason=f"no ninja installed beside {PY}")
def test_the_test_suite_builds_with_the_environments_ninja():
    # conftest.py puts it first for every process of the suite, as the command line does for a run's
    assert os.path.realpath(shutil.which("ninja")) == os.path.realpath(shutil.which("ninja", path=str(Path(PY).parent)))


def test_every_documented_launch_line_parses_with_its_launcher():
    from deepspeed.launcher.runner import parse_args as deepspeed_launcher_args
    from torch.distributed.run import get_args_parser as torchrun_parser

    from reft_fast.train.cli import _parse_args

    lines = _documented_launch_lines()
    assert {words[0] for _, words in lines} == {"deepspeed", "torchrun"}, lines
    for where, words in lines:
        if words[0] == "deepspeed":
            launch = deepspeed_launcher_args(words[1:])
            module, script, ours = launch.module, launch.user_script, launch.user_args
        else:
            launch = torchrun_parser().parse_args(words[1:])
            module, script, ours = launch.module, launch.training_script, launch.training_script_args
        assert module and script == "reft_fast", where
        assert _parse_args(["--local_rank=0", *ours]).command in ("train", "eval"), where  # the multi-rank commands


def _launcher() -> str:
    launcher = shutil.which("deepspeed") or str(Path(PY).parent / "deepspeed")
    if not Path(launcher).exists():
        pytest.skip("the deepspeed launcher is not installed")
    return launcher


@pytest.mark.slow
def test_readme_launch_line_trains_on_two_ranks(tmp_path):
    """The README's deepspeed line itself, with 2 ranks (gloo on CPU) and a tiny config instead of 8 GPUs and
    Llama-2-7B. ZeRO-3 with a low persistence threshold, so that the base really is partitioned: the log must show
    each rank's shard, about half of the base."""
    (where, words), = [(w, ws) for w, ws in _documented_launch_lines() if w.startswith("README") and
                       ws[0] == "deepspeed" and ws[-1] == "configs/llama2-7b-zero3-multigpu.yaml"]
    assert words[1:3] == ["--num_gpus", "8"] and words[-1].endswith(".yaml"), where
    config = make_run(tmp_path)
    out = tmp_path / "launched"
    line = [_launcher(), "--master_port", str(_free_port()), "--num_gpus", "2", *words[3:-1], str(config),
            "training.max_steps=2", "deepspeed.stage=3",
            "deepspeed.config.zero_optimization.stage3_param_persistence_threshold=100", f"output_dir={out}"]
    proc = subprocess.run(line, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    rows = [json.loads(row) for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert "2 ranks over gloo" in log, log[-3000:]
    held, total = map(int, re.search(r"base loaded: (\d+) of (\d+) parameters on this rank", log).groups())
    assert 0.4 * total < held < 0.6 * total, (held, total)


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_after_the_timeout(config, tmp_path):
    # Rank 1 joins the process group and then never reaches a collective (a stuck data read, a deadlock); rank 0
    # trains until it must wait for rank 1 (DeepSpeed making its data-parallel group), gives up after
    # deepspeed.timeout_minutes and says what to check. Rank 1 is plain torch: killing it can never leave a
    # half-built DeepSpeed extension (and its lock) behind.
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    hung = subprocess.Popen([PY, "-c", "import time, torch.distributed as dist; dist.init_process_group('gloo'); "
                                       "time.sleep(600)"], cwd=ROOT, env={**env, "RANK": "1", "LOCAL_RANK": "1"})
    try:
        proc = subprocess.run([PY, "-m", "reft_fast", "train", str(config), "deepspeed.timeout_minutes=0.1",
                               f"output_dir={tmp_path / 'out'}"], cwd=ROOT, env={**env, "RANK": "0", "LOCAL_RANK": "0"},
                              capture_output=True, text=True, timeout=300)
    finally:
        hung.kill()
        hung.wait()
    assert proc.returncode != 0
    assert "rank 0 waited more than deepspeed.timeout_minutes = 0.1 for the other ranks" in proc.stderr, \
        proc.stderr[-3000:]
    assert "Another rank stopped or hangs" in proc.stderr


def test_a_config_with_the_old_intervention_keys_runs_and_the_user_is_told_the_new_names(config, tmp_path):
    tree = yaml.safe_load(config.read_text())
    iv = tree["interventions"]
    iv["type"], iv["rank"] = iv.pop("intervention"), iv.pop("low_rank_dimension")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(tree))
    proc = subprocess.run([PY, "-m", "reft_fast", "plan", str(old), "--gpus", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("deprecated") == 1, proc.stderr[-2000:]
    assert "interventions.rank -> interventions.low_rank_dimension" in proc.stderr
    assert "interventions.type -> interventions.intervention" in proc.stderr


def test_a_rank_killed_mid_collective_leaves_the_others_one_line_naming_the_checkpoint(config, tmp_path, capsys,
                                                                                       monkeypatch):
    """kill -9 of one rank: each other rank's next collective fails with gloo's error (the text below is what torch
    2.13 raised on rank 0 of a 2-rank ZeRO-3 run); each says once what happened and where --resume continues, instead
    of a traceback through DeepSpeed."""
    from reft_fast.train.checkpoints import write_checkpoint
    from reft_fast.train.recipe import ReftTrainingRecipe

    out = tmp_path / "out"
    newest = write_checkpoint(out / "checkpoints", 40, {"step": 40})

    def peer_gone(self):
        raise RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                           "[127.0.0.1]:18600: Connection reset by peer. This is typically caused by a remote worker "
                           "hanging or bugs in the application.")

    monkeypatch.setattr(ReftTrainingRecipe, "run", peer_gone)
    assert main(["train", str(config), f"output_dir={out}", "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("reft-fast: rank 0 lost its connection to another rank ([/__w/pytorch"), err
    assert f"the newest checkpoint is {newest}: the same command with --resume continues from it" in err, err
    assert len(err.splitlines()) == 1, err
