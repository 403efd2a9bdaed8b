"""The one error type the scripts print as a single line (no traceback): a bad flag or input file.

Library functions raise it for input a user can fix (a malformed record, an impossible batch size, a
missing option); train.py and eval.py catch it, together with loader.CheckpointError, and exit 2.
"""


class UsageError(ValueError):
    """A bad flag or input file; the message names the flag or the file and line."""
