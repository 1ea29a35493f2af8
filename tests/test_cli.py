"""The CLI: bad configs fail before any model is loaded, with a message naming the field; `python -m reft_fast` parses
the launchers' extra argument."""

import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from reft_fast.cli import main

from dist.tiny import make_run

ROOT = Path(__file__).resolve().parent.parent


def _no_model_loading(*args, **kwargs):
    raise AssertionError("model weights were loaded before the config was checked")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("cli"))


@pytest.mark.parametrize("override, field", [
    ("training.nonsense=1", "training.nonsense"),
    ("data.train_file=absent.jsonl", "data.train_file"),
    ("interventions.layers=[1, 9]", "interventions.layers"),
    ("training.global_batch_size=6", "training.global_batch_size"),
    ("training.lr=[1]", "training.lr"),
])
def test_train_with_bad_config_fails_fast_naming_the_field(config, capsys, monkeypatch, override, field):
    # "fails before any model is loaded": loading weights is made an error for the duration of the call
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_model_loading)
    assert main(["train", str(config), override]) == 2
    err = capsys.readouterr().err
    assert f"config error: {field}:" in err, err
    assert not (config.parent / "out").exists()  # nothing was started


def test_python_m_entry_point_accepts_launcher_local_rank(config):
    proc = subprocess.run([sys.executable, "-m", "reft_fast", "--local_rank=0", "train", str(config),
                           "interventions.rank=0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "config error: interventions.rank:" in proc.stderr, proc.stderr[-2000:]
