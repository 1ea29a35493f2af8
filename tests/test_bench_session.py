"""bench/gpu_session.sh, the one GPU command: its CPU dry run, the wheels it carries, and what its forked rows need.

The GPU run itself cannot happen here; these tests catch on a CPU what would otherwise end a 10-minute GPU command:
a broken stage, a test selection that names nothing, a wheel missing from .whl, a forkserver that initializes CUDA
(its forked rows then cannot use it) or dies on a library that fails to import.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SESSION = ROOT / "bench" / "gpu_session.sh"
E2E = ROOT / "bench" / "bench_e2e.py"

# The GPU image's Python packages (its package list as read on a machine running it, 2026-11-17): what the session
# need not carry.
IMAGE_PACKAGES = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _carried() -> dict[str, str]:
    """name -> pinned version of every package bench/make_wheels.sh puts in .whl."""
    text = (ROOT / "bench" / "make_wheels.sh").read_text()
    block = re.search(r"^WHEELS=\((.*?)^\)", text, re.S | re.M).group(1)
    pins = re.findall(r"^\s*([A-Za-z0-9_.-]+)==(\S+)", block, re.M)
    pins += re.findall(r"^DEEPSPEED=(deepspeed)==(\S+)", text, re.M)
    return {_normalize(name): version for name, version in pins}


def _session_imports() -> list[str]:
    """The modules the session's set-up stage checks: what its stages import."""
    text = SESSION.read_text()
    block = re.search(r'for module in \((.*?)\):', text, re.S).group(1)
    return re.findall(r'"([\w.]+)"', block)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("session")
    completed = subprocess.run(["bash", str(SESSION), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                               timeout=300, env=dict(os.environ, OUT=str(out), PY=sys.executable))
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    return out, completed.stdout


def _csv(out: Path, pattern: str) -> list[dict]:
    [path] = out.glob(pattern)
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_dry_run_runs_every_stage_in_order_into_few_flat_files(dry_run):
    out, stdout = dry_run
    banners = re.findall(r"^=== (\w+) \(", stdout, re.M)
    assert banners == ["setup", "host", "packing", "correctness", "e2e", "kernels", "tests", "done"]
    files = [p for p in out.rglob("*")]
    assert all(p.is_file() and p.parent == out for p in files), files  # the device tool returns 8 files, 2 levels
    assert 4 <= len(files) <= 8, files
    log = (out / "session.log").read_text()
    assert log.count("=== ") == 8 and "=== done" in log and "host: bench_host.py starts" in log  # the whole output, complete when the command returns
    # the packing stage's result lines (its CSV stays in the scratch folder)
    assert re.search(r"^mode=packed, tokens_per_s=[\d.]+, ratio_vs_padded=[\d.]+, .*losses_equal=True, step_s=[\d.;]+$", log, re.M), log
    assert "import reft_fast.kernels.low_rank_edit: ok" in log
    carried = ROOT / ".whl"
    if any(carried.glob("*.whl")):  # installed for CPython 3.12 into a scratch folder: every wheel fits the GPU's
        assert re.search(r"setup: \d+ wheels installed into ", log), log[:3000]
    else:
        assert "setup: no wheels in .whl" in log


@pytest.mark.slow
def test_dry_run_e2e_rows_follow_the_session_plan(dry_run):
    out, _ = dry_run
    rows = _csv(out, "e2e_*.csv")
    bench = _load_e2e()
    expected = list(dict.fromkeys((c, "on" if k else "off", m) for c, k, _, m in bench.SESSION_ROWS))
    assert [(r["config"], r["checkpointing"], r["method"]) for r in rows] == expected
    assert rows[0]["method"] == "floor" and rows[0]["status"] == "ok"
    for row in rows:
        assert row["status"] == "ok" or row["status"].startswith(("not run:", "skipped:")), row["status"]
        if row["status"] == "ok":
            assert 0 < float(row["cpu_issue_s"]) <= float(row["step_s"])


@pytest.mark.slow
def test_dry_run_kernel_rows_and_test_selections(dry_run):
    out, stdout = dry_run
    rows = _csv(out, "kernels_smoke_*.csv")
    assert {r["backend"] for r in rows} == {"torch", "triton"}  # no cuda rows: no nvcc build in the kernel stage
    assert rows and all(r["status"] == "ok" for r in rows), [r["status"] for r in rows]
    # Every pytest selection of the GPU run names tests that exist (the dry run collects them).
    summaries = re.findall(r"^tests \((.+?)\): (.*)$", stdout, re.M)
    assert len(summaries) == 8, summaries
    for label, summary in summaries:
        assert re.search(r"\d+(/\d+)? tests? collected", summary), (label, summary)
    assert "exit" not in "".join(s for _, s in summaries)


def test_wheels_cover_every_import_of_the_session_beyond_the_image():
    """What `import pyreft, deepspeed, ...` loads here, mapped to distributions: each is carried, on the image, or
    needed by an image package (then the image brings it)."""
    modules = _session_imports()
    assert {"liger_kernel.transformers", "pyreft", "deepspeed", "datasets"} <= set(modules)
    missing = [m for m in modules if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        pytest.skip(f"not installed here: {missing}")
    script = textwrap.dedent(f"""
        import importlib, importlib.metadata as md, json, sys
        for name in {modules!r}:
            importlib.import_module(name)
        found = md.packages_distributions()
        print(json.dumps(sorted({{d for m in list(sys.modules) for d in found.get(m.split(".")[0], [])}})))
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                               env=dict(os.environ, PYTORCH_NVML_BASED_CUDA_CHECK="1"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    imported = {_normalize(d) for d in json.loads(completed.stdout.strip().splitlines()[-1])}
    covered = set(_carried()) | {_normalize(p) for p in IMAGE_PACKAGES} | {"reft-fast"}
    covered |= _requirements_of({_normalize(p) for p in IMAGE_PACKAGES})
    assert imported - covered == set(), "import needs a wheel that bench/make_wheels.sh does not carry"


def _requirements_of(names: set[str]) -> set[str]:
    """Every distribution installed here that the installed ones among ``names`` require, transitively."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    seen, todo = set(), [n for n in names]
    while todo:
        name = todo.pop()
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            dep = _normalize(requirement.name)
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_carried_versions_fit_together_and_fix_the_known_breakages():
    from packaging.version import Version

    carried = _carried()
    assert Version(carried["typing-extensions"]) >= Version("4.15")  # pydantic 2.14 fails with 4.12
    assert Version(carried["setuptools"]) >= Version("77")  # pyproject's `license = "Apache-2.0"` string
    assert carried["liger-kernel"] == "0.8.5" and carried["deepspeed"] == "0.19.8"
    import importlib.metadata as md

    from packaging.requirements import Requirement

    try:
        installed = md.version("pydantic")
    except md.PackageNotFoundError:
        pytest.skip("pydantic is not installed here")
    if installed != carried["pydantic"]:
        pytest.skip(f"pydantic {installed} here, {carried['pydantic']} carried: its requirements are not readable")
    for text in md.requires("pydantic"):
        requirement = Requirement(text)
        name = _normalize(requirement.name)
        if requirement.marker is None and name in carried:
            assert requirement.specifier.contains(carried[name]), (text, carried[name])


def test_session_installs_every_carried_wheel():
    text = SESSION.read_text()
    assert "for whl in .whl/*.whl" in text and "--no-index --no-deps" in text
    assert "HF_HUB_OFFLINE=1" in text and "TRANSFORMERS_OFFLINE=1" in text


def _load_e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e_for_test", E2E)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_forkserver_preload_asks_nvml_not_the_cuda_runtime():
    """What the server the rows are forked from runs (bench/e2e_preload.py: bench_e2e.py and the row libraries), and
    what each row runs again (bench_e2e.py as __mp_main__), must not ask the CUDA runtime anything: a process forked
    from one that did cannot use CUDA. Recorded here by wrapping torch.cuda.is_available (each call must find the NVML
    check chosen) and torch.cuda._lazy_init (never called)."""
    script = textwrap.dedent(f"""
        import os, sys
        import torch
        calls = []
        real_is_available = torch.cuda.is_available
        def is_available():
            calls.append(("is_available", os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")))
            return real_is_available()
        def lazy_init():
            calls.append(("lazy_init", None))
        torch.cuda.is_available = is_available
        torch.cuda._lazy_init = lazy_init
        sys.path.insert(0, {str(E2E.parent)!r})
        import e2e_preload  # the server's preload
        from multiprocessing import spawn
        spawn.import_main_path({str(E2E)!r})  # a row's
        print("preloaded", sorted(m for m in ("liger_kernel.transformers", "pyreft", "peft") if m in sys.modules))
        print("CALLS", calls)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                               env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    calls = eval(completed.stdout.split("CALLS", 1)[1])
    assert calls, "the preload checked no device at all: the wrapper saw nothing"
    assert all(call == ("is_available", "1") for call in calls), calls
    if importlib.util.find_spec("liger_kernel") is not None:
        assert "liger_kernel.transformers" in completed.stdout  # imported once, in the server


def test_a_library_failing_at_import_fails_only_its_own_rows(tmp_path):
    """multiprocessing's preload catches only ImportError: a library raising anything else at import (pydantic on an
    old typing-extensions raises TypeError) ended the server and every row with it."""
    fake = tmp_path / "site" / "pyreft"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('broken at import (test)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")]))
    completed = subprocess.run([sys.executable, str(E2E), "--smoke", "--configs", "a", "--checkpointing", "off",
                                "--methods", "floor,pyreft", "--no-plot", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = {r["method"]: r["status"] for r in _csv(tmp_path, "e2e_*.csv")}
    assert rows["floor"] == "ok", rows
    assert rows["pyreft"].startswith("error: RuntimeError: broken at import"), rows
    assert "preload: import pyreft failed: RuntimeError" in completed.stderr


def test_kernel_csv_is_written_row_by_row_and_stops_at_the_deadline(tmp_path):
    completed = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kernels.py"), "--smoke", "--grid",
                                "session", "--backends", "torch", "--deadline-s", "0", "--no-orthogonal",
                                "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = _csv(tmp_path, "kernels_smoke_*.csv")
    assert [(r["n_rows"], r["status"]) for r in rows] == [("8", "not run: deadline"), ("24", "not run: deadline")]


def test_kernel_rows_reach_the_file_before_the_run_ends(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_kernels as bk
    finally:
        sys.path.remove(str(ROOT / "bench"))
    seen_in_file = []
    appender = bk.CsvAppender(tmp_path / "k.csv", bk.FIELDS)

    def on_row(row):
        appender.append(row)
        with open(appender.path, newline="") as f:
            seen_in_file.append(len(list(csv.DictReader(f))))

    env = dict(device="cpu", torch="-", triton="-", date="2026-11-28", timer="wall")
    bk.run_kernels(dict(bk.SESSION_SMOKE, rows=(8,)), torch.device("cpu"), env, reps=1, backends=("torch",),
                   on_row=on_row)
    appender.close()
    assert seen_in_file == [1, 2]  # torch op fwd, fwd+bwd: each on disk as soon as it was measured
