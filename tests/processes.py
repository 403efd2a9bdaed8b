"""Child processes for tests: SIGINT at its default whatever the suite inherited, and never left running.

A shell starts a background job with SIGINT ignored, a child inherits that, and Python then installs no
KeyboardInterrupt handler: a test that stops its child with SIGINT would hang or fail when the suite runs
in the background. `running` resets SIGINT in the child and kills it on the way out, however the test ended.
"""
from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def running(args: list[str], **popen_kwargs) -> Iterator[subprocess.Popen]:
    with subprocess.Popen(args, preexec_fn=_default_sigint, **popen_kwargs) as proc:  # closes pipes, reaps
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
