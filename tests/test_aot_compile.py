"""Every Triton kernel variant the code can launch, compiled for NVIDIA sm_80 and sm_90 with no GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` lowers a kernel to PTX and a cubin
with the ptxas inside the triton wheel, so a CPU-only CI machine catches what only a GPU run would
otherwise show: a kernel that does not compile for a real target (the interpreter accepts much that the
compiler refuses), or one that spills registers to local memory (read from the cubin with the wheel's
cuobjdump). The variants are the launch
configurations the dispatchers pick (nano_gtalign/kernels/logprob.py: dtype x entropy x vocabulary tile x num_warps;
nano_gtalign/kernels/advantage.py: tile shape), each compiled twice: without specialisation hints and with the
16-byte alignment / divisibility hints Triton's launcher adds for aligned pointers and sizes (Qwen's
V = 151,936 is a multiple of 16, so that is the variant that runs in practice).

Skipped only when triton is not installed.
"""
from __future__ import annotations

import json
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed: there is nothing to compile")

from nano_gtalign.kernels import advantage, logprob  # noqa: E402
from tests.processes import running  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = (80, 90)
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _jit(kernel):
    """The kernel as a JITFunction (tests/conftest.py may have made it an interpreted function)."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def logprob_variants() -> list[tuple]:
    """(name, kernel, signature, constexprs, num_warps) of every row-kernel launch fused_logprobs can make."""
    out = []
    for kernel, backward in ((logprob._rows_forward_kernel, False), (logprob._rows_backward_kernel, True)):
        for dtype in logprob.ROW_DTYPES:
            # The dispatcher's tile in every dtype; the block_v= overrides (any power of two in range) in bf16:
            # the dtype changes only the loads and stores, the tile changes the register use.
            tiles = [logprob.DEFAULT_BLOCK_V]
            if dtype == torch.bfloat16:
                b = logprob.BLOCK_V_MIN
                while b <= logprob.BLOCK_V_MAX:
                    tiles += [b] if b != logprob.DEFAULT_BLOCK_V else []
                    b *= 2
            for block_v in tiles:
                for entropy in (False, True):
                    sig = {"x_ptr": PTR[dtype], "stride": "i32", "targets_ptr": "*i64"}
                    fp32_ptrs = (("lse_ptr", "mean_z_ptr", "g_ptr", "g_ent_ptr") if backward
                                 else ("logp_ptr", "lse_ptr", "mean_z_ptr"))
                    sig.update({p: "*fp32" for p in fp32_ptrs})
                    sig.update({"V": "i32", "inv_temp": "fp32", "BLOCK_V": "constexpr", "WITH_ENTROPY": "constexpr"})
                    name = f"{_jit(kernel).__name__}[{str(dtype)[6:]}, BLOCK_V={block_v}, entropy={entropy}]"
                    out.append((name, kernel, sig, {"BLOCK_V": block_v, "WITH_ENTROPY": entropy},
                                logprob.row_kernel_warps(block_v)))
    return out


def advantage_variants() -> list[tuple]:
    """(name, kernel, signature, constexprs, num_warps) of every launch group_advantages can make."""
    out, seen = [], set()
    for group_size in [2 ** k for k in range(1, advantage.MAX_TRITON_GROUP.bit_length())]:
        tile = advantage.advantage_tile(group_size)
        if tile in seen:
            continue
        seen.add(tile)
        sig = {"r_ptr": "*fp32", "out_ptr": "*fp32", "n_groups": "i32", "G": "i32", "eps": "fp32",
               "std_normalize": "i32", "var_denom": "fp32", "BLOCK_GROUPS": "constexpr", "BLOCK_G": "constexpr"}
        out.append((f"_group_advantages_kernel[BLOCK_GROUPS={tile[0]}, BLOCK_G={tile[1]}]",
                    advantage._group_advantages_kernel, sig, {"BLOCK_GROUPS": tile[0], "BLOCK_G": tile[1]}, tile[2]))
    return out


def aligned_attrs(fn, signature: dict) -> dict:
    """Triton's launch-time hints for 16-byte-aligned pointers and ints divisible by 16."""
    return {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, t in signature.items()
            if t.startswith("*") or t in ("i32", "i64")}


def cuobjdump_path(cc: int) -> str:
    """The wheel's cuobjdump (beside the ptxas triton runs for sm_<cc>)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        bin_dir = Path(get_ptxas(cc).path).parent
    except (ImportError, AttributeError, TypeError):  # another triton layout
        bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    path = os.environ.get("TRITON_CUOBJDUMP_PATH") or str(bin_dir / "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no cuobjdump at {path} (set TRITON_CUOBJDUMP_PATH)")
    return path


def resource_usage(cubin: bytes, cuobjdump: str) -> tuple[int, int, int]:
    """(registers, stack bytes, local-memory bytes) of the cubin triton built, as cuobjdump reads them.

    Spilled registers live in the stack frame; these kernels have no calls or local arrays, so any
    stack or local memory at all means a spill. (Read from the cubin, not from a second ptxas run:
    triton passes ptxas options of its own, and they change the register allocation.)
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([cuobjdump, "--dump-resource-usage", str(path)], capture_output=True, text=True,
                              timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", proc.stdout)
    assert usage, f"cannot read cuobjdump's resource usage:\n{proc.stdout}"
    return int(usage.group(1)), int(usage.group(2)), int(usage.group(3))


def compile_one(variant: tuple, cc: int, hinted: bool, cuobjdump: str) -> str:
    """Compile one variant for sm_<cc>; returns '' when it is fine, else what is wrong."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, kernel, sig, constexprs, warps = variant
    fn = _jit(kernel)
    label = f"{name} sm_{cc}{' aligned' if hinted else ''}"
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned_attrs(fn, sig) if hinted else None)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})
        regs, stack, local = resource_usage(compiled.asm["cubin"], cuobjdump)
    except Exception as exc:  # a compile error is this variant's failure; the others still compile
        return f"{label}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
    if stack or local:
        return f"{label}: spills ({regs} registers, {stack} bytes of stack, {local} bytes of local memory)"
    return ""


def compile_all(cc: int) -> list[str]:
    """Compile every variant for sm_<cc>, each without and with the alignment hints; the problems found."""
    cuobjdump = cuobjdump_path(cc)
    jobs = [(v, hinted) for v in logprob_variants() + advantage_variants() for hinted in (False, True)]
    # A thread pool overlaps one compile's ptxas run (a subprocess) with another's Python front end.
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        problems = [p for p in pool.map(lambda j: compile_one(j[0], cc, j[1], cuobjdump), jobs) if p]
    return [f"{len(jobs)} variants"] + problems


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[str]]:
    """One process per target, run side by side: compiling needs triton's real front end, and tests/conftest.py
    puts this process in the interpreter (TRITON_INTERPRET=1) when there is no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = {}
    with contextlib.ExitStack() as stack:  # a failed target must not leave the other compiling
        procs = {cc: stack.enter_context(running([sys.executable, __file__, str(cc)], cwd=ROOT, env=env, text=True,
                                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for cc in TARGETS}
        for cc, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=900)
            assert proc.returncode == 0, f"compiling for sm_{cc} crashed:\n{stderr[-3000:]}"
            out[cc] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("cc", TARGETS, ids=[f"sm_{cc}" for cc in TARGETS])
def test_every_kernel_variant_compiles_without_spills(compiled, cc):
    count, *problems = compiled[cc]
    assert not problems, f"{len(problems)} of {count} failed:\n" + "\n".join(problems)


def test_variant_lists_follow_the_dispatchers():
    # The launch code picks exactly these: fused_logprobs' default tile and its warps, the advantage tiles.
    assert logprob.DEFAULT_BLOCK_V == 2048 and logprob.row_kernel_warps(2048) == 8
    assert [logprob.row_kernel_warps(b) for b in (16, 1024, 4096)] == [4, 4, 16]  # <= 8 elements per thread
    assert len(logprob_variants()) == 2 * 2 * (3 + 8)  # kernels x entropy x (3 dtypes + 8 other bf16 tiles)
    assert {v[3]["BLOCK_V"] for v in logprob_variants()} == {2 ** k for k in range(4, 13)}
    assert advantage.advantage_tile(2) == (128, 16, 8) and advantage.advantage_tile(8) == (128, 16, 8)
    assert advantage.advantage_tile(17) == (64, 32, 8) and advantage.advantage_tile(3000) == (1, 4096, 16)
    assert [v[3] for v in advantage_variants()] == [
        {"BLOCK_GROUPS": 2048 // g if g <= 2048 else 1, "BLOCK_G": g} for g in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)]
    with pytest.raises(ValueError, match=r"power of two in \[16, 4096\]"):
        logprob.fused_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), block_v=8192)


if __name__ == "__main__":  # the worker of the `compiled` fixture: python tests/test_aot_compile.py CC
    print(json.dumps(compile_all(int(sys.argv[1]))))
