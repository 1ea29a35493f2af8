"""Compile the Triton kernels for an H100 (sm_90) on this machine, at the launch configurations the code uses.

The interpreter that runs the kernels on the CPU accepts code the GPU compiler rejects (non-constexpr globals, dot
shapes, dtypes), and it cannot show register spills. Triton compiles ahead of time without a GPU, with the ptxas
shipped in its wheel, whose report (-v) gives registers and spill stores per kernel.
"""

import contextlib
import io
import re

import pytest
import torch

from sm90 import compiled_report

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

DTYPE = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def pointer_types(h: str) -> dict:
    """The pointer arguments' types of every kernel: h, out, g and their row copies in h's type ``h``, positions
    int64, parameters, gradients and scratch fp32."""
    pointers = dict(h_ptr=h, out_ptr=h, g_ptr=h, dh_ptr=h, h_rows_ptr=h, g_rows_ptr=h, positions_ptr="*i64")
    pointers.update({n: "*fp32" for n in ("q_ptr", "p_ptr", "w_ptr", "b_ptr", "delta_ptr", "dz_ptr", "t_ptr",
                                           "dq_part_ptr", "dw_part_ptr", "dp_part_ptr", "db_part_ptr", "part_ptr",
                                           "dq_ptr", "dw_ptr", "dp_ptr", "db_ptr")})
    return pointers


def kernel_source(fn, pointers, scalars, constexprs, attrs=None):
    """``fn`` as Triton's compiler takes it: the types of its arguments, its constexprs' values and ``attrs``."""
    signature = {name: pointers.get(name) or scalars[name] for name in fn.arg_names if name not in constexprs}
    signature.update({name: "constexpr" for name in constexprs})
    return ASTSource(fn=fn, signature=signature,
                     constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)


def compile_for_sm90(fn, pointers, scalars, constexprs, num_warps):
    """Compile for sm_90 and return (registers, spill-store bytes) from the ptxas report."""
    src = kernel_source(fn, pointers, scalars, constexprs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1 makes triton print ptxas -v
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    report = log.getvalue()
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return regs, spills


SCALARS = dict(n_slots="i32", n_per_example="i32", seq_len="i32", d="i32", r="i32", slots_per_split="i32",
               n_splits="i32", cols_per_program="i32", cols_per_split="i32", slot_blocks="i32", copy_units="i32",
               n_rows="i32", copy_col_chunks="i32", cols_per_copy="i32", numel="i32",
               dropout_p="fp32", dropout_scale="fp32", seed="i32")


MULTI_SCALARS = {name: "i32" for name in ("n_entries", "n_max", "batch", "seq_len", "d", "slot_blocks", "copy_units",
                                         "copy_col_chunks", "cols_per_copy")}

CASES = [(torch.bfloat16, 8), (torch.bfloat16, 32), (torch.bfloat16, 64), (torch.float32, 64)]


def resource_report():
    """[(kernel, h dtype, r, registers, spill-store bytes, tiles, warps)] for the heaviest variant of each kernel."""
    from reft_fast.kernels import low_rank_edit as k

    rows = []
    for h_dtype, r in CASES:
        block_m, block_d, block_r, num_warps, precision = k.launch_config(4096, r, h_dtype, interpreted=False)
        h = DTYPE[h_dtype]
        pointers = pointer_types(h)
        tiles = dict(BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r, DOT_PRECISION=precision)
        copy_rows, copy_d, block_n, _ = k.copy_config(4096, interpreted=False)
        copying = dict(tiles, COPY_ROWS=copy_rows, COPY_D=copy_d, BLOCK_N=block_n)
        full = dict(HAS_P=True, HAS_W=True, DROPOUT=True)  # every parameter, gelu, dropout
        for fn, flags in [(k._edit_forward_kernel, dict(full, HAS_B=True, ACT=2, FROM_PARTS=False, KEEP_ROWS=True,
                                                        **copying)),
                          (k._edit_forward_kernel, dict(full, HAS_B=True, ACT=2, FROM_PARTS=True, KEEP_ROWS=True,
                                                        **copying)),
                          (k._edit_backward_rows_kernel, dict(full, HAS_B=True, ACT=2, FROM_PARTS=False,
                                                              KEEP_G_ROWS=True, **copying)),
                          (k._edit_backward_rows_kernel, dict(full, HAS_B=True, ACT=2, FROM_PARTS=True,
                                                              KEEP_G_ROWS=True, **copying)),
                          (k._split_projections_kernel, dict(full, HAS_G=True, **tiles)),
                          (k._edit_backward_weights_kernel, dict(full, HAS_B=True, SAME_PQ=False, G_BY_SLOT=True,
                                                                 **tiles))]:
            regs, spills = compile_for_sm90(fn, pointers, SCALARS, flags, num_warps)
            variant = fn.__name__ + ("[parts]" if flags.get("FROM_PARTS") else "")
            rows.append((variant, str(h_dtype), r, regs, spills, tiles, num_warps))
        # several ReFTs in one batch: the parameters are read through a table of addresses (int64 → pointer casts)
        multi_pointers = dict(h_ptr=h, out_ptr=h, edit_index_ptr="*i64", table_ptr="*i64")
        regs, spills = compile_for_sm90(k._multi_edit_forward_kernel, multi_pointers, MULTI_SCALARS,
                                        dict(copying, BLOCK_R=block_r), num_warps)
        rows.append((k._multi_edit_forward_kernel.__name__, str(h_dtype), r, regs, spills, tiles, num_warps))
    # the sum over weight splits has no shape-dependent tiles: one compile (a second would hit Triton's cache)
    flags = dict(HAS_W=True, SEPARATE_P=True, HAS_B=True, BLOCK=k._SUM_BLOCK)
    regs, spills = compile_for_sm90(k._sum_weight_splits_kernel, pointers, SCALARS, flags, 4)
    rows.append((k._sum_weight_splits_kernel.__name__, "fp32", 0, regs, spills, flags, 4))
    return rows


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    # an empty cache, so that ptxas runs (and reports) for every kernel
    rows = compiled_report("test_triton_compile", "resource_report", timeout=600, TRITON_DEFAULT_FP_FUSION="1",
                           TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=str(tmp_path))
    assert len(rows) == 7 * len(CASES) + 1
    for name, dtype, r, regs, spills, tiles, warps in rows:
        print(f"{name:32s} {dtype:15s} r={r:<3d} regs={regs:<4d} spill-stores={spills:<5d} {tiles} warps={warps}")
    spills = [row for row in rows if row[4] != 0]
    assert not spills, f"register spills on sm_90: {spills}"


LAUNCHED = ("_split_projections_kernel", "_edit_forward_kernel", "_edit_backward_rows_kernel",
            "_edit_backward_weights_kernel", "_sum_weight_splits_kernel")


def launch_specializations():
    """{kernel: the distinct compile keys of its non-constexpr arguments} over forwards and backwards of batches whose
    row counts, lengths, position counts and seeds differ, as Triton's launcher for sm_90 would key its compile cache
    (its binder, made here without a GPU; the launches themselves are replaced by the binding)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from reft_fast.kernels import low_rank_edit as k

    backend = make_backend(GPUTarget("cuda", 90, 32))
    keys = {}

    def recording(name, fn):
        binder = create_function_from_signature(fn.signature, fn.params, backend)

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    specialization = binder(*args, **kwargs)[1]
                    keys.setdefault(name, set()).add(str([s for s in specialization if s[0] != "constexpr"]))
                return launch
        return Launcher()

    for name in LAUNCHED:
        setattr(k, name, recording(name, getattr(k, name)))
    d, r = 64, 8
    torch.manual_seed(0)
    Q, b = torch.randn(r, d), torch.randn(r)
    for batch, seq_len, n, seed in [(2, 7, 3, 1), (5, 33, 6, 16), (1, 48, 4, 12345), (16, 1024, 14, 32), (3, 1, 1, 7)]:
        h = torch.randn(batch, seq_len, d)
        positions = torch.randint(0, seq_len, (batch, n))
        h_rows = torch.empty(batch, n, d)
        k.edit_forward(h, positions, Q, Q, Q, b, 0, 0.1, seed, h.clone(), h_rows=h_rows)
        g = torch.randn_like(h)
        k.edit_backward(h_rows, g, positions, Q, Q, Q, b, 0, 0.1, seed, g.clone())
    return {name: sorted(v) for name, v in keys.items()}


def test_a_new_batch_shape_compiles_no_kernel_again():
    """Triton compiles a kernel per combination of its int arguments being 1, a multiple of 16 or neither. Rows,
    positions, lengths and the dropout seed change from batch to batch (packed and variable-length data draw new
    combinations every few steps), so they are plain values: one compile per kernel and flags (before, every such
    combination compiled every kernel again, seconds inside a training step)."""
    keys = compiled_report("test_triton_compile", "launch_specializations", timeout=300)
    assert set(keys) == set(LAUNCHED), sorted(keys)
    assert all(len(variants) == 1 for variants in keys.values()), keys


def _global_accesses(ptx: str) -> dict:
    """{"ld.global" | "st.global" | "cp.async": (instructions, 4-wide, 2-wide)} of a kernel's PTX (cp.async: the
    copies into shared memory that feed a dot's operands)."""
    counts = {}
    for kind in ("ld.global", "st.global", "cp.async"):
        lines = [line for line in ptx.splitlines() if kind in line]
        counts[kind] = (len(lines), sum(".v4" in line for line in lines), sum(".v2" in line for line in lines))
    return counts


def column_vector_widths():
    """{kernel: [its PTX's global accesses with every per-batch int plain (as launched), the same with the column
    split (cols_per_program / cols_per_split) known to be a multiple of 16 (as Triton specialized it before)]}, for
    bf16 h, rank 32, d 4096: the pointers and d aligned, as a launch on aligned tensors specializes them."""
    from triton.compiler import make_backend

    from reft_fast.kernels import low_rank_edit as k

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    block_m, block_d, block_r, num_warps, precision = k.launch_config(4096, 32, torch.bfloat16, interpreted=False)
    tiles = dict(BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_R=block_r, DOT_PRECISION=precision)
    copy_rows, copy_d, block_n, _ = k.copy_config(4096, interpreted=False)
    copying = dict(tiles, COPY_ROWS=copy_rows, COPY_D=copy_d, BLOCK_N=block_n)
    flags = dict(HAS_P=True, HAS_W=True, HAS_B=True, ACT=0, DROPOUT=False, FROM_PARTS=False)
    cases = [(k._edit_forward_kernel, "cols_per_program", dict(flags, KEEP_ROWS=True, **copying)),
             (k._edit_backward_rows_kernel, "cols_per_program", dict(flags, KEEP_G_ROWS=True, **copying)),
             (k._split_projections_kernel, "cols_per_split", dict(HAS_P=True, HAS_W=True, HAS_G=False, DROPOUT=False,
                                                                  **tiles))]
    pointers = pointer_types(DTYPE[torch.bfloat16])
    widths = {}
    for fn, column_arg, constexprs in cases:
        aligned = [name for name in fn.arg_names if name in pointers or name in ("d", "cols_per_copy")]
        widths[fn.__name__] = []
        for divisible in (aligned, aligned + [column_arg]):
            src = kernel_source(fn, pointers, SCALARS, constexprs,
                                attrs={(fn.arg_names.index(n),): backend.parse_attr("D") for n in divisible})
            ptx = triton.compile(src, target=target, options=dict(num_warps=num_warps)).asm["ptx"]
            widths[fn.__name__].append(_global_accesses(ptx))
    return widths


def test_plain_column_splits_keep_the_vector_accesses_of_specialized_ones(tmp_path):
    """The column range of a program (cols_per_program, cols_per_split) is a per-batch int, so Triton no longer knows
    it is a multiple of 16; the kernels restate that fact, or the loads and stores of h lose their vector width (on
    sm_90 the rank-32 forward went from 10 to 17 global loads, and its H200 time at 65 536 rows from 1.30 to 1.84 ms,
    2026-11-30). Each kernel's PTX as launched must access memory as the specialized one did."""
    widths = compiled_report("test_triton_compile", "column_vector_widths", timeout=600, TRITON_DEFAULT_FP_FUSION="1",
                             TRITON_CACHE_DIR=str(tmp_path))
    assert set(widths) == {"_edit_forward_kernel", "_edit_backward_rows_kernel", "_split_projections_kernel"}
    for name, (plain, specialized) in widths.items():
        assert plain == specialized, (name, plain, specialized)
    for name in ("_edit_forward_kernel", "_edit_backward_rows_kernel"):  # their writes of h's rows: vectors at all
        assert widths[name][0]["st.global"][2] + widths[name][0]["st.global"][1] > 0, widths[name]
