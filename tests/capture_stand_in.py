"""A CPU stand-in for torch.cuda.make_graphed_callables (``traced_capture``) and what a GPU's capture sees of the
ReftModel's locations (``values_on_the_device``): tests/test_graphs.py, and tests/dist/run_train.py's
``--stand-in-capture`` for launched ranks.

torch's make_fx records the ops one forward and backward dispatch, as a capture records their kernels, with every
Python value of the step frozen at the trace and any read of a tensor's value refused, as a capturing stream refuses
it (and torch says a stream is capturing, which transformers asks, and a device synchronize is refused); the recorded
graph then runs on the tensors of later batches, handing out its loss and gradients from buffers of its own as the
graphs do.
"""

import contextlib
from unittest import mock

import torch
from torch.fx.experimental.proxy_tensor import make_fx


def traced_capture(module, sample_args, **_):
    """make_graphed_callables' stand-in on the CPU: the module's loss and its gradients to the module's parameters,
    traced once on ``sample_args``; calls replay the trace on their own tensors and return the loss in a buffer of
    their own, and backward writes the traced gradients (times the incoming one) into buffers of its own and hands
    autograd detached views of them, as the graphs' replays hand out their static tensors (which the next replay
    overwrites)."""
    params = list(module.parameters())
    static_grads = [torch.empty_like(p) for p in params]
    static_loss = torch.empty(())

    def joint(*args):
        loss = module(*args)
        return (loss, *torch.autograd.grad(loss, params))

    # What the step's libraries see while a stream captures: transformers' is_tracing asks this, and then reads no
    # mask or position ids (it builds the causal mask instead). A device synchronize is refused, as a capturing stream
    # refuses it (on a CPU it reaches no op the trace could see).
    from deepspeed.accelerator import get_accelerator

    def synchronize(*args, **kwargs):
        raise RuntimeError("synchronize while a stream captures")

    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: True), \
            mock.patch.object(torch.cuda, "synchronize", synchronize), \
            mock.patch.object(get_accelerator(), "synchronize", synchronize):
        trace = make_fx(joint)(*sample_args)
    n = len(sample_args)

    class Replayed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            loss, *grads = trace(*inputs[:n])
            ctx.grads = grads
            static_loss.copy_(loss)
            return static_loss.detach()  # as the forward graph's static output: the next replay rewrites it

        @staticmethod
        def backward(ctx, grad):
            for static, g in zip(static_grads, ctx.grads):
                torch.mul(g, grad, out=static)
            return (None,) * n + tuple(static.detach() for static in static_grads)

    return lambda *args: Replayed.apply(*args, *params)


@contextlib.contextmanager
def values_on_the_device():
    """The ReftModel checks the values of CPU locations (free there) and never reads device ones; a captured step's
    locations are on the device, checked by CapturedLoss on the host copy. On a CPU they are CPU tensors: the model's
    value check is left to CapturedLoss, as it is on a GPU (its shape checks stay)."""
    import reft_fast.core.model as model_module

    check = model_module.check_locations
    with mock.patch.object(model_module, "check_locations",
                           lambda locations, n, batch, seq_len=None: check(locations, n, batch)):
        yield
