"""Several named ReFTs over one base, and what a batch that mixes them needs before the base runs.

A ReftModel holds its ReFTs as ``Adapter`` records (the config, the interventions, their placements); the active one
is the ReftModel's own ``interventions`` and runs through its permanent hooks, exactly as a ReftModel with one ReFT.
A batch with ``adapter_names`` (one name or None per example) instead builds a ``MultiForwardState`` here: for every
site (layer, component) that any ReFT of the batch edits, the passes of one ``ops.multi_low_rank_edit`` each. A
ReFT's edits at a site run in its own order (its interventions there, each one or two op steps); pass m takes the
m-th step of every ReFT that has one there, so each example sees exactly its own ReFT's sequence of edits.

Positions: per ReFT, an int tensor [n_interventions, batch, P] over the whole batch (only its own examples' rows are
read), given by the caller, or computed from the ReFT's saved position spec (``"f7+l7"``) and the attention mask
(prompt lengths, left padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from reft_fast.core.config import ReftConfig
from reft_fast.core.hooks import MultiForwardState, SitePass
from reft_fast.core.positions import check_locations, intervention_locations

__all__ = ["Adapter", "check_adapter_names", "adapter_locations", "multi_forward_state"]


@dataclass
class Adapter:
    """One named ReFT: its config, its interventions (in the order of the locations) and their (layer, component)."""

    reft_config: ReftConfig
    interventions: nn.ModuleDict
    placements: list


def check_adapter_names(adapter_names, batch_size: int, known: Sequence[str]) -> list:
    """The distinct names used in ``adapter_names`` (a name or None per example), after checking them."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
        raise TypeError(f"adapter_names must be a list with one adapter name (or None) per example, got "
                        f"{type(adapter_names).__name__}")
    if len(adapter_names) != batch_size:
        raise ValueError(f"adapter_names has {len(adapter_names)} entries but the batch has {batch_size} examples: "
                         "give one adapter name (or None for the plain model) per example")
    unknown = sorted({str(name) for name in adapter_names if name is not None and name not in known})
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown} in adapter_names; loaded adapters: {list(known)}")
    return list(dict.fromkeys(name for name in adapter_names if name is not None))


def adapter_locations(base: Mapping, used: Sequence[str], adapters: Mapping[str, Adapter], given,
                      batch_size: int, seq_len: int) -> dict:
    """name → int64 locations [n_interventions, batch, P] for each used adapter: from ``given`` (a mapping of
    name → tensor) or from the adapter's position spec and the attention mask."""
    if given is not None and not isinstance(given, Mapping):
        raise TypeError("with adapter_names, intervention_locations must be a dict {adapter name: int tensor "
                        "[n_interventions, batch, positions]} (or None to use each adapter's saved position spec)")
    locations = {}
    for name in used:
        adapter = adapters[name]
        n = len(adapter.interventions)
        if given is not None and name in given:
            check_locations(given[name], n, batch_size)
            if given[name].device.type == "cpu":
                check_locations(given[name], n, batch_size, seq_len=seq_len)
            locations[name] = given[name].long()
            continue
        spec = adapter.reft_config.positions
        if spec is None:
            raise ValueError(f"adapter {name!r} has no saved position spec: pass intervention_locations="
                             f"{{{name!r}: <int tensor [{n}, batch, positions]>}}")
        lengths, offsets = _prompt_spans(base, batch_size, seq_len)
        locations[name] = intervention_locations(lengths, spec, n, share_weights=adapter.reft_config.share_weights,
                                                 offsets=offsets)
    return locations


def _prompt_spans(base: Mapping, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt lengths, left-padding offsets) [batch] from the attention mask (full length without one)."""
    mask = base.get("attention_mask")
    if mask is None:
        return torch.full((batch_size,), seq_len), torch.zeros(batch_size, dtype=torch.long)
    mask = mask.to("cpu", torch.long)
    return mask.sum(1), (mask.cumsum(1) == 0).sum(1)


def multi_forward_state(adapter_names: Sequence[Optional[str]], used: Sequence[str], adapters: Mapping[str, Adapter],
                        locations: Mapping[str, torch.Tensor], step_parameters, backend_on, *, expandable: bool,
                        prompt_length: int) -> tuple[list, MultiForwardState]:
    """(the hooked sites, the state): one list of SitePass per site, in the order of the sites.

    ``step_parameters(adapter)`` gives each intervention's ``edit_steps`` (R computed for the adapter's rotation
    interventions at once) and its device; ``backend_on(device)`` the backend name there."""
    sequences: dict = {}  # site -> adapter name -> [(step, its positions [B, P], device)], in edit order
    for name in used:
        moved: dict = {}
        for i, ((steps, device), site) in enumerate(zip(step_parameters(adapters[name]), adapters[name].placements)):
            if device not in moved:
                moved[device] = locations[name].to(device, non_blocking=True).contiguous()
            sequences.setdefault(site, {}).setdefault(name, []).extend(
                (step, moved[device][i], device) for step in steps)
    rows = {name: [b for b, given in enumerate(adapter_names) if given == name] for name in used}
    sites = list(sequences)
    passes = [_site_passes(sequences[site], rows, len(adapter_names), backend_on) for site in sites]
    return sites, MultiForwardState(passes, expandable=expandable, prompt_length=prompt_length)


def _site_passes(by_adapter: dict, rows: dict, batch_size: int, backend_on) -> list:
    """Pass m: the m-th step of each adapter that has one at this site, for that adapter's examples."""
    passes = []
    for m in range(max(map(len, by_adapter.values()))):
        members = [(name, sequence[m]) for name, sequence in by_adapter.items() if len(sequence) > m]
        edit_index = torch.full((batch_size,), -1, dtype=torch.long)
        for k, (name, _) in enumerate(members):
            edit_index[rows[name]] = k
        device = members[0][1][2]  # a site's interventions all sit on its layer's device
        passes.append(SitePass([step for _, (step, _, _) in members],
                               [positions for _, (_, positions, _) in members],
                               edit_index.to(device, non_blocking=True), backend_on(device)))
    return passes
