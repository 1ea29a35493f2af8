"""ctrl-C during ``reft-fast demo training.save_every=N`` says "the same command with --resume continues from it", but
``reft-fast demo ... --resume`` was refused ("unrecognized arguments: --resume"), ``resume=true`` too (the demo always
overwrote its run), and the plain command again removed the checkpoints. The demo now takes --resume."""

from types import SimpleNamespace

import pytest

from reft_fast.demo import DEMO_CONFIG
from reft_fast.train import cli


@pytest.fixture
def launches(monkeypatch):
    seen = []

    def train(config_path, overrides, resume=False, overwrite=False):
        seen.append(dict(config=config_path, overrides=list(overrides), resume=resume, overwrite=overwrite))
        return None, SimpleNamespace(samples_before=[], samples_before_resumed=False, samples=[], steps=0,
                                     final_dir="runs/demo/final")

    monkeypatch.setattr(cli, "_train", train)
    return seen


def test_the_demo_resumes_as_its_ctrl_c_message_says(launches):
    assert cli.main(["demo", "training.save_every=5", "--resume"]) == 0
    assert launches == [dict(config=str(DEMO_CONFIG), overrides=["training.save_every=5"], resume=True,
                             overwrite=False)]


def test_the_plain_demo_still_replaces_its_earlier_run(launches):
    assert cli.main(["demo", "training.max_steps=2"]) == 0
    assert launches == [dict(config=str(DEMO_CONFIG), overrides=["training.max_steps=2"], resume=False,
                             overwrite=True)]


def test_resuming_a_finished_demo_says_the_demo_s_own_way_out(tmp_path, capsys):
    """``reft-fast demo --resume`` after a demo that finished without checkpoints said "pass --overwrite", which
    ``reft-fast demo`` refuses ("unrecognized arguments: --overwrite"): it names the plain command instead."""
    (tmp_path / "final").mkdir()
    assert cli.main(["demo", f"output_dir={tmp_path}", "--resume"]) == 2
    said = capsys.readouterr().err
    assert "no checkpoint to continue from" in said and "`reft-fast demo` without --resume" in said
    assert "--overwrite" not in said
    assert sorted(path.name for path in tmp_path.iterdir()) == ["final"]


def test_ctrl_c_before_any_checkpoint_says_how_to_go_on(tmp_path):
    """ctrl-C during the plain demo (no training.save_every) said only "no checkpoint was written yet
    (training.save_every)": now that none will come, how one would, and that the same command starts again."""
    from reft_fast.train.train_config import load_config

    demo = load_config(str(DEMO_CONFIG), [f"output_dir={tmp_path}", "overwrite_output_dir=true"])
    said = cli._what_an_interrupted_run_kept(demo)
    assert "training.save_every is 0" in said and "training.save_every=N" in said
    assert said.endswith("the same command starts again at step 0")
    saving = load_config(str(DEMO_CONFIG), [f"output_dir={tmp_path}", "training.save_every=5"])
    assert cli._what_an_interrupted_run_kept(saving).endswith(
        "(the first comes at step 5): the same command with --resume starts again at step 0")
