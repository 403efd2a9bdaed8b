"""Shared pytest setup: Triton kernels run in the interpreter when there is no GPU."""
import os

# Must be set before triton compiles anything; harmless when triton is absent.
os.environ.setdefault("TRITON_INTERPRET", "1")
