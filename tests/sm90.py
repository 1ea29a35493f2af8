"""Running a test module's function in a fresh interpreter where Triton compiles (for sm_90, without a GPU) instead of
interpreting: the suite's conftest turns the interpreter on for every test process, before triton.jit decorates the
kernels, so the compiling tests work in a process of their own. (No import of conftest here: it would turn the
interpreter on in that process too.)"""

import json
import os
import subprocess
import sys


def compiled_report(module: str, function: str, timeout: int, **environment: str):
    """The JSON result of ``tests/<module>.<function>()`` run in a fresh interpreter without TRITON_INTERPRET (and
    with ``environment`` added): Triton then takes its compiling path (the function compiles for sm_90 itself: no GPU
    needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(environment)
    code = f"import json, {module} as t; print(json.dumps(t.{function}()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
