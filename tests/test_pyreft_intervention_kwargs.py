"""The constructor arguments pyreft's scripts pass to every intervention (examples/loreft/train.py passes
``dropout, dtype, act_fn, device, add_bias`` whatever the type). pyreft accepts them all: its interventions take
``**kwargs`` and ignore what a type does not use."""

import pytest
import torch

import reft_fast as pyreft

ROTATION_TYPES = ["LoreftIntervention", "DireftIntervention", "ConsreftIntervention", "LobireftIntervention"]
ALL_TYPES = ROTATION_TYPES + ["NoreftIntervention", "NodireftIntervention"]


@pytest.mark.parametrize("name", ROTATION_TYPES)
@pytest.mark.parametrize("add_bias", [False, True])
def test_add_bias_is_accepted_by_every_type(name, add_bias):
    # pyreft ignores add_bias on these types: the parameters are those of the default construction.
    torch.manual_seed(0)
    with_flag = getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2, add_bias=add_bias)
    torch.manual_seed(0)
    without = getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2)
    assert with_flag.state_dict().keys() == without.state_dict().keys()
    for key, value in without.state_dict().items():
        torch.testing.assert_close(with_flag.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_device_places_the_parameters(name):
    intervention = getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2, device="meta")
    assert {t.device.type for t in (*intervention.parameters(), *intervention.buffers())} == {"meta"}
    assert {p.dtype for p in intervention.parameters()} == {torch.float32}
    on_cpu = getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2, device=torch.device("cpu"))
    assert {t.device.type for t in on_cpu.parameters()} == {"cpu"}


@pytest.mark.parametrize("name", ["ConsreftIntervention", "LobireftIntervention"])
@pytest.mark.parametrize("act_fn", ["relu", "gelu"])  # "linear" (the identity) is accepted already
def test_act_fn_is_ignored_where_the_source_is_a_constant(name, act_fn):
    intervention = getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2, act_fn=act_fn)
    h = torch.randn(2, 5, 16)
    positions = torch.tensor([[0, 3], [1, -1]])
    reference = getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2)
    reference.load_state_dict(intervention.state_dict())
    torch.testing.assert_close(intervention(h, positions), reference(h, positions), rtol=0, atol=0)


def test_pyreft_loreft_train_py_arguments():
    # examples/loreft/train.py's call, for each intervention type it offers.
    for name in ALL_TYPES:
        getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2, dropout=0.05, dtype=torch.bfloat16, act_fn=None,
                              device="cpu", add_bias=False)


@pytest.mark.parametrize("name", ALL_TYPES)
def test_init_orth_is_accepted_as_pyreft_does(name):
    # pyreft's composition notebook passes pyvene's init_orth=True; pyreft's R starts orthonormal whatever it says.
    torch.manual_seed(0)
    with_flag = getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2, init_orth=True)
    torch.manual_seed(0)
    without = getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2)
    for key, value in without.state_dict().items():
        torch.testing.assert_close(with_flag.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="init_orth=False is not supported"):
        getattr(pyreft, name)(embed_dim=16, low_rank_dimension=2, init_orth=False)
