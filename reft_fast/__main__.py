"""``python -m reft_fast``: the CLI, runnable by the launchers (``deepspeed --module reft_fast train ...``,
``torchrun -m reft_fast train ...``)."""

import sys

from reft_fast.train.cli import main

sys.exit(main())
