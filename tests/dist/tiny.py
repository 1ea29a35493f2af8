"""A tiny random Llama with a word-level tokenizer, a small dataset and a config, written to a folder.

Shared by the engine tests and the scripts they launch (tests/dist/*.py), so every process builds the same files.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def subprocess_env(**extra) -> dict:
    """The environment of a launched test process: this checkout importable, one thread, no Triton interpreter
    (the launched process chooses for itself)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)
    # A recipe run inside the test process (one rank) sets these for itself and may still hold MASTER_PORT: a
    # launched process must choose its own rendezvous, or it fails with EADDRINUSE depending on the test order.
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    env.update(extra)
    return env



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(args: list[str], *, world: int = 2, timeout: float = 400) -> subprocess.CompletedProcess:
    """``python args...`` as the ``world`` ranks of one job on this machine, each with the variables a launcher sets
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), started by this process: the deepspeed launcher's own
    two processes import deepspeed each (7 s of CPU on 2 cores), which only the tests of its launch lines need
    (tests/test_cli.py, tests/test_engine.py). A rank that fails or outlives ``timeout`` ends the others. Returns the
    first non-zero return code (else 0) and the ranks' output, rank 0's first."""
    port, procs = free_port(), []
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as files:
        logs = [tuple(files.enter_context(open(Path(folder) / f"{rank}.{kind}", "w+")) for kind in ("out", "err"))
                for rank in range(world)]
        for rank, (out, err) in enumerate(logs):
            env = subprocess_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                                 LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=err))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.returncode for p in procs) or time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                break
            time.sleep(0.2)
        texts = []
        for handles in logs:
            for handle in handles:
                handle.seek(0)
            texts.append(tuple(handle.read() for handle in handles))
    returncode = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(args, returncode, "".join(o for o, _ in texts), "".join(e for _, e in texts))


WORDS = ("red green blue black white cat dog bird fish cow one two three four five six seven eight nine ten "
         "sky sea sun moon tree big small hot cold fast slow up down left right yes no").split()
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"] + ROLE_TOKENS
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + ["repeat", "reverse", ":"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=ROLE_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model_dir(path: Path, *, layers: int = 4, hidden: int = 64, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_examples(n: int, seed: int = 0) -> list[dict]:
    """'repeat: w1 w2 w3' → 'w1 w2 w3' (a task with structure, learnable from the prompt)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]
        examples.append({"instruction": "repeat : " + " ".join(words), "output": " ".join(words)})
    return examples


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_run(folder: Path, *, n_examples: int = 32, **training) -> Path:
    """A model folder, a dataset and a config file under ``folder``; returns the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    model_dir = make_model_dir(folder / "model")
    write_jsonl(folder / "train.jsonl", make_examples(n_examples))
    config = {
        "model": {"path": str(model_dir), "dtype": "float32", "attn_implementation": "sdpa"},
        "interventions": {"layers": [1, 2], "intervention": "LoreftIntervention", "low_rank_dimension": 2,
                          "positions": "f1+l1",
                          "share_weights": True},
        "data": {"train_file": "train.jsonl", "max_length": 32},
        "training": {"max_steps": 4, "micro_batch_size": 4, "lr": 1.0e-2, "warmup_steps": 1, "seed": 3,
                     "progress_bar": False, **training},
        "deepspeed": {"stage": 0},
        "output_dir": str(folder / "out"),
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
