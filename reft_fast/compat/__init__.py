"""pyreft compatibility, in one place: its state and directory formats (``pyreft``), its data names (``data``,
``reft_datasets``), its trainers (``trainer``).

Import direction. ``reft_fast.ops``, ``reft_fast.core`` and ``reft_fast.train`` never import this package; it imports
them. The one place where core behaviour depends on pyreft, ``ReftModel.load`` reading a pyreft directory, goes through a registry that the
core owns: ``reft_fast.core.saving.register_directory_format`` takes a recognizer and a reader, and
``reft_fast.compat.pyreft`` registers pyreft's at import. The package's ``reft_fast/__init__.py`` imports this package,
and importing any ``reft_fast.*`` module runs that file first, so the reader is registered before any load can run.
A registry rather than a lazy import inside ``ReftModel.load`` keeps the dependency one-way even at run time: the core
knows that foreign formats exist, never which ones.

The trainers need ``transformers.Trainer`` (a slow import that pulls in accelerate); they load on first use of their
names, here and at the top level.
"""

from reft_fast.compat.pyreft import load_pyreft_directory, load_pyreft_module, load_pyreft_state  # noqa: F401
from reft_fast.compat.data import (  # noqa: F401
    ReftDataCollator,
    ReftRewardCollator,
    TaskType,
    make_last_position_supervised_data_module,
    make_multiple_position_supervised_data_module,
)
from reft_fast.compat.reft_datasets import (  # noqa: F401
    ReftDataset,
    ReftGenerationDataset,
    ReftPreferenceDataset,
    ReftRawDataset,
    ReftRewardDataset,
    ReftSupervisedDataset,
)

TRAINER_NAMES = ("ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForCausalLMDistributed",
                 "ReftTrainerForSequenceClassification")

__all__ = ["load_pyreft_directory", "load_pyreft_module", "load_pyreft_state", "TaskType", "ReftDataCollator",
           "ReftRewardCollator", "ReftDataset", "ReftSupervisedDataset", "ReftRawDataset", "ReftGenerationDataset",
           "ReftPreferenceDataset", "ReftRewardDataset", "make_last_position_supervised_data_module",
           "make_multiple_position_supervised_data_module", *TRAINER_NAMES]


def __getattr__(name: str):
    if name in TRAINER_NAMES:
        from reft_fast.compat import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
