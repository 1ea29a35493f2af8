import json
import os
import pickle
import stat

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reft_fast import ReftConfig, ReftModel, get_reft_model
from reft_fast.core.saving import ReftLoadError

_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=64)


def _model(**overrides):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**_CONFIG, **overrides})).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


_REPRESENTATIONS = [
    {"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2, "act_fn": "relu",
     "dropout": 0.1, "orthogonalization": "polar"},  # every map is saved and loaded; consreft gets the default
    {"layer": 1, "component": "mlp_output", "intervention": "noreft", "low_rank_dimension": 3, "add_bias": True},
    {"layer": 1, "component": "mlp_output", "intervention": "lobireft", "low_rank_dimension": 2,
     "orthogonalization": "householder"},
    {"layer": 2, "component": "attention_input", "intervention": "consreft", "low_rank_dimension": 1},
    {"layer": 2, "component": "block_input", "intervention": "nodireft", "low_rank_dimension": 2, "act_fn": "gelu",
     "dtype": "bfloat16"},
    {"layer": 0, "component": "mlp_input", "intervention": "direft", "low_rank_dimension": 2,
     "orthogonalization": "cholesky"},
]


def _locations(n):
    return torch.tensor([[[0, 3], [2, -1], [5, 1]]] * n)


def test_save_then_load_restores_identical_outputs(tmp_path):
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS, positions="f1+l1", share_weights=True))
    with torch.no_grad():
        for p in reft_model.interventions.parameters():
            p.add_(0.3 * torch.randn_like(p) if p.dim() == 1 else 0)
    reft_model.eval()
    locations = _locations(len(_REPRESENTATIONS))
    with torch.no_grad():
        _, expected = reft_model(_inputs(), intervention_locations=locations)
    reft_model.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "interventions.safetensors"]

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["positions"] == "f1+l1" and config["share_weights"] is True
    assert config["model"] == {"class": "LlamaForCausalLM", "model_type": "llama", "hidden_size": 32, "num_layers": 3}
    first = config["interventions"][0]
    assert first == {"key": "layer_0_comp_block_output_unit_pos_nunit_1#0", "layer": 0, "component": "block_output",
                     "type": "LoreftIntervention", "embed_dim": 32, "low_rank_dimension": 2, "dropout": 0.1,
                     "act_fn": "relu", "dtype": "float32", "orthogonalization": "polar"}
    assert config["interventions"][1]["add_bias"] is True
    assert config["interventions"][4]["dtype"] == "bfloat16"

    loaded = ReftModel.load(tmp_path, _model()).eval()
    assert [i.config_dict() for i in loaded.interventions.values()] == \
        [i.config_dict() for i in reft_model.interventions.values()]
    with torch.no_grad():
        _, out = loaded(_inputs(), intervention_locations=locations)
    assert torch.equal(out.logits, expected.logits)


def test_the_householder_base_is_saved_compact_and_an_explicit_one_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    representations = [{"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2},
                       {"layer": 2, "component": "block_output", "intervention": "direft", "low_rank_dimension": 3}]
    reft_model = get_reft_model(_model(), ReftConfig(representations)).eval()
    with torch.no_grad():
        for name, p in reft_model.interventions.named_parameters():
            p.add_(0.3 * torch.randn_like(p).tril(-1) if name.endswith("original") else 0.3 * torch.randn_like(p))
        _, expected = reft_model(_inputs(), intervention_locations=_locations(2))
    reft_model.save(tmp_path / "new")
    state = load_file(str(tmp_path / "new" / "interventions.safetensors"))
    rotate_layers = {k: v for k, v in state.items() if ".rotate_layer." in k}
    assert sorted(k.rsplit(".", 1)[1] for k in rotate_layers) == ["base_reflectors", "base_reflectors", "base_tau",
                                                                   "base_tau", "original", "original"]
    assert max(v.numel() for v in rotate_layers.values()) == 32 * 3  # O(d·r): no d×d base is written

    # A directory saved before compact bases holds the explicit base B = H_1⋯H_r diag(s, 1, …, 1) instead.
    for key in [k for k in state if k.endswith("base_reflectors")]:
        prefix = key.removesuffix("base_reflectors")
        reflectors, tau = state.pop(key), state.pop(prefix + "base_tau")
        signs = torch.cat([reflectors.diagonal().sign(), torch.ones(32 - tau.shape[0])])
        state[prefix + "base"] = torch.ormqr(reflectors, tau, torch.diag(signs)).contiguous()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    save_file(state, str(tmp_path / "old" / "interventions.safetensors"))
    for folder in ("new", "old"):
        loaded = ReftModel.load(tmp_path / folder, _model()).eval()
        assert all(iv.rotate_layer.has_explicit_base == (folder == "old") for iv in loaded.interventions.values())
        with torch.no_grad():
            _, out = loaded(_inputs(), intervention_locations=_locations(2))
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    loaded.save(tmp_path / "again")  # an explicit base is saved as it was loaded
    assert "layer_0_comp_block_output_unit_pos_nunit_1#0.rotate_layer.base" in \
        load_file(str(tmp_path / "again" / "interventions.safetensors"))


def test_load_refuses_a_different_model(tmp_path):
    get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1])).save(tmp_path)
    with pytest.raises(ValueError, match="saved for a different model \\(hidden_size: saved 32, model 48\\)"):
        ReftModel.load(tmp_path, _model(hidden_size=48))
    with pytest.raises(ValueError, match="num_layers: saved 3, model 2"):
        ReftModel.load(tmp_path, _model(num_hidden_layers=2))
    with pytest.raises(ValueError, match="holds no config.json"):
        ReftModel.load(tmp_path / "missing", _model())


def test_saving_into_a_file_path_says_it_is_a_file(tmp_path):
    # It was pathlib's bare "[Errno 17] File exists", from mkdir.
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1]))
    (tmp_path / "notes.txt").write_text("mine")
    for save in (reft_model.save, reft_model.save_intervention):
        with pytest.raises(FileExistsError, match="notes.txt: it is a file, and a saved ReFT model is a directory"):
            save(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.cuda
def test_load_onto_a_cuda_model(tmp_path):
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS)).eval()  # no dropout: comparable forwards
    with torch.no_grad():
        _, expected = reft_model(_inputs(), intervention_locations=_locations(len(_REPRESENTATIONS)))
    reft_model.save(tmp_path)
    loaded = ReftModel.load(tmp_path, _model().cuda(), backend="torch").eval()
    assert all(p.device.type == "cuda" for p in loaded.trainable_parameters())
    with torch.no_grad():
        _, out = loaded({k: v.cuda() for k, v in _inputs().items()},
                        intervention_locations=_locations(len(_REPRESENTATIONS)))
    torch.testing.assert_close(out.logits.cpu(), expected.logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Directories written by pyreft itself
# ---------------------------------------------------------------------------------------------------------------------
# Every pyreft type: (class name, arguments, layer, component).
_PYREFT_KINDS = [("LoreftIntervention", {}, 0, "block_output"),
                 ("NoreftIntervention", {"add_bias": True}, 1, "mlp_output"),
                 ("NoreftIntervention", {"add_bias": False}, 2, "block_output"),
                 ("DireftIntervention", {}, 0, "mlp_output"),
                 ("NodireftIntervention", {"add_bias": False}, 1, "block_input"),
                 ("ConsreftIntervention", {}, 2, "mlp_input"), ("LobireftIntervention", {}, 1, "mlp_input")]


def _pyreft_model(pyreft, model):
    d = model.config.hidden_size
    representations = [{"layer": layer, "component": comp, "low_rank_dimension": 2,
                        "intervention": getattr(pyreft, name)(embed_dim=d, low_rank_dimension=2, dtype=torch.float32,
                                                              **kwargs)}
                       for name, kwargs, layer, comp in _PYREFT_KINDS]
    theirs = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=representations), set_device=False)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "learned_source" in name or "proj_layer" in name:
                p.add_(0.5 * torch.randn_like(p))
    return theirs


def _pyreft_model_with_a_trained_head(pyreft):
    """A pyreft model whose LM head trains with the interventions (requires grad) and moved from its initial value."""
    theirs = _pyreft_model(pyreft, _model())
    head = theirs.model.lm_head.weight
    head.requires_grad_(True)
    with torch.no_grad():
        head.add_(1.0)
    return theirs


def test_load_a_directory_saved_by_pyreft(tmp_path):
    pyreft = pytest.importorskip("pyreft")
    model = _model()
    theirs = _pyreft_model(pyreft, model)
    # pyvene has no "no position" (−1 indexes the last token there): full rows only.
    locations = [[[0, 3], [2, 4], [5, 1]]] * len(theirs.interventions)
    with torch.no_grad():
        _, expected = theirs(_inputs(), unit_locations={"sources->base": (None, locations)})
    theirs.save(str(tmp_path))
    assert any(p.name.startswith("intkey_") and p.suffix == ".bin" for p in tmp_path.iterdir())
    for method in ("polar", "householder"):
        ours = ReftModel.load(tmp_path, _model(), orthogonalization=method).eval()
        assert [type(i).__name__ for i in ours.interventions.values()] == \
            [type(i).__name__ for i in theirs.interventions.values()]
        assert ours.interventions["layer_1_comp_mlp_output_unit_pos_nunit_1#0"].add_bias is True
        if method == "householder":  # pyreft saves LoReFT's weight alone (compact base completes it) and the
            # parametrization state of the others (their explicit base is kept, to train as in pyreft)
            forms = {type(iv).__name__: iv.rotate_layer.has_explicit_base for iv in ours.interventions.values()
                     if iv.uses_rotation}
            assert forms == {"LoreftIntervention": False, "DireftIntervention": True, "ConsreftIntervention": True,
                             "LobireftIntervention": True}
        with torch.no_grad():
            _, out = ours(_inputs(), unit_locations={"sources->base": (None, locations)})
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_a_pyreft_directory_with_linked_interventions_is_refused(tmp_path):
    # pyvene's intervention_link_key (kept in config.json) makes a linked site edit the first site's edited hidden
    # states instead of its own; reft_fast loaded such a directory as independent interventions, whose outputs differ
    # from pyreft's (by 0.3 in the logits here), without a word.
    pyreft = pytest.importorskip("pyreft")
    representations = [{"layer": layer, "component": "block_output", "low_rank_dimension": 2,
                        "intervention_link_key": link,
                        "intervention": pyreft.LoreftIntervention(embed_dim=32, low_rank_dimension=2)}
                       for layer, link in ((0, 7), (1, None), (2, 7))]
    theirs = pyreft.get_reft_model(_model(), pyreft.ReftConfig(representations=representations), set_device=False)
    theirs.save(str(tmp_path))
    with pytest.raises(ReftLoadError, match="representation 0 has pyvene's intervention_link_key 7, which is not "
                                            "supported"):
        ReftModel.load(tmp_path, _model())


def test_include_model_loads_the_base_parameters_pyreft_saved(tmp_path):
    # pyvene's save(..., include_model=True) (and every checkpoint of pyreft's trainer) writes the base's trainable
    # parameters, a head trained with the interventions, to pytorch_model.bin; ReftModel.load(..., include_model=True)
    # read only its own base_trainable.safetensors and left the head untrained without a word.
    pyreft = pytest.importorskip("pyreft")
    theirs = _pyreft_model_with_a_trained_head(pyreft)
    head = theirs.model.lm_head.weight
    theirs.save(str(tmp_path), include_model=True)
    assert (tmp_path / "pytorch_model.bin").is_file()

    fresh = _model()
    ReftModel.load(tmp_path, fresh)
    assert not torch.equal(fresh.lm_head.weight, head)  # include_model=False (the default) leaves the base alone
    ReftModel.load(tmp_path, fresh, include_model=True)
    assert torch.equal(fresh.lm_head.weight, head)

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _Payload()}, protocol=2))
    with pytest.raises(ReftLoadError, match="pytorch_model.bin cannot be read \\(UnpicklingError: Weights only"):
        ReftModel.load(tmp_path, _model(), include_model=True)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pyreft_weights_are_read_without_unpickling_objects(tmp_path):
    pyreft = pytest.importorskip("pyreft")
    theirs = _pyreft_model(pyreft, _model())
    theirs.save(str(tmp_path))
    target = next(p for p in tmp_path.iterdir() if p.suffix == ".bin")
    target.write_bytes(pickle.dumps({"weight": _Payload()}, protocol=2))
    with pytest.raises(ReftLoadError, match=f"{target.name} cannot be read \\(UnpicklingError: Weights only load "
                                            "failed"):
        ReftModel.load(tmp_path, _model())


def test_a_missing_pyreft_weights_file_is_a_load_error_naming_it(tmp_path):
    pyreft = pytest.importorskip("pyreft")
    _pyreft_model(pyreft, _model()).save(str(tmp_path))
    target = next(p for p in tmp_path.iterdir() if p.suffix == ".bin")
    target.unlink()
    with pytest.raises(ReftLoadError, match=f"{target.name} is missing"):  # was FileNotFoundError from torch.load
        ReftModel.load(tmp_path, _model())


@pytest.mark.parametrize("damage", ["missing", "cut short", "not safetensors", "another rank"])
def test_a_damaged_weights_file_is_a_load_error_naming_it(tmp_path, damage):
    # These were FileNotFoundError, safetensors' SafetensorError or load_state_dict's RuntimeError: `reft-fast
    # generate --reft DIR` showed a traceback instead of naming the file.
    get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1])).save(tmp_path / "reft")
    weights = tmp_path / "reft" / "interventions.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "cut short":
        weights.write_bytes(weights.read_bytes()[:-40])
    elif damage == "not safetensors":
        weights.write_text("not a tensor file")
    else:  # the same intervention saved at rank 3 where config.json says 2
        other = {**_REPRESENTATIONS[0], "low_rank_dimension": 3}
        get_reft_model(_model(), ReftConfig([other])).save(tmp_path / "other")
        weights.write_bytes((tmp_path / "other" / "interventions.safetensors").read_bytes())
    problem = {"missing": "is missing", "cut short": "cannot be read", "not safetensors": "cannot be read",
               "another rank": "does not hold the interventions .*config.json describes"}[damage]
    with pytest.raises(ReftLoadError, match=f"interventions.safetensors {problem}"):
        ReftModel.load(tmp_path / "reft", _model())


def test_include_model_saves_and_loads_the_trained_base_parameters_as_pyvene(tmp_path):
    # pyvene's save(..., include_model=True) / load(..., include_model=True) keep the base's trainable parameters
    # (a head trained with the interventions); reft_fast's save and load refused the keyword.
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1]))
    head = reft_model.model.lm_head.weight
    head.requires_grad_(True)
    with torch.no_grad():
        head.add_(1.0)
    reft_model.save(tmp_path / "with", include_model=True)
    reft_model.save(tmp_path / "without")  # pyvene's default: interventions only
    assert (tmp_path / "with" / "base_trainable.safetensors").is_file()
    assert not (tmp_path / "without" / "base_trainable.safetensors").exists()

    fresh = _model()
    ReftModel.load(tmp_path / "with", fresh)
    assert not torch.equal(fresh.lm_head.weight, head)  # include_model=False (the default) leaves the base alone
    ReftModel.load(tmp_path / "with", fresh, include_model=True)
    assert torch.equal(fresh.lm_head.weight, head)


@pytest.mark.parametrize("include_model", [False, True])
def test_saving_again_without_the_base_leaves_no_earlier_base_file(tmp_path, include_model):
    # A second save into one directory, without the base (include_model=False, or nothing of the base trains any
    # more), kept the first save's base_trainable.safetensors: load(..., include_model=True) then put that stale head
    # beside the new interventions, silently.
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1]))
    head = reft_model.model.lm_head.weight
    head.requires_grad_(True)
    with torch.no_grad():
        head.add_(1.0)
    reft_model.save(tmp_path, include_model=True)
    head.requires_grad_(False)
    with torch.no_grad():
        head.add_(1.0)
    reft_model.save(tmp_path, include_model=include_model)
    assert not (tmp_path / "base_trainable.safetensors").exists()
    fresh = _model()
    ReftModel.load(tmp_path, fresh, include_model=True)
    assert torch.equal(fresh.lm_head.weight, _model().lm_head.weight)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_weights_get_the_permissions_of_the_config_beside_them(tmp_path, umask):
    """safetensors 0.8's save_file left its files at 0600 whatever the umask: another user (a server) could read the
    saved config.json but not the interventions beside it."""
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1]))
    reft_model.model.lm_head.weight.requires_grad_(True)
    previous = os.umask(umask)
    try:
        reft_model.save(tmp_path, include_model=True)
    finally:
        os.umask(previous)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["config.json", "interventions.safetensors", "base_trainable.safetensors"],
                                  0o666 & ~umask)


def test_a_save_that_fails_leaves_the_earlier_weights_file_whole(tmp_path, monkeypatch):
    """The weights go to a scratch file renamed over the old one: a save that stops midway (here the disk fills as
    the written bytes are flushed) leaves the earlier file as it was, and no scratch file."""
    import errno

    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1]))
    reft_model.save(tmp_path)
    weights = tmp_path / "interventions.safetensors"
    before = weights.read_bytes()
    with torch.no_grad():
        next(iter(reft_model.interventions.parameters())).add_(1.0)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        reft_model.save(tmp_path)
    monkeypatch.undo()
    assert weights.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == \
        ["config.json", "interventions.safetensors"]
    ReftModel.load(tmp_path, _model())


def test_a_config_that_is_not_json_names_its_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        ReftModel.load(tmp_path, _model())


def _train_step(reft_model, locations):
    optimizer = torch.optim.SGD(reft_model.trainable_parameters(), lr=0.5)
    _, out = reft_model(_inputs(), intervention_locations=locations, labels=_inputs()["input_ids"])
    out.loss.backward()
    optimizer.step()


def test_one_intervention_instance_at_two_layers_stays_one_after_save_and_load(tmp_path):
    # pyreft/pyvene accept one instance in several representations (its weights shared). Saving it once raised
    # safetensors' "Some tensors share memory"; then it loaded back as two independent copies, which a further training
    # step moved apart. It loads back as one instance, and trains as the saved model does.
    from reft_fast import LoreftIntervention

    shared = LoreftIntervention(embed_dim=32, low_rank_dimension=2)
    representations = [{"layer": layer, "component": "block_output", "intervention": shared} for layer in (0, 2)]
    representations.insert(1, _REPRESENTATIONS[1])  # an unshared one between them keeps its own weights
    reft_model = get_reft_model(_model(), ReftConfig(representations)).eval()
    locations = _locations(3)
    with torch.no_grad():
        _, expected = reft_model(_inputs(), intervention_locations=locations)
    reft_model.save(tmp_path)
    loaded = ReftModel.load(tmp_path, _model()).eval()
    first, unshared, last = loaded.interventions.values()
    assert first is last and unshared is not first
    assert loaded.count_parameters() == reft_model.count_parameters()
    with torch.no_grad():
        _, out = loaded(_inputs(), intervention_locations=locations)
    assert torch.equal(out.logits, expected.logits)

    _train_step(reft_model, locations)
    _train_step(loaded, locations)
    for ours, theirs in zip(loaded.interventions.state_dict().values(), reft_model.interventions.state_dict().values()):
        torch.testing.assert_close(ours, theirs)


def test_one_intervention_instance_on_layers_of_two_devices_is_refused():
    # Each intervention moves to its layer's device: a shared one went to its last layer's, and its first layer then
    # failed with a device mismatch at the first forward (a base split over GPUs; the meta device stands in here).
    from reft_fast import LoreftIntervention

    model = _model()
    model.model.layers[2].to("meta")
    shared = LoreftIntervention(embed_dim=32, low_rank_dimension=2)
    representations = [{"layer": layer, "component": "block_output", "intervention": shared} for layer in (0, 2)]
    with pytest.raises(ValueError, match=r"one intervention instance is given at layer 0 \(cpu\) and at layer 2 "
                                         r"\(meta\): a module sits on one device"):
        get_reft_model(model, ReftConfig(representations))


def test_an_entry_sharing_an_unknown_key_is_a_load_error(tmp_path):
    from reft_fast import LoreftIntervention

    shared = LoreftIntervention(embed_dim=32, low_rank_dimension=2)
    get_reft_model(_model(), ReftConfig([{"layer": layer, "component": "block_output", "intervention": shared}
                                         for layer in (0, 2)])).save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["interventions"][1]["shared_with"] = "layer_1_comp_block_output_unit_pos_nunit_1#0"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReftLoadError, match="shares the weights of 'layer_1_comp_block_output_unit_pos_nunit_1#0', "
                                            "which no earlier entry has"):
        ReftModel.load(tmp_path, _model())


def test_the_state_dict_holds_the_base_layers_once():
    # The layer list was also registered as a submodule of the ReftModel: state_dict() named every decoder weight
    # twice (model.model.layers.* and _layers.*) and print() showed the layers twice.
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1]))
    keys = list(reft_model.state_dict())
    assert not [k for k in keys if not k.startswith(("model.", "interventions."))]
    assert len(keys) == len(reft_model.model.state_dict()) + len(reft_model.interventions.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# pyvene's in-place pair: save_intervention / load_intervention
# ---------------------------------------------------------------------------------------------------------------------
def _same_config_as_pyreft(model, orthogonalization="householder", kinds=_PYREFT_KINDS, rank=2):
    """A reft_fast model built, as a pyreft user's script builds it, with the config of ``_pyreft_model``."""
    import reft_fast

    rotation = {"orthogonalization": orthogonalization}
    representations = [{"layer": layer, "component": comp, "low_rank_dimension": rank,
                        "intervention": getattr(reft_fast, name)(
                            embed_dim=32, low_rank_dimension=rank, dtype=torch.float32, **kwargs,
                            **(rotation if name not in ("NoreftIntervention", "NodireftIntervention") else {}))}
                       for name, kwargs, layer, comp in kinds]
    return get_reft_model(model, ReftConfig(representations))


def _pyreft_trainer_checkpoint(pyreft, theirs, checkpoint):
    """What pyreft's trainer writes at each checkpoint: its own save_model (pyreft 0.1.0), which needs only .model."""
    from types import SimpleNamespace

    pyreft.ReftTrainer.save_model(SimpleNamespace(model=theirs), str(checkpoint))
    return checkpoint / "intervenable_model"


@pytest.mark.parametrize("orthogonalization", ["householder", "polar"])
@pytest.mark.parametrize("written_by", ["trainer checkpoint", "save"])
def test_load_intervention_reads_what_pyreft_wrote(tmp_path, orthogonalization, written_by):
    # pyreft's trainer writes checkpoint-N/intervenable_model with pyvene's save_intervention: intkey_*.bin and
    # pytorch_model.bin, no config.json (pyreft #109). reft_fast had no load_intervention, and load refused it.
    pyreft = pytest.importorskip("pyreft")
    theirs = _pyreft_model_with_a_trained_head(pyreft)
    head = theirs.model.lm_head.weight
    locations = [[[0, 3], [2, 4], [5, 1]]] * len(theirs.interventions)
    with torch.no_grad():
        _, expected = theirs(_inputs(), unit_locations={"sources->base": (None, locations)})
    if written_by == "save":
        directory = tmp_path / "saved"
        theirs.save(str(directory), include_model=True)
    else:
        directory = _pyreft_trainer_checkpoint(pyreft, theirs, tmp_path / "checkpoint-8")
        assert (directory / "pytorch_model.bin").is_file() and not (directory / "config.json").exists()
        with pytest.raises(ReftLoadError, match="holds no config.json.*reft_model.load_intervention"):
            ReftModel.load(directory, _model())

    ours = _same_config_as_pyreft(_model(), orthogonalization)
    ours.load_intervention(str(directory))
    ours.eval()
    assert torch.equal(ours.model.lm_head.weight, head)  # include_model=True: pyvene's default
    with torch.no_grad():
        _, out = ours(_inputs(), unit_locations={"sources->base": (None, locations)})
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_load_intervention_reads_pyreft_checkpoints_of_interventions_given_by_module_path(tmp_path):
    """pyvene keys an intervention given by a module path by that path (``comp_model_layers[1]_output_unit_pos_
    nunit_1#0``), not by layer and component as ours: the trainer checkpoint of such a pyreft model was refused with
    both key lists. Two at one path get #0 and #1; a named component among them keeps its usual key."""
    pyreft = pytest.importorskip("pyreft")
    import reft_fast

    sites = [("model.layers[1].output", None), ("model.layers[0].mlp.output", None), ("model.layers[0].mlp.output",
             None), ("block_output", 2)]
    locations = [[[0, 3], [2, 4], [5, 1]]] * len(sites)

    def representations(library, seed):
        torch.manual_seed(seed)
        built = []
        for component, layer in sites:
            intervention = library.LoreftIntervention(embed_dim=32, low_rank_dimension=2, dtype=torch.float32)
            built.append({"component": component, "low_rank_dimension": 2, "intervention": intervention,
                          **({} if layer is None else {"layer": layer})})
        return built

    theirs = pyreft.get_reft_model(_model(), pyreft.ReftConfig(representations=representations(pyreft, 1)),
                                   set_device=False)
    with torch.no_grad():
        _, expected = theirs(_inputs(), unit_locations={"sources->base": (None, locations)})
    checkpoint = _pyreft_trainer_checkpoint(pyreft, theirs, tmp_path / "checkpoint-4")
    names = {p.name for p in checkpoint.glob("intkey_*")}
    assert {"intkey_comp_model_layers[1]_output_unit_pos_nunit_1#0.bin",
            "intkey_comp_model_layers[0]_mlp_output_unit_pos_nunit_1#1.bin"} <= names
    ours = get_reft_model(_model(), ReftConfig(representations(reft_fast, 2))).eval()
    ours.load_intervention(checkpoint)
    with torch.no_grad():
        _, out = ours(_inputs(), unit_locations={"sources->base": (None, locations)})
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    other = get_reft_model(_model(), ReftConfig(representations(reft_fast, 2)[:3]))
    with pytest.raises(ReftLoadError, match="does not hold the model's interventions"):
        other.load_intervention(checkpoint)


def test_save_intervention_round_trips_and_every_loader_reads_it(tmp_path):
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS, share_weights=True))
    head = reft_model.model.lm_head.weight
    head.requires_grad_(True)
    with torch.no_grad():
        head.add_(1.0)
        for p in reft_model.interventions.parameters():
            p.add_(0.3 * torch.randn_like(p))
    reft_model.eval()
    locations = _locations(len(_REPRESENTATIONS))
    with torch.no_grad():
        _, expected = reft_model(_inputs(), intervention_locations=locations)
    reft_model.save_intervention(tmp_path / "ckpt")  # include_model=True: pyvene's default

    fresh = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS, share_weights=True)).eval()
    fresh.load_intervention(tmp_path / "ckpt", include_model=False)
    assert not torch.equal(fresh.model.lm_head.weight, head)
    fresh.load_intervention(tmp_path / "ckpt")
    assert torch.equal(fresh.model.lm_head.weight, head)
    rebuilt = ReftModel.load(tmp_path / "ckpt", _model(), include_model=True).eval()  # the config is there too
    for loaded in (fresh, rebuilt):
        with torch.no_grad():
            _, out = loaded(_inputs(), intervention_locations=locations)
        assert torch.equal(out.logits, expected.logits)


def _unchanged_after(reft_model, call):
    before = {k: v.clone() for k, v in reft_model.state_dict().items()}
    call()
    after = reft_model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing was loaded partially


@pytest.mark.parametrize("problem", ["missing key", "extra key", "wrong rank", "another type"])
def test_load_intervention_refuses_our_directory_of_other_interventions_and_changes_nothing(tmp_path, problem):
    saved = [{"layer": 0, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2},
             {"layer": 1, "component": "block_output", "intervention": "loreft", "low_rank_dimension": 2}]
    get_reft_model(_model(), ReftConfig(saved)).save_intervention(tmp_path)
    model_config = {"missing key": saved + [{**saved[1], "layer": 2}], "extra key": saved[:1],
                    "wrong rank": [saved[0], {**saved[1], "low_rank_dimension": 3}],
                    "another type": [saved[0], {**saved[1], "intervention": "direft"}]}[problem]
    message = {"missing key": "the model's \\['layer_2_comp_block_output_unit_pos_nunit_1#0'\\] are missing",
               "extra key": "interventions: \\['layer_1_comp_block_output_unit_pos_nunit_1#0'\\] are not in the model",
               "wrong rank": "'layer_1_comp_block_output_unit_pos_nunit_1#0' does not match the model's "
                             "\\(low_rank_dimension: saved 2, model 3\\)",
               "another type": "\\(type: saved 'LoreftIntervention', model 'DireftIntervention'\\)"}[problem]
    reft_model = get_reft_model(_model(), ReftConfig(model_config))
    reft_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ReftLoadError, match=message):
        _unchanged_after(reft_model, lambda: reft_model.load_intervention(tmp_path))


def test_load_intervention_checks_every_tensor_before_loading_any(tmp_path):
    # The config agrees, the weights file does not (its second intervention has another rank): the first one must
    # not be loaded either.
    config = [{"layer": layer, "component": "block_output", "intervention": "noreft", "low_rank_dimension": 2}
              for layer in (0, 1)]
    get_reft_model(_model(), ReftConfig(config)).save_intervention(tmp_path / "a")
    get_reft_model(_model(), ReftConfig([config[0], {**config[1], "low_rank_dimension": 3}])).save_intervention(
        tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    reft_model = get_reft_model(_model(), ReftConfig(config))
    with pytest.raises(ReftLoadError, match="(?s)b/interventions.safetensors does not match the model's interventions: "
                                            ".*size mismatch for layer_1"):
        _unchanged_after(reft_model, lambda: reft_model.load_intervention(tmp_path / "b"))


@pytest.mark.parametrize("problem", ["missing key", "wrong rank", "no bias", "another type", "pickled code",
                                     "base shape"])
def test_load_intervention_refuses_pyreft_weights_of_other_interventions_and_changes_nothing(tmp_path, problem):
    pyreft = pytest.importorskip("pyreft")
    theirs = _pyreft_model(pyreft, _model())
    theirs.model.lm_head.weight.requires_grad_(True)
    checkpoint = _pyreft_trainer_checkpoint(pyreft, theirs, tmp_path / "checkpoint-1")
    kinds, rank, model = list(_PYREFT_KINDS), 2, _model()
    if problem == "missing key":
        kinds.append(("LoreftIntervention", {}, 2, "attention_output"))
        message = "the model's \\['layer_2_comp_attention_output_unit_pos_nunit_1#0'\\] are missing"
    elif problem == "wrong rank":
        rank, message = 3, "intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin does not match the model's"
    elif problem == "no bias":  # the bias would be dropped without a word
        kinds[1] = ("NoreftIntervention", {"add_bias": False}, 1, "mlp_output")
        message = ("intkey_layer_1_comp_mlp_output_unit_pos_nunit_1#0.bin does not match the model's intervention: "
                   "the pyreft state of NoreftIntervention has the subtracted bias proj_layer.bias")
    elif problem == "another type":  # pyreft's save writes a config.json naming the types; its checkpoints do not
        theirs.save(str(checkpoint))
        kinds[3] = ("LobireftIntervention", {}, 0, "mlp_output")
        message = "layer_0_comp_mlp_output_unit_pos_nunit_1#0.bin holds a DireftIntervention .* is a Lobireft"
    elif problem == "pickled code":
        (checkpoint / "intkey_layer_2_comp_mlp_input_unit_pos_nunit_1#0.bin").write_bytes(
            pickle.dumps({"weight": _Payload()}, protocol=2))
        message = "cannot be read \\(UnpicklingError: Weights only load failed"
    else:
        model = _model(vocab_size=80)
        message = "pytorch_model.bin: parameters of the wrong shape: lm_head.weight \\[64, 32\\] \\(model \\[80, 32\\]\\)"
    ours = _same_config_as_pyreft(model, kinds=kinds, rank=rank)
    with pytest.raises(ReftLoadError, match=message):
        _unchanged_after(ours, lambda: ours.load_intervention(checkpoint))


def test_load_intervention_of_a_directory_without_weights_says_so(tmp_path):
    reft_model = get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1]))
    with pytest.raises(ReftLoadError, match="is not a directory"):
        reft_model.load_intervention(tmp_path / "absent")
    with pytest.raises(ReftLoadError, match="holds neither a reft_fast config.json .* nor the weights of a "
                                            "registered format \\(\\['pyreft'\\]\\)"):
        reft_model.load_intervention(tmp_path)


def test_format_version_is_2_only_with_shared_weights_and_a_newer_one_is_refused(tmp_path):
    """A directory with a shared intervention is written as format_version 2 (version 1 has no "shared_with"), any
    other stays version 1, readable by older versions; a version this reader does not know is refused by name (it was
    read as if it were version 1)."""
    from reft_fast import LoreftIntervention

    shared = LoreftIntervention(embed_dim=32, low_rank_dimension=2)
    get_reft_model(_model(), ReftConfig([{"layer": layer, "component": "block_output", "intervention": shared}
                                         for layer in (0, 2)])).save(tmp_path / "shared")
    get_reft_model(_model(), ReftConfig(_REPRESENTATIONS[:1])).save(tmp_path / "plain")
    assert json.loads((tmp_path / "shared" / "config.json").read_text())["format_version"] == 2
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["format_version"] == 1
    config["format_version"] = 3
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReftLoadError, match="has format_version 3, and this reft_fast reads versions 1, 2: it was "
                                            "written by a newer reft_fast"):
        ReftModel.load(tmp_path / "plain", _model())
