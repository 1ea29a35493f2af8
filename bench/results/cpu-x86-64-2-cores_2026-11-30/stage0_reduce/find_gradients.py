"""DeepSpeed's stage-0 search for the gradients to reduce (a walk of module.parameters()) against reft-fast's flat
tensor (ds_config.reduce_only_trained_gradients), on bench_host's engines."""
import os, sys, timeit
os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = os.path.dirname(os.path.abspath(__file__)); ROOT = os.path.join(HERE, *[".."] * 4)
sys.path.insert(0, os.path.join(ROOT, "bench")); sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch
torch.set_num_threads(1)
import bench_host
from reft_fast.train.ds_config import reduce_only_trained_gradients
base = sys.argv[1]
with bench_host.process_group_of_one():
    step, n, engine = bench_host.build_ds_step("reft-fast:triton-ds0", base=base)
    with bench_host.stubbed_launches():
        step()
    # a step's gradients in place (the step zeroes them at its end): make them
    for group in engine.basic_optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    ds = lambda: type(engine)._get_gradients_for_reduction(engine)
    assert reduce_only_trained_gradients(engine)
    ours = engine._get_gradients_for_reduction
    print("modules", sum(1 for _ in engine.module.modules()), "params", sum(1 for _ in engine.module.parameters()), "interventions", n)
    for name, f in (("deepspeed", ds), ("reft-fast (flat tensor)", ours)):
        best = min(timeit.repeat(f, number=200, repeat=5)) / 200
        print(f"{name}: {best * 1e6:.0f} us per step, {best * 1e6 / n:.1f} us per intervention")
