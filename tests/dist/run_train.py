"""Train from a config on every rank (launched by tests with the deepspeed launcher, torchrun or plain python) and
write what the tests check to a JSON file on rank 0.

    python run_train.py CONFIG RESULT.json [key=value ...] [--then key=value ...] [--kill-in-save STEP]
                        [--kill-before-step STEP] [--check-frozen] [--record-collectives]
                        [--record-deepspeed-buffers] [--count-module-walks]

Each --then starts another training in the same processes (one launch, several runs: launches are the slow part);
RESULT.json holds one entry per run.

--kill-in-save STEP    SIGKILL this process while it saves the checkpoint of step STEP: its files are written, it is
                       not yet published (the moment a kill tears a checkpoint written in place).
--kill-before-step STEP  SIGKILL this process when it starts training step STEP.
--check-frozen         after training, compare every base weight with the checkpoint on disk (gathered under ZeRO-3),
                       and record how zero.Init partitioned the base.
--record-collectives   record each torch.distributed collective that reft_fast code calls: the calling function, the
                       devices of its tensors and the accelerator's current device; and, apart, DeepSpeed's: the
                       collective and the first calling function outside deepspeed.comm.
--record-deepspeed-buffers  record, per run, the largest tensor that DeepSpeed's code asks torch.empty or
                       torch.zeros for: its number of elements and the allocating function.
--count-module-walks   count, per run, the calls of the ReftModel's parameters() / named_parameters() made inside the
                       recipe's training steps (walks of the whole model, frozen base included).
--stand-in-capture     training.cuda_graphs on a CPU: the recipe captures with tests/capture_stand_in.py's
                       ``traced_capture`` where a GPU's would use make_graphed_callables.
"""

import json
import os
import signal
import sys

import torch

# The collectives that take tensors (barrier takes none: NCCL runs it on the current device by itself).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all", "all_to_all_single", "broadcast",
               "gather", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "all_gather_object",
               "broadcast_object_list", "gather_object", "scatter_object_list")


def main(argv):
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it; LOCAL_RANK is set
    check_frozen = "--check-frozen" in argv
    collectives = [] if "--record-collectives" in argv else None
    deepspeed_collectives = []
    if "--record-deepspeed-buffers" in argv:
        record_deepspeed_buffers()
    if "--count-module-walks" in argv:
        count_module_walks()
    if "--stand-in-capture" in argv:
        use_stand_in_capture()
    argv = [a for a in argv if a not in ("--check-frozen", "--record-collectives", "--record-deepspeed-buffers",
                                         "--count-module-walks", "--stand-in-capture")]
    if "--kill-in-save" in argv:
        i = argv.index("--kill-in-save")
        kill_when_publishing(int(argv[i + 1]))
        argv = argv[:i] + argv[i + 2:]
    if "--kill-before-step" in argv:
        i = argv.index("--kill-before-step")
        kill_before_step(int(argv[i + 1]))
        argv = argv[:i] + argv[i + 2:]
    if collectives is not None:
        record_collectives(collectives, deepspeed_collectives)
    config_path, result_path, rest = argv[0], argv[1], argv[2:]
    groups = [[]]
    for arg in rest:
        if arg == "--then":
            groups.append([])
        else:
            groups[-1].append(arg)

    from reft_fast.train.distributed import shutdown

    results = [run_one(config_path, overrides, check_frozen) for overrides in groups]
    if collectives is not None:
        results[-1]["collectives"] = collectives
        results[-1]["deepspeed_collectives"] = deepspeed_collectives
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result_path, "w") as f:
            json.dump(results, f)
    shutdown()


_DEVICE_VALUES = None


def use_stand_in_capture():
    """The recipe's training.cuda_graphs on a CPU (tests/capture_stand_in.py): its capture is the stand-in's, the
    accelerator is not asked for CUDA, and the model's locations are treated as a GPU's (values checked by
    CapturedLoss on the host)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from capture_stand_in import traced_capture, values_on_the_device

    from reft_fast.train.recipe import ReftTrainingRecipe

    global _DEVICE_VALUES
    _DEVICE_VALUES = values_on_the_device()  # entered for the whole process (kept: collected, it would exit)
    _DEVICE_VALUES.__enter__()
    original = ReftTrainingRecipe._captured_loss
    ReftTrainingRecipe._check_graph_device = lambda recipe: None
    ReftTrainingRecipe._captured_loss = lambda recipe, params: original(recipe, params, capture=traced_capture)


def kill_when_publishing(step):
    """SIGKILL this process when it renames anything to ``step{step}``: an atomic save's publishing moment."""
    original = os.replace

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(os.fspath(dst)) == f"step{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        return original(src, dst, *args, **kwargs)

    os.replace = replace


def kill_before_step(step):
    """SIGKILL this process when it starts training step ``step`` (counted from 1)."""
    from reft_fast.train.recipe import ReftTrainingRecipe

    original = ReftTrainingRecipe.train_step

    def train_step(recipe, index):
        if index + 1 == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(recipe, index)

    ReftTrainingRecipe.train_step = train_step


def _first_caller_outside_deepspeed_comm(frame):
    while frame is not None and frame.f_globals.get("__name__", "").startswith("deepspeed.comm"):
        frame = frame.f_back
    return "" if frame is None else f"{frame.f_globals.get('__name__', '')}.{frame.f_code.co_name}"


def record_collectives(log, deepspeed_log):
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    def tensors_of(args):
        for arg in args:
            if isinstance(arg, torch.Tensor):
                yield arg
            elif isinstance(arg, (list, tuple)):
                yield from tensors_of(arg)

    def wrap(name, collective):
        def recorded(*args, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("reft_fast"):
                log.append({"collective": name, "caller": f"{module}.{caller.f_code.co_name}",
                            "devices": [str(t.device) for t in tensors_of(list(args) + list(kwargs.values()))],
                            "accelerator_device": get_accelerator().current_device_name()})
            elif module.startswith("deepspeed"):
                deepspeed_log.append({"collective": name, "caller": _first_caller_outside_deepspeed_comm(caller)})
            return collective(*args, **kwargs)

        return recorded

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


LARGEST_DEEPSPEED_BUFFER = {}  # the run's largest tensor allocated by DeepSpeed's code: {"numel", "caller"}


def record_deepspeed_buffers():
    """Record in LARGEST_DEEPSPEED_BUFFER the largest torch.empty / torch.zeros that a deepspeed module calls for."""

    def numel_of(size):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = size[0]
        count = 1
        for n in size:
            count *= int(n)
        return count

    def wrap(allocate):
        def recorded(*size, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith("deepspeed") and numel_of(size) > LARGEST_DEEPSPEED_BUFFER.get("numel", -1):
                LARGEST_DEEPSPEED_BUFFER.update(numel=numel_of(size), caller=f"{module}.{caller.f_code.co_name}")
            return allocate(*size, **kwargs)

        return recorded

    torch.empty, torch.zeros = wrap(torch.empty), wrap(torch.zeros)


MODULE_WALKS = {}  # the run's walks of the ReftModel inside training steps: {"steps", "walks"}


def count_module_walks():
    """Count in MODULE_WALKS the ReftModel's parameters() / named_parameters() calls made inside train_step."""
    from reft_fast.core.model import ReftModel
    from reft_fast.train.recipe import ReftTrainingRecipe

    in_step = []

    def counted(walk):
        def wrapper(self, *args, **kwargs):
            if in_step:
                MODULE_WALKS["walks"] = MODULE_WALKS.get("walks", 0) + 1
            return walk(self, *args, **kwargs)

        return wrapper

    ReftModel.parameters = counted(ReftModel.parameters)
    ReftModel.named_parameters = counted(ReftModel.named_parameters)
    original = ReftTrainingRecipe.train_step

    def train_step(recipe, index):
        in_step.append(index)
        try:
            return original(recipe, index)
        finally:
            in_step.pop()
            MODULE_WALKS["steps"] = MODULE_WALKS.get("steps", 0) + 1

    ReftTrainingRecipe.train_step = train_step


def run_one(config_path, overrides, check_frozen):
    from reft_fast.train.recipe import ReftTrainingRecipe
    from reft_fast.train.train_config import load_config

    cfg = load_config(config_path, overrides)
    seen = {}
    LARGEST_DEEPSPEED_BUFFER.clear()
    MODULE_WALKS.clear()

    def on_step(step, metrics, engine):
        # After each step: where the trained gradients live (storages holding them, and how many are None).
        trained = [p for group in engine.basic_optimizer.param_groups for p in group["params"]]
        seen["trained_gradients"] = {
            "storages": len({p.grad.untyped_storage().data_ptr() for p in trained if p.grad is not None}),
            "none": sum(p.grad is None for p in trained), "tensors": len(trained)}
        if step == 1:
            # DeepSpeed's shared-memory allreduce buffer of this rank, still named in /dev/shm while the run goes on
            # (a rank killed now would leave it there)
            seen["shm_buffer_named"] = os.path.exists(
                f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                f"{os.environ.get('MASTER_PORT', '')}_{os.environ.get('RANK', '0')}")
            base_params = list(engine.module.model.parameters())
            seen["full_base_numel"] = sum(getattr(p, "ds_numel", p.numel()) for p in base_params)
            # Under ZeRO-3 each rank keeps a 1/N shard (ds_tensor) of every partitioned parameter.
            seen["shard_numel"] = sum(p.ds_tensor.numel() for p in base_params if hasattr(p, "ds_tensor"))

    engines = []
    result = ReftTrainingRecipe(cfg, callbacks=[on_step, lambda step, metrics, engine: engines.append(engine)]).run()
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
            "fused_ops": list(result.fused_ops), "world": int(os.environ.get("WORLD_SIZE", "1")),
            "cuda_graphs": result.cuda_graphs,
            "largest_deepspeed_buffer": dict(LARGEST_DEEPSPEED_BUFFER), "module_walks": dict(MODULE_WALKS), **seen}


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
