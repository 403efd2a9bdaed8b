"""Shared pytest setup: Triton kernels run compiled on a GPU, in Triton's interpreter without one.

Tests parametrised with backend="triton" are skipped, with the reason, when the interpreter is needed
but cannot run on this machine: triton 3.6's interpreter converts a run-time loop bound with
int(1-element array), which numpy >= 2.4 refuses (triton-lang/triton#9171; fixed in triton 3.8).
"""
from __future__ import annotations

import os

import pytest
import torch

# Must be set before triton compiles anything (nano_gtalign/kernels/ decorate at import); harmless when triton is absent.
# With a GPU the kernel tests run compiled, on CUDA tensors.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nano_gtalign import grpo  # noqa: E402  (after TRITON_INTERPRET: the kernels decorate at import)

grpo.CHECK_INPUTS = True  # policy_loss checks its inputs on every call under test; a run skips that


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels here (None when it can, or is not in use)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy as np
        import triton
        import triton.language as tl
    except Exception:  # no triton: the tests skip themselves
        return None

    @triton.jit
    def probe(x_ptr, n):
        acc = 0.0
        for i in range(0, n, 1):  # a loop bound read at run time, as in nano_gtalign/kernels/logprob.py
            acc += tl.load(x_ptr + i)
        tl.store(x_ptr, acc)

    try:
        x = torch.ones(3)
        probe[(1,)](x, 3)
        assert x[0].item() == 3.0, f"the probe kernel computed {x[0].item()}, not 3"
    except Exception as exc:
        return (f"triton {triton.__version__}'s interpreter cannot run these kernels with numpy {np.__version__} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); triton-lang/triton#9171, fixed in "
                "triton 3.8: use triton >= 3.8, numpy < 2.4, or a GPU")
    return None


def pytest_collection_modifyitems(config, items):
    triton_items = [it for it in items if getattr(it, "callspec", None) and it.callspec.params.get("backend") == "triton"]
    problem = _interpreter_problem() if triton_items else None
    if problem:
        for item in triton_items:
            item.add_marker(pytest.mark.skip(reason=problem))
