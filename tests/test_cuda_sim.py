"""csrc/sim, the CPU simulation the cuda backend's tests run on without a GPU: barriers, warp shuffles, __syncwarp, the
wmma TF32 subset (a GEMM against a host reference, bit for bit; the fragment mapping; __float_to_tf32 against a float64
reference), the faults it reports (divergent barriers, misaligned vector and wmma accesses, partial-warp and
non-uniform wmma calls), AddressSanitizer catching an out-of-bounds read, the half and bfloat16 conversions against
torch's, bit for bit, cudaDeviceGetAttribute, and the launch rewriting of reft_fast.ops.cuda_build.

The kernels are in tests/csrc_sim/selftest.cu, written in CUDA syntax and built the way cuda_backend builds csrc/ for
the CPU (launches rewritten, the stand-in CUDA headers first), into a plain executable: no torch in the loop.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from reft_fast.ops import cuda_build as cuda_backend

HERE = Path(__file__).resolve().parent
CXX = shutil.which("c++") or shutil.which("g++")
SIM = cuda_backend.CSRC_DIR / "sim"

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH")


def _compile(out_dir: Path, name: str, extra):
    # A source file per binary: the two compile at once, and a shared one was rewritten for the second while the
    # first compiler read it (seen 2026-11-29: "undefined reference to `main'", every test of the module an error).
    source = out_dir / f"{name}.cpp"
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


@pytest.mark.parametrize("case", ["reverse", "butterfly", "syncwarp", "wmma_gemm", "wmma_mapping"])
@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle", "warps"])
def test_barriers_and_shuffles_hold_under_every_schedule(binaries, case, order, monkeypatch):
    """wmma_gemm: six warps, every operand layout, NaN and inf inputs; the exact equality with the host reference
    (A rounded with __float_to_tf32, B truncated to TF32, fmaf in k order) needs the sim to accumulate as documented."""
    monkeypatch.setenv("REFT_FAST_CUDA_SIM_ORDER", order)
    done = run(binaries["plain"], case)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr


def test_divergent_barriers_are_a_launch_error(binaries):
    done = run(binaries["plain"], "divergent")
    assert done.returncode == 0, done.stderr
    assert "barrier divergence" in done.stdout, done.stdout
    assert "__syncthreads at" in done.stdout and "__shfl_xor_sync at" in done.stdout, done.stdout


@pytest.mark.parametrize("case,what", [("two_sites", "different __syncthreads"),
                                       ("split_shuffle", "different warp-wide call sites: __shfl_xor_sync"),
                                       ("split_syncwarp", "different warp-wide call sites: __syncwarp"),
                                       ("wmma_split", "different warp-wide call sites: wmma::mma_sync")])
def test_barriers_at_different_call_sites_are_a_launch_error(binaries, case, what):
    done = run(binaries["plain"], case)
    assert done.returncode == 0, done.stderr
    assert "barrier divergence" in done.stdout and what in done.stdout and "selftest.cu:" in done.stdout, done.stdout
    assert "[719]" in done.stdout, done.stdout  # cudaErrorLaunchFailure


@pytest.mark.parametrize("case,what,code", [
    ("wmma_misaligned", "load_matrix_sync of a misaligned address", 716),
    ("wmma_bad_ldm", "ldm 6, not a multiple of 4 floats: misaligned", 716),
    ("wmma_pointers", "the lanes of a warp pass different pointers", 719),
    ("wmma_half_warp", "wmma::mma_sync at", 719),
    ("syncwarp_mask", "__syncwarp needs the full mask", 719)])
def test_wmma_and_syncwarp_misuse_is_a_launch_error(binaries, case, what, code):
    done = run(binaries["plain"], case)
    assert done.returncode == 0, done.stderr
    assert what in done.stdout and f"[{code}]" in done.stdout, done.stdout
    if case == "wmma_half_warp":  # lanes 16..31 have exited instead of joining the mma
        assert "have exited (block (0, 0, 0), thread (16, 0, 0))" in done.stdout, done.stdout


def test_device_attributes(binaries):
    done = run(binaries["plain"], "attributes")
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stdout + done.stderr


def test_misaligned_vector_load_is_a_launch_error(binaries):
    done = run(binaries["plain"], "misaligned")
    assert "misaligned" in done.stdout and "thread (0, 0, 0)" in done.stdout, done.stdout


def test_address_sanitizer_sees_an_out_of_bounds_read(binaries):
    if binaries["asan"] is None:
        pytest.skip("the compiler cannot link AddressSanitizer here")
    for case in ("reverse", "wmma_gemm"):
        clean = run(binaries["asan"], case)
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


def _tf32_reference(values):
    """cvt.rna.tf32.f32 in float64 arithmetic: the magnitude rounded to a multiple of its TF32 quantum (2^(e - 11) for
    |x| in [2^(e-1), 2^e), 2^-136 below the normal range), ties away from zero; past FLT_MAX an infinity."""
    with np.errstate(invalid="ignore"):  # signalling NaNs
        x = values.astype(np.float64)
    out = values.copy()
    finite = np.isfinite(x)
    magnitude = np.abs(x[finite])
    _, e = np.frexp(magnitude)
    quantum = np.ldexp(1.0, np.maximum(e - 11, -136))
    rounded = np.floor(magnitude / quantum + 0.5) * quantum  # exact in float64
    with np.errstate(over="ignore"):
        out[finite] = np.copysign(rounded, x[finite]).astype(np.float32)
    return out


def test_float_to_tf32_rounds_to_nearest_ties_away(binaries, tmp_path):
    rng = np.random.default_rng(1)
    one, ulp10 = np.float32(1.0), np.float32(2.0**-10)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1 + 2.0**-11, -(1 + 2.0**-11),
                         1 + 3 * 2.0**-11, 1 + 2.0**-11 - 2.0**-23, 2 - 2.0**-11, -(2 - 2.0**-11), 3.4028235e38,
                         -3.4028235e38, 1e-40, -1e-40, 2.0**-136, 2.0**-137, 3 * 2.0**-137, 1.17e-38],
                        dtype=np.float32)
    low_payload_nan = np.array([0x7F800001, 0xFF801000, 0x7FC00000, 0x7F7FEFFF, 0x7F7FF000], dtype=np.uint32)
    spread = (rng.standard_normal(20000) * 10.0 ** rng.uniform(-40, 38, 20000)).astype(np.float32)
    raw = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([specials, low_payload_nan.view(np.float32), spread, raw])
    path = tmp_path / "floats.bin"
    values.tofile(path)
    done = run(binaries["plain"], "tf32", str(path))
    assert done.returncode == 0, done.stderr
    got = np.array([int(line, 16) for line in done.stdout.split()], dtype=np.uint32)
    assert len(got) == len(values)
    assert not (got & 0x1FFF).any()  # the low 13 bits are zero, NaN included

    nan = np.isnan(values)
    assert np.isnan(got.view(np.float32)[nan]).all()  # NaN stays NaN (a NaN with a low payload must not become inf)
    expected = _tf32_reference(values).view(np.uint32)
    bad = np.nonzero((got != expected) & ~nan)[0]
    assert bad.size == 0, f"{bad.size} mismatches, e.g. {values[bad[:5]]} -> {got[bad[:5]]} not {expected[bad[:5]]}"
    # The cases named: a tie goes away from zero (nearest even would keep 1.0), a carry reaches the exponent,
    # FLT_MAX overflows, infinities stay.
    as_float = got.view(np.float32)
    assert as_float[6] == one + ulp10 and as_float[7] == -(one + ulp10) and as_float[8] == one + 2 * ulp10
    assert as_float[9] == one and as_float[10] == 2.0 and as_float[11] == -2.0
    assert as_float[12] == np.inf and as_float[13] == -np.inf and as_float[2] == np.inf and as_float[3] == -np.inf


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
