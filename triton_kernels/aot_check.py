"""Compile every kernel for real GPU targets, ahead of time, without a GPU.

The interpreter accepts programs the compiler rejects (non-power-of-2 aranges, tl.dot
below 16, scalar/block type mixes), so CPU tests alone do not prove the kernels
build. This runs Triton's full NVIDIA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin
with the bundled ptxas) for representative specialisations and reports failures.

    python -m triton_kernels.aot_check [--arch 80 90] [--quick | --smoke | --fit]

``--fit`` checks shared memory instead: the autotuner drops every config that needs more
than a GPU's per-block limit, so the smallest config (the first) must fit on each target
for the largest tiles (float32, head dim 256: the prefill tile of 32 query rows).

Must run with TRITON_INTERPRET unset (the kernels must be JIT functions, not
interpreted ones). Exit status 0 when everything compiles. A full run takes minutes
(~3 s per specialisation on a CPU core); ``--smoke`` compiles four.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

_TY = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _compile(jit_fn, signature: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int,
             aligned: tuple[str, ...] = ()):
    """Compile as a real launch specialises: every pointer, and the integer arguments in
    ``aligned``, divisible by 16 (torch's allocations are; so are the strides of head dims
    that are multiples of 16), and an integer argument given in ``constexprs`` (a launch
    makes an argument equal to 1 a constant) fixed. Without these the compiler builds
    another kernel: no asynchronous copies, scalar loads, a fraction of the shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    fn = jit_fn
    while not isinstance(fn, JITFunction):  # unwrap triton.autotune
        fn = fn.fn
    sig = {name: ("constexpr" if name in constexprs else signature[name]) for name in fn.arg_names}
    div = [n for n in fn.arg_names if n not in constexprs and (sig[n].startswith("*") or n in aligned)]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


# ---- signatures (pointer element types and scalar types of each kernel's runtime args) ----------

def _segment_sig(dt: str) -> dict:
    ty = _TY[dt]
    sig = {k: "*fp32" for k in ("o_part_ptr", "lse_part_ptr", "inv_freq_ptr")}
    sig.update({k: f"*{ty}" for k in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")})
    sig.update({k: "*i32" for k in ("items_ptr", "kv_indptr_ptr", "kv_pages_ptr", "q_rows_ptr",
                                    "shift_ptr", "limit_ptr", "state_off_ptr")})
    sig["qk_scale"] = "fp32"
    sig.update({k: "i32" for k in ("page_size", "stride_qt", "stride_qh", "stride_kp", "stride_ks",
                                   "stride_kh", "stride_vp", "stride_vs", "stride_vh", "stride_ot",
                                   "stride_oh", "stride_pt", "stride_ph", "stride_lt", "stride_lh")})
    return sig


def _merge_sig(dt: str) -> dict:
    sig = {"o_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": f"*{_TY[dt]}", "merge_indptr_ptr": "*i32",
           "merge_entries_ptr": "*i32", "state_off_ptr": "*i32", "nsplit_ptr": "*i32", "H": "i32"}
    sig.update({k: "i32" for k in ("stride_os", "stride_oh", "stride_ls", "stride_lh", "stride_ot",
                                   "stride_oh2")})
    return sig


def _rope_sig(dt: str) -> dict:
    ty = _TY[dt]
    sig = {"k_ptr": f"*{ty}", "v_ptr": f"*{ty}", "kp_ptr": f"*{ty}", "vp_ptr": f"*{ty}",
           "slots_ptr": "*i64", "pos_ptr": "*i64", "cos_ptr": f"*{ty}", "sin_ptr": f"*{ty}",
           "inv_freq_ptr": "*fp32", "H": "i32", "page_size": "i32", "num_slots": "i64", "max_pos": "i32"}
    sig.update({k: "i32" for k in ("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_kpp",
                                   "stride_kps", "stride_kph", "stride_vpp", "stride_vps", "stride_vph",
                                   "stride_cos", "stride_sin")})
    return sig


# ---- specialisations: (kernel name, dtype, constexprs, num_warps, num_stages) --------------------

def _segment_cx(dt, D, group, bq, bn, shift, direct):
    half = D // 2
    return dict(HALF=half, HALF_PAD=max(16, _pow2(half)), GROUP=group, BLOCK_Q=bq, BLOCK_N=bn,
                HAS_SHIFT=shift, DIRECT=direct, IS_FP32=dt == "float32", UPCAST=False,
                stride_lh=1)  # (lse_part [S, Hq] is contiguous: a launch passes 1, a constant)


# the segment kernel's integer arguments a launch sees divisible by 16 (a page of 16 tokens;
# strides of [*, heads, head dim] tensors with head dims that are multiples of 16)
_SEGMENT_ALIGNED = ("page_size", "stride_qt", "stride_qh", "stride_kp", "stride_ks", "stride_kh", "stride_vp",
                    "stride_vs", "stride_vh", "stride_ot", "stride_oh", "stride_pt", "stride_ph", "stride_lt")


def specs(mode: str):
    from .segment import _configs
    from .work import block_q_sizes
    if mode == "smoke":
        yield "segment", "bfloat16", _segment_cx("bfloat16", 128, 4, 16, 64, True, False), 4, 2
        yield "segment", "float32", _segment_cx("float32", 80, 3, 64, 32, False, True), 4, 2
        yield "merge", "bfloat16", dict(D=80, D_PAD=128, BLOCK_H=32, HAS_SPLIT=True), 4, 1
        yield "rope", "float16", dict(HALF=40, HALF_PAD=64, BLOCK_H=8, ROPE=2), 4, 1
        return
    dims = [(64, 4), (80, 3), (128, 8), (256, 1)] if mode == "full" else [(64, 4), (128, 8)]
    tune = [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in _configs()]
    if mode != "full":
        tune = tune[1:2]
    for dt, (D, group) in itertools.product(("bfloat16", "float16", "float32"), dims):
        half_pad = max(16, _pow2(D // 2))
        for bq in sorted(set(block_q_sizes(group, half_pad, dt == "float32"))):
            for shift, direct in ((True, False), (False, True)):
                for bn, w, s in tune:
                    yield "segment", dt, _segment_cx(dt, D, group, bq, bn, shift, direct), w, s
    for dt, D, split in itertools.product(("float32", "bfloat16"), (64, 80, 128), (False, True)):
        yield "merge", dt, dict(D=D, D_PAD=_pow2(D), BLOCK_H=min(32, 4096 // _pow2(D)), HAS_SPLIT=split), 4, 1
    for dt, D, rope in itertools.product(("float16", "bfloat16", "float32"), (64, 80, 128), (0, 1, 2)):
        yield "rope", dt, dict(HALF=D // 2, HALF_PAD=_pow2(D // 2), BLOCK_H=8, ROPE=rope), 4, 1


def check(arch: int, mode: str) -> list[str]:
    from .merge import _merge_kernel
    from .rope_append import _rope_append_kernel
    from .segment import _segment_attn_kernel
    kernels = {"segment": (_segment_attn_kernel, _segment_sig, _SEGMENT_ALIGNED),
               "merge": (_merge_kernel, _merge_sig, ()), "rope": (_rope_append_kernel, _rope_sig, ())}
    failures, n, t0 = [], 0, time.time()
    for name, dt, cx, w, s in specs(mode):
        fn, sig, aligned = kernels[name]
        n += 1
        try:
            _compile(fn, sig(dt), cx, arch, w, s, aligned)
        except Exception as e:  # report every failing specialisation, not just the first
            failures.append(f"{name} sm_{arch} {dt} {cx} warps={w} stages={s}: "
                            f"{type(e).__name__}: {e}"[:2000])
    print(f"sm_{arch}: compiled {n - len(failures)}/{n} specialisations in {time.time() - t0:.1f} s")
    return failures


# Shared memory per block (opt-in maximum) by compute capability.
SHARED_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def check_fit(arch: int) -> list[str]:
    """The first tuning config of the segment kernel, float32, head dim 256, every query
    block size for GQA 1, compiled as a launch specialises it, against the arch's
    shared-memory limit."""
    from .segment import _configs, _segment_attn_kernel
    from .work import block_q_sizes
    c = _configs()[0]
    bn, w, s = c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
    limit = SHARED_LIMIT.get(arch, min(SHARED_LIMIT.values()))
    failures = []
    for bq in sorted(set(block_q_sizes(1, 128, fp32=True))):
        k = _compile(_segment_attn_kernel, _segment_sig("float32"),
                     _segment_cx("float32", 256, 1, bq, bn, True, False), arch, w, s, _SEGMENT_ALIGNED)
        shared = k.metadata.shared
        print(f"sm_{arch}: float32 D=256 BLOCK_Q={bq} BLOCK_N={bn} warps={w} stages={s}: "
              f"{shared} B shared (limit {limit})")
        if shared > limit:
            failures.append(f"segment sm_{arch} float32 D=256 BLOCK_Q={bq}: the smallest config needs "
                            f"{shared} B of shared memory, over the {limit} B limit")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="one tuning config, two head dims")
    g.add_argument("--smoke", action="store_true", help="four specialisations")
    g.add_argument("--fit", action="store_true", help="the smallest config's shared memory per target")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the AOT check compiles the real kernels", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    failures = []
    for arch in args.arch:
        failures += check_fit(arch) if args.fit else check(arch, mode)
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
