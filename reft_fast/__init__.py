"""reft-fast: fused Representation Finetuning (ReFT) for frozen large language models.

``import reft_fast as pyreft`` gives pyreft's public names; the pyreft-only ones (data modules, trainers, its saved
directory format) live in ``reft_fast.compat``, imported last here because it builds on everything above it.
"""

__version__ = "0.1.0"

from reft_fast.ops import consreft, direft, lobireft, loreft, low_rank_edit, nodireft, noreft  # noqa: E402,F401
from reft_fast.core.interventions import (  # noqa: E402,F401
    ConsreftIntervention,
    DireftIntervention,
    InterventionSpec,
    LobireftIntervention,
    LoreftIntervention,
    NodireftIntervention,
    NoreftIntervention,
    register_intervention,
)
from reft_fast.core.config import ReftConfig  # noqa: E402,F401
from reft_fast.core.positions import get_intervention_locations, parse_positions  # noqa: E402,F401
from reft_fast.core.model import ReftModel, get_reft_model  # noqa: E402,F401
from reft_fast.train.fused_base import apply_fused_base_ops  # noqa: E402,F401
from reft_fast.compat import (  # noqa: E402,F401
    TRAINER_NAMES as _TRAINER_NAMES,
    ReftDataCollator,
    ReftDataset,
    ReftGenerationDataset,
    ReftPreferenceDataset,
    ReftRawDataset,
    ReftRewardCollator,
    ReftRewardDataset,
    ReftSupervisedDataset,
    TaskType,
    make_last_position_supervised_data_module,
    make_multiple_position_supervised_data_module,
)


def __getattr__(name: str):
    # The trainers import transformers.Trainer (seconds); load them when first named.
    if name in _TRAINER_NAMES:
        from reft_fast import compat

        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
