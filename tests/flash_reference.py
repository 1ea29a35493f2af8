"""transformers' flash attention path on the CPU, with plain-torch stand-ins for flash-attn's two kernels
(tests/test_flash_one_row.py, tests/test_graphs.py).

flash-attn runs only on a GPU. transformers 5.24 (modeling_flash_attention_utils.py) gets the kernels from
``lazy_import_flash_attention``, which ``_flash_attention_forward`` calls at every attention call: ``reference_kernels``
replaces that one function, so everything else of the path runs as it is (the choice between ``flash_fn`` and
``flash_varlen_fn``, the packed-sequence check on the position ids, the kwargs each kernel is given, built by
transformers' own ``_lazy_define_process_function`` from the stand-in's signature). A model takes the path by its
config's ``_attn_implementation`` (``as_flash``), which transformers reads at each forward; set after the model is
built, it skips transformers' build-time check that flash-attn is installed. Those two, the check and the kernels'
import, are all that flash-attn's absence stops on this path.

The stand-ins follow flash-attn 2's contract: ``flash_attn_func`` takes [B, T, heads, d] rows, each causal;
``flash_attn_varlen_func`` takes the rows laid end to end, [tokens, heads, d], cut into sequences at ``cu_seqlens``,
each causal on its own. Neither reads a value on the host (flash-attn's kernels read the lengths on the device), so
a count of host reads sees transformers' alone.
"""

import contextlib

import torch
import torch.nn.functional as F

FLASH = "flash_attention_2"


class Calls(list):
    """The kernels called, in order: ("flash", T) or ("varlen", max_seqlen_q, max_seqlen_k)."""


def reference_kernels(calls: Calls):
    """(flash_attn_func, flash_attn_varlen_func) in plain torch, recording each call in ``calls``."""

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        assert dropout_p == 0.0 and causal, (dropout_p, causal)
        calls.append(("flash", q.shape[1]))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                             scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False):
        assert dropout_p == 0.0 and causal, (dropout_p, causal)
        assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), (max_seqlen_q, max_seqlen_k)
        calls.append(("varlen", max_seqlen_q, max_seqlen_k))
        tokens = torch.arange(q.shape[0], device=q.device)
        # each token's sequence, found on the device: the number of sequence ends at or before it
        query_seq = torch.searchsorted(cu_seqlens_q[1:].long(), tokens, right=True)
        key_seq = torch.searchsorted(cu_seqlens_k[1:].long(), tokens, right=True)
        allowed = (query_seq[:, None] == key_seq[None, :]) & (tokens[None, :] <= tokens[:, None])
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                             attn_mask=allowed, scale=softmax_scale, enable_gqa=True)
        return out.transpose(0, 1)

    return flash_attn_func, flash_attn_varlen_func


@contextlib.contextmanager
def reference_flash():
    """Within: transformers' flash attention path calls the plain-torch kernels; yields their ``Calls``."""
    from unittest import mock

    import transformers.modeling_flash_attention_utils as fa

    calls = Calls()
    flash_fn, varlen_fn = reference_kernels(calls)
    # as lazy_import_flash_attention builds it from the loaded varlen kernel
    process_kwargs = fa._lazy_define_process_function(varlen_fn)

    def lazy_import_flash_attention(implementation, *args, **kwargs):
        return (flash_fn, varlen_fn, None, fa._pad_input, fa._unpad_input), (process_kwargs, dict)

    with mock.patch.object(fa, "lazy_import_flash_attention", lazy_import_flash_attention):
        yield calls


def as_flash(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a base, or a ReftModel around one) set to flash attention 2: its config's attention
    implementation, which transformers reads at each forward."""
    base = getattr(model, "model", model)
    base.config._attn_implementation = FLASH
    return model
