"""Whole stage-0 steps on one rank with the gradient all-reduce turned back on (as on several ranks), paired with the
floor: DeepSpeed's own (walk of the module), the trained tensors handed as a list, reft-fast's flat tensor."""
import os, sys, statistics
os.environ.setdefault("TRITON_INTERPRET", "1")
HERE = os.path.dirname(os.path.abspath(__file__)); ROOT = os.path.join(HERE, *[".."] * 4)
sys.path.insert(0, os.path.join(ROOT, "bench")); sys.path.insert(0, os.path.join(ROOT, "tests"))
import torch
torch.set_num_threads(1)
import bench_host
from reft_fast.train import ds_config
base = sys.argv[1]; reps = int(sys.argv[2])
with bench_host.process_group_of_one():
    floor, _, _ = bench_host.build_step("floor", base=base)
    steps = {"floor": floor}
    for name in ("walk", "list", "flat"):
        step, n, engine = bench_host.build_ds_step("reft-fast:triton-ds0", base=base)
        engine.enable_backward_allreduce = True
        if name == "walk":
            pass
        elif name == "list":
            # the trained tensors as a list (reduce_only_trained_gradients' path for mixed dtypes)
            stepped = [p for g in engine.basic_optimizer.param_groups for p in g["params"]]
            def trained_gradients(stepped=stepped):
                for p in stepped:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                return [p.grad.data for p in stepped], {}
            engine._get_gradients_for_reduction = trained_gradients
        else:
            assert ds_config.reduce_only_trained_gradients(engine)
        steps[name] = step
    with bench_host.stubbed_launches():
        for _ in range(5):
            for f in steps.values(): f()
        t = bench_host.paired_times(steps, reps)
for k in ("walk", "list", "flat"):
    print(k, f"{statistics.median([(x - y) / n * 1e3 for x, y in zip(t[k], t['floor'])]):.0f} us per intervention over floor")
for a, b in (("list", "walk"), ("flat", "list"), ("flat", "walk")):
    d = [(x - y) / n * 1e3 for x, y in zip(t[a], t[b])]
    print(f"{a} - {b}: {statistics.median(d):.1f} us per intervention, quartiles {[round(q, 1) for q in statistics.quantiles(d, n=4)]}")
