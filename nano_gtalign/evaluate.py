"""Held-out evaluation: generate completions for records, score them, and summarise (docs/metrics.md).

eval.py and train.py share these steps: `generate_completions` (this rank's share of the prompts, in
batches), `score_completions` (reward breakdown + metrics row per completion) and, for train.py's
periodic evaluation, `evaluate_policy`, which adds the correct-action rates the before/after table shows.

eval.py's fault handling lives here too: `check_scorable` and `check_writable` refuse bad input and
unwritable outputs before any judge call, `SampleLog` appends --per-sample lines as completions are generated
and as they are scored (and reads them back for --resume, checking each with `check_sample_line`), and
`judge_failures` counts what the judge could not score. Each line says what generated its completion (its
`generation`: the checkpoint's `checkpoint_identity` and the sampling settings), so --resume refuses a file
that another model or setting wrote (`generation_mismatch`). `compare_by_source` is eval.py --compare's
per-source view.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from nano_gtalign.config import TrainConfig
from nano_gtalign.data import check_record, json_type, parse_json_line
from nano_gtalign.distributed import Dist, gather_lists, generation_mode
from nano_gtalign.errors import UsageError
from nano_gtalign.loader import TOKENIZER_FILES
from nano_gtalign.metrics import compare, group_metrics, sample_row
from nano_gtalign.policy import autocast, compute_dtype
from nano_gtalign.sampling import SamplingParams, generate
from nano_gtalign.scoring import score_batch

# The correct strategies per question type, for records that say their type (arith_demo): a clear (DQ)
# question is served by answering (DA, AQ), a vague (VQ) one by a clarifying question (CQ).
GOOD_ACTIONS = {"DQ": ("DA", "AQ"), "VQ": ("CQ",)}


@dataclass(order=True)
class Completion:
    index: int                 # the record's index in the evaluated list
    sample: int                # which of the record's num_samples completions
    text: str
    finish_reason: str         # eos | stop | length
    generated_tokens: int      # tokens the sampler produced, EOS included


def generate_completions(model, tokenizer, prompts: dict[int, list[int]], order: list[int], params: SamplingParams,
                         *, batch_size: int, num_samples: int = 1, generator: torch.Generator | None = None,
                         log: Callable[[str], None] | None = None) -> list[Completion]:
    """num_samples completions of prompts[i] for every i in `order`, batch_size prompts per generate call."""
    out = []
    t0 = time.perf_counter()
    for b in range(0, len(order), batch_size):
        batch = order[b: b + batch_size]
        gen = generate(model, tokenizer, [prompts[i] for i in batch], params, num_samples=num_samples,
                       generator=generator)
        n_tokens = gen.completion_mask.sum(dim=1).tolist()
        for r, text in enumerate(gen.texts):
            out.append(Completion(batch[r // num_samples], r % num_samples, text, gen.finish_reasons[r],
                                  int(n_tokens[r])))
        if log:
            log(f"generated {min(b + batch_size, len(order))}/{len(order)} prompts ({time.perf_counter() - t0:.1f}s)")
    return out


def score_completions(pairs: list[tuple[dict, str]], judge, *, welfare: str, llm_reward: str, bleu: str,
                      judge_failure: str = "exclude", generated_tokens: list[int | None] | None = None,
                      count_tokens: Callable[[str], int] | None = None, chunk: int = 256,
                      log: Callable[[str], None] | None = None,
                      on_chunk: Callable[[int, list[dict], list], None] | None = None) -> tuple[list[dict], list]:
    """Metrics rows (metrics.sample_row) and reward breakdowns of (record, completion) pairs, `chunk` at a
    time (bounds memory, shows progress); on_chunk(start, rows, breakdowns) gets each chunk as it is
    done (eval.py writes it out). Raises ValueError for a record the reward cannot use."""
    generated_tokens = generated_tokens or [None] * len(pairs)
    rows, breakdowns = [], []
    for c in range(0, len(pairs), chunk):
        part = pairs[c: c + chunk]
        scores = score_batch([p[1] for p in part], [p[0] for p in part], judge, welfare=welfare,
                             llm_reward=llm_reward, bleu=bleu, judge_failure=judge_failure)
        part_rows = [sample_row(b, text, record, count_tokens, n)
                     for (record, text), n, b in zip(part, generated_tokens[c: c + chunk], scores)]
        rows += part_rows
        breakdowns += scores
        if on_chunk:
            on_chunk(c, part_rows, scores)
        if log:
            log(f"scored {min(c + chunk, len(pairs))}/{len(pairs)} completions")
    return rows, breakdowns


def evaluate_policy(policy, tokenizer, records: list[dict], prompts: list[list[int]], cfg: TrainConfig, judge,
                    d: Dist) -> dict:
    """train.py's held-out evaluation (--eval-temperature, --eval-samples, --eval-batch-size): the metrics of
    docs/metrics.md over every rank's share, plus the correct-action rates per question type where records
    say their type.

    Sampled evaluation uses a generator seeded the same way at every evaluation, so two evaluations of
    the same policy draw the same tokens and a before/after difference is the policy's, not the dice's.
    """
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.eval_temperature)
    generator = torch.Generator(device=d.device).manual_seed(cfg.seed * 1000 + 500 + d.rank)
    mine = list(range(d.rank, len(records), d.world))
    with generation_mode(policy, cfg.fsdp), autocast(d.device, compute_dtype(cfg.dtype, d.device)):
        done = generate_completions(policy, tokenizer, dict(enumerate(prompts)), mine, params,
                                    batch_size=cfg.eval_batch_size, num_samples=cfg.eval_samples, generator=generator)
    rows, _ = score_completions([(records[c.index], c.text) for c in done], judge, welfare=cfg.welfare,
                                llm_reward=cfg.llm_reward, bleu=cfg.bleu, judge_failure=cfg.judge.settings.failure,
                                generated_tokens=[c.generated_tokens for c in done])
    for row, c in zip(rows, done):
        row["true_type"] = (records[c.index].get("extra_info") or {}).get("question_type")
    rows = gather_lists(d, rows)
    out = summarize(rows)
    sources = sorted({r["data_source"] for r in rows})
    if len(sources) > 1:  # a mix: one source's collapse must not hide behind the overall mean
        out["by_source"] = {s: summarize([r for r in rows if r["data_source"] == s]) for s in sources}
    return out


def summarize(rows: list[dict]) -> dict:
    """The before/after table's numbers (report.EVAL_COLUMNS) of scored rows carrying `true_type`."""
    m = group_metrics(rows)
    out = {k: m[k] for k in ("n", "welfare", "user", "llm", "answer_llm", "format_rate", "reasoning_chars",
                             "judge_failure_rate")}
    out["completion_tokens"] = sum(r["generated_tokens"] for r in rows) / max(len(rows), 1)
    for qtype, good in GOOD_ACTIONS.items():
        typed = [r for r in rows if r["true_type"] == qtype]
        out[f"action_ok_{qtype}"] = sum(r["strategy"] in good for r in typed) / len(typed) if typed else None
        scored = [r for r in typed if r["welfare"] is not None]
        out[f"answer_{qtype}"] = sum(r["answer_llm"] for r in scored) / len(scored) if scored else None
    return out


# -----------------------------------------------------------------------------
# eval.py's fault handling: checks before any judge call, --per-sample lines as they are scored, --resume

Key = tuple[str, int, int]  # (prompt_id, sample, k): the k-th completion with that prompt and sample index


def sample_keys(pairs: list[tuple[str, int]]) -> list[Key]:
    """A key per (prompt_id, sample) pair that stays unique when a prompt repeats (k counts repeats in order),
    so a --per-sample line is matched to the completion it scored."""
    seen: Counter = Counter()
    keys = []
    for pair in pairs:
        keys.append((*pair, seen[pair]))
        seen[pair] += 1
    return keys


def check_scorable(record: object, where: str) -> None:
    """data.check_record plus what the reward itself needs (a wildguard label, a question): raises UsageError
    naming `where` for a record scoring would refuse. Scoring an empty completion checks the record and
    asks no judge (a completion without blocks scores all zeros)."""
    check_record(record, where)
    try:
        score_batch([""], [record], judge=None)
    except ValueError as e:
        raise UsageError(f"{where}: {re.sub(r'^record 0( [(][^)]*[)])?:? ?', '', str(e))}") from None


def check_writable(path: str, flag: str) -> None:
    """Raise UsageError naming flag and path unless a file can be written there (its folder is made)."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        existed = p.exists()
        with open(p, "a", encoding="utf-8"):
            pass
        if not existed:
            p.unlink()
    except OSError as e:
        raise UsageError(f"{flag} {path} cannot be written: {e.strerror or e}") from None


def json_safe(x):
    """NaN/inf (e.g. metrics of an empty comparison) become null so the file is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _json_line(obj: dict) -> str:
    return json.dumps(json_safe(obj), ensure_ascii=False) + "\n"


LINE_FIELDS = ("prompt_id", "sample", "data_source", "judge_failed", "user", "llm")  # what --resume reads
PENDING_FIELDS = ("prompt_id", "sample", "record", "completion")  # a pending line: generated, not yet scored


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# What each field --resume and --compare read must hold: (test, what a good value is).
LINE_TYPES = {
    "prompt_id": (lambda v: isinstance(v, str), "a string"),
    "data_source": (lambda v: isinstance(v, str), "a string"),
    "judge_failed": (lambda v: isinstance(v, bool), "true or false"),
    "user": (lambda v: v is None or _is_number(v), "a number or null"),
    "llm": (lambda v: v is None or _is_number(v), "a number or null"),
    "completion": (lambda v: isinstance(v, str), "a string"),
    "generation": (lambda v: v is None or isinstance(v, dict), "an object"),
}


def check_sample_line(obj: object, where: str) -> bool:
    """Raise a one-line UsageError naming `where` unless obj is an eval.py --per-sample line whose fields are
    of the types --resume and --compare read them as (its record checked as --data's are); True for a pending
    line (generated, not yet scored)."""
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: not an eval.py --per-sample line (a JSON object), got {json_type(obj)}")
    pending = obj.get("pending") is True
    missing = [k for k in (PENDING_FIELDS if pending else LINE_FIELDS) if k not in obj]
    if missing:
        raise UsageError(f"{where}: not an eval.py --per-sample line (missing {', '.join(missing)})")
    sample = obj["sample"]
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
        got = sample if isinstance(sample, int) and not isinstance(sample, bool) else json_type(sample)
        raise UsageError(f"{where}: sample must be an integer >= 0, got {got}")
    for key, (ok, need) in LINE_TYPES.items():
        if key in obj and not ok(obj[key]):
            raise UsageError(f"{where}: {key} must be {need}, got {json_type(obj[key])}")
    if "record" in obj:
        check_record(obj["record"], where)
    return pending


def keyed(lines: list[dict]) -> dict[Key, dict]:
    """--per-sample lines by key (sample_keys over their prompt_id and sample, in file order)."""
    return dict(zip(sample_keys([(line["prompt_id"], line["sample"]) for line in lines]), lines))


# ---- what generated a completion: the checkpoint and the sampling settings, in every --per-sample line

SAMPLED_BYTES = 1 << 16  # of each weight file's start and end, for its fingerprint


def _digest(h) -> str:
    return h.hexdigest()[:16]


def checkpoint_identity(path: str | Path) -> dict[str, str]:
    """Short fingerprints of a checkpoint directory's weights and tokenizer, cheap enough to take on every run.
    weights: config.json whole, and each *.safetensors file's name, size and first and last 64 KiB (hashing
    gigabytes would not be cheap; a retrained model of the same shape differs there all the same). tokenizer:
    the files loader.load_tokenizer reads, whole. A copy of the directory elsewhere has the same identity.
    Raises OSError for a file it cannot read."""
    p = Path(path)
    weights = hashlib.sha256()
    for f in [p / "config.json", p / "model.safetensors.index.json", *sorted(p.glob("*.safetensors"))]:
        if not f.is_file():
            continue
        size = f.stat().st_size
        weights.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if f.suffix == ".json" or size <= 2 * SAMPLED_BYTES:
                weights.update(fh.read())
            else:
                weights.update(fh.read(SAMPLED_BYTES))
                fh.seek(size - SAMPLED_BYTES)
                weights.update(fh.read(SAMPLED_BYTES))
    tokenizer = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (p / name).is_file():
            tokenizer.update(f"{name}\0".encode() + (p / name).read_bytes())
    return {"weights": _digest(weights), "tokenizer": _digest(tokenizer)}


# The settings a completion depends on, in the order a mismatch is reported; "model" (the path it was loaded
# from) is shown but not compared: a copy of the checkpoint elsewhere generates the same completions.
GENERATION_KEYS = ("weights", "tokenizer", "max_new_tokens", "temperature", "top_p", "top_k", "num_samples", "seed",
                   "dtype")


def generation_mismatch(old: dict, new: dict | None) -> str | None:
    """How the completion a --per-sample line holds (generated as `old` says) was made differently from this
    run's (`new`, None for --completions lines that do not say), in words naming the setting and both values;
    None when nothing differs. Settings only one side records (an eval.py with fewer) are not compared."""
    if new is None:
        return (f"was generated by the model at {old.get('model')}, and this run's completions do not say what "
                "generated them")
    extra = sorted(set(old) & set(new) - {"model", *GENERATION_KEYS})  # recorded by a newer eval.py
    for key in [k for k in GENERATION_KEYS if k in old and k in new] + extra:
        if old[key] == new[key]:
            continue
        if key == "weights":
            return (f"was generated by the model at {old.get('model')} (weights {old[key]}), this run's by the model "
                    f"at {new.get('model')} (weights {new[key]})")
        if key == "tokenizer":
            return (f"was generated with the tokenizer {old[key]} (of {old.get('model')}), this run's with the "
                    f"tokenizer {new[key]} (of {new.get('model')})")
        flag = "--" + key.replace("_", "-")
        return f"was generated with {flag} {old[key]}, this run's with {flag} {new[key]}"
    return None


class SampleLog:
    """A --per-sample file in progress. Each generated completion is appended first as a *pending* line
    (`"pending": true`, the record and the completion, no scores), then as its scored line once its chunk is
    scored; both are flushed at once. So an interrupted run or a scoring that fails loses no generation: eval.py
    --completions scores such a file, and --resume scores its pending lines without generating them again.
    With resume, `done` holds the scored lines an earlier run left and `pending` the completions it left
    unscored, by key. Without resume a file that already has lines is refused (it may be an interrupted run's
    work). finish() rewrites the file with the scored lines only."""

    def __init__(self, path: str, resume: bool):
        self.path, self.done, self.pending, self.new, self.new_pending = path, {}, {}, 0, 0
        self._line_of: dict[Key, int] = {}
        self._generation_of: dict[Key, dict | None] = {}
        p = Path(path)
        if p.is_file() and p.stat().st_size:
            if not resume:
                n = len(p.read_bytes().splitlines())
                raise UsageError(f"{path} already has {n} lines: pass --resume to continue it, or delete it "
                                 "(or pick another --per-sample) to start over")
            self._read()
        self._f = None

    def _read(self) -> None:
        data = Path(self.path).read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line cut short by a kill: drop it so appends start on a fresh line
            with open(self.path, "r+b") as f:
                f.truncate(end)
        scored, waiting = [], []
        for n, raw in enumerate(data[:end].splitlines(), 1):
            obj = parse_json_line(raw, self.path, n)
            if obj is None:
                continue
            (waiting if check_sample_line(obj, f"{self.path}:{n}") else scored).append((n, obj))
        for lines in (waiting, scored):  # a scored line's number (and generation) wins over its pending line's
            for key, (n, obj) in zip(keyed([obj for _, obj in lines]), lines):
                self._line_of[key], self._generation_of[key] = n, obj.get("generation")
        self.done = keyed([obj for _, obj in scored])
        self.pending = {k: v for k, v in keyed([obj for _, obj in waiting]).items() if k not in self.done}

    def check_keys(self, wanted: dict[Key, dict | None]) -> int:
        """Refuse a file with lines this run would not make: another --data, --limit or --num-samples (a key
        not wanted), or another model, tokenizer or generation setting (wanted[key], this run's generation of
        that completion, differs from the line's). Returns how many lines record no generation (written by an
        older eval.py): those cannot be checked."""
        unrecorded = 0
        for key in sorted(self._line_of, key=self._line_of.get):
            where = f"{self.path}:{self._line_of[key]}"
            if key not in wanted:
                raise UsageError(f"{where}: prompt_id {key[0]}, sample {key[1]} is not a completion of this run: "
                                 "--resume needs the same inputs, --limit and --num-samples")
            old = self._generation_of[key]
            if old is None:  # an older eval.py's line (or a --completions input that did not say either)
                unrecorded += wanted[key] is not None
                continue
            why = generation_mismatch(old, wanted[key])
            if why:
                raise UsageError(f"{where}: its completion {why}; --resume needs the same model, tokenizer and "
                                 "generation settings (delete the file, or pick another --per-sample, to start over)")
        return unrecorded

    @property
    def written(self) -> int:
        """Scored lines in the file."""
        return len(self.done) + self.new

    @property
    def has_pending(self) -> bool:
        return bool(self.pending or self.new_pending)

    def append(self, lines: list[dict]) -> None:
        self._write(lines)
        self.new += len(lines)

    def append_pending(self, lines: list[dict]) -> None:
        """Generated completions, before they are scored (each line gets "pending": true)."""
        self._write([{**line, "pending": True} for line in lines])
        self.new_pending += len(lines)

    def _write(self, lines: list[dict]) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write("".join(_json_line(line) for line in lines))
        self._f.flush()

    def finish(self, lines: list[dict]) -> None:
        """Rewrite the file as `lines` (the run's order) in one step: a crash meanwhile leaves the appended file."""
        if self._f is not None:
            self._f.close()
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(_json_line(line) for line in lines))
        os.replace(tmp, self.path)


def judge_failures(lines: list[dict], show: int = 3) -> tuple[int, int, list[str]]:
    """(failed, judged, the first `show` distinct errors) over --per-sample lines. judged: the lines the judge
    was asked about; a completion whose blocks did not parse scores all zeros without a verdict."""
    failed = judged = 0
    errors: list[str] = []
    for line in lines:
        b = line.get("breakdown") or {}
        if b.get("parse_error") is not None:
            continue
        judged += 1
        if line["judge_failed"]:
            failed += 1
            error = " ".join(str(b.get("judge_error") or "no error given").split())[:160]
            if error not in errors and len(errors) < show:
                errors.append(error)
    return failed, judged, errors


def compare_by_source(rows_a: list[dict], rows_b: list[dict], eps: float) -> dict[str, dict]:
    """metrics.compare within each data source (sorted) and over all: {source: ..., "overall": ...}. Each
    source's coverage, hypervolume and regret are normalised within that source."""
    sources = sorted({r["data_source"] for r in rows_a + rows_b})
    out = {s: compare([r for r in rows_a if r["data_source"] == s], [r for r in rows_b if r["data_source"] == s],
                      eps=eps) for s in sources}
    out["overall"] = compare(rows_a, rows_b, eps=eps)
    return out


COMPARE_COLUMNS = (  # (header, value of a compare() result or None, format)
    ("n", lambda c: c["n_matched"], "{:d}"), ("a>b", lambda c: c["dominance"]["a_dominates_b"], "{:d}"),
    ("b>a", lambda c: c["dominance"]["b_dominates_a"], "{:d}"), ("equal", lambda c: c["dominance"]["equal"], "{:d}"),
    ("incomp", lambda c: c["dominance"]["incomparable"], "{:d}"),
    ("U_a", lambda c: c["mean_a"] and c["mean_a"][0], "{:.4f}"),
    ("U_b", lambda c: c["mean_b"] and c["mean_b"][0], "{:.4f}"),
    ("L_a", lambda c: c["mean_a"] and c["mean_a"][1], "{:.4f}"),
    ("L_b", lambda c: c["mean_b"] and c["mean_b"][1], "{:.4f}"),
    ("cov_a", lambda c: c["coverage_a"], "{:.3f}"), ("cov_b", lambda c: c["coverage_b"], "{:.3f}"),
    ("regret_a", lambda c: c["regret_a"], "{:.4f}"), ("regret_b", lambda c: c["regret_b"], "{:.4f}"),
)


def format_comparison_by_source(by_source: dict[str, dict], name_a: str = "a", name_b: str = "b") -> str:
    """compare_by_source as a table, one row per source and overall; "-" where a source has no matched prompt."""
    width = max(len("source"), *(len(s) for s in by_source))
    lines = [f"per source (a = {name_a}, b = {name_b}; a>b: prompts where a dominates b; coverage and regret "
             "within each source, lower regret is better):",
             f"{'source':{width}s}  " + " ".join(f"{h:>8s}" for h, _, _ in COMPARE_COLUMNS)]
    for source, c in by_source.items():
        values = [get(c) for _, get, _ in COMPARE_COLUMNS]
        cells = ["-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f.format(v)
                 for v, (_, _, f) in zip(values, COMPARE_COLUMNS)]
        lines.append(f"{source:{width}s}  " + " ".join(f"{x:>8s}" for x in cells))
    return "\n".join(lines)
