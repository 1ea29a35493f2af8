"""reft-fast: fused Representation Finetuning (ReFT) for frozen large language models."""

__version__ = "0.1.0"

from reft_fast.ops import consreft, direft, lobireft, loreft, low_rank_edit, nodireft, noreft  # noqa: E402,F401
