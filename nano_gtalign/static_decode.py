"""The fixed-shape decode step over a preallocated KV cache, replayable as a CUDA graph or compiled.

One job: feed each row's newest token through gpt-fast's static decode step (model.decode_step plus the
LM head) and return the next logits, with every input in a buffer allocated once: the cache is written at a
tensor position and attention reads all of it under a mask, so every step has the same shapes and reads
nothing back to the host. That is what lets decode="graph" capture the step once as a CUDA graph and
replay it (one launch instead of ~40 per layer), and decode="compile" run it through
torch.compile(fullgraph=True); decode="static" runs it eagerly, the reference the other two are checked
against.

Why beside the eager path (sampling._eager_decoder): the eager step grows the cache by one column and
attends only to the columns filled so far, which is cheapest on a CPU but changes shapes every step, so it
can be neither captured nor compiled once. sampling.generate picks the decoder; this module knows nothing
of sampling (the loop, the rows, stop strings), and sampling imports from it, never the reverse.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from nano_gtalign.model import KVCache, Transformer, decode_step


def _static_step(model: Transformer, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], tokens: torch.Tensor,
                 positions: torch.Tensor, index: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """model.decode_step plus the LM head: the next fp32 logits [R, V]. What "graph" captures and "compile" compiles."""
    hidden = decode_step(model, k_cache, v_cache, tokens, positions, index, key_valid)
    return F.linear(hidden, model.output_weight()).float()


COMPILE_BACKEND = "inductor"  # torch.compile backend of decode="compile" (the CPU test uses "aot_eager": no C++ build)
_COMPILED: dict[str, Callable] = {}


def _compiled_step() -> Callable:
    """_static_step through torch.compile(fullgraph=True), built once per process (dynamo caches per shape).

    fullgraph: a graph break would hide a host sync or a Python-side shape. Not mode="reduce-overhead":
    its CUDA graphs copy every input that is not a parameter into static storage on each call (the
    KV caches, unless marked static, which then recompiles for every new cache), so on CUDA the compiled
    step is captured by StaticDecoder, as the eager one is.
    """
    if COMPILE_BACKEND not in _COMPILED:
        _COMPILED[COMPILE_BACKEND] = torch.compile(_static_step, fullgraph=True, backend=COMPILE_BACKEND)
    return _COMPILED[COMPILE_BACKEND]


def _transformer(model) -> Transformer:
    """The Transformer inside `model` (the trainer passes its Policy, which wraps one)."""
    if isinstance(model, Transformer):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, Transformer):
        return inner
    raise TypeError(f"the static decode paths need a Transformer (or a wrapper with .model), got {type(model).__name__}")


class StaticDecoder:
    """decoder(tok, t) for decode = "static" | "graph" | "compile": the fixed-shape step on the prefilled cache.

    Every input of the step lives in a buffer allocated once (tokens, positions, the cache column to
    write, which keys are real), and between steps only device ops touch them, so on CUDA the first
    call captures the step into a CUDA graph and every later call is one copy and one replay.
    """

    def __init__(self, model, cache: KVCache, positions: torch.Tensor, key_mask: torch.Tensor | None, mode: str,
                 strict: bool = True):
        self.model = _transformer(model)
        self.strict = strict  # False (decode="auto"): a failed CUDA-graph capture falls back to plain launches
        R, S, device = cache.batch_size, cache.max_seq_len, positions.device
        self.k, self.v = cache.k, cache.v
        self.tokens = torch.zeros((R, 1), dtype=torch.long, device=device)
        self.positions = positions[:, None].clone()  # RoPE position of the token fed next
        self.index = torch.full((1,), cache.seq_len, dtype=torch.long, device=device)  # cache column it goes to
        self.key_valid = torch.ones((R, S), dtype=torch.bool, device=device)  # left padding is False
        if key_mask is not None:
            self.key_valid[:, :key_mask.shape[1]] = key_mask.bool()
        self.step = _compiled_step() if mode == "compile" else _static_step
        self.use_graph = device.type == "cuda" and mode in ("graph", "compile")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None

    def __call__(self, tok: torch.Tensor, t: int) -> torch.Tensor:
        self.tokens.copy_(tok[:, None])
        if not self.use_graph:
            logits = self._run()
        elif self.graph is None:
            with torch.cuda.device(self.tokens.device):
                logits = self._capture()
        else:
            with torch.cuda.device(self.tokens.device):
                self.graph.replay()
            logits = self.graph_logits  # overwritten by the next replay: the caller samples from it first
        self.positions += 1
        self.index += 1
        return logits

    def _run(self) -> torch.Tensor:
        return self.step(self.model, self.k, self.v, self.tokens, self.positions, self.index, self.key_valid)

    def _capture(self) -> torch.Tensor:
        """Warm up, capture the step into a CUDA graph, and return this step's logits."""
        # Warm-up on a side stream, as torch.cuda.graphs asks (lazy initialisation, cuBLAS workspaces,
        # compilation stay out of the capture). It also fills autocast's weight-cast cache, so the graph
        # reads the cached casts instead of casting every weight on every replay. Running the step twice
        # with the same inputs writes the same cache column twice: the warm-up's logits are this step's.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                logits = self._run()
        torch.cuda.current_stream().wait_stream(side)
        logits.record_stream(torch.cuda.current_stream())
        self.graph = torch.cuda.CUDAGraph()
        try:
            # Records, does not run (the cache is not written here). thread_local: CUDA calls that other
            # threads of the trainer may make meanwhile (an allocation, say) do not invalidate this capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.graph_logits = self._run()
        except RuntimeError as exc:
            if self.strict:  # decode="graph" | "compile" asked for by name: say so
                raise
            # decode="auto": a GPU/driver where capture fails still samples, one launch at a time.
            warnings.warn(f"CUDA graph capture of the decode step failed ({str(exc).splitlines()[0][:200]}); "
                          "decoding without a graph (NANO_GTALIGN_DECODE=eager or =static silences this)")
            self.graph, self.graph_logits, self.use_graph = None, None, False
        return logits
