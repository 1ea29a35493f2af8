"""Which tokens each intervention edits: position specs, per-example location tensors, padding rules.

Locations are one integer tensor ``[n_interventions, batch, P]``: row ``[i, b]`` lists the token indices of example b
that intervention i edits, −1 meaning "no position" (a slot left empty because the prompt is short). The tensor is
built on the CPU once per batch, validated there, and moved to the device once; the hooks never rebuild it from Python
lists and never read it back to the host.

A position spec is pyreft's string: ``"f7+l7"`` (the first 7 and the last 7 prompt tokens), ``"f5"``, ``"l1"``.
As in pyreft, each side is capped at half the prompt length (``n = min(n, prompt_len // 2)``) so that the first and the
last positions never overlap, and with two sides the interventions either share one combined list
(``share_weights=True``, or a one-sided spec) or split: the first half of the interventions take the first positions and
the second half the last positions (pyreft's scripts list the layers twice for this).

Deliberate differences from pyreft
----------------------------------
* **"lN" means the last N prompt tokens, including the final one.** pyreft's supervised datasets pass
  ``last_position = prompt_len − 1`` to ``get_intervention_locations``, so "l1" there edits the second-to-last prompt
  token, while its other datasets (and ``make_multiple_position_supervised_data_module``) pass ``prompt_len`` and edit
  the last one. We use the prompt length everywhere. To reproduce a pyreft supervised run exactly, pass
  ``prompt_len − 1`` as the prompt length.
* **No sink token.** pyreft's datasets prepend one pad token to every example and add 1 to every location, so that a
  missing position (−1) lands on that pad token and edits it. Here −1 means "no position": the slot edits nothing and
  the input is not shifted. Locations built for pyreft's shifted inputs stay valid here if you keep its extra token, but
  a pad-slot edit of pyreft's sink token has no counterpart.
* **One width per batch.** With two sides and ``share_weights=False``, pyreft falls back to its combined list for
  prompts shorter than 2 tokens (a capped side is empty), so such an example's rows are twice as wide as the others'.
  Here every example of a batch has the same row layout.
* **Short prompts pad with −1, never with a real token.** pyreft's ``pad_mode="last"`` fills missing slots with
  ``last_position``, which repeats one token in a row. ``get_intervention_locations`` returns those lists as pyreft
  does, and ``unit_locations_to_tensor`` keeps each repeated position once (pyvene computes the same edit for every
  copy of a row and writes them all to the one token, so the token is edited once there too); the tensor form
  ``intervention_locations`` rejects repeats (the op edits each token once).
"""

from __future__ import annotations

import operator
import re
from typing import Optional, Sequence, Union

import torch

from reft_fast.ops import validate_positions

__all__ = ["parse_positions", "intervention_layers", "intervention_locations", "get_intervention_locations", "unit_locations_to_tensor",
           "check_locations"]

_SPEC = re.compile(r"^\s*(?:f(\d+))?\s*\+?\s*(?:l(\d+))?\s*$")


def parse_positions(positions: str) -> tuple[int, int]:
    """``"f7+l7"`` → (7, 7), ``"f3"`` → (3, 0), ``"l1"`` → (0, 1): the numbers of first and last prompt tokens."""
    if not isinstance(positions, str):
        raise TypeError(f"positions must be a string like 'f7+l7', 'f3' or 'l1', got {type(positions).__name__}")
    match = _SPEC.match(positions)
    if match is None or (match.group(1) is None and match.group(2) is None) or (
            "+" in positions and (match.group(1) is None or match.group(2) is None)):
        raise ValueError(f"positions must look like 'f7+l7', 'f3' or 'l1' (first N, then last N), got {positions!r}")
    return int(match.group(1) or 0), int(match.group(2) or 0)


def intervention_layers(layers: Sequence[int], positions: str, share_weights: bool) -> list[int]:
    """The layer of each intervention. A two-sided spec ("f5+l5") without ``share_weights`` lists every layer twice:
    the first copy edits the first positions, the second copy the last ones (pyreft's scripts double the list)."""
    first_n, last_n = parse_positions(positions)
    layers = list(layers)
    return layers + layers if first_n and last_n and not share_weights else layers


def _as_long_vector(name: str, values, batch: Optional[int] = None) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [batch], got shape {list(t.shape)}")
    if batch is not None and t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} entries but prompt_lengths has {batch}")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must be ≥ 0, found {int(t.min())}")
    return t.long()


def intervention_locations(
    prompt_lengths: Union[torch.Tensor, Sequence[int]],
    positions: Union[str, tuple[int, int]],
    num_interventions: int,
    *,
    share_weights: bool = False,
    offsets: Union[torch.Tensor, Sequence[int], None] = None,
) -> torch.Tensor:
    """Locations ``[num_interventions, batch, P]`` (int64, −1 = none) for prompts of the given lengths.

    Args:
        prompt_lengths: [batch] number of prompt tokens of each example (the tokens the positions are counted in).
        positions: a spec such as ``"f7+l7"`` or a ``(first_n, last_n)`` pair.
        num_interventions: how many interventions the model has (rows of the result).
        share_weights: with two sides, give every intervention both the first and the last positions
            (P = first_n + last_n); otherwise the first half of the interventions get the first positions and the
            second half the last ones (P = max(first_n, last_n)), and num_interventions must be even.
        offsets: [batch] index of each example's first prompt token in the padded batch (the number of left-pad
            tokens; None or zeros for right padding). Added to every real position.

    Valid positions come first in each row, in increasing order, −1 fills the rest (pyreft's order).
    """
    first_n, last_n = parse_positions(positions) if isinstance(positions, str) else tuple(positions)
    if not (isinstance(first_n, int) and isinstance(last_n, int)) or first_n < 0 or last_n < 0:
        raise ValueError(f"positions must be a spec string or a pair of non-negative ints, got {positions!r}")
    if first_n + last_n == 0:
        raise ValueError("positions selects no token: give at least one of first_n, last_n (e.g. 'l1')")
    if not isinstance(num_interventions, int) or num_interventions < 1:
        raise ValueError(f"num_interventions must be a positive int, got {num_interventions!r}")
    lengths = _as_long_vector("prompt_lengths", prompt_lengths)
    start = torch.zeros_like(lengths) if offsets is None else _as_long_vector("offsets", offsets, lengths.shape[0])
    start = start.to(lengths.device)

    half = lengths // 2
    n_first = torch.clamp(half, max=first_n)[:, None]  # [B, 1]: how many first positions this example gets
    n_last = torch.clamp(half, max=last_n)[:, None]
    j_first = torch.arange(first_n, device=lengths.device)[None, :]
    j_last = torch.arange(last_n, device=lengths.device)[None, :]
    first = torch.where(j_first < n_first, j_first + start[:, None], -1)
    last = torch.where(j_last < n_last, (lengths - n_last[:, 0] + start)[:, None] + j_last, -1)

    two_sided = first_n > 0 and last_n > 0
    if share_weights or not two_sided:
        rows = _valid_first(torch.cat([first, last], dim=1))
        return rows.unsqueeze(0).expand(num_interventions, -1, -1).contiguous()
    if num_interventions % 2:
        raise ValueError(
            f"with first and last positions ({first_n}, {last_n}) and share_weights=False the first half of the "
            f"interventions take the first positions and the second half the last ones, so num_interventions must be "
            f"even, got {num_interventions} (list each layer twice, or pass share_weights=True)")
    width = max(first_n, last_n)
    first = torch.nn.functional.pad(first, (0, width - first_n), value=-1)
    last = torch.nn.functional.pad(last, (0, width - last_n), value=-1)
    half_n = num_interventions // 2
    return torch.cat([first.unsqueeze(0).expand(half_n, -1, -1), last.unsqueeze(0).expand(half_n, -1, -1)]).contiguous()


def get_intervention_locations(*, last_position: int, num_interventions: int, positions: Optional[str] = None,
                               first_n: Optional[int] = None, last_n: Optional[int] = None,
                               share_weights: bool = False, pad_mode: str = "first") -> list[list[int]]:
    """pyreft's per-example helper: locations [num_interventions][P] of one prompt of length ``last_position``.

    Same lists as pyreft for prompts of 2 tokens or more. Slots a short prompt leaves empty hold −1 with
    ``pad_mode="first"`` and ``last_position`` with ``pad_mode="last"`` (pyreft's two modes; a ReftModel edits a
    position repeated in ``unit_locations`` once). Batched code should call ``intervention_locations``.
    """
    if pad_mode not in ("first", "last"):
        raise ValueError(f"pad_mode must be 'first' (empty slots hold −1) or 'last' (they hold last_position), got "
                         f"{pad_mode!r}")
    spec = positions if positions is not None else (first_n or 0, last_n or 0)
    rows = intervention_locations([last_position], spec, num_interventions, share_weights=share_weights)[:, 0]
    if pad_mode == "last":
        rows = torch.where(rows < 0, last_position, rows)
    return rows.tolist()


def _valid_first(rows: torch.Tensor) -> torch.Tensor:
    """Move the −1 slots of each row to its end, keeping the order of the valid positions."""
    order = torch.sort((rows < 0).to(torch.int8), dim=1, stable=True).indices
    return rows.gather(1, order)


def unit_locations_to_tensor(unit_locations, num_interventions: int, batch_size: int) -> torch.Tensor:
    """pyreft/pyvene ``unit_locations`` → int64 tensor [num_interventions, batch, P] on the CPU (−1 = none).

    Accepts ``{"sources->base": (None, L)}``, ``{"base": L}`` or ``L`` itself, where L is nested lists (or a tensor)
    indexed [intervention][example][position]. Rows may have different lengths: they are padded with −1. A position
    repeated within a row is kept once (pyreft's ``pad_mode="last"`` repeats one; pyvene edits it once).
    """
    nested = unit_locations
    if isinstance(nested, dict):
        if "sources->base" in nested:
            value = nested["sources->base"]
            if isinstance(value, (tuple, list)) and len(value) == 2:
                if value[0] is not None:
                    raise ValueError("unit_locations: source locations are not supported (ReFT interventions have no "
                                     "source); use {'sources->base': (None, locations)}")
                nested = value[1]
            else:
                nested = value
        elif "base" in nested:
            nested = nested["base"]
        else:
            raise ValueError(f"unit_locations must have the key 'sources->base' (or 'base'), got keys {list(nested)}")
    if isinstance(nested, torch.Tensor):
        if nested.dim() != 3:
            raise ValueError("unit_locations must be indexed [intervention][example][position] (3 levels), got a "
                             f"tensor of shape {list(nested.shape)}")
        if nested.dtype.is_floating_point or nested.dtype.is_complex or nested.dtype == torch.bool:
            raise TypeError(f"unit_locations must hold integer positions, got a tensor of dtype {nested.dtype}")
        tensor = nested.to("cpu", torch.long)
    else:
        if not isinstance(nested, (list, tuple)) or not all(
                isinstance(per_int, (list, tuple)) and all(isinstance(row, (list, tuple)) for row in per_int)
                for per_int in nested):
            raise ValueError("unit_locations must be nested lists indexed [intervention][example][position] "
                             f"(3 levels), got {type(nested).__name__} {str(nested)[:80]}")
        width = max((len(row) for per_int in nested for row in per_int), default=0)
        tensor = torch.full((len(nested), len(nested[0]) if nested else 0, width), -1, dtype=torch.long)
        for i, per_int in enumerate(nested):
            if len(per_int) != tensor.shape[1]:
                raise ValueError(f"unit_locations: intervention {i} has {len(per_int)} examples, intervention 0 has "
                                 f"{tensor.shape[1]}")
            for b, row in enumerate(per_int):
                if row:
                    tensor[i, b, : len(row)] = torch.as_tensor([_integer_position(p) for p in row])
    check_locations(tensor, num_interventions, batch_size)
    return _without_repeats(tensor)


def _integer_position(value) -> int:
    """One position of a nested ``unit_locations`` list: an int (Python, numpy or a one-element integer tensor).
    A float, bool or string is refused rather than cast: ``int(6.5)`` would silently edit token 6."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"unit_locations must hold integer positions, got {value!r} ({type(value).__name__})") \
            from None


def _without_repeats(locations: torch.Tensor) -> torch.Tensor:
    """[..., P] locations with every repeat of a position within a row replaced by −1 and moved to the row's end."""
    if locations.numel() == 0:
        return locations
    earlier = torch.ones(locations.shape[-1], locations.shape[-1], dtype=torch.bool).tril(-1)  # [j, k]: k before j
    repeated = ((locations.unsqueeze(-1) == locations.unsqueeze(-2)) & earlier).any(-1) & (locations >= 0)
    rows = torch.where(repeated, -1, locations)
    return _valid_first(rows.reshape(-1, rows.shape[-1])).reshape(rows.shape)


def check_locations(locations: torch.Tensor, num_interventions: int, batch_size: int,
                    seq_len: Optional[int] = None) -> None:
    """Shape and dtype checks always; value checks (range, repeats) when ``seq_len`` is given.

    The value checks read the tensor, so the model layer runs them only on CPU tensors (once per batch, before the
    single transfer to the device).
    """
    if not isinstance(locations, torch.Tensor):
        raise TypeError(f"intervention_locations must be an integer tensor, got {type(locations).__name__}")
    if locations.dtype.is_floating_point or locations.dtype.is_complex or locations.dtype == torch.bool:
        raise TypeError(f"intervention_locations must have an integer dtype, got {locations.dtype}")
    if locations.dim() != 3:
        raise ValueError("intervention_locations must be 3-D [n_interventions, batch, positions], got shape "
                         f"{list(locations.shape)}")
    if locations.shape[0] != num_interventions:
        raise ValueError(f"intervention_locations has locations for {locations.shape[0]} interventions but the model "
                         f"has {num_interventions}")
    if locations.shape[1] != batch_size:
        raise ValueError(f"intervention_locations has batch {locations.shape[1]} but the inputs have batch "
                         f"{batch_size}")
    if seq_len is not None:
        try:
            validate_positions(locations.reshape(locations.shape[0] * locations.shape[1], locations.shape[2]), seq_len)
        except ValueError as err:
            raise ValueError(f"intervention_locations (flattened to [n_interventions·batch, positions]): {err}") \
                from None
