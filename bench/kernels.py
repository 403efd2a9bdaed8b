"""Benchmark fused token log-probs (forward + backward) against the naive path and Liger-Kernel on one CUDA GPU.

    python bench/kernels.py            # H in {896, 2048} x N in {4096, 16384, 32768}, V = 151936, bf16
    python bench/kernels.py --quick    # H = 896, N = 4096 only, shorter timing

Every method computes loss = -sum(logp) over N rows and backpropagates into
hidden [N, H] and weight [V, H], so Liger's summed cross-entropy does the same
work as ours and the naive `(h @ W.T).float().log_softmax(-1).gather(...)`.
Time: median of triton.testing.do_bench. Memory: torch.cuda.max_memory_allocated
during one forward + backward, inputs and grads included (the inputs alone are
printed per shape). Floor: 6*N*H*V FLOPs (forward GEMM + the two backward GEMMs,
the least any exact method does) at the bf16 GEMM rate measured in this run;
ours does 8*N*H*V because it recomputes the logits in backward. The run starts
with a correctness check of ours against naive and an fp32 reference on a
smaller shape. Needs a CUDA GPU: exits 2 without one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The repository root replaces this script's folder on sys.path: no file here may shadow an installed package.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nano_gtalign.kernels.logprob import fused_logprobs  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fwd+bwd time and peak memory of token log-probs over a large vocabulary")
    p.add_argument("--quick", action="store_true", help="H = 896, N = 4096 only, shorter timing")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden sizes (default 896 2048)")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="token counts N (default 4096 16384 32768)")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (Qwen2/3)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--rep-ms", type=float, default=None, help="do_bench time budget per cell (default 2000, quick 500)")
    p.add_argument("--check-rows", type=int, default=2048, help="rows of the correctness check (H = first --hidden)")
    p.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel even when it imports")
    p.add_argument("--torch-backend", action="store_true", help="also time our torch backend on the GPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.hidden is None:
        args.hidden = [896] if args.quick else [896, 2048]
    if args.rows is None:
        args.rows = [4096] if args.quick else [4096, 16384, 32768]
    if args.rep_ms is None:
        args.rep_ms = 500.0 if args.quick else 2000.0
    for name in ("hidden", "rows"):
        if any(v < 1 for v in getattr(args, name)):
            p.error(f"--{name} values must be positive")
    if args.vocab < 2 or args.check_rows < 1:
        p.error("--vocab must be >= 2 and --check-rows >= 1")
    return args


def naive_logprobs(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (h @ w.T).float().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)


def load_liger():
    """(loss module factory, version or reason it is unavailable)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as exc:  # not installed, or installed against another torch/triton
        return None, f"unavailable ({type(exc).__name__}: {exc})"
    try:
        from importlib.metadata import version

        ver = version("liger-kernel")
    except Exception:
        ver = "unknown version"
    return LigerFusedLinearCrossEntropyLoss, ver


def make_step(method: str, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, liger_cls=None):
    """A closure doing one forward + backward of loss = -sum(logp)."""
    if method == "naive":
        def step():
            (-naive_logprobs(h, w, y).sum()).backward()
    elif method in ("ours", "ours-torch"):
        backend = "triton" if method == "ours" else "torch"

        def step():
            (-fused_logprobs(h, w, y, backend=backend).sum()).backward()
    elif method == "liger":
        ce = liger_cls(reduction="sum")

        def step():
            out = ce(w, h, y)  # Liger's argument order: (lin_weight, _input, target)
            loss = out[0] if isinstance(out, (tuple, list)) else out
            loss.backward()
    else:
        raise ValueError(f"unknown method {method!r}")
    return step


def floor_ms(n: int, h: int, v: int, tflops: float) -> float:
    """6*N*H*V FLOPs (three GEMMs: logits, dh, dW) at `tflops` TFLOP/s, in milliseconds."""
    return 6.0 * n * h * v / (tflops * 1e12) * 1e3


def median_ms(do_bench, fn, warmup: float, rep: float, grad_to_none=None) -> float:
    """Median of triton.testing.do_bench (older triton: the 0.5 quantile)."""
    try:
        return float(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))
    except (TypeError, AssertionError, ValueError):  # a do_bench without return_mode="median"
        out = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=[0.5])
        return float(out[0] if isinstance(out, (tuple, list)) else out)


def measure(step, params: list[torch.Tensor], rep_ms: float, do_bench) -> tuple[float, float]:
    """(median ms, peak GiB) of one forward + backward; raises torch.cuda.OutOfMemoryError."""
    for p in params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    step()  # also the warm-up: Triton compiles here
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / GIB
    for p in params:
        p.grad = None
    ms = median_ms(do_bench, step, warmup=max(25.0, rep_ms / 10), rep=rep_ms, grad_to_none=params)
    for p in params:
        p.grad = None
    return ms, peak


def matmul_tflops(dtype: torch.dtype, do_bench, n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = median_ms(do_bench, lambda: torch.mm(a, b), warmup=50, rep=500)
    del a, b
    return 2.0 * n**3 / (ms * 1e-3) / 1e12


def correctness_check(n: int, hdim: int, v: int, dtype: torch.dtype, seed: int) -> list[str]:
    """Max |difference| of logp, entropy, dh, dW: ours vs naive, and each vs an fp32 reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    h0 = torch.randn(n, hdim, device="cuda", generator=gen).to(dtype)
    w0 = (0.02 * torch.randn(v, hdim, device="cuda", generator=gen)).to(dtype)
    y = torch.randint(0, v, (n,), device="cuda", generator=gen)
    g = torch.randn(n, device="cuda", generator=gen)
    g[::4] = 0.0  # masked tokens: exercise the skipped rows

    def run(fn, cast):
        h = h0.detach().to(cast).requires_grad_()
        w = w0.detach().to(cast).requires_grad_()
        logp, ent = fn(h, w)
        ((logp * g).sum() + (ent * g).sum()).backward()
        return logp.detach().float(), ent.detach().float(), h.grad.float(), w.grad.float()

    def naive_both(h, w):
        lp = (h @ w.T).float().log_softmax(-1)
        return lp.gather(-1, y[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)

    results = {
        "naive": run(naive_both, dtype),
        "ours": run(lambda h, w: fused_logprobs(h, w, y, return_entropy=True, backend="triton"), dtype),
        "ours-torch": run(lambda h, w: fused_logprobs(h, w, y, return_entropy=True, backend="torch"), dtype),
    }
    ref = run(naive_both, torch.float32)
    torch.cuda.empty_cache()
    names = ("logp", "entropy", "dh", "dW")
    lines = [f"correctness (N={n}, H={hdim}, V={v}, {dtype}; loss = sum(g*logp) + sum(g*entropy), 1/4 of g zero): "
             "max |difference|"]
    lines.append(f"  {'pair':<22}" + "".join(f"{k:>12}" for k in names))
    pairs = [("ours", "naive", results["ours"], results["naive"]),
             ("ours-torch", "ours", results["ours-torch"], results["ours"])]
    pairs += [(k, "fp32 ref", results[k], ref) for k in ("naive", "ours", "ours-torch")]
    for a, b, ra, rb in pairs:
        diffs = [(x - y_).abs().max().item() for x, y_ in zip(ra, rb)]
        lines.append(f"  {a + ' vs ' + b:<22}" + "".join(f"{d:>12.3e}" for d in diffs))
    lines.append(f"  {'scale: max |fp32 ref|':<22}" + "".join(f"{t.abs().max().item():>12.3e}" for t in ref))
    return lines


def format_row(method: str, hdim: int, n: int, ms: float | None, peak: float | None, floor: float, note: str = "") -> str:
    if ms is None:
        return f"| {method:<10} | {hdim:>5} | {n:>6} | {note or 'OOM':>11} | {'-':>8} | {'-':>8} | {'-':>9} |"
    return (f"| {method:<10} | {hdim:>5} | {n:>6} | {ms:>11.2f} | {peak:>8.2f} | {floor:>8.2f} | "
            f"{ms / floor:>8.2f}x |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import triton
    from triton.testing import do_bench

    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    liger_cls, liger_info = (None, "skipped (--no-liger)") if args.no_liger else load_liger()
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} "
          f"| liger-kernel {liger_info}")
    print(f"config: hidden={args.hidden} rows={args.rows} vocab={args.vocab} dtype={args.dtype} "
          f"rep_ms={args.rep_ms} check_rows={args.check_rows} seed={args.seed}")

    for line in correctness_check(args.check_rows, args.hidden[0], args.vocab, dtype, args.seed):
        print(line)

    rate = matmul_tflops(dtype, do_bench)
    print(f"measured {args.dtype} GEMM rate (8192^3 torch.mm, median): {rate:.1f} TFLOP/s")
    print("floor = 6*N*H*V FLOPs / that rate (forward GEMM + dh and dW GEMMs); ours does 8*N*H*V (recomputes logits)")
    print("peak = torch.cuda.max_memory_allocated over one forward+backward, inputs and grads included")
    print()

    methods = ["naive", "ours"] + (["ours-torch"] if args.torch_backend else []) + (["liger"] if liger_cls else [])
    print(f"| {'method':<10} | {'H':>5} | {'N':>6} | {'fwd+bwd ms':>11} | {'peak GiB':>8} | {'floor ms':>8} | "
          f"{'vs floor':>9} |")
    print(f"|{'-' * 12}|{'-' * 7}|{'-' * 8}|{'-' * 13}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    summary = []
    for hdim in args.hidden:
        w = (0.02 * torch.randn(args.vocab, hdim, device="cuda")).to(dtype).requires_grad_()
        for n in args.rows:
            h = torch.randn(n, hdim, device="cuda").to(dtype).requires_grad_()
            y = torch.randint(0, args.vocab, (n,), device="cuda")
            floor = floor_ms(n, hdim, args.vocab, rate)
            cells = {}
            for method in methods:
                try:
                    ms, peak = measure(make_step(method, h, w, y, liger_cls), [h, w], args.rep_ms, do_bench)
                    cells[method] = (ms, peak)
                    print(format_row(method, hdim, n, ms, peak, floor), flush=True)
                except torch.cuda.OutOfMemoryError:
                    cells[method] = None
                    print(format_row(method, hdim, n, None, None, floor, "OOM"), flush=True)
                except Exception as exc:  # e.g. a Liger version with another API: report, keep going
                    cells[method] = None
                    print(format_row(method, hdim, n, None, None, floor, "error"), flush=True)
                    print(f"    {method} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                h.grad = None
                w.grad = None
                torch.cuda.empty_cache()
            summary.append(summary_line(hdim, n, cells, (h.numel() + w.numel()) * h.element_size() / GIB))
            del h, y
        del w
        torch.cuda.empty_cache()
    print()
    for line in summary:
        print(line)
    return 0


def summary_line(hdim: int, n: int, cells: dict, inputs_gib: float) -> str:
    """Ours relative to the others at one shape: time and peak-memory ratios."""
    parts = [f"H={hdim} N={n} (inputs {inputs_gib:.2f} GiB): ours"]
    ours = cells.get("ours")
    if ours is None:
        return " ".join(parts + ["failed"])
    for other in ("naive", "liger"):
        if other not in cells:
            continue
        if cells[other] is None:
            parts.append(f"| {other} failed/OOM")
        else:
            parts.append(f"| time {ours[0] / cells[other][0]:.2f}x {other}, memory {ours[1] / cells[other][1]:.2f}x {other}")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
