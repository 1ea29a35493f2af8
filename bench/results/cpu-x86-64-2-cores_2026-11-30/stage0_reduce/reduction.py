"""DeepSpeed's stage-0 reduction (buffered_allreduce_fallback) of the trained gradients on a one-rank gloo group:
handed as the 96 tensors (flatten, all-reduce, copy back) and as reft-fast's flat tensor they are views of."""
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
    for name in ("trained tensors as a list", "flat tensor"):
        step, n, engine = bench_host.build_ds_step("reft-fast:triton-ds0", base=base)
        params = [p for g in engine.basic_optimizer.param_groups for p in g["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        if name == "flat tensor":
            assert reduce_only_trained_gradients(engine)
        else:
            engine._get_gradients_for_reduction = lambda: ([p.grad for p in params], {})
        f = lambda: engine.buffered_allreduce_fallback(elements_per_buffer=500000000)
        best = min(timeit.repeat(f, number=100, repeat=5)) / 100
        print(f"{name}: {best * 1e6:.0f} us per step, {best * 1e6 / n:.1f} us per intervention")
