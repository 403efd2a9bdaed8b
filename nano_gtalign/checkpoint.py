"""Training checkpoints that survive a crash at any moment, resume bit for bit, and the final export.

A checkpoint is one file OUT_DIR/step_NNNNNN.pt holding the full (unsharded) weights, the optimizer and
scheduler state (PPO: the value model's too, under "critic"), every rank's RNG states, the data cursor and
the flags. The file verifies itself: a
256-byte text header (`head -c 256 step_000050.pt`) records the format, the size and the SHA-256 of the
torch.save payload after it, so a copy taken anywhere is checked before anything is unpickled. Files are
written through a temporary file, fsynced and renamed (`atomic_write_bytes`), then listed in
OUT_DIR/checkpoints.json with their size and the SHA-256 of the whole file; the two newest are kept.
`load_checkpoint` checks a file against its header and, when listed, the manifest, and when it is damaged
names a previous checkpoint only after verifying that one too. `remove_stale_temporaries` deletes what
writers killed mid-save left behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import random
import tempfile
import re
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes

from nano_gtalign.data import Cursor
from nano_gtalign.distributed import (Dist, all_gather, full_model_state, full_optimizer_state, load_full_state,
                                      print0, unwrap)
from nano_gtalign.errors import UsageError
from nano_gtalign.loader import CheckpointError, default_file_mode, save_pretrained
from nano_gtalign.model import Transformer

MANIFEST = "checkpoints.json"
# 3: loaded with torch.load(weights_only=True), numpy's RNG state kept as plain lists; 2: the SHA-256 header,
# loaded with full unpickling; 1: a bare torch.save file.
CHECKPOINT_FORMAT = 3
KEEP = 2  # checkpoints kept: the newest and the one before it
MAGIC = b"nano-gtalign checkpoint\n"
HEADER_BYTES = 256  # fixed, so the header can be written after the payload it describes
# Leftovers of atomic_write_bytes (.NAME.tmp-PID) and save_pretrained (.NAME.tmp-PID/, .NAME.old-PID/).
TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, write) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over the target: a reader
    sees the old file or the complete new one, never a partial one. write(f) gets the open binary file.
    An OSError (disk full, unwritable directory) propagates with the temporary file removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            # Like any new file (0644 under umask 022), also when a stale temporary of another mode is reused.
            os.chmod(tmp, default_file_mode())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # failing to clean up must not hide why the write failed
            tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


# -----------------------------------------------------------------------------
# The file: a header with the payload's size and SHA-256, then the torch.save payload


class _Hashing:
    """A write-only file that passes bytes through to `f`, counting and hashing them."""

    def __init__(self, f):
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _write_checkpoint(f, state: dict) -> None:
    """Header placeholder, the payload streamed through a hash (no second copy of the state in memory),
    then the real header over the placeholder."""
    f.write(b"\0" * HEADER_BYTES)
    payload = _Hashing(f)
    torch.save(state, payload)
    info = json.dumps({"format": CHECKPOINT_FORMAT, "bytes": payload.size, "sha256": payload.sha.hexdigest()})
    f.seek(0)
    f.write((MAGIC + info.encode()).ljust(HEADER_BYTES - 1) + b"\n")


def _read_header(f, path: Path) -> tuple[dict, bytes]:
    """(format/bytes/sha256 the file records about its payload, the header's bytes); refuses a file
    that is not a checkpoint of this format."""
    head = f.read(HEADER_BYTES)
    if not head.startswith(MAGIC):
        if zipfile.is_zipfile(f):  # a bare torch.save file: format 1, or not train.py's at all
            raise CheckpointError(f"{path}: not a train.py checkpoint (format {CHECKPOINT_FORMAT}): a plain "
                                  "torch.save file without the SHA-256 header (older train.py versions wrote these)")
        raise CheckpointError(f"{path}: unreadable checkpoint (no train.py checkpoint header)")
    if len(head) < HEADER_BYTES:
        raise CheckpointError(f"{path}: truncated checkpoint ({len(head)} bytes, shorter than its header)")
    try:
        info = json.loads(head[len(MAGIC):].decode())
        if not (isinstance(info["bytes"], int) and isinstance(info["sha256"], str)):
            raise TypeError
    except (ValueError, KeyError, TypeError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: corrupt checkpoint (SHA-256 header damaged)") from None
    if info.get("format") == 2:
        raise CheckpointError(f"{path}: written by an older train.py (checkpoint format 2), whose files must be "
                              "unpickled in full and so could run code; this version refuses them: resume with "
                              "the train.py that wrote it, or start the run again")
    if info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train.py checkpoint (format {CHECKPOINT_FORMAT}): "
                              f"its header says format {info.get('format')}")
    return info, head


def _verify(f, path: Path, entry: dict | None) -> None:
    """Check an open checkpoint against its own header and, when the manifest lists it, the manifest:
    sizes first (cheap, and they name truncation), then both SHA-256s in one pass over the file."""
    size = os.fstat(f.fileno()).st_size
    if entry is not None and size != entry["bytes"]:
        raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes, the manifest says {entry['bytes']})")
    info, head = _read_header(f, path)
    if size != HEADER_BYTES + info["bytes"]:
        raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes, its header says "
                              f"{HEADER_BYTES + info['bytes']})")
    whole, payload = hashlib.sha256(head), hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        whole.update(block)
        payload.update(block)
    if entry is not None and whole.hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupt checkpoint (SHA-256 differs from the manifest)")
    if payload.hexdigest() != info["sha256"]:
        raise CheckpointError(f"{path}: corrupt checkpoint (SHA-256 differs from the one in its header)")


class _Payload(io.RawIOBase):
    """The bytes after the header of an open checkpoint, seen by torch.load as a file of their own."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        f.seek(HEADER_BYTES)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.f.readinto(b)

    def tell(self) -> int:
        return self.f.tell() - HEADER_BYTES

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        return self.f.seek(pos + HEADER_BYTES if whence == os.SEEK_SET else pos, whence) - HEADER_BYTES


def _load_verified(path: Path, entry: dict | None) -> dict:
    """Verify, then unpickle from the same open file (a rename over `path` meanwhile cannot swap it)."""
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file is missing")
        with open(path, "rb") as f:
            _verify(f, path, entry)
            # A valid SHA-256 proves the file is intact, not who wrote it: only tensors and plain values load.
            try:
                state = torch.load(io.BufferedReader(_Payload(f)), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                first = " ".join(str(e).split()).split(". ")[0][:160]
                raise CheckpointError(f"{path}: refused: the checkpoint holds something other than tensors and "
                                      f"plain values, which could run code when loaded ({first})") from None
            except Exception as e:  # torch raises several types for a damaged zip/pickle
                raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: "
                                      f"{' '.join(str(e).split())[:200]})") from None
    except PermissionError:
        raise CheckpointError(f"permission denied reading {path}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train.py checkpoint (format {CHECKPOINT_FORMAT})")
    return state


# -----------------------------------------------------------------------------
# The manifest


def read_manifest(out_dir: Path) -> list[dict]:
    """OUT_DIR's checkpoint entries, oldest first ([] without a manifest); a one-line CheckpointError
    naming the manifest when it cannot be read or an entry is malformed."""
    path = out_dir / MANIFEST
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointError(f"{path}: unreadable checkpoint manifest "
                              f"({getattr(e, 'strerror', None) or ' '.join(str(e).split())})") from None
    entries = data.get("checkpoints") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise CheckpointError(f"{path}: malformed checkpoint manifest (no 'checkpoints' list)")
    for i, entry in enumerate(entries):
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointError(f"{path}: malformed checkpoint manifest (entry {i}: {problem})")
    return entries


def _entry_problem(entry) -> str | None:
    """What is wrong with one manifest entry, or None."""
    if not isinstance(entry, dict):
        return "not an object"
    for key, kind in (("step", int), ("file", str), ("bytes", int), ("sha256", str)):
        if key not in entry:
            return f"no '{key}'"
        if not isinstance(entry[key], kind):
            return f"'{key}' is not {'an integer' if kind is int else 'a string'}"
    # save_checkpoint deletes dropped entries' files: only plain names in OUT_DIR, never "../x" or "/x"
    if Path(entry["file"]).name != entry["file"] or entry["file"] in ("", ".", ".."):
        return f"'file' {entry['file']!r} is not a file name in this directory"
    return None


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream's state in types torch.load(weights_only=True) reads (numpy's as plain lists)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                   "gauss": float(gauss)}
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "sampler": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["sampler"])


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer, scheduler, cursor: Cursor,
                    generator: torch.Generator, flags: dict, fsdp: bool, d: Dist, critic=None) -> Path | None:
    """Everything needed to continue bit for bit. Collective (all ranks call it); rank 0 writes and gets
    the path, the other ranks None. `flags` are the run's settings, recorded to report changes on resume.
    `critic` (PPO: anything with .module, .optimizer, .scheduler) is saved the same way as the policy.
    A failed write is a CheckpointError naming the file; the earlier checkpoints and manifest stay."""
    rngs = all_gather(d, rng_state(generator))
    if not (d.main or fsdp):  # FSDP gathers the full state collectively; DDP ranks hold identical copies
        return None
    state = {
        "format": CHECKPOINT_FORMAT, "step": step, **training_state(model, optimizer, scheduler, fsdp),
        "cursor": asdict(cursor), "rng": rngs, "args": dict(flags), "world": d.world, "fsdp": fsdp,
    }
    if critic is not None:
        state["critic"] = training_state(critic.module, critic.optimizer, critic.scheduler, fsdp)
    if not d.main:
        return None
    path = out_dir / f"step_{step:06d}.pt"
    with _writing(path, "the earlier checkpoints and the manifest are unchanged"):
        atomic_write_bytes(path, lambda f: _write_checkpoint(f, state))
        entry = {"step": step, "file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
    entries = [e for e in _manifest_to_update(out_dir, d) if e["step"] != step] + [entry]
    keep, drop = entries[-KEEP:], entries[:-KEEP]
    manifest = out_dir / MANIFEST
    with _writing(manifest, f"{path} itself is complete: --resume {path}"):
        atomic_write_bytes(manifest, lambda f: f.write(json.dumps({"checkpoints": keep}, indent=1).encode()))
    for e in drop:  # only after the manifest no longer lists them
        with contextlib.suppress(OSError):  # a file that cannot be deleted only costs space
            (out_dir / e["file"]).unlink(missing_ok=True)
    return path


def training_state(model: nn.Module, optimizer, scheduler, fsdp: bool) -> dict:
    """Full weights, optimizer and scheduler state of one trained model (collective under FSDP)."""
    return {"model": full_model_state(model, fsdp), "optimizer": full_optimizer_state(model, optimizer, fsdp),
            "scheduler": scheduler.state_dict()}


@contextlib.contextmanager
def _writing(path: Path, kept: str):
    """An OSError while writing `path` (disk full, unwritable directory) as one line naming it."""
    try:
        yield
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e}); {kept}") from None


def _manifest_to_update(out_dir: Path, d: Dist) -> list[dict]:
    """The entries a save extends. An unreadable manifest (a run resumed with --resume FILE beside it) is
    replaced rather than ending the run here: its files stay on disk and each verifies on its own."""
    try:
        return read_manifest(out_dir)
    except CheckpointError as e:
        print0(d, f"warning: {e}; writing a new one (the checkpoint files it listed are left in place)")
        return []


def load_checkpoint(spec: str, out_dir: Path) -> tuple[dict, Path]:
    """The checkpoint --resume names ("latest": the newest in OUT_DIR's manifest), verified against its own
    header and, when listed, the manifest before anything is unpickled. A bad file is refused and left alone;
    the message names an intact checkpoint to resume from instead, if there is one."""
    if spec == "latest":
        entries = read_manifest(out_dir)
        if not entries:
            raise CheckpointError(f"{out_dir / MANIFEST}: no checkpoint to resume from")
        entry = entries[-1]
        path = out_dir / entry["file"]
    else:
        path = Path(spec)
        try:
            entries = read_manifest(path.parent)
        except CheckpointError:  # the file carries its own check: a broken manifest beside it does not matter
            entries = []
        entry = next((e for e in entries if e["file"] == path.name), None)
    try:
        return _load_verified(path, entry), path
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_fallback(path, entry, entries)}") from None


def _fallback(path: Path, failed: dict | None, entries: list[dict]) -> str:
    """The hint after a refused checkpoint: the newest other listed checkpoint that verifies, or that none
    does. Each candidate is checked in full (size and both hashes) before it is called intact."""
    others = sorted((e for e in entries if failed is None or e["file"] != failed["file"]),
                    key=lambda e: e["step"], reverse=True)
    for e in others:
        candidate = path.parent / e["file"]
        try:
            with open(candidate, "rb") as f:
                _verify(f, candidate, e)
        except (CheckpointError, OSError):
            continue
        which = "the previous checkpoint" if failed is None or e["step"] < failed["step"] else "checkpoint"
        return f"; {which} {candidate} is intact: --resume {candidate}"
    return f"; no other checkpoint in {path.parent / MANIFEST} is intact" if others else ""


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete what writers killed mid-save (SIGKILL, OOM, a lost node) left in out_dir: atomic_write_bytes'
    .NAME.tmp-PID files, each as large as a checkpoint, and save_pretrained's .NAME.tmp-PID/ directories.
    Only leftovers of processes no longer running are removed, so a writer still at work keeps its file;
    call it once at start, on the one process that writes (rank 0). A .NAME.old-PID/ directory (the export
    being replaced) goes only once NAME exists again: until then it may be the only complete copy.
    Returns the removed paths; what cannot be removed is left (it only costs space)."""
    removed = []
    for p in sorted(out_dir.glob(".*-*")):
        m = TEMPORARY.fullmatch(p.name)
        if m is None or _running(int(m["pid"])):
            continue
        if m["kind"] == "old" and not (out_dir / m["target"]).exists():
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except OSError:
            continue
        removed.append(p)
    return removed


def _running(pid: int) -> bool:
    """Whether process `pid` exists. Our own pid on a leftover at start is a dead writer's, reused."""
    if pid == os.getpid():
        return False
    if os.name == "nt":  # os.kill there terminates the process: assume it runs, remove nothing
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, ValueError):  # not a possible pid
        return False
    return True


def restore(state: dict, model: nn.Module, optimizer, scheduler, generator: torch.Generator, fsdp: bool,
            d: Dist, critic=None) -> Cursor:
    """Load a checkpoint's weights, optimizer, scheduler (the critic's too) and this rank's RNG states;
    returns its data cursor."""
    if state["fsdp"] != fsdp:
        raise CheckpointError(f"checkpoint was written with fsdp={state['fsdp']}; resume with the same --fsdp setting")
    if ("critic" in state) != (critic is not None):
        algo = "ppo" if "critic" in state else "grpo"
        raise CheckpointError(f"checkpoint was written with --algo {algo} ({'with' if algo == 'ppo' else 'without'} "
                              f"a value model); resume with --algo {algo}")
    _check_shapes(model, state["model"], "policy")
    load_full_state(model, optimizer, state["model"], state["optimizer"], fsdp)
    scheduler.load_state_dict(state["scheduler"])
    if critic is not None:
        c = state["critic"]
        _check_shapes(critic.module, c["model"], "value model")
        load_full_state(critic.module, critic.optimizer, c["model"], c["optimizer"], fsdp)
        critic.scheduler.load_state_dict(c["scheduler"])
    if state["world"] == d.world:
        set_rng_state(state["rng"][d.rank], generator)
    else:
        print0(d, f"warning: checkpoint was written by {state['world']} ranks, this run has {d.world}: "
                  "sampling RNG streams restart (the run continues, but not bit for bit)")
    return Cursor(**state["cursor"])


def _check_shapes(model: nn.Module, saved: dict, what: str) -> None:
    """One line naming the first tensor whose shape (or presence) differs between the checkpoint and this
    run's model: the checkpoint was written for another architecture (another --model, or the demo with
    other settings)."""
    # Parameters' .shape is the full shape under FSDP2 too (DTensors); buffers are not checkpointed apart.
    own = {name: tuple(t.shape) for name, t in unwrap(model).state_dict().items()}
    for name in sorted(set(own) | set(saved)):
        mine, theirs = own.get(name), tuple(saved[name].shape) if name in saved else None
        if mine != theirs:
            raise CheckpointError(f"the checkpoint's {what} does not fit this run's model: {name} is "
                                  f"{theirs or 'absent'} there and {mine or 'absent'} here (written for another "
                                  "architecture: resume with the --model and settings that wrote it)")


def export_final(model: nn.Module, tokenizer, path: Path, fsdp: bool, d: Dist,
                 head_file: str | None = None, dtype: str | None = None,
                 generation_config: dict | None = None) -> None:
    """Hugging Face directory (config.json + safetensors + tokenizer) for sample.py, eval.py, transformers,
    vLLM, written in `dtype` (None: the training weights' fp32) with `generation_config` (the input
    checkpoint's sampling defaults). `model` is the (wrapped) policy or critic whose `.model` is the
    Transformer; the critic's value head (its tensors outside `.model`) goes to path/head_file. Collective
    under FSDP."""
    if not (d.main or fsdp):
        return
    state = full_model_state(model, fsdp)
    if not d.main:
        return
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:  # never export weights no one can use
        raise CheckpointError(f"{path}: not exported: the trained weights are not finite ({bad} holds NaN or inf)")
    config = unwrap(model).model.config
    with torch.device("meta"):
        plain = Transformer(config)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
                          assign=True)
    plain.init_buffers("cpu")
    try:
        save_pretrained(plain, tokenizer, path, dtype=dtype, generation_config=generation_config)
    except (OSError, SafetensorError) as e:  # a full disk, say: leave no half-written folder behind
        shutil.rmtree(path.with_name(f".{path.name}.tmp-{os.getpid()}"), ignore_errors=True)
        raise CheckpointError(f"{path}: exporting failed ({getattr(e, 'strerror', None) or e})") from None
    if head_file is not None:
        head = {k: v.contiguous() for k, v in state.items() if not k.startswith("model.")}
        atomic_write_bytes(path / head_file, lambda f: f.write(safetensors_bytes(head, metadata={"format": "pt"})))


def prepare_out_dir(path: Path) -> None:
    """Create OUT_DIR and check that files can be written there, before any work that would be lost."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UsageError(f"--out-dir {path}: cannot write there ({e.strerror or e})") from None
