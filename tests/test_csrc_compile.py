"""csrc/ builds without a GPU: each .cu compiles for sm_90 with this machine's nvcc (to an object, never run), ptxas
reports no register spills, no kernel leaves fma contraction to the compiler (the PTX), the torch binding compiles
against this torch, and the objects link into a module that imports and rejects CPU tensors with a clear error.

Everything compiles in parallel once per module (about a minute on 2 cores). Skips only when nvcc (or, for the binding,
a C++ compiler) is absent.
"""

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from reft_fast.ops import cuda_build as cuda_backend

CSRC = cuda_backend.CSRC_DIR
CU_FILES = sorted(name for name in cuda_backend.SOURCES if name.endswith(".cu"))
NVCC = shutil.which("nvcc")
CXX = shutil.which("c++") or shutil.which("g++")

# As cuda_build compiles them (its flags, torch's -D__CUDA_NO_HALF_* defines), plus the resource report.
NVCC_FLAGS = ["-std=c++17", *cuda_backend.NVCC_FLAGS, "-arch=sm_90", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
              *cpp_extension.COMMON_NVCC_FLAGS]
# Kernel templates and how many instantiations each .cu must report: 3 dtypes x 5 padded ranks x {vector, scalar}, and
# for the per-row kernels also 3 dtypes x 2 padded ranks (4, 8) x {vector, scalar} with 4 rows per block; the tile
# kernels (rows, weight gradients) for 2 dtypes (bf16, fp16) x 3 padded ranks (16, 32, 64).
EXPECTED_KERNELS = {"edit_forward_kernel": 42, "edit_backward_rows_kernel": 42, "weight_grad_kernel": 30,
                    "reduce_grads_kernel": 1, "edit_forward_tile_kernel": 6, "edit_backward_tile_kernel": 6,
                    "weight_grad_tile_kernel": 6}

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH; the CUDA sources cannot be compiled here")


def _torch_includes():
    return [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Start every compile at once, wait, and return {name: (returncode, output, object path)}; the PTX that ptxas
    compiled is kept beside each .cu's object, as <stem>/<stem>.ptx."""
    out_dir = tmp_path_factory.mktemp("csrc_build")
    jobs = {}
    for name in CU_FILES:
        obj = out_dir / (Path(name).stem + ".o")
        keep = out_dir / Path(name).stem
        keep.mkdir()
        cmd = [NVCC, "-c", str(CSRC / name), "-o", str(obj), "-keep", "-keep-dir", str(keep), *NVCC_FLAGS]
        jobs[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), obj)
    if CXX is not None:
        obj = out_dir / "binding.o"
        # The binding includes torch/extension.h and nothing from CUDA: it compiles against a CPU-only torch.
        cmd = [CXX, "-c", str(CSRC / "binding.cpp"), "-o", str(obj), "-std=c++20", "-O1", "-fPIC",
               "-DTORCH_EXTENSION_NAME=reft_fast_cuda_ci", "-DTORCH_API_INCLUDE_EXTENSION_H", *_torch_includes()]
        jobs["binding.cpp"] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), obj)
    results = {}
    for name, (proc, obj) in jobs.items():
        output, _ = proc.communicate(timeout=900)
        results[name] = (proc.returncode, output, obj)
    return results


def parse_ptxas(output: str) -> dict:
    """{mangled kernel name: {"registers", "spill_stores", "spill_loads", "stack"}} from `-Xptxas -v` output."""
    kernels, current = {}, None
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for 'sm_90'", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current["registers"] = int(m.group(1))
    return kernels


@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles_for_sm90(build, name):
    returncode, output, obj = build[name]
    assert returncode == 0, f"nvcc failed on {name}:\n{output}"
    assert obj.stat().st_size > 0
    assert "warning" not in output.lower(), f"nvcc warned on {name}:\n{output}"


def test_every_kernel_instantiation_fits_in_registers_without_spills(build):
    kernels = {}
    for name in CU_FILES:
        returncode, output, _ = build[name]
        assert returncode == 0, output
        kernels.update(parse_ptxas(output))
    counts = {template: sum(template in k for k in kernels) for template in EXPECTED_KERNELS}
    assert counts == EXPECTED_KERNELS, f"ptxas reported an unexpected set of kernels: {sorted(kernels)}"
    for kernel, report in kernels.items():
        assert set(report) == {"registers", "spill_stores", "spill_loads", "stack"}, (kernel, report)
        assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{kernel} spills: {report}"
        assert report["stack"] == 0, f"{kernel} uses local memory: {report}"
        assert report["registers"] <= 255, (kernel, report)


# A floating-point add, subtract or multiply without a rounding modifier: nvcc writes these where it may still fuse
# (-fmad=true), and ptxas may then contract a `mul.f32` feeding an `add.f32` into one FFMA. With .rn neither does.
_CONTRACTIBLE = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?((?:add|sub|mul)(?:\.ftz)?(?:\.sat)?\.(?:f16|f16x2|bf16|bf16x2|f32|f64))\s", re.M)


def ptx_kernels(ptx: str) -> dict:
    """{mangled kernel name: its PTX} for every .entry of a PTX module."""
    starts = [(m.start(), m.group(1)) for m in re.finditer(r"^\.visible \.entry (\w+)", ptx, re.M)]
    return {name: ptx[start:end] for (start, name), (end, _) in zip(starts, [*starts[1:], (len(ptx), "")])}


def test_no_kernel_leaves_fma_contraction_to_the_compiler(build):
    """Every fused multiply-add of csrc/ is an fmaf in the source; every other add and multiply is rounded as written.

    Left to the compiler, whether a * b + c becomes one fma depends on the code around it: for
    grad_h = grad_out · dropout + (dz W − t P), nvcc fused the two in the scalar backward rows kernel with four rows
    per block (it unswitched the unrolled row loop on the dropout test, which put both in one basic block) and not
    with one row, so fp32 grad_h differed in the last bit between launch shapes (d = 4097 on an H200). Built with
    cuda_build.NVCC_FLAGS (-fmad=false), nvcc fuses nothing and marks every add and multiply .rn, which ptxas does not
    fuse either: so no kernel's PTX may hold one without it."""
    kernels = {}
    for name in CU_FILES:
        returncode, output, obj = build[name]
        assert returncode == 0, output
        kernels.update(ptx_kernels((obj.parent / obj.stem / f"{obj.stem}.ptx").read_text()))
    counts = {template: sum(template in k for k in kernels) for template in EXPECTED_KERNELS}
    assert counts == EXPECTED_KERNELS, f"unexpected set of kernels in the PTX: {sorted(kernels)}"
    loose = {k: sorted(set(_CONTRACTIBLE.findall(body))) for k, body in kernels.items()}
    loose = {k: ops for k, ops in loose.items() if ops}
    assert not loose, f"{len(loose)} kernels have adds or multiplies the compiler may fuse: {loose}"


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH for the torch binding")
def test_binding_compiles_against_this_torch(build):
    returncode, output, obj = build["binding.cpp"]
    assert returncode == 0, f"binding.cpp failed to compile:\n{output}"
    assert "binding.cpp:" not in output, f"warnings in binding.cpp itself:\n{output}"


def _cudart_dir():
    for root in (Path(NVCC).resolve().parent.parent, Path("/usr/local/cuda")):
        if (root / "lib64" / "libcudart.so").exists():
            return root / "lib64"
    return None


@pytest.mark.skipif(CXX is None, reason="no C++ compiler on PATH for the torch binding")
def test_objects_link_into_an_importable_module_that_rejects_cpu_tensors(build, tmp_path):
    """Every launcher the binding calls is defined with the declared signature (the link and the import would fail)."""
    cudart = _cudart_dir()
    if cudart is None:
        pytest.skip("libcudart.so not found next to nvcc; cannot link the module")
    objects = []
    for name in [*CU_FILES, "binding.cpp"]:
        returncode, output, obj = build[name]
        assert returncode == 0, output
        objects.append(str(obj))
    module = tmp_path / "reft_fast_cuda_ci.so"
    torch_lib = Path(torch.__file__).parent / "lib"
    link = [CXX, "-shared", "-o", str(module), *objects, f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu",
            "-ltorch_python", f"-L{cudart}", "-lcudart", f"-Wl,-rpath,{cudart}", f"-Wl,-rpath,{torch_lib}"]
    linked = subprocess.run(link, capture_output=True, text=True)
    assert linked.returncode == 0, linked.stderr
    script = (
        "import torch, reft_fast_cuda_ci as m\n"
        "h = torch.zeros(1, 2, 8); pos = torch.zeros(1, 1, dtype=torch.long); Q = torch.zeros(1, 8)\n"
        "try:\n"
        "    m.edit_forward(h, pos, Q, None, None, torch.zeros(1), 0, 0.0, 0, h.clone(), 0)\n"
        "except ValueError as e:\n"
        "    print('REJECTED:', e)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "REJECTED: the cuda backend needs CUDA tensors, but h is on cpu" in run.stdout, run.stdout + run.stderr
