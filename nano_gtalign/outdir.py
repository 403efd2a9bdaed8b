"""The out-dir a training run owns: one run at a time, no silent overwrite, and a resume that continues the
same run on the same data.

- `exclusive(out_dir, d)`: an exclusive lock on OUT_DIR/run.lock for the run's life; a second run is refused
  in one line naming the holder (PID, host, start time). The kernel drops the lock when its process dies, so
  a stale lock file is taken over, with a message.
- `check_fresh_start(out_dir, overwrite)`: a run without --resume into an out-dir holding checkpoints is
  refused (naming --resume and --overwrite); with --overwrite the old checkpoints are removed first.
- `data_fingerprint(files)` and `check_resume(...)`: the flags that may change on resume, and the training
  data's SHA-256, against what the checkpoint recorded.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from nano_gtalign.checkpoint import MANIFEST, read_manifest, sha256
from nano_gtalign.distributed import Dist, all_gather
from nano_gtalign.errors import UsageError

LOCK = "run.lock"


@contextlib.contextmanager
def exclusive(out_dir: Path, d: Dist, log=print) -> Iterator[None]:
    """Hold OUT_DIR/run.lock (rank 0 takes it; every rank learns whether it could) until the block ends."""
    handle, problem = None, None
    if d.main:
        handle, problem = _take(out_dir / LOCK, log)
    problems = [p for p in all_gather(d, problem) if p]
    if problems:
        raise UsageError(problems[0])
    try:
        yield
    finally:
        if handle is not None:  # an empty lock file: this run ended (a killed run's file keeps its holder)
            handle.seek(0)
            handle.truncate()
            handle.close()  # closing the file releases the lock


def _take(path: Path, log) -> tuple[object | None, str | None]:
    """(the open, locked file, None), or (None, why the lock is held by another run)."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(path)
        handle.close()
        return None, (f"--out-dir {path.parent}: another train.py run is using it ({holder}); wait for it to "
                      "finish or choose another --out-dir")
    previous = _holder(path)
    if previous:  # the lock file outlived its run (killed): the kernel had already dropped the lock
        log(f"took over {path} from a run that is no longer running ({previous})")
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    handle.flush()
    return handle, None


def _holder(path: Path) -> str:
    """Who the lock file says holds it, in words ('' when it says nothing readable)."""
    try:
        info = json.loads(path.read_text())
        return f"PID {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def check_fresh_start(out_dir: Path, overwrite: bool, log=print, remove: bool = True) -> None:
    """Refuse to start a new run over an earlier run's checkpoints unless --overwrite; with it, remove them
    (`remove`: this process does the removing; under torchrun rank 0 alone)."""
    files = sorted(out_dir.glob("step_*.pt"))
    entries = read_manifest(out_dir) if (out_dir / MANIFEST).exists() else []
    if not files and not entries:
        return
    latest = max([e["step"] for e in entries] + [int(f.stem.split("_")[1]) for f in files if f.stem[5:].isdigit()],
                 default=0)
    if not overwrite:
        raise UsageError(f"--out-dir {out_dir} holds the checkpoints of an earlier run (latest step {latest}): "
                         "continue it with --resume, or start again there with --overwrite (its checkpoints, "
                         "metrics.jsonl and final/ are replaced)")
    if remove:
        for f in files + [out_dir / MANIFEST]:
            f.unlink(missing_ok=True)
        log(f"--overwrite: removed the {len(files)} checkpoints of the earlier run in {out_dir}")


def data_fingerprint(files: list[str] | None) -> dict[str, str]:
    """SHA-256 of each training data file (path -> hex digest); {} for the demo, whose data is its flags."""
    return {str(name): sha256(Path(name)) for name in files or ()}


def check_resume(saved: dict, flags: dict, may_change: tuple[str, ...], accept_changed_data: bool,
                 log=print) -> None:
    """Compare this run's flags (and data fingerprint, under 'data_sha256') with those the checkpoint
    recorded: a changed flag outside `may_change` is refused, naming it; changed data is refused unless
    accept_changed_data, when it is a warning naming the file."""
    changed = {k: (saved.get(k), v) for k, v in flags.items()
               if k not in may_change and k != "data_sha256" and saved.get(k) != v}
    if changed:
        k, (old, new) = next(iter(changed.items()))
        more = f" (and {', '.join('--' + c.replace('_', '-') for c in list(changed)[1:])})" if len(changed) > 1 else ""
        raise UsageError(f"--{k.replace('_', '-')} was {old!r} in the checkpoint, {new!r} now{more}: a resumed run "
                         f"continues the same run; only {', '.join('--' + f.replace('_', '-') for f in may_change)} "
                         "may change (start a new run in another --out-dir to change the others)")
    old_data, new_data = saved.get("data_sha256") or {}, flags.get("data_sha256") or {}
    for name in sorted(set(old_data) | set(new_data)):
        if old_data.get(name) == new_data.get(name):
            continue
        what = f"{name} changed since the checkpoint (its SHA-256 differs)"
        if not accept_changed_data:
            raise UsageError(f"--data {what}: the run would continue on other records; restore the file, or pass "
                             "--accept-changed-data to continue on the new contents")
        log(f"warning: --data {what}; continuing on the new contents (--accept-changed-data)")
