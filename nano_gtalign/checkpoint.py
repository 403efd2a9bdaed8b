"""Training checkpoints that survive a crash at any moment, resume bit for bit, and the final export.

A checkpoint is one torch.save file OUT_DIR/step_NNNNNN.pt holding the full (unsharded) weights, the
optimizer and scheduler state, every rank's RNG states, the data cursor and the flags. Files are written
through a temporary file, fsynced and renamed (`atomic_write_bytes`), then listed in OUT_DIR/checkpoints.json
with their size and SHA-256; the two newest are kept. `load_checkpoint` verifies a file against the manifest
before loading it and names the intact previous checkpoint when the newest is damaged.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nano_gtalign.data import Cursor
from nano_gtalign.distributed import (Dist, all_gather, full_model_state, full_optimizer_state, load_full_state,
                                      print0, unwrap)
from nano_gtalign.loader import CheckpointError, save_pretrained
from nano_gtalign.model import Transformer

MANIFEST = "checkpoints.json"
CHECKPOINT_FORMAT = 1
KEEP = 2  # checkpoints kept: the newest and the one before it


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
    sees the old file or the complete new one, never a partial one. write(f) gets the open binary file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def read_manifest(out_dir: Path) -> list[dict]:
    path = out_dir / MANIFEST
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["checkpoints"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint manifest ({e})") from None
    return entries


def rng_state(generator: torch.Generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "sampler": generator.get_state()}


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["sampler"])


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer, scheduler, cursor: Cursor,
                    generator: torch.Generator, flags: dict, fsdp: bool, d: Dist) -> Path | None:
    """Everything needed to continue bit for bit. Collective (all ranks call it); rank 0 writes and gets
    the path, the other ranks None. `flags` are the run's settings, recorded to report changes on resume."""
    rngs = all_gather(d, rng_state(generator))
    if not (d.main or fsdp):  # FSDP gathers the full state collectively; DDP ranks hold identical copies
        return None
    state = {
        "format": CHECKPOINT_FORMAT, "step": step, "model": full_model_state(model, fsdp),
        "optimizer": full_optimizer_state(model, optimizer, fsdp), "scheduler": scheduler.state_dict(),
        "cursor": asdict(cursor), "rng": rngs, "args": dict(flags), "world": d.world, "fsdp": fsdp,
    }
    if not d.main:
        return None
    name = f"step_{step:06d}.pt"
    path = out_dir / name
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    entry = {"step": step, "file": name, "bytes": path.stat().st_size, "sha256": sha256(path)}
    entries = [e for e in read_manifest(out_dir) if e["step"] != step] + [entry]
    keep, drop = entries[-KEEP:], entries[:-KEEP]
    atomic_write_bytes(out_dir / MANIFEST, lambda f: f.write(json.dumps({"checkpoints": keep}, indent=1).encode()))
    for e in drop:  # only after the manifest no longer lists them
        (out_dir / e["file"]).unlink(missing_ok=True)
    return path


def load_checkpoint(spec: str, out_dir: Path) -> tuple[dict, Path]:
    """The checkpoint --resume names ("latest": the newest in OUT_DIR's manifest), verified against the
    manifest's size and SHA-256 before loading. A bad file is refused and left alone."""
    entries = read_manifest(out_dir)
    if spec == "latest":
        if not entries:
            raise CheckpointError(f"{out_dir / MANIFEST}: no checkpoint to resume from")
        entry = entries[-1]
        path = out_dir / entry["file"]
    else:
        path = Path(spec)
        entries = read_manifest(path.parent)
        entry = next((e for e in entries if e["file"] == path.name), None)
    others = [e["file"] for e in entries if entry is None or e["file"] != entry["file"]]
    hint = f"; the previous checkpoint {path.parent / others[-1]} is intact: --resume {path.parent / others[-1]}" \
        if others else ""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing{hint}")
    if entry is not None:
        _verify(path, entry, hint)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: RNG states are pickled
    except Exception as e:  # torch raises several types for a damaged zip/pickle
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]}){hint}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a train.py checkpoint (format {CHECKPOINT_FORMAT})")
    return state, path


def _verify(path: Path, entry: dict, hint: str) -> None:
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(f"{path}: truncated checkpoint ({size} bytes, the manifest says {entry['bytes']}){hint}")
    if sha256(path) != entry["sha256"]:
        raise CheckpointError(f"{path}: corrupt checkpoint (SHA-256 differs from the manifest){hint}")


def restore(state: dict, model: nn.Module, optimizer, scheduler, generator: torch.Generator, fsdp: bool,
            d: Dist) -> Cursor:
    """Load a checkpoint's weights, optimizer, scheduler and this rank's RNG states; returns its data cursor."""
    if state["fsdp"] != fsdp:
        raise CheckpointError(f"checkpoint was written with fsdp={state['fsdp']}; resume with the same --fsdp setting")
    load_full_state(model, optimizer, state["model"], state["optimizer"], fsdp)
    scheduler.load_state_dict(state["scheduler"])
    if state["world"] == d.world:
        set_rng_state(state["rng"][d.rank], generator)
    else:
        print0(d, f"warning: checkpoint was written by {state['world']} ranks, this run has {d.world}: "
                  "sampling RNG streams restart (the run continues, but not bit for bit)")
    return Cursor(**state["cursor"])


def export_final(model: nn.Module, tokenizer, path: Path, fsdp: bool, d: Dist) -> None:
    """Hugging Face directory (config.json + safetensors + tokenizer) for sample.py, eval.py, transformers,
    vLLM. `model` is the (wrapped) policy whose `.model` is the Transformer. Collective under FSDP."""
    if not (d.main or fsdp):
        return
    state = full_model_state(model, fsdp)
    if not d.main:
        return
    config = unwrap(model).model.config
    with torch.device("meta"):
        plain = Transformer(config)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, assign=True)
    plain.init_buffers("cpu")
    save_pretrained(plain, tokenizer, path)
