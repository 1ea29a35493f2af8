import json

import pytest
import torch

from reft_fast.core.config import ReftConfig
from reft_fast.core.interventions import ConsreftIntervention, LoreftIntervention, NoreftIntervention
from reft_fast.core.positions import check_locations, intervention_layers, intervention_locations, parse_positions, \
    unit_locations_to_tensor


@pytest.mark.parametrize("spec, expected", [("f7+l7", (7, 7)), ("f3", (3, 0)), ("l1", (0, 1)), ("f0+l2", (0, 2)),
                                            (" f12 + l5 ", (12, 5))])
def test_parse_positions(spec, expected):
    assert parse_positions(spec) == expected


@pytest.mark.parametrize("spec", ["", "x7", "f+l", "7", "l3+f2", "f3+", "+l2", "fl"])
def test_parse_positions_rejects(spec):
    with pytest.raises(ValueError, match="positions must look like"):
        parse_positions(spec)
    with pytest.raises(TypeError):
        parse_positions(7)


@pytest.mark.parametrize("spec, share_weights, expected", [
    ("f5+l5", False, [3, 9, 3, 9]),  # the first copy edits the first positions, the second the last ones
    ("f5+l5", True, [3, 9]),
    ("f0+l2", False, [3, 9]),  # one side empty: one-sided
    ("l1", False, [3, 9]),
])
def test_intervention_layers_doubles_for_two_separate_sides(spec, share_weights, expected):
    assert intervention_layers((3, 9), spec, share_weights) == expected


@pytest.mark.parametrize("spec", ["f7+l7", "f3", "l2", "f1+l4", "f5+l1"])
@pytest.mark.parametrize("share_weights", [False, True])
def test_matches_pyreft_get_intervention_locations(spec, share_weights):
    pyreft_dataset = pytest.importorskip("pyreft.dataset")
    first_n, last_n = parse_positions(spec)
    # pyreft switches to its combined list when a capped side is empty (prompts shorter than 2 with two sides): a
    # per-example width we do not copy (one width per batch here), so those lengths are compared only where it agrees.
    lengths = [L for L in range(0, 20) if share_weights or not (first_n and last_n) or L >= 2]
    ours = intervention_locations(lengths, spec, 4, share_weights=share_weights)
    for b, L in enumerate(lengths):
        expected = pyreft_dataset.get_intervention_locations(last_position=L, positions=spec, num_interventions=4,
                                                             share_weights=share_weights)
        assert ours[:, b].tolist() == expected, (L, spec)


def test_pyreft_style_helper():
    from reft_fast import get_intervention_locations

    assert get_intervention_locations(last_position=6, positions="f2+l1", num_interventions=2) == [[0, 1], [5, -1]]
    assert get_intervention_locations(last_position=6, first_n=1, last_n=1, num_interventions=1,
                                      share_weights=True) == [[0, 5]]
    assert get_intervention_locations(last_position=2, positions="f2+l1", num_interventions=2,
                                      pad_mode="last") == [[0, 2], [1, 2]]
    with pytest.raises(ValueError, match="pad_mode must be 'first'"):
        get_intervention_locations(last_position=6, positions="l1", num_interventions=1, pad_mode="sink")


def test_offsets_shift_real_positions_only():
    locs = intervention_locations(torch.tensor([5, 9, 2]), "f2+l3", 2, offsets=[4, 0, 7])
    assert locs.dtype == torch.long and locs.shape == (2, 3, 3)
    assert locs[0].tolist() == [[4, 5, -1], [0, 1, -1], [7, -1, -1]]
    assert locs[1].tolist() == [[7, 8, -1], [6, 7, 8], [8, -1, -1]]
    shared = intervention_locations([5], "f2+l3", 3, share_weights=True, offsets=[1])
    assert shared.shape == (3, 1, 5) and shared[2, 0].tolist() == [1, 2, 4, 5, -1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_interventions must be even"):
        intervention_locations([5], "f1+l1", 3)
    with pytest.raises(ValueError, match="prompt_lengths must be ≥ 0"):
        intervention_locations([-1], "l1", 1)
    with pytest.raises(ValueError, match="offsets has 2 entries"):
        intervention_locations([3], "l1", 1, offsets=[0, 1])
    with pytest.raises(TypeError, match="prompt_lengths must hold integers"):
        intervention_locations([3.0], "l1", 1)
    with pytest.raises(ValueError, match="selects no token"):
        intervention_locations([3], (0, 0), 1)


def test_unit_locations_formats():
    nested = [[[1, 2], [0]], [[3], [4, 5]]]
    expected = [[[1, 2], [0, -1]], [[3, -1], [4, 5]]]
    for form in ({"sources->base": (None, nested)}, {"base": nested}, nested):
        assert unit_locations_to_tensor(form, 2, 2).tolist() == expected
    assert unit_locations_to_tensor({"sources->base": (None, torch.tensor(expected))}, 2, 2).tolist() == expected
    with pytest.raises(ValueError, match="has locations for 2 interventions but the model has 3"):
        unit_locations_to_tensor(nested, 3, 2)
    with pytest.raises(ValueError, match="3 levels"):
        unit_locations_to_tensor({"sources->base": (None, [[1, 2], [3]])}, 2, 2)
    with pytest.raises(ValueError, match="source locations are not supported"):
        unit_locations_to_tensor({"sources->base": ([[[0]]], nested)}, 2, 2)
    with pytest.raises(ValueError, match="batch 2 but the inputs have batch 3"):
        unit_locations_to_tensor(nested, 2, 3)


def test_check_locations_values():
    locs = torch.tensor([[[0, 3], [1, -1]]])
    check_locations(locs, 1, 2, seq_len=4)
    with pytest.raises(ValueError, match="sequence length 3"):
        check_locations(locs, 1, 2, seq_len=3)
    with pytest.raises(ValueError, match="more than once"):
        check_locations(torch.tensor([[[2, 2]]]), 1, 1, seq_len=4)
    with pytest.raises(TypeError, match="integer dtype"):
        check_locations(locs.float(), 1, 2)
    with pytest.raises(ValueError, match="3-D"):
        check_locations(locs[0], 1, 2)


# ---------------------------------------------------------------------------------------------------------------------
# ReftConfig
# ---------------------------------------------------------------------------------------------------------------------
def test_config_pyreft_style_single_dict():
    inter = LoreftIntervention(embed_dim=16, low_rank_dimension=4)
    config = ReftConfig(representations={"layer": 1, "component": "block_output", "low_rank_dimension": 4,
                                         "intervention": inter})
    built = config.build(num_layers=2, hidden_size=16)
    assert built == [(1, "block_output", inter)]


def test_config_by_name_expands_layers(tmp_path):
    data = {"representations": [
        {"layer": "0;2", "component": "mlp_output", "intervention": "noreft", "low_rank_dimension": 2,
         "add_bias": True, "dropout": 0.1},
        {"layer": "all", "intervention": "ConsreftIntervention", "low_rank_dimension": 1}],
        "positions": "f1+l1", "share_weights": True}
    for suffix in (".json", ".yaml"):
        path = tmp_path / f"config{suffix}"
        ReftConfig.from_dict(data).save(path)
        config = ReftConfig.from_file(path)
        built = config.build(num_layers=3, hidden_size=8)
        assert [(layer, comp) for layer, comp, _ in built] == [(0, "mlp_output"), (2, "mlp_output"),
                                                              (0, "block_output"), (1, "block_output"),
                                                              (2, "block_output")]
        assert isinstance(built[0][2], NoreftIntervention) and built[0][2].add_bias and built[0][2].dropout_rate == 0.1
        assert isinstance(built[4][2], ConsreftIntervention) and built[4][2].embed_dim == 8
        assert config.positions == "f1+l1" and config.share_weights
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["representations"][0]["intervention"] == "NoreftIntervention"


def test_config_round_trip_of_instances():
    inter = NoreftIntervention(embed_dim=8, low_rank_dimension=2, act_fn="relu", add_bias=True, dropout=0.2)
    config = ReftConfig({"layer": 0, "intervention": inter})
    again = ReftConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    (_, _, rebuilt), = again.build(1, 8)
    assert rebuilt.config_dict() == inter.config_dict()


def test_config_errors():
    inter = LoreftIntervention(embed_dim=16, low_rank_dimension=4)
    with pytest.raises(ValueError, match="out of range: the model has 2 decoder layers"):
        ReftConfig({"layer": 2, "intervention": inter}).build(2, 16)
    with pytest.raises(ValueError, match="unknown component 'block'"):
        ReftConfig({"layer": 0, "component": "block", "intervention": inter})
    with pytest.raises(ValueError, match="embed_dim 16 differs from the model's hidden size 32"):
        ReftConfig({"layer": 0, "intervention": inter}).build(2, 32)
    with pytest.raises(ValueError, match="low_rank_dimension 8 is larger than embed_dim 4"):
        ReftConfig({"layer": 0, "intervention": "loreft", "low_rank_dimension": 8}).build(2, 4)
    with pytest.raises(ValueError, match="unknown keys \\['lyer'\\]"):
        ReftConfig({"lyer": 0, "intervention": inter})
    with pytest.raises(ValueError, match="unknown intervention type 'lora'"):
        ReftConfig({"layer": 0, "intervention": "lora", "low_rank_dimension": 2})
    with pytest.raises(ValueError, match="low_rank_dimension is required"):
        ReftConfig({"layer": 0, "intervention": "loreft"})
    with pytest.raises(ValueError, match="one layer"):
        ReftConfig({"layer": [0, 1], "intervention": inter})
    with pytest.raises(ValueError, match="positions must look like"):
        ReftConfig({"layer": 0, "intervention": inter}, positions="first7")


@pytest.mark.parametrize("value", [6.5, 6.0, True, "6"], ids=["fraction", "float", "bool", "str"])
def test_unit_locations_refuse_positions_that_are_not_integers(value):
    # A fractional position used to be truncated (6.5 edited token 6) and a bool or str cast to an int, silently.
    with pytest.raises(TypeError, match="integer"):
        unit_locations_to_tensor({"sources->base": (None, [[[value], [5]]])}, 1, 2)


def test_unit_locations_take_integers_of_any_kind_and_refuse_a_float_tensor():
    import numpy as np

    nested = [[[np.int64(6), torch.tensor(2)], [5, np.int32(1)]]]
    assert unit_locations_to_tensor(nested, 1, 2).tolist() == [[[6, 2], [5, 1]]]
    with pytest.raises(TypeError, match="integer"):
        unit_locations_to_tensor({"sources->base": (None, torch.tensor([[[6.7], [5.0]]]))}, 1, 2)


def test_config_accepts_pyvenes_max_number_of_units():
    # pyvene's representation key (the most positions a unit location may hold there) was an "unknown key" here.
    entry = {"layer": 1, "component": "block_output", "unit": "pos", "max_number_of_units": 4,
             "intervention": LoreftIntervention(embed_dim=8, low_rank_dimension=2)}
    assert ReftConfig(representations=entry).representations[0].layer == 1
    with pytest.raises(ValueError, match="max_number_of_units must be a positive int"):
        ReftConfig(representations={**entry, "max_number_of_units": 0})
