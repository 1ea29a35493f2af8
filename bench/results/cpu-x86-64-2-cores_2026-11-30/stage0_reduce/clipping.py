"""The stage-0 clipping of 96 gradients (LoReFT r8 at 32 layers of hidden 64): torch's foreach clip_grad_norm_ over
the tensors against one norm and one product over the flat tensor they are views of."""
import timeit, torch
torch.set_num_threads(1)
params = []
for _ in range(32):
    params += [torch.nn.Parameter(torch.randn(8, 64)), torch.nn.Parameter(torch.randn(8, 64)), torch.nn.Parameter(torch.randn(8))]
flat = torch.randn(sum(p.numel() for p in params))
views = flat.split([p.numel() for p in params])
for p, v in zip(params, views): p.grad = v.view_as(p)
f = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True, error_if_nonfinite=False)
def g():
    norm = torch.linalg.vector_norm(flat)
    flat.mul_(torch.clamp(1.0 / (norm + 1e-6), max=1.0))
    return norm
for name, fn in (("foreach over 96", f), ("flat", g)):
    best = min(timeit.repeat(fn, number=200, repeat=5)) / 200
    print(f"{name}: {best*1e6:.0f} us per step")
