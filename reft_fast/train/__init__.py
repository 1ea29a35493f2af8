"""Training: the YAML schema and its validation, data and collation, the DeepSpeed training recipe, checkpoints, the
memory plan, fused kernels for the frozen base and the ``reft-fast`` command line.

It imports ``reft_fast.core`` and ``reft_fast.ops``, never ``reft_fast.compat``.
"""
