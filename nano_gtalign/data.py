"""Training and evaluation records: read and check them, encode their prompts, and visit them in order.

A record is one GTAlign prompt (docs/data.md): `prompt` (chat messages), `data_source` (which task
scores it) and `reward_model.ground_truth`. train.py and eval.py read records through `read_records`,
so both refuse the same bad input with the same message (file and line).

The training order is a fixed function of (seed, epoch) (`epoch_order`): a resumed run only needs the
cursor (epoch, position), and every rank computes the same order without communicating.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nano_gtalign.errors import UsageError
from nano_gtalign.judges import canonical_task
from nano_gtalign.reward import TASKS


def read_records(path: str | Path) -> list[dict]:
    """GTAlign records from JSONL (one JSON object a line) or parquet (needs pyarrow), each checked."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix == ".parquet":
        records, where = _read_parquet(path)
    else:
        records, where = _read_jsonl(path)
    if not records:
        raise UsageError(f"{path}: no records")
    for record, w in zip(records, where):
        check_record(record, w)
    return records


def _read_parquet(path: Path) -> tuple[list, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it "
                         "with data/gtalign/prepare.py") from None
    records = pq.read_table(path).to_pylist()
    return records, [f"{path} row {i}" for i in range(len(records))]


def _read_jsonl(path: Path) -> tuple[list, list[str]]:
    records, where = [], []
    try:
        with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported with its line
            for n, raw in enumerate(f, 1):
                line = _decode(raw, path, n)
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
                where.append(f"{path}:{n}")
    except PermissionError:
        raise UsageError(f"permission denied reading {path}") from None
    return records, where


def _decode(raw: bytes, path: Path, n: int) -> str:
    """Line n of the file as text; bytes that are not UTF-8 are a UsageError naming the file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                         "line; save the file as UTF-8)") from None


def check_record(record: object, where: str) -> None:
    """The fields training and evaluation read (docs/data.md); the reward checks the task-specific rest."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    messages = record.get("prompt")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise UsageError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} chat messages")
    source = record.get("data_source")
    if not isinstance(source, str) or canonical_task(source) not in TASKS:
        raise UsageError(f"{where}: unknown data_source {source!r} (known: {', '.join(TASKS)})")
    truth = (record.get("reward_model") or {}).get("ground_truth")
    if not isinstance(truth, str):
        raise UsageError(f"{where}: reward_model.ground_truth must be a string")


def read_splits(data: list[str], eval_data: list[str] | None, holdout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) records from the --data files and the --eval-data files; without eval files, a seeded
    hold-out of `holdout` training records."""
    train = [r for path in data for r in read_records(path)]
    if eval_data:
        return train, [r for path in eval_data for r in read_records(path)]
    order = np.random.default_rng([seed, 1]).permutation(len(train)).tolist()
    held = set(order[:holdout])
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def encode_prompts(records: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], list[list[int]], int]:
    """Each record's own chat messages through the chat template; records over max_tokens are dropped.
    Returns (kept records, their token ids, how many were dropped)."""
    kept, ids, dropped = [], [], 0
    for r in records:
        x = tokenizer.encode_chat(r["prompt"])
        if len(x) > max_tokens:
            dropped += 1
            continue
        kept.append(r)
        ids.append(x)
    return kept, ids, dropped


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order the n records are visited in one epoch: a fixed function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class Cursor:
    """Where training is in the data: the epoch and the position in that epoch's order (checkpointed)."""
    epoch: int = 0
    pos: int = 0


def next_prompts(cursor: Cursor, n: int, per_step: int, seed: int) -> list[int]:
    """Indices of the next step's prompts (all ranks), advancing the cursor; an epoch's remainder smaller
    than a step is skipped."""
    if cursor.pos + per_step > n:
        cursor.epoch += 1
        cursor.pos = 0
    order = epoch_order(n, seed, cursor.epoch)
    idx = order[cursor.pos: cursor.pos + per_step].tolist()
    cursor.pos += per_step
    return idx
