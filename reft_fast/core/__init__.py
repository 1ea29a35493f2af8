"""The model layer: interventions (the edit's parameters as nn.Modules), their orthogonalization, positions, ReftConfig,
ReftModel (hooks on a Hugging Face model, forward, generate, save/load) and the Hugging Face structure helpers.

It imports ``reft_fast.ops`` and nothing above it (``reft_fast.train``, ``reft_fast.compat``).
"""
