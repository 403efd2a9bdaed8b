"""Fused token log-probabilities: log softmax(W·h/τ)[y] (and entropy) without N×V logits (docs/logprobs.md).

    logp, ent = fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True)

The naive `(h @ W.T).float().div(τ).log_softmax(-1).gather(-1, y)` holds N×V fp32
logits (plus their copies for backward): about 10 GB per 16k tokens at Qwen's
V = 151,936. Here the rows are processed in chunks: one chunk of C×V logits
exists at a time, the forward keeps only the log-sum-exp per row, and the
backward recomputes each chunk's logits.

Per chunk the work is split the way the hardware likes it:
  * the three matrix products (logits = h·Wᵀ, dh = dz·W, dW += dzᵀ·h) are
    plain torch GEMMs (cuBLAS on GPU: fp32 accumulation, full tensor-core
    rate on any card, no per-GPU tuning);
  * the row-wise part is one pass over the chunk's logits in fp32: an online
    log-sum-exp over vocabulary tiles (running max, running sum, running Σe·z
    for the entropy) in the forward, and dz = g·(onehot(y) − softmax(z))/τ
    (+ the entropy term) written over the logits in place in the backward.
    Backend "triton" runs this pass as a Triton kernel (one program per row,
    int64 offsets, loop over 2048-wide vocabulary tiles); backend "torch" runs the same maths
    as torch ops (the CPU path and the test oracle).

Precision: the logits of a chunk come out of the GEMM in the input dtype (for
bf16, one rounding of an fp32-accumulated dot product, exactly as the naive
reference does); everything after that (max, exp, sums, lse, entropy, dz) is
fp32, or fp64 for fp64 inputs. dW is accumulated over chunks in an fp32 [V, H]
buffer; dh comes from one GEMM per chunk (fp32 accumulation inside it).

Memory bound, beyond the inputs and the returned grads:
  forward  one C×V buffer in the input dtype (backend "torch": plus two
           C×V fp32 work buffers), plus lse (and Σp·z) for N rows in fp32;
  backward the same chunk buffer, a copy of the active rows of hidden when
           some rows are skipped, and for dW, when there is more than one
           chunk and the weight is not fp32, an fp32 [V, H] accumulator and a
           [V, H] per-chunk product in the input dtype.
  Example, N = 16384, H = 2048, V = 151,936, bf16: C = 4096, chunk 1.16 GiB,
  dW accumulator 1.16 GiB + 0.58 GiB; the naive path's fp32 logits alone are 9.3 GiB.
C (rows per chunk) comes from the shapes: on CUDA the chunk holds
max(4096, 2H) rows' worth of bf16 logits (large GEMMs, and the O(V·H) dW
update amortised over many rows); on CPU a 256 MiB buffer. Chunks are balanced
so the last one is not a sliver.

Rows whose upstream gradient (and entropy gradient) is zero, e.g. prompt and
padding tokens in GRPO, are dropped before the backward: they cost no GEMM
work and contribute exactly nothing.

The gradient through the entropy is propagated:
dH/dz_k = p_k·(μ − z_k), μ = Σ_j p_j·z_j = lse − H.

Backend choice: argument `backend` ("auto" | "triton" | "torch"); with "auto",
the environment variable NANO_GTALIGN_LOGPROB_BACKEND (same values) decides,
else Triton for CUDA tensors when triton imports, else torch. The Triton backend
also runs on CPU tensors under TRITON_INTERPRET=1 (the tests do this).
"""
from __future__ import annotations

import os

import torch

try:  # triton is optional: the library must import on machines without it
    import triton
    import triton.language as tl

    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # ImportError, or a broken install raising something else
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "NANO_GTALIGN_LOGPROB_BACKEND"


def resolve_backend(backend: str, device: torch.device, env_var: str | None = BACKEND_ENV) -> str:
    """Turn "auto"|"triton"|"torch" (and the environment override) into "triton" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
    if backend == "auto" and env_var is not None:
        forced = os.environ.get(env_var, "").strip().lower()
        if forced:
            if forced not in BACKENDS:
                raise ValueError(f"{env_var}={forced!r}: expected one of {BACKENDS}")
            backend = forced
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError(f"backend 'triton' was asked for but triton does not import ({_TRITON_IMPORT_ERROR})")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                f"backend 'triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 before importing kernels to run it in Triton's interpreter"
            )
    return backend


def default_chunk_rows(n_rows: int, vocab: int, hidden: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows of logits held at once (see the module docstring for the memory bound)."""
    elem = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        # Thousands of rows keep the GEMMs at full rate and amortise the O(V·H) dW update;
        # sized in bf16 bytes so fp32 inputs get half the rows, not twice the memory.
        budget = max(4096, 2 * hidden) * vocab * 2
    else:
        budget = 256 * 2**20
    rows = max(16, budget // (vocab * elem))
    n_chunks = max(1, -(-n_rows // rows))
    return max(1, -(-n_rows // n_chunks))


# The row kernels' launch variants (tests/test_aot_compile.py compiles every one for sm_80 and sm_90):
# x in bf16 / fp16 / fp32, entropy on or off, and the vocabulary tile BLOCK_V. The dispatcher always
# picks DEFAULT_BLOCK_V (a small vocabulary is one masked tile); block_v= may ask for any power of two
# in [BLOCK_V_MIN, BLOCK_V_MAX]. The warps grow with the tile so that each thread holds at most 8
# elements of it: the backward kernel at 16 per thread (4096 over 8 warps) spilled registers on sm_90
# with triton 3.6's ptxas.
ROW_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_BLOCK_V, BLOCK_V_MIN, BLOCK_V_MAX = 2048, 16, 4096


def row_kernel_warps(block_v: int) -> int:
    """num_warps the row kernels launch with for a vocabulary tile of block_v (4 to 16)."""
    return min(16, max(4, block_v // 256))


# ----------------------------------------------------------------------------
# Row pass, torch backend. `buf` is a chunk of raw logits x = h·Wᵀ (scratch: may be overwritten).

def _rows_forward_torch(buf, targets, inv_temp: float, with_entropy: bool):
    acc = torch.float64 if buf.dtype == torch.float64 else torch.float32
    z = buf.to(acc)  # no copy for fp32/fp64: buf is scratch
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    # log_softmax is one fused pass on CPU; torch.logsumexp is several and ~5x slower
    log_p = torch.log_softmax(z, dim=-1)
    logp = log_p.gather(1, targets[:, None]).squeeze(1)
    lse = z.gather(1, targets[:, None]).squeeze(1) - logp
    mean_z = log_p.exp_().mul_(z).sum(-1) if with_entropy else None
    return logp, lse, mean_z


def _rows_backward_torch(buf, targets, lse, mean_z, g, g_ent, inv_temp: float):
    """dx = (g·(onehot(y) − p) + g_ent·p·(μ − z)) / τ, returned in the input dtype."""
    z = buf.to(lse.dtype)
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    p = torch.softmax(z, dim=-1)  # one fused pass; equals exp(z − lse) for the recomputed z
    if g_ent is not None:
        coef = z.neg_().add_(mean_z[:, None]).mul_(g_ent[:, None]).sub_(g[:, None])  # g_ent·(μ − z) − g
        dz = p.mul_(coef)
    else:
        dz = p.mul_(-g[:, None])
    dz.scatter_add_(1, targets[:, None], g[:, None])
    if inv_temp != 1.0:
        dz.mul_(inv_temp)
    return dz.to(buf.dtype)


# ----------------------------------------------------------------------------
# Row pass, Triton backend: one program per row, a loop over BLOCK_V-wide vocabulary tiles.

if triton is not None:

    @triton.jit
    def _rows_forward_kernel(x_ptr, stride, targets_ptr, logp_ptr, lse_ptr, mean_z_ptr, V, inv_temp,
                             BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row·stride overflows int32 at Qwen's V
        x_row = x_ptr + row * stride
        m = float("-inf")  # running max
        s = 0.0            # running Σ exp(z − m)
        t = 0.0            # running Σ exp(z − m)·z (entropy)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            z = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            s = s * scale + tl.sum(e, axis=0)
            if WITH_ENTROPY:
                # masked lanes have e = 0 but z = −inf; zero z there so 0·z is not nan
                t = t * scale + tl.sum(e * tl.where(valid, z, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(s)
        y = tl.load(targets_ptr + row)
        z_y = tl.load(x_row + y).to(tl.float32) * inv_temp
        tl.store(logp_ptr + row, z_y - lse)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            tl.store(mean_z_ptr + row, t / s)

    @triton.jit
    def _rows_backward_kernel(x_ptr, stride, targets_ptr, lse_ptr, mean_z_ptr, g_ptr, g_ent_ptr, V, inv_temp,
                              BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride
        y = tl.load(targets_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        if WITH_ENTROPY:
            mu = tl.load(mean_z_ptr + row)
            g_ent = tl.load(g_ent_ptr + row)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < V
            z = tl.load(x_row + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp
            p = tl.exp(z - lse)
            if WITH_ENTROPY:
                dz = p * (g_ent * (mu - z) - g)
            else:
                dz = -p * g
            dz = tl.where(cols == y, dz + g, dz) * inv_temp
            tl.store(x_row + cols, dz.to(x_ptr.dtype.element_ty), mask=valid)


def _rows_forward_triton(buf, targets, inv_temp: float, with_entropy: bool, block_v: int | None):
    n, vocab = buf.shape
    logp = torch.empty(n, dtype=torch.float32, device=buf.device)
    lse = torch.empty_like(logp)
    mean_z = torch.empty_like(logp) if with_entropy else lse  # dummy pointer when unused
    bv = block_v or DEFAULT_BLOCK_V
    _rows_forward_kernel[(n,)](buf, buf.stride(0), targets, logp, lse, mean_z, vocab, inv_temp,
                               BLOCK_V=bv, WITH_ENTROPY=with_entropy, num_warps=row_kernel_warps(bv))
    return logp, lse, (mean_z if with_entropy else None)


def _rows_backward_triton(buf, targets, lse, mean_z, g, g_ent, inv_temp: float, block_v: int | None):
    n, vocab = buf.shape
    with_entropy = g_ent is not None
    bv = block_v or DEFAULT_BLOCK_V
    _rows_backward_kernel[(n,)](buf, buf.stride(0), targets, lse, mean_z if with_entropy else lse, g,
                                g_ent if with_entropy else g, vocab, inv_temp,
                                BLOCK_V=bv, WITH_ENTROPY=with_entropy, num_warps=row_kernel_warps(bv))
    return buf


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype an active autocast region computes matrix products in on this device type, else None.

    The one place that reads autocast's state: fused_logprobs casts to it, and the sampler's KV cache
    and CPU weight packing (nano_gtalign) import it from here.
    """
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta) has no autocast region
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


# ----------------------------------------------------------------------------
# The autograd function: chunk loop and GEMMs, shared by both backends. Autocast is off
# inside: the dtypes were settled by fused_logprobs, and the out= buffers rely on them.

class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, backend, chunk_rows, block_v):
        with torch.autocast(hidden.device.type, enabled=False):
            return _FusedLogprobs._forward(ctx, hidden, weight, targets, temperature, with_entropy, backend,
                                           chunk_rows, block_v)

    @staticmethod
    def backward(ctx, *grads):
        with torch.autocast(ctx.device_type, enabled=False):
            return _FusedLogprobs._backward(ctx, *grads)

    @staticmethod
    def _forward(ctx, hidden, weight, targets, temperature, with_entropy, backend, chunk_rows, block_v):
        n = hidden.shape[0]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        inv_temp = 1.0 / temperature
        logp = torch.empty(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        mean_z = torch.empty(n, dtype=acc, device=hidden.device) if with_entropy else None
        chunk = chunk_rows or default_chunk_rows(n, weight.shape[0], weight.shape[1], weight.dtype, hidden.device)
        buf = torch.empty(min(chunk, n), weight.shape[0], dtype=weight.dtype, device=hidden.device)
        wt = weight.t()
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            x = torch.mm(hidden[s:e], wt, out=buf[: e - s])
            if backend == "triton":
                out = _rows_forward_triton(x, targets[s:e], inv_temp, with_entropy, block_v)
            else:
                out = _rows_forward_torch(x, targets[s:e], inv_temp, with_entropy)
            logp[s:e], lse[s:e] = out[0], out[1]
            if with_entropy:
                mean_z[s:e] = out[2]
        del buf
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.cfg = (inv_temp, with_entropy, backend, chunk, block_v)
        ctx.device_type = hidden.device.type
        if with_entropy:
            return logp, lse - mean_z
        return logp

    @staticmethod
    def _backward(ctx, *grads):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        inv_temp, with_entropy, backend, chunk, block_v = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, h_dim = hidden.shape
        vocab = weight.shape[0]
        # contiguous: the grad of logp.sum() arrives as a stride-0 expand, and the kernel reads g[row]
        g = grads[0].to(lse.dtype).contiguous()
        g_ent = grads[1].to(lse.dtype).contiguous() if with_entropy else None

        # Only rows with a nonzero upstream gradient do any work (GRPO masks prompts and padding).
        active = g != 0 if g_ent is None else (g != 0) | (g_ent != 0)
        idx = active.nonzero().squeeze(1)
        m = idx.numel()
        if m < n:
            h_a, y_a, lse_a, g_a = hidden[idx], targets[idx], lse[idx], g[idx]
            mu_a = mean_z[idx] if with_entropy else None
            ge_a = g_ent[idx] if with_entropy else None
        else:
            h_a, y_a, lse_a, mu_a, g_a, ge_a = hidden, targets, lse, mean_z, g, g_ent

        n_chunks = -(-m // chunk)
        # dW: one chunk is one GEMM (fp32 accumulation inside it); several chunks accumulate in an
        # fp32 buffer, through a per-chunk product when the weight is bf16/fp16.
        dw = None
        if need_w and n_chunks != 1:
            dw = torch.zeros(vocab, h_dim, dtype=lse.dtype, device=weight.device)
        separate_acc = dw is not None and n_chunks > 1 and weight.dtype != lse.dtype
        dh_a = torch.empty(m, h_dim, dtype=hidden.dtype, device=hidden.device) if need_h else None
        dw_part = torch.empty(vocab, h_dim, dtype=weight.dtype, device=weight.device) if separate_acc else None
        buf = torch.empty(min(chunk, max(m, 1)), vocab, dtype=weight.dtype, device=hidden.device)
        wt = weight.t()
        for s in range(0, m, chunk):
            e = min(m, s + chunk)
            x = torch.mm(h_a[s:e], wt, out=buf[: e - s])
            ge_c = ge_a[s:e] if with_entropy else None
            mu_c = mu_a[s:e] if with_entropy else None
            if backend == "triton":
                dz = _rows_backward_triton(x, y_a[s:e], lse_a[s:e], mu_c, g_a[s:e], ge_c, inv_temp, block_v)
            else:
                dz = _rows_backward_torch(x, y_a[s:e], lse_a[s:e], mu_c, g_a[s:e], ge_c, inv_temp)
            if need_h:
                torch.mm(dz, weight, out=dh_a[s:e])
            if need_w:
                if n_chunks == 1:
                    dw = torch.mm(dz.t(), h_a[s:e])
                elif separate_acc:
                    dw.add_(torch.mm(dz.t(), h_a[s:e], out=dw_part))
                else:  # fp32/fp64 weight: accumulate straight into the grad
                    dw.addmm_(dz.t(), h_a[s:e])
        del buf, dw_part

        dh = None
        if need_h:
            if m < n:
                dh = torch.zeros_like(hidden).index_copy_(0, idx, dh_a)
            else:
                dh = dh_a
        if dw is not None:
            dw = dw.to(weight.dtype)
        return dh, dw, None, None, None, None, None, None


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, return_entropy: bool = False, backend: str = "auto",
                   *, chunk_rows: int | None = None, block_v: int | None = None):
    """log softmax(hidden·weightᵀ / τ)[targets] per row, differentiable in hidden and weight.

    hidden [N, H], weight [V, H] (the same float dtype: fp16/bf16/fp32, or fp64 on the
    torch backend; inside an autocast region both are cast to its dtype, as `h @ W.T`
    would be), targets [N] integers in [0, V). Returns fp32 logp [N] (fp64 for
    fp64 inputs) and, with return_entropy, also the entropy [N] of softmax(z); both
    carry gradients. chunk_rows (rows of logits per chunk) and block_v (Triton
    vocabulary tile, a power of two in [16, 4096]) override the defaults.
    """
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden is {tuple(hidden.shape)}, weight is {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}]; got {tuple(targets.shape)}")
    amp = autocast_dtype(hidden.device.type)
    if amp is not None and hidden.is_floating_point() and weight.is_floating_point():
        hidden, weight = hidden.to(amp), weight.to(amp)  # as `h @ W.T` would run; grads flow back through .to
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if hidden.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"hidden/weight must be a float dtype; got {hidden.dtype}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"targets must be an integer tensor; got {targets.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"hidden, weight, targets on different devices: {hidden.device}, {weight.device}, {targets.device}")
    temperature = float(temperature)
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a positive finite number; got {temperature}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
    if block_v is not None and (not BLOCK_V_MIN <= block_v <= BLOCK_V_MAX or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two in [{BLOCK_V_MIN}, {BLOCK_V_MAX}]; got {block_v}")
    n, vocab = hidden.shape[0], weight.shape[0]
    targets = targets.long().contiguous()
    if n and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}); got min {int(targets.min())}, max {int(targets.max())}")
    chosen = resolve_backend(backend, hidden.device)
    if chosen == "triton" and hidden.dtype == torch.float64:
        raise ValueError("the Triton backend computes in fp32; use backend='torch' for float64 inputs")
    return _FusedLogprobs.apply(hidden, weight, targets, temperature, bool(return_entropy), chosen, chunk_rows, block_v)
