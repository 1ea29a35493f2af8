"""Train from a config on every rank (launched by tests with the deepspeed launcher, torchrun or plain python) and
write what the tests check to a JSON file on rank 0.

    python run_train.py CONFIG RESULT.json [key=value ...] [--then key=value ...] [--kill-at STEP] [--check-frozen]

Each --then starts another training in the same processes (one launch, several runs: launches are the slow part);
RESULT.json holds one entry per run.

--kill-at STEP   SIGKILL this process right after optimizer step STEP (a crash mid-training).
--check-frozen   after training, compare every base weight with the checkpoint on disk (gathered under ZeRO-3), and
                 record how zero.Init partitioned the base.
"""

import json
import os
import signal
import sys

import torch


def main(argv):
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it; LOCAL_RANK is set
    kill_at = None
    check_frozen = "--check-frozen" in argv
    argv = [a for a in argv if a != "--check-frozen"]
    if "--kill-at" in argv:
        i = argv.index("--kill-at")
        kill_at = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    config_path, result_path, rest = argv[0], argv[1], argv[2:]
    groups = [[]]
    for arg in rest:
        if arg == "--then":
            groups.append([])
        else:
            groups[-1].append(arg)

    from reft_fast.engine import shutdown

    results = [run_one(config_path, overrides, kill_at, check_frozen) for overrides in groups]
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)
    shutdown()


def run_one(config_path, overrides, kill_at, check_frozen):
    from reft_fast.engine import train
    from reft_fast.train_config import load_config

    cfg = load_config(config_path, overrides)
    seen = {}

    def on_step(step, metrics, engine):
        if step == 1:
            base_params = list(engine.module.model.parameters())
            seen["full_base_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in base_params)
            # Under ZeRO-3 each rank keeps a 1/N shard (ds_tensor) of every partitioned parameter.
            seen["shard_numel"] = sum(p.ds_tensor.numel() for p in base_params if hasattr(p, "ds_tensor"))
        if kill_at is not None and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    engines = []
    result = train(cfg, callbacks=[on_step, lambda step, metrics, engine: engines.append(engine)])
    if check_frozen:
        import deepspeed
        from safetensors.torch import load_file

        on_disk = load_file(os.path.join(cfg.model.path, "model.safetensors"))
        model = engines[-1].module.model
        max_diff = 0.0
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                max_diff = max(max_diff, float((p.detach().float().cpu() - on_disk[name].float()).abs().max()))
        seen["frozen_max_diff"] = max_diff
    return {"losses": result.losses, "eval_losses": result.eval_losses, "final_dir": result.final_dir,
            "samples": result.samples, "base_numel_at_load": result.base_numel_at_load,
            "fused_ops": list(result.fused_ops), "world": int(os.environ.get("WORLD_SIZE", "1")), **seen}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
