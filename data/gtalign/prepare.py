r"""Convert the published GTAlign parquet files into our JSONL records.

    python data/gtalign/prepare.py --src /path/to/gtalign --out out/gtalign
    python data/gtalign/prepare.py --src /path/to/gtalign --split test --out out/gtalign/test.jsonl
    python data/gtalign/prepare.py --src /path/to/gtalign/gtalign_mix/math-hard/train.parquet \
        --out out/gtalign/math_train.jsonl --sources math-hard

--src is one parquet file or a directory searched recursively for *.parquet.
--out ending in .jsonl collects every kept row into that one file; any other
--out is a directory that mirrors the source tree (a/b/test.parquet ->
OUT/a/b/test.jsonl).

One JSON object per line, every column of the parquet row kept (docs/data.md):
`prompt` (chat messages), `data_source`, `reward_model.ground_truth`, and
`extra_info` with `single_turn_prompt`, `chat_history`,
`single_turn_completion`. Two deliberate changes, both reported:
- the published data_source "abg-coqa" is written as our task name
  "abg_coqa" (the published spelling stays in the row's `source` column);
- `chat_history` / `single_turn_completion`, absent from the abg-coqa file,
  are written as null so every record has the same keys.

Every row is validated; a bad row (unknown data_source, missing ground truth,
missing or empty messages, missing single_turn_prompt) is printed with its
file and row index and skipped, and the skips are counted at the end.
pyarrow is needed by this script only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Task names the reward and judges know (interfaces.md), and the published
# spellings that map onto them.
KNOWN_SOURCES = ("math-hard", "minerva", "medium", "wildguard", "advbench", "ambig_qa", "abg_coqa", "arith_demo")
SOURCE_ALIASES = {"abg-coqa": "abg_coqa"}
SPEC_EXTRA_FIELDS = ("single_turn_prompt", "chat_history", "single_turn_completion")


class RowError(ValueError):
    """A row that cannot become a record; the message says what is wrong."""


def canonical_source(name: str) -> str:
    return SOURCE_ALIASES.get(name, name)


def to_plain(value, where: str = "row"):
    """Plain JSON values from whatever a parquet reader returned.

    pyarrow's to_pylist gives Python lists, but readers that go through pandas
    give numpy arrays (lists of messages) and numpy scalars; both must become
    JSON lists/numbers. NaN/inf have no JSON form and are an error.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError(f"{where} is {value}, which has no JSON form")
        return value
    if isinstance(value, dict):
        return {str(k): to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy array or numpy scalar
        return to_plain(value.tolist(), where)
    if isinstance(value, bytes):
        raise RowError(f"{where} is binary data, expected text")
    raise RowError(f"{where} has unsupported type {type(value).__name__}")


def _check_messages(messages, where: str) -> None:
    if messages is None:
        raise RowError(f"missing messages ({where} is null)")
    if not isinstance(messages, list) or not messages:
        raise RowError(f"missing or empty messages ({where} is {'an empty list' if messages == [] else type(messages).__name__})")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RowError(f"{where}[{i}] is not a {{role, content}} message")
        if not m["content"].strip():
            raise RowError(f"{where}[{i}] ({m['role']}) has empty content")


def convert_row(row: dict) -> tuple[dict, list[str]]:
    """One parquet row -> (record, notes). Raises RowError for a row to skip.

    notes name SPEC fields that were absent and written as null (reported, not fatal).
    """
    rec = to_plain(row)
    source = rec.get("data_source")
    if not isinstance(source, str) or canonical_source(source) not in KNOWN_SOURCES:
        raise RowError(f"unknown data_source {source!r} (known: {', '.join(KNOWN_SOURCES)}, or 'abg-coqa')")
    rec["data_source"] = canonical_source(source)
    _check_messages(rec.get("prompt"), "prompt")
    rm = rec.get("reward_model")
    gt = rm.get("ground_truth") if isinstance(rm, dict) else None
    if not isinstance(gt, str) or not gt.strip():
        raise RowError(f"missing ground truth (reward_model.ground_truth is {gt!r})")
    extra = rec.get("extra_info")
    if not isinstance(extra, dict):
        raise RowError("missing extra_info")
    stp = extra.get("single_turn_prompt")
    if not isinstance(stp, str) or not stp.strip():
        raise RowError(f"missing extra_info.single_turn_prompt (got {stp!r})")
    notes = []
    for key in SPEC_EXTRA_FIELDS[1:]:
        if key not in extra:
            extra[key] = None
            notes.append(f"extra_info.{key} absent (written as null)")
    if extra["chat_history"] is not None:
        _check_messages(extra["chat_history"], "extra_info.chat_history")
    return rec, notes


@dataclass
class FileReport:
    path: str
    kept: int = 0
    skipped: int = 0
    filtered: int = 0  # rows of other data sources, left out on purpose by --sources
    error: str | None = None  # the whole file could not be read
    by_source: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)


def iter_parquet_rows(path: Path, batch_size: int = 512):
    """Yield the rows of one parquet file as dicts, a batch at a time (bounded memory)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("prepare.py needs pyarrow to read parquet: pip install pyarrow")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise RowError(f"cannot read parquet file: {e}") from None
    for batch in pf.iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()


def find_parquet(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    if src.is_dir():
        return sorted(src.rglob("*.parquet"))
    raise FileNotFoundError(f"--src {src} does not exist")


def convert_file(path: Path, sources: set[str] | None, log=print) -> tuple[list[dict], FileReport]:
    report = FileReport(str(path))
    records = []
    try:
        rows = iter_parquet_rows(path)
        for i, row in enumerate(rows):
            try:
                rec, notes = convert_row(row)
            except RowError as e:
                report.skipped += 1
                log(f"SKIP {path} row {i}: {e}")
                continue
            if sources is not None and rec["data_source"] not in sources:
                report.filtered += 1
                continue
            records.append(rec)
            report.kept += 1
            report.by_source[rec["data_source"]] += 1
            report.notes.update(notes)
    except RowError as e:
        log(f"SKIP {path}: {e}")
        report.error = str(e)
    return records, report


def prepare(src: Path, out: Path, sources: set[str] | None = None, split: str | None = None, log=print) -> list[FileReport]:
    """Convert every parquet file under src; write JSONL; return one report per file."""
    files = find_parquet(src)
    if split is not None:
        files = [f for f in files if f.stem == split]
    if not files:
        raise FileNotFoundError(f"no parquet files under {src}" + (f" named {split}.parquet" if split else ""))
    single = out.suffix == ".jsonl"
    reports = []
    sink = None
    if single:
        out.parent.mkdir(parents=True, exist_ok=True)
        sink = open(out, "w", encoding="utf-8")
    try:
        for f in files:
            records, report = convert_file(f, sources, log)
            reports.append(report)
            if single:
                target = sink
            else:
                rel = f.relative_to(src) if src.is_dir() else Path(f.name)
                dest = (out / rel).with_suffix(".jsonl")
                dest.parent.mkdir(parents=True, exist_ok=True)
                target = open(dest, "w", encoding="utf-8")
            for rec in records:
                target.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
            if not single:
                target.close()
                log(f"wrote {len(records)} records to {dest}")
    finally:
        if sink is not None:
            sink.close()
    if single:
        log(f"wrote {sum(r.kept for r in reports)} records to {out}")
    return reports


def summarize(reports: list[FileReport], log=print) -> None:
    log(f"{'file':60s} {'kept':>6s} {'skipped':>8s} {'filtered':>9s}")
    for r in reports:
        log(f"{r.path[-60:]:60s} {r.kept:6d} {r.skipped:8d} {r.filtered:9d}" + (f"  UNREADABLE: {r.error}" if r.error else ""))
        for note, n in sorted(r.notes.items()):
            log(f"    {n} rows: {note}")
    total = Counter()
    for r in reports:
        total.update(r.by_source)
    log("kept per data_source: " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    log(f"total: kept {sum(r.kept for r in reports)}, skipped {sum(r.skipped for r in reports)} (bad rows, listed above), "
        f"filtered out by --sources {sum(r.filtered for r in reports)}, unreadable files {sum(r.error is not None for r in reports)}")


def parse_sources(text: str | None) -> set[str] | None:
    if not text:
        return None
    names = {canonical_source(s.strip()) for s in text.split(",") if s.strip()}
    bad = sorted(n for n in names if n not in KNOWN_SOURCES)
    if bad:
        raise ValueError(f"--sources: unknown data source(s) {', '.join(bad)} (known: {', '.join(KNOWN_SOURCES)})")
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="a parquet file, or a directory searched recursively for *.parquet")
    ap.add_argument("--out", required=True, help="FILE.jsonl (all rows in one file) or a directory (mirrors --src)")
    ap.add_argument("--sources", default=None, help="comma-separated data sources to keep, e.g. math-hard,wildguard (default: all)")
    ap.add_argument("--split", default=None, help="only files named SPLIT.parquet, e.g. test or train (default: all)")
    args = ap.parse_args(argv)
    print(f"prepare: src={args.src} out={args.out} sources={args.sources or 'all'} split={args.split or 'all'}")
    try:
        sources = parse_sources(args.sources)
        reports = prepare(Path(args.src), Path(args.out), sources, args.split)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summarize(reports)
    if sum(r.kept for r in reports) == 0:
        print("error: no records were written", file=sys.stderr)
        return 1
    return 1 if any(r.error for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
