"""Training and evaluation records: read and check them, encode their prompts, and visit them in order.

A record is one GTAlign prompt (docs/data.md): `prompt` (chat messages), `data_source` (which task
scores it) and `reward_model.ground_truth`. train.py and eval.py read records through `read_records`,
so both refuse the same bad input with the same message (file and line).

The training order is a fixed function of (seed, epoch) (`epoch_order`): a resumed run only needs the
cursor (epoch, position), and every rank computes the same order without communicating.

`stratified_subset` draws a seeded subset proportional per data_source (eval.py --limit, train.py
--eval-size), so a small evaluation of a mixed file is not the first source alone. `encode_prompts_report`
and `drop_report` say per data_source how many prompts a token limit drops and how long they were.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np

from nano_gtalign.errors import UsageError
from nano_gtalign.judges import canonical_task
from nano_gtalign.reward import TASKS


# Deepest nesting of arrays and objects a record may have. The published records nest 4 deep (extra_info ->
# chat_history -> message -> content); a bound far above that lets everything downstream that walks a record
# recursively (json.dumps, the --per-sample writer) do so safely, and makes "too deep" one line, not a
# RecursionError.
MAX_DEPTH = 64


def read_records(path: str | Path) -> list[dict]:
    """GTAlign records from JSONL (one JSON object a line) or parquet (needs pyarrow), each checked."""
    return [record for _, record in read_records_at(path)]


def read_records_at(path: str | Path) -> list[tuple[str, dict]]:
    """(where, record) for each record of a JSONL or parquet file, each checked: where is "FILE:LINE" (JSONL)
    or "FILE row I" (parquet), for messages about the record that come later."""
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
    return list(zip(where, records))


def _read_parquet(path: Path) -> tuple[list, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert it "
                         "with data/gtalign/prepare.py") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for a broken file
        raise UsageError(f"{path}: cannot read parquet file: {' '.join(str(e).split())}") from None
    return records, [f"{path} row {i}" for i in range(len(records))]


def _read_jsonl(path: Path) -> tuple[list, list[str]]:
    records, where = [], []
    try:
        with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported with its line
            for n, raw in enumerate(f, 1):
                obj = parse_json_line(raw, path, n)
                if obj is not None:
                    records.append(obj)
                    where.append(f"{path}:{n}")
    except PermissionError:
        raise UsageError(f"permission denied reading {path}") from None
    return records, where


def parse_json_line(raw: bytes, path: str | Path, n: int) -> object:
    """Line n of a JSONL file as a JSON value, None for a blank line. Anything that is not a JSON value this
    project can hold is a one-line UsageError "FILE:N: problem": bytes that are not UTF-8, bad JSON, an integer
    past Python's int-string limit (a ValueError from json.loads), nesting past MAX_DEPTH (a RecursionError
    from json.loads when deep enough, found by check_plain otherwise)."""
    line = _decode(raw, path, n)
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise UsageError(f"{path}:{n}: nested more than {MAX_DEPTH} levels deep (arrays and objects)") from None
    except ValueError as e:  # int("9" * 5000): json.loads' only other refusal
        if "integer string conversion" not in str(e):
            raise UsageError(f"{path}:{n}: not valid JSON ({' '.join(str(e).split())})") from None
        raise UsageError(f"{path}:{n}: an integer of more than {_int_digits()} digits, past "
                         "Python's limit; write it as a string") from None
    check_plain(value, f"{path}:{n}")
    return value


def _decode(raw: bytes, path: Path, n: int) -> str:
    """Line n of the file as text; bytes that are not UTF-8 are a UsageError naming the file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}:{n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the "
                         "line; save the file as UTF-8)") from None


def json_type(value: object) -> str:
    """A value's type as messages name it: null for None, else the Python type (dict, list, str, int, ...)."""
    return "null" if value is None else type(value).__name__


def _int_digits() -> int:
    """Python's int-string conversion limit in digits (0: none; Python before 3.10.7 has none)."""
    return getattr(sys, "get_int_max_str_digits", lambda: 0)()


def _huge_int(n: int) -> bool:
    """n has more digits than Python will turn into text (json.dumps would raise ValueError)."""
    limit = _int_digits()
    if not limit or n.bit_length() < 3 * limit:  # a decimal digit is over 3 bits: fewer bits surely fit
        return False
    try:
        str(n)
    except ValueError:
        return True
    return False


def check_plain(value: object, where: str) -> None:
    """Raise a one-line UsageError naming `where` and the field unless value is plain JSON (dict with str keys,
    list, str, int, float, bool, None) nested at most MAX_DEPTH deep. A parquet reader can hand over bytes,
    dates or decimals, and a record from anywhere can be deep enough to break a recursive writer later; both
    are refused here, where the file and line are known. Iterative, so any depth (a cycle too) ends here."""
    stack: list[tuple[object, str, int]] = [(value, "", 1)]
    while stack:
        v, field, depth = stack.pop()
        if isinstance(v, (dict, list)) and depth > MAX_DEPTH:
            raise UsageError(f"{where}: {field or 'the record'} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise UsageError(f"{where}: {field or 'the record'} has a key {k!r} that is not a string")
                stack.append((item, f"{field}.{k}" if field else k, depth + 1))
        elif isinstance(v, list):
            stack.extend((item, f"{field}[{i}]", depth + 1) for i, item in enumerate(v))
        elif isinstance(v, int) and not isinstance(v, bool) and _huge_int(v):
            raise UsageError(f"{where}: {field or 'the record'} is an integer of more than "
                             f"{_int_digits()} digits, past Python's limit; write it as a string")
        elif not (v is None or isinstance(v, (str, int, float, bool))):
            raise UsageError(f"{where}: {field or 'the record'} is {json_type(v)}, not a JSON value (convert parquet "
                             "files with data/gtalign/prepare.py)")


def _is_messages(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def check_record(record: object, where: str) -> None:
    """The fields training and evaluation read (docs/data.md), each of the type they are read as; the reward
    checks the task-specific rest. Also plain JSON, nested at most MAX_DEPTH deep (check_plain)."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: a record must be a JSON object, got {json_type(record)}")
    check_plain(record, where)
    messages = record.get("prompt")
    if not messages or not _is_messages(messages):
        raise UsageError(f"{where}: 'prompt' must be a non-empty list of {{role, content}} chat messages "
                         "(role and content strings)")
    source = record.get("data_source")
    if not isinstance(source, str) or canonical_task(source) not in TASKS:
        raise UsageError(f"{where}: unknown data_source {source!r} (known: {', '.join(TASKS)})")
    reward_model = record.get("reward_model")
    if not isinstance(reward_model, dict):
        raise UsageError(f"{where}: reward_model must be an object with a ground_truth, got {json_type(reward_model)}")
    truth = reward_model.get("ground_truth")
    if not isinstance(truth, str):
        raise UsageError(f"{where}: reward_model.ground_truth must be a string, got {json_type(truth)}")
    extra = record.get("extra_info")
    if extra is None:  # optional: the judge's question falls back to the prompt's last user message
        return
    if not isinstance(extra, dict):
        raise UsageError(f"{where}: extra_info must be an object, got {json_type(extra)}")
    question = extra.get("single_turn_prompt")
    if not (question is None or isinstance(question, str)):
        raise UsageError(f"{where}: extra_info.single_turn_prompt must be a string or null, got {json_type(question)}")
    history = extra.get("chat_history")
    if history is not None and not _is_messages(history):
        got = "" if isinstance(history, list) else f", got {json_type(history)}"
        raise UsageError(f"{where}: extra_info.chat_history must be a list of {{role, content}} chat messages or "
                         f"null{got}")


def read_splits(data: list[str], eval_data: list[str] | None, holdout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) records from the --data files and the --eval-data files; without eval files, a seeded
    hold-out of `holdout` training records."""
    train = [r for path in data for r in read_records(path)]
    if eval_data:
        return train, [r for path in eval_data for r in read_records(path)]
    order = np.random.default_rng([seed, 1]).permutation(len(train)).tolist()
    held = set(order[:holdout])
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def stratified_subset(records: list[dict], n: int, seed: int) -> list[dict]:
    """n records drawn per data_source in proportion to its size, every source represented when n allows,
    returned in the file's order. A fixed function of (records, n, seed).

    Each source first gets one record, then the other n - k are shared in proportion to the sources'
    remaining sizes, by largest remainder (ties by name); with fewer than k = number of sources, the n
    largest get one each. Within a source the records come from one seeded permutation of the whole list,
    so they are a random sample, not the source's first ones."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n >= len(records):
        return list(records)
    sizes: dict[str, int] = defaultdict(int)
    for r in records:
        sizes[r["data_source"]] += 1
    quota = _stratum_quotas(dict(sizes), n)
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for i in np.random.default_rng([seed, 2]).permutation(len(records)).tolist():
        source = records[i]["data_source"]
        if taken[source] < quota[source]:
            taken[source] += 1
            chosen.append(i)
    return [records[i] for i in sorted(chosen)]


def _stratum_quotas(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of each source's records stratified_subset takes (n < the total size)."""
    by_size = sorted(sizes, key=lambda s: (-sizes[s], s))
    if n <= len(sizes):  # not every source can be represented: the largest ones are
        return {s: int(i < n) for i, s in enumerate(by_size)}
    rest, spare = n - len(sizes), sum(sizes.values()) - len(sizes)
    share = {s: rest * (sizes[s] - 1) / spare for s in sizes}
    quota = {s: 1 + int(share[s]) for s in sizes}
    # rest < spare, so a source whose share rounds up still has a record left to give
    for s in sorted(sizes, key=lambda s: (-(share[s] - int(share[s])), s))[:n - sum(quota.values())]:
        quota[s] += 1
    return quota


def encode_prompts(records: list[dict], tokenizer, max_tokens: int) -> tuple[list[dict], list[list[int]], int]:
    """Each record's own chat messages through the chat template; records over max_tokens are dropped.
    Returns (kept records, their token ids, how many were dropped)."""
    kept, ids, report = encode_prompts_report(records, tokenizer, max_tokens)
    return kept, ids, sum(d.dropped for d in report.values())


def encode_prompts_report(records: list[dict], tokenizer, max_tokens: int
                          ) -> tuple[list[dict], list[list[int]], dict[str, "SourceDrops"]]:
    """encode_prompts with the per-source drop_report instead of a count (each prompt encoded once)."""
    ids = [tokenizer.encode_chat(r["prompt"]) for r in records]
    report = drop_report(records, [len(x) for x in ids], max_tokens)
    kept = [(r, x) for r, x in zip(records, ids) if len(x) <= max_tokens]
    return [r for r, _ in kept], [x for _, x in kept], report


@dataclass
class SourceDrops:
    """One data_source's prompts under a token limit."""
    kept: int = 0
    dropped: int = 0
    longest: int = 0   # tokens of its longest prompt, kept or dropped

    @property
    def total(self) -> int:
        return self.kept + self.dropped


def drop_report(records: list[dict], lengths: list[int], max_tokens: int) -> dict[str, SourceDrops]:
    """Per data_source (sorted): how many prompts fit in max_tokens, how many do not, and the longest."""
    if len(lengths) != len(records):
        raise ValueError(f"{len(lengths)} lengths for {len(records)} records")
    report: dict[str, SourceDrops] = defaultdict(SourceDrops)
    for r, n in zip(records, lengths):
        d = report[r["data_source"]]
        d.longest = max(d.longest, n)
        if n > max_tokens:
            d.dropped += 1
        else:
            d.kept += 1
    return dict(sorted(report.items()))


def format_drop_report(report: dict[str, SourceDrops], max_tokens: int, what: str) -> str:
    """One line: the prompts the limit dropped, in all and per source with its longest prompt."""
    dropped, total = sum(d.dropped for d in report.values()), sum(d.total for d in report.values())
    per_source = ", ".join(f"{s} {d.dropped} of {d.total} (longest {d.longest})" for s, d in report.items())
    return f"{what} prompts dropped over {max_tokens} tokens: {dropped} of {total}; {per_source}"


def drop_warnings(report: dict[str, SourceDrops], max_tokens: int, most: float = 0.5) -> list[str]:
    """A line for each source that loses more than `most` of its prompts to the limit: its results would
    rest on its few shortest prompts, or it would vanish from the run."""
    return [f"{s} loses {d.dropped} of its {d.total} prompts ({100 * d.dropped / d.total:.0f}%) to the "
            f"{max_tokens}-token prompt limit; its longest prompt is {d.longest} tokens"
            for s, d in report.items() if d.dropped > most * d.total]


def require_prompts(report: dict[str, SourceDrops], needed: int, what: str, max_tokens: int, hint: str = "") -> None:
    """Raise a one-line UsageError when fewer than `needed` prompts were kept, saying when the limit of
    max_tokens is why (and how long the dropped prompts were) rather than only that too few are left."""
    kept = sum(d.kept for d in report.values())
    if kept >= needed:
        return
    longer = [(s, d) for s, d in report.items() if d.dropped]
    if not longer:
        raise UsageError(f"{what}: {kept} prompts, {needed} needed" + (f"; {hint}" if hint else ""))
    total = sum(d.total for d in report.values())
    fit = f"only {kept} of {total} prompts fit" if kept else "no prompts fit"
    lengths = ", ".join(f"{s} up to {d.longest}" + (" tokens" if i == 0 else "") for i, (s, d) in enumerate(longer))
    raise UsageError(f"{what}: {fit} in {max_tokens} tokens, {needed} needed (the rest are longer: {lengths})"
                     + (f"; {hint}" if hint else ""))


def encode_for_run(train: list[dict], evals: list[dict], tokenizer, *, max_prompt_tokens: int, eval_size: int,
                   seed: int, prompts_per_step: int, max_new_tokens: int, max_positions: int, evaluate: bool,
                   log: Callable[[str], None] = print) -> tuple[list[dict], list[list[int]], list[dict], list[list[int]]]:
    """(train records, their prompt ids, eval records, theirs) for a training run: a seeded subset of eval_size
    evaluation records stratified by data_source, prompts over max_prompt_tokens dropped and reported per source
    (a warning when a source loses most of them), and a one-line UsageError for data the run cannot use: too few
    training prompts, no evaluation prompt when an evaluation was asked for, or prompts that leave the model no
    room for max_new_tokens."""
    evals = stratified_subset(evals, eval_size, seed)
    train, train_ids, train_report = encode_prompts_report(train, tokenizer, max_prompt_tokens)
    evals, eval_ids, eval_report = encode_prompts_report(evals, tokenizer, max_prompt_tokens)
    for what, report in (("train", train_report), ("eval", eval_report)):
        if any(s.dropped for s in report.values()):
            log(format_drop_report(report, max_prompt_tokens, what))
        for warning in drop_warnings(report, max_prompt_tokens):
            log(f"WARNING: {what}: {warning}")
    hint = f"raise --max-prompt-tokens (the model has {max_positions} positions) or use shorter prompts"
    require_prompts(train_report, prompts_per_step, "training", max_prompt_tokens,
                    hint=f"--prompts-per-step is {prompts_per_step}; {hint}")
    if evaluate:
        require_prompts(eval_report, 1, "evaluation", max_prompt_tokens, hint=hint)
    longest = max(len(x) for x in train_ids + eval_ids)
    if longest + max_new_tokens > max_positions:
        raise UsageError(f"the longest prompt ({longest} tokens) + --max-new-tokens {max_new_tokens} exceeds the "
                         f"model's max_position_embeddings ({max_positions}); lower --max-new-tokens or "
                         "--max-prompt-tokens")
    return train, train_ids, evals, eval_ids


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
