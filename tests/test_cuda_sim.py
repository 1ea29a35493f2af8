"""csrc/sim, the CPU simulation the cuda backend's tests run on without a GPU: barriers, warp shuffles, the faults it
reports (divergent barriers, misaligned vector loads), AddressSanitizer catching an out-of-bounds read, the half and
bfloat16 conversions against torch's, bit for bit, and the launch rewriting of reft_fast.cuda_backend.

The kernels are in tests/csrc_sim/selftest.cu, written in CUDA syntax and built the way cuda_backend builds csrc/ for
the CPU (launches rewritten, the stand-in CUDA headers first), into a plain executable: no torch in the loop.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from reft_fast import cuda_backend

HERE = Path(__file__).resolve().parent
CXX = shutil.which("c++") or shutil.which("g++")
SIM = cuda_backend.CSRC_DIR / "sim"

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")


def _compile(out_dir: Path, name: str, extra):
    source = out_dir / "selftest.cpp"
    cu = HERE / "csrc_sim" / "selftest.cu"
    source.write_text(f'#line 1 "{cu}"\n' + cuda_backend.translate_launches(cu.read_text(encoding="utf-8")),
                      encoding="utf-8")
    exe = out_dir / name
    cmd = [CXX, "-std=c++17", "-O1", "-g", "-fno-strict-aliasing", f"-I{SIM / 'include'}", str(source),
           str(SIM / "cuda_sim.cpp"), "-o", str(exe), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), exe


@pytest.fixture(scope="module")
def binaries(tmp_path_factory):
    """{"plain": path, "asan": path or None}; both compile at once."""
    out_dir = tmp_path_factory.mktemp("cuda_sim")
    plain = _compile(out_dir, "selftest", [])
    asan = _compile(out_dir, "selftest_asan", ["-fsanitize=address", "-fno-omit-frame-pointer"])
    result = {}
    for key, (proc, exe) in (("plain", plain), ("asan", asan)):
        output, _ = proc.communicate(timeout=300)
        if key == "plain":
            assert proc.returncode == 0, output
        result[key] = exe if proc.returncode == 0 else None  # a compiler without libasan: the asan test skips
    return result


def run(exe, *args, env=None):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("case", ["reverse", "butterfly"])
@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_barriers_and_shuffles_hold_under_every_schedule(binaries, case, order, monkeypatch):
    monkeypatch.setenv("REFT_FAST_CUDA_SIM_ORDER", order)
    done = run(binaries["plain"], case)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr


def test_divergent_barriers_are_a_launch_error(binaries):
    done = run(binaries["plain"], "divergent")
    assert done.returncode == 0, done.stderr
    assert "barrier divergence" in done.stdout and "__syncthreads" in done.stdout and "warp shuffle" in done.stdout, \
        done.stdout


@pytest.mark.parametrize("case,what", [("two_sites", "different __syncthreads"),
                                       ("split_shuffle", "shuffle at different call sites")])
def test_barriers_at_different_call_sites_are_a_launch_error(binaries, case, what):
    done = run(binaries["plain"], case)
    assert done.returncode == 0, done.stderr
    assert "barrier divergence" in done.stdout and what in done.stdout and "selftest.cu:" in done.stdout, done.stdout


def test_misaligned_vector_load_is_a_launch_error(binaries):
    done = run(binaries["plain"], "misaligned")
    assert "misaligned" in done.stdout and "thread (0, 0, 0)" in done.stdout, done.stdout


def test_address_sanitizer_sees_an_out_of_bounds_read(binaries):
    if binaries["asan"] is None:
        pytest.skip("the compiler cannot link AddressSanitizer here")
    clean = run(binaries["asan"], "reverse")
    assert clean.returncode == 0 and clean.stdout.startswith("ok"), clean.stdout + clean.stderr
    caught = run(binaries["asan"], "out_of_bounds")
    assert caught.returncode != 0
    assert "heap-buffer-overflow" in caught.stderr and "out_of_bounds_kernel" in caught.stderr, caught.stderr[-3000:]


def test_half_and_bfloat16_conversions_match_torch_bit_for_bit(binaries, tmp_path):
    rng = np.random.default_rng(0)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, 1e-8, 2.0**-24, 2.0**-25,
                         3 * 2.0**-26, 2.0**-14, 2.0**-14 * (1 - 2.0**-11), 1 + 2.0**-11, 1 + 3 * 2.0**-11,
                         1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4e38, -1.5e-40], dtype=np.float32)
    spread = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-9, 6, 20000)).astype(np.float32)
    raw = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)  # every bit pattern kind
    values = np.concatenate([specials, spread, raw])
    path = tmp_path / "floats.bin"
    values.tofile(path)
    done = run(binaries["plain"], "convert", str(path))
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert len(rows) == len(values)
    got = {k: np.array([int(r[i], 16) for r in rows], dtype=np.uint32) for i, k in enumerate(["h", "bf", "hb", "bb"])}

    x = torch.from_numpy(values)
    half, bf16 = x.to(torch.float16), x.to(torch.bfloat16)
    nan = torch.isnan(x).numpy()
    # NaN payloads may differ; a NaN must stay a NaN.
    for name, ours, theirs in (("half", got["h"], half.view(torch.int16).numpy().astype(np.uint16)),
                               ("bfloat16", got["bf"], bf16.view(torch.int16).numpy().astype(np.uint16))):
        bad = np.nonzero((ours.astype(np.uint16) != theirs) & ~nan)[0]
        assert bad.size == 0, f"{name}: {bad.size} mismatches, e.g. {values[bad[:5]]}"
    back_h = half.float().numpy().view(np.uint32)
    back_bf = bf16.float().numpy().view(np.uint32)
    assert np.array_equal(got["hb"][~nan], back_h[~nan])
    assert np.array_equal(got["bb"][~nan], back_bf[~nan])
    assert np.isnan(got["hb"].view(np.float32)[nan]).all() and np.isnan(got["bb"].view(np.float32)[nan]).all()


def test_launch_rewriting():
    """Launches become cuda_sim calls; a line break inside a launch is kept, so line numbers stay those of the .cu."""
    source = ("k<<<g, b>>>(x);\n"
              "detail::kern<T, R, 1>\n    <<<grid, host::threads(d, 1), 0, stream>>>(args, out);\n")
    assert cuda_backend.translate_launches(source) == (
        "::cuda_sim::Launch(g, b).run(k, x);\n"
        "::cuda_sim::Launch(grid, host::threads(d, 1), 0, stream).run(detail::kern<T, R, 1>, \nargs, out);\n")
    with pytest.raises(cuda_backend.CudaBackendUnavailable, match="line 2"):
        cuda_backend.translate_launches("int x;\n(*table[i])<<<g, b>>>(x);\n")


def test_simulation_switch(monkeypatch):
    for value, mode in (("", None), ("0", None), ("1", "sim"), ("asan", "asan"), ("ON", "sim")):
        monkeypatch.setenv(cuda_backend.SIM_ENV, value)
        assert cuda_backend.simulation() == mode
    monkeypatch.setenv(cuda_backend.SIM_ENV, "valgrind")
    with pytest.raises(ValueError, match="REFT_FAST_CUDA_SIM='valgrind'"):
        cuda_backend.simulation()
