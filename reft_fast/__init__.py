"""reft-fast: fused Representation Finetuning (ReFT) for frozen large language models."""

__version__ = "0.1.0"

from reft_fast.ops import consreft, direft, lobireft, loreft, low_rank_edit, nodireft, noreft  # noqa: E402,F401
from reft_fast.interventions import (  # noqa: E402,F401
    ConsreftIntervention,
    DireftIntervention,
    LobireftIntervention,
    LoreftIntervention,
    NodireftIntervention,
    NoreftIntervention,
)
from reft_fast.config import ReftConfig  # noqa: E402,F401
from reft_fast.positions import get_intervention_locations, parse_positions  # noqa: E402,F401
from reft_fast.model import ReftModel, get_reft_model  # noqa: E402,F401
from reft_fast.fused_base import apply_fused_base_ops  # noqa: E402,F401
