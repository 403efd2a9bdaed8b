"""fused_logprobs (both backends) against a float64 naive reference (docs/logprobs.md).

The torch backend runs on the CPU. The Triton backend runs compiled on CUDA tensors when there is a
GPU, and in Triton's interpreter on CPU tensors otherwise (tests/conftest.py); results are compared
on the CPU either way.
"""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nano_gtalign.kernels.logprob import default_chunk_rows, fused_logprobs, resolve_backend, triton

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(triton is None, reason="triton not installed"))]
# Where the Triton backend runs: compiled on the GPU, or interpreted on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"
# V not a power of two; 70 rows in chunks of 32 (three chunks, the last partial);
# 1024-wide vocabulary tiles (five, the last partial).
N, H, V, TAU = 70, 48, 5003, 0.7
SMALL = dict(chunk_rows=32, block_v=1024)


def make_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=gen).to(dtype)
    w = (0.3 * torch.randn(V, H, generator=gen)).to(dtype)
    y = torch.randint(0, V, (N,), generator=gen)
    y[0], y[1] = 0, V - 1  # both ends of the vocabulary
    g = torch.randn(N, generator=gen)
    g[::4] = 0.0  # masked tokens
    g_ent = torch.randn(N, generator=gen)
    g_ent[::4] = 0.0
    g_ent[2::8] = 0.0  # rows with a logp gradient but none through the entropy
    return h, w, y, g, g_ent


def reference(h, w, y, tau, g, g_ent=None, logits=None):
    """float64 naive path: (h·Wᵀ)/τ, log_softmax, gather; entropy; grads by autograd."""
    hd = h.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    x = hd @ wd.T if logits is None else logits.double()
    lp = (x / tau).log_softmax(-1)
    logp = lp.gather(1, y[:, None]).squeeze(1)
    ent = -(lp.exp() * lp).sum(-1)
    loss = (logp * g.double()).sum()
    if g_ent is not None:
        loss = loss + (ent * g_ent.double()).sum()
    if logits is None:
        loss.backward()
    return logp.detach(), ent.detach(), hd.grad, wd.grad


def ours(h, w, y, tau, g, g_ent=None, backend="torch", **kw):
    """fused_logprobs forward + backward on the backend's device; everything returned on the CPU."""
    dev = device_of(backend)
    hh = h.detach().to(dev).requires_grad_()
    ww = w.detach().to(dev).requires_grad_()
    y, g = y.to(dev), g.to(dev)
    g_ent = None if g_ent is None else g_ent.to(dev)
    out = fused_logprobs(hh, ww, y, tau, return_entropy=g_ent is not None, backend=backend, **kw)
    logp, ent = out if g_ent is not None else (out, None)
    loss = (logp * g).sum() + ((ent * g_ent).sum() if g_ent is not None else 0.0)
    loss.backward()
    return logp.detach().cpu(), (ent.detach().cpu() if ent is not None else None), hh.grad.cpu(), ww.grad.cpu()


def chunk_logits(h, w, backend, chunk_rows):
    """h·Wᵀ exactly as the kernel's GEMMs round it: same device, same chunks (cuBLAS may pick another
    algorithm, and so another bf16 rounding, for another number of rows)."""
    dev = device_of(backend)
    hd, wd = h.to(dev), w.to(dev)
    return torch.cat([hd[s:s + chunk_rows] @ wd.T for s in range(0, h.shape[0], chunk_rows)]).cpu()


def rel(a, b):
    """max |a − b| relative to max |b| (grads have entries near zero, so not elementwise)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_float64_reference(backend):
    h, w, y, g, _ = make_inputs(torch.float32)
    logp, ent, dh, dw = ours(h, w, y, TAU, g, backend=backend, **SMALL)
    r_logp, _, r_dh, r_dw = reference(h, w, y, TAU, g)
    assert logp.dtype == torch.float32 and logp.shape == (N,) and ent is None
    assert rel(logp, r_logp) <= 1e-5
    assert rel(dh, r_dh) <= 1e-5
    assert rel(dw, r_dw) <= 1e-5
    # the two ends of the vocabulary, row by row
    assert torch.allclose(logp[:2].double(), r_logp[:2], rtol=1e-6, atol=1e-5)
    assert torch.equal(dh[g == 0], torch.zeros_like(dh[g == 0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_and_its_gradient_fp32(backend):
    h, w, y, g, g_ent = make_inputs(torch.float32, seed=1)
    logp, ent, dh, dw = ours(h, w, y, TAU, g, g_ent, backend=backend, **SMALL)
    r_logp, r_ent, r_dh, r_dw = reference(h, w, y, TAU, g, g_ent)
    assert ent.dtype == torch.float32
    assert rel(logp, r_logp) <= 1e-5
    assert rel(ent, r_ent) <= 1e-5
    assert rel(dh, r_dh) <= 1e-5
    assert rel(dw, r_dw) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_forward_exact_on_its_logits_and_close_to_float64(backend):
    h, w, y, g, g_ent = make_inputs(torch.bfloat16, seed=2)
    logp, ent, dh, dw = ours(h, w, y, TAU, g, g_ent, backend=backend, **SMALL)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16 and logp.dtype == torch.float32
    # After the bf16 GEMM (the naive path rounds its logits the same way) everything is fp32:
    # against float64 maths on those very logits the forward is fp32-exact.
    b_logp, b_ent, _, _ = reference(h, w, y, TAU, g, g_ent, logits=chunk_logits(h, w, backend, SMALL["chunk_rows"]))
    assert rel(logp, b_logp) <= 1e-5
    assert rel(ent, b_ent) <= 1e-5
    # Against exact float64 maths on the bf16 inputs: bf16 logit rounding (2^-9 relative,
    # logits up to ~15 here) bounds the forward; grads also round dz and the GEMM outputs to bf16.
    r_logp, r_ent, r_dh, r_dw = reference(h, w, y, TAU, g, g_ent)
    assert rel(logp, r_logp) <= 5e-3
    assert rel(ent, r_ent) <= 2e-2
    assert rel(dh, r_dh) <= 3e-2
    assert rel(dw, r_dw) <= 3e-2


@pytest.mark.filterwarnings("ignore:.*(NaN|invalid value).*:RuntimeWarning")  # the nan rows, in the interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_rows_contribute_exactly_nothing(backend):
    h, w, y, g, _ = make_inputs(torch.float32, seed=3)
    active = g != 0
    h = h.clone()
    h[~active] = float("nan")  # were these rows touched in backward, the grads would be nan
    _, _, dh, dw = ours(h, w, y, TAU, g, backend=backend, **SMALL)
    # the same computation on only the active rows: identical bits
    _, _, dh_a, dw_a = ours(h[active], w, y[active], TAU, g[active], backend=backend, **SMALL)
    assert torch.equal(dw, dw_a)
    assert torch.equal(dh[active], dh_a)
    assert torch.equal(dh[~active], torch.zeros_like(dh[~active]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_upstream_gradient(backend):
    # logp.sum().backward() hands the function a stride-0 gradient
    h, w, y, _, _ = make_inputs(torch.float32, seed=4)
    dev = device_of(backend)
    hh = h.to(dev).requires_grad_()
    fused_logprobs(hh, w.to(dev), y.to(dev), TAU, backend=backend, **SMALL).sum().backward()
    _, _, r_dh, _ = reference(h, w, y, TAU, torch.ones(N))
    assert rel(hh.grad.cpu(), r_dh) <= 1e-5


def test_gradcheck_torch_float64():
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 10, 3, 3, 7, 1])
    fn = lambda h_, w_: fused_logprobs(h_, w_, y, 0.8, return_entropy=True, backend="torch", chunk_rows=4)
    assert torch.autograd.gradcheck(fn, (h, w))


def test_hand_computed_two_token_vocabulary():
    # H = 1, W = [[1], [0]], h = ln 3: logits (ln 3, 0) -> p = (3/4, 1/4)
    h = torch.tensor([[math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    logp, ent = fused_logprobs(h, w, torch.tensor([1]), return_entropy=True, backend="torch")
    assert logp.item() == pytest.approx(math.log(0.25), abs=1e-12)
    assert ent.item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-12)
    logp.sum().backward()  # d logp_1 / dh = W_1 − Σ p W = 0 − 3/4
    assert h.grad.item() == pytest.approx(-0.75, abs=1e-12)


def test_tied_weight_receives_both_gradients():
    # a tied head: W is also the embedding that produced the hidden states
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(37, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 37, (9,), generator=gen)
    y = torch.randint(0, 37, (9,), generator=gen)
    fused_logprobs(torch.tanh(w[ids]), w, y, 1.3, backend="torch", chunk_rows=4).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    (torch.tanh(w2[ids]) @ w2.T / 1.3).log_softmax(-1).gather(1, y[:, None]).sum().backward()
    assert torch.allclose(w.grad, w2.grad, rtol=1e-10, atol=1e-12)


def test_no_grad_frozen_hidden_and_empty_input():
    h, w, y, g, _ = make_inputs(torch.float32, seed=7)
    with_grad = fused_logprobs(h, w, y, TAU, backend="torch")
    with torch.no_grad():
        assert torch.equal(fused_logprobs(h, w, y, TAU, backend="torch"), with_grad)
    ww = w.clone().requires_grad_()  # frozen hidden: only dW
    (fused_logprobs(h, ww, y, TAU, backend="torch", chunk_rows=32) * g).sum().backward()
    assert rel(ww.grad, reference(h, w, y, TAU, g)[3]) <= 1e-5
    he = torch.zeros(0, H, requires_grad=True)
    out = fused_logprobs(he, ww, torch.zeros(0, dtype=torch.long), backend="torch")
    assert out.shape == (0,)
    out.sum().backward()
    assert he.grad.shape == (0, H)


def test_default_chunk_rows_from_shapes():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    qwen = 151936
    # CUDA: max(4096, 2H) rows of bf16 logits
    assert default_chunk_rows(16384, qwen, 2048, torch.bfloat16, cuda) == 4096
    assert default_chunk_rows(16384, qwen, 896, torch.bfloat16, cuda) == 4096
    assert default_chunk_rows(16384, qwen, 4096, torch.bfloat16, cuda) == 8192
    assert default_chunk_rows(16384, qwen, 2048, torch.float32, cuda) == 2048  # same bytes
    assert default_chunk_rows(4097, qwen, 2048, torch.bfloat16, cuda) == 2049  # two balanced chunks
    assert default_chunk_rows(100, qwen, 2048, torch.bfloat16, cuda) == 100
    # CPU: a 256 MiB chunk; 2^28 // (151936·4) = 441 rows, so 1000 rows -> 3 chunks of 334
    assert default_chunk_rows(1000, qwen, 896, torch.float32, cpu) == 334
    assert default_chunk_rows(1000, 300, 64, torch.float32, cpu) == 1000


def test_backend_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("NANO_GTALIGN_LOGPROB_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cuda) == "torch"
    if triton is not None:
        assert resolve_backend("auto", cuda) == "triton"
        monkeypatch.setenv("NANO_GTALIGN_LOGPROB_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # (tests/conftest.py sets it only when there is no GPU)
        assert resolve_backend("auto", cpu) == "triton"
        assert resolve_backend("torch", cpu) == "torch"  # an explicit argument beats the variable
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            resolve_backend("triton", cpu)
    monkeypatch.setenv("NANO_GTALIGN_LOGPROB_BACKEND", "cuda")
    with pytest.raises(ValueError, match="NANO_GTALIGN_LOGPROB_BACKEND"):
        resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast", cpu)


@pytest.mark.parametrize("case, match", [
    ("hidden_1d", r"\[N, H\]"), ("h_mismatch", "hidden size mismatch"), ("targets_shape", "targets must be"),
    ("target_high", r"\[0, 7\)"), ("target_negative", r"\[0, 7\)"), ("dtype_mix", "same dtype"),
    ("float_targets", "integer"), ("temperature", "temperature"), ("int_hidden", "float dtype"),
    ("triton_fp64", "float64"),
])
def test_bad_inputs_name_the_problem(case, match):
    h, w, y = torch.randn(3, 4), torch.randn(7, 4), torch.tensor([0, 6, 2])
    args = dict(hidden=h, weight=w, targets=y)
    kw = {}
    if case == "hidden_1d":
        args["hidden"] = h[0]
    elif case == "h_mismatch":
        args["weight"] = torch.randn(7, 5)
    elif case == "targets_shape":
        args["targets"] = y[:2]
    elif case == "target_high":
        args["targets"] = torch.tensor([0, 7, 2])
    elif case == "target_negative":
        args["targets"] = torch.tensor([0, -1, 2])
    elif case == "dtype_mix":
        args["weight"] = w.double()
    elif case == "float_targets":
        args["targets"] = y.float()
    elif case == "temperature":
        kw["temperature"] = 0.0
    elif case == "int_hidden":
        args["hidden"], args["weight"] = h.long(), w.long()
    elif case == "triton_fp64":
        if triton is None:
            pytest.skip("triton not installed")
        args["hidden"], args["weight"] = h.double(), w.double()
        kw["backend"] = "triton"
    with pytest.raises(ValueError, match=match):
        fused_logprobs(**args, **kw)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernels.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_arguments_and_floor():
    bench = _load_bench()
    a = bench.parse_args([])
    assert (a.hidden, a.rows, a.vocab, a.dtype) == ([896, 2048], [4096, 16384, 32768], 151936, "bf16")
    q = bench.parse_args(["--quick"])
    assert (q.hidden, q.rows, q.rep_ms) == ([896], [4096], 500.0)
    assert bench.parse_args(["--quick", "--rows", "8"]).rows == [8]
    # 6·N·H·V = 6·4096·896·151936 = 3.34565e12 FLOPs; at 500 TFLOP/s that is 6.6913 ms
    assert bench.floor_ms(4096, 896, 151936, 500.0) == pytest.approx(6.0 * 4096 * 896 * 151936 / 5e14 * 1e3)
    assert bench.floor_ms(4096, 896, 151936, 500.0) == pytest.approx(6.6913, abs=1e-4)
    line = bench.summary_line(896, 4096, {"naive": (10.0, 8.0), "ours": (5.0, 2.0)}, 0.3)
    assert "time 0.50x naive, memory 0.25x naive" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit")
def test_bench_script_exits_2_without_gpu():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels.py"), "--quick"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr


def test_package_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch; from nano_gtalign import kernels; "
            "h = torch.randn(3, 4, requires_grad=True); w = torch.randn(5, 4); "
            "kernels.fused_logprobs(h, w, torch.tensor([0, 4, 2])).sum().backward(); "
            "print(kernels.group_advantages(torch.tensor([1.0, 0.0]), 2).tolist())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    # [1, 0]: mean 1/2, deviations ±1/2, unbiased std sqrt(1/2)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert [float(x) for x in proc.stdout.strip(" []\n").split(",")] == pytest.approx([a, -a], rel=1e-6)


def test_autocast_runs_the_head_in_its_dtype():
    h, w, y, g, _ = make_inputs(torch.float32, seed=8)
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = fused_logprobs(hh, ww, y, TAU, backend="torch", chunk_rows=32)
    (logp * g).sum().backward()
    assert logp.dtype == torch.float32 and ww.grad.dtype == torch.float32  # grads reach the fp32 weights
    hb, wb = h.bfloat16(), w.bfloat16()
    assert rel(logp, reference(hb, wb, y, TAU, g, logits=hb @ wb.T)[0]) <= 1e-5  # the bf16 GEMM's logits
