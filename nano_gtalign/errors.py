"""The error types the scripts print as a single line (no traceback): a bad flag or input file, a bad checkpoint.

Library functions raise UsageError for input a user can fix (a malformed record, an impossible batch size, a
missing option); train.py and eval.py catch it, together with CheckpointError, and exit 2. CheckpointError
lives here rather than in loader.py so that tokenizer.py, which loader.py imports, can raise it too (a chat
template that fails to render); `from nano_gtalign.loader import CheckpointError` still works.
"""


class UsageError(ValueError):
    """A bad flag or input file; the message names the flag or the file and line."""


class CheckpointError(ValueError):
    """A model directory that cannot be loaded or used; the message names the file and the problem."""
