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
file and row index (the first 10 per file, then a count) and skipped, and the
skips are counted at the end. A file that cannot be converted at all (it cannot
be read, or it lacks a required column such as extra_info.single_turn_prompt)
is one SKIP FILE line naming it and the reason; the other files are still
converted, and the exit status is 1. Each output is written to a temporary file
in the same directory, fsynced and renamed over the target only once complete,
so a failure never truncates a good output from an earlier run; a single .jsonl
--out is written only if every file converted, and an output that would hold no
record (every row bad, or left out by --sources) is not written at all, so an
earlier one stays. A row that JSON cannot hold (nested more than 64 deep, an
integer wider than 64 bits, NaN, binary data) is a bad row like any other. An
unwritable --out is reported before anything is converted.
pyarrow is needed by this script only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Task names the reward and judges know (interfaces.md), and the published
# spellings that map onto them.
KNOWN_SOURCES = ("math-hard", "minerva", "medium", "wildguard", "advbench", "ambig_qa", "abg_coqa", "arith_demo")
SOURCE_ALIASES = {"abg-coqa": "abg_coqa"}
SPEC_EXTRA_FIELDS = ("single_turn_prompt", "chat_history", "single_turn_completion")
# Columns without which no row of a file can become a record (checked once per file, from its schema).
REQUIRED_COLUMNS = ("data_source", "prompt", "reward_model.ground_truth", "extra_info.single_turn_prompt")
# Bad rows named per file; the rest are counted in one line (a systematic fault must not flood the log).
MAX_LISTED_SKIPS = 10
# Deepest nesting of lists and objects a row may have, as nano_gtalign.data.MAX_DEPTH allows in a record (the
# published rows nest 4 deep); deeper is a bad row, where recursing further could end in a RecursionError.
MAX_DEPTH = 64


class RowError(ValueError):
    """A row that cannot become a record; the message says what is wrong."""


class FileError(Exception):
    """A whole parquet file that cannot be converted (unreadable, or a required column absent).

    rows: how many rows the failure cost, where known (a missing column costs them all).
    """

    def __init__(self, message: str, rows: int = 0):
        super().__init__(message)
        self.rows = rows


def canonical_source(name: str) -> str:
    return SOURCE_ALIASES.get(name, name)


def to_plain(value, where: str = "row", depth: int = 1):
    """Plain JSON values from whatever a parquet reader returned.

    pyarrow's to_pylist gives Python lists, but readers that go through pandas
    give numpy arrays (lists of messages) and numpy scalars; both must become
    JSON lists/numbers. NaN/inf have no JSON form and are an error, and so are
    integers wider than 64 bits (no parquet column holds one; past about 4300
    digits json.dumps itself refuses them) and lists or objects nested more
    than MAX_DEPTH deep (the row itself is depth 1).
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        if value.bit_length() > 64:
            raise RowError(f"{where} is an integer of {value.bit_length()} bits; parquet integers have at most 64")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError(f"{where} is {value}, which has no JSON form")
        return value
    if isinstance(value, (dict, list, tuple)) and depth > MAX_DEPTH:
        raise RowError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, dict):
        return {str(k): to_plain(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy array or numpy scalar
        return to_plain(value.tolist(), where, depth)
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

    notes name record fields (docs/data.md) that were absent and written as null (reported, not fatal).
    """
    rec = to_plain(row)
    source = rec.get("data_source")
    if not isinstance(source, str) or canonical_source(source) not in KNOWN_SOURCES:
        raise RowError(f"unknown data_source {source!r} (known: {', '.join(KNOWN_SOURCES)}, or 'abg-coqa')")
    rec["data_source"] = canonical_source(source)
    _check_messages(rec.get("prompt"), "prompt")
    rm = rec.get("reward_model")
    if rm is not None and not isinstance(rm, dict):
        raise RowError(f"reward_model must be an object with a ground_truth, got {type(rm).__name__}")
    gt = rm.get("ground_truth") if rm is not None else None
    if not isinstance(gt, str) or not gt.strip():
        raise RowError(f"missing ground truth (reward_model.ground_truth is {gt!r})")
    extra = rec.get("extra_info")
    if extra is None:
        raise RowError("missing extra_info")
    if not isinstance(extra, dict):
        raise RowError(f"extra_info must be an object, got {type(extra).__name__}")
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
    error: str | None = None  # the whole file could not be converted (unreadable, or a required column absent)
    by_source: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)


def one_line(e: BaseException) -> str:
    """An exception's message on one line: pyarrow's messages span several, and a log reader greps lines."""
    return " ".join(str(e).split())


def missing_column(schema) -> str | None:
    """The first required column (a dotted path into struct columns) that a file's arrow schema lacks, or None.

    Checked once per file so that a file without, say, extra_info.single_turn_prompt is one line naming the
    column, not one SKIP line per row. A column of another type (not a struct) is left to the per-row checks.
    """
    import pyarrow as pa

    for dotted in REQUIRED_COLUMNS:
        head, *rest = dotted.split(".")
        if head not in schema.names:
            return head
        kind = schema.field(head).type
        if rest and pa.types.is_struct(kind) and kind.get_field_index(rest[0]) < 0:
            return dotted
    return None


def open_parquet(path: Path):
    """Open one parquet file (reads only its footer) and check its columns; FileError if either fails."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("prepare.py needs pyarrow to read parquet: pip install pyarrow")
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise FileError(f"cannot read parquet file: {one_line(e)}") from None
    column = missing_column(pf.schema_arrow)
    if column is not None:
        n = pf.metadata.num_rows
        raise FileError(f"required column {column} is missing (all {n} rows skipped)", rows=n)
    return pf


def iter_parquet_rows(path: Path, batch_size: int = 512):
    """Yield the rows of one parquet file as dicts, a batch at a time (bounded memory).

    A damaged data page only shows once it is read, part-way through the file: that is a FileError too, so the
    caller can drop the rows it already has rather than write a silently shortened output.
    """
    pf = open_parquet(path)
    done = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size):
            yield from batch.to_pylist()
            done += batch.num_rows
    except Exception as e:  # OSError, ArrowInvalid, ... depending on what is broken
        raise FileError(f"cannot read parquet file after {done} rows: {one_line(e)}") from None


def find_parquet(src: Path, split: str | None = None) -> list[Path]:
    """The parquet files to convert: src itself, or every *.parquet below it (only SPLIT.parquet with split)."""
    if src.is_file():
        files = [src]
    elif src.is_dir():
        files = sorted(src.rglob("*.parquet"))
    else:
        raise FileNotFoundError(f"--src {src} does not exist")
    if split is not None:
        files = [f for f in files if f.stem == split]
    if not files:
        raise FileNotFoundError(f"no parquet files under {src}" + (f" named {split}.parquet" if split else ""))
    return files


def convert_file(path: Path, sources: set[str] | None, log=print,
                 max_listed: int = MAX_LISTED_SKIPS) -> tuple[list[dict], FileReport]:
    """Convert one parquet file: (records, report). Bad rows are skipped, the first max_listed of them named.

    A file is converted whole or not at all: on a file-level failure it returns no records and a report with
    only `error` (and, for a missing column, the rows it cost) set, and logs one line naming file and reason.
    """
    report = FileReport(str(path))
    records = []
    try:
        for i, row in enumerate(iter_parquet_rows(path)):
            try:
                rec, notes = convert_row(row)
            except RowError as e:
                report.skipped += 1
                if report.skipped <= max_listed:
                    log(f"SKIP {path} row {i}: {e}")
                continue
            if sources is not None and rec["data_source"] not in sources:
                report.filtered += 1
                continue
            records.append(rec)
            report.kept += 1
            report.by_source[rec["data_source"]] += 1
            report.notes.update(notes)
    except FileError as e:
        log(f"SKIP FILE {path}: {e}")
        return [], FileReport(str(path), skipped=e.rows, error=str(e))
    if report.skipped > max_listed:  # a bad column that slipped past the schema check must not flood the log
        log(f"SKIP {path}: ... {report.skipped - max_listed} more bad rows not listed ({report.skipped} in all)")
    return records, report


class AtomicJsonl:
    """A JSONL output written under a temporary name in its own directory and renamed over the target by
    commit(), after fsync: the target is only ever absent, the old complete file, or the new complete file.
    Leaving the `with` block without commit() deletes the temporary file and leaves the target as it was.
    """

    def __init__(self, dest: Path):
        self.dest = dest
        self.tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")  # same directory: os.replace is atomic
        self.file = open(self.tmp, "w", encoding="utf-8")
        self.lines = 0

    def write(self, records: list[dict]) -> None:
        for rec in records:
            self.file.write(json.dumps(rec, ensure_ascii=False, allow_nan=False) + "\n")
        self.lines += len(records)

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # the data is on disk before the name points at it
        self.file.close()
        os.replace(self.tmp, self.dest)
        _fsync_dir(self.dest.parent)

    def __enter__(self) -> "AtomicJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)  # gone already after commit()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in folder durable (POSIX); where a directory cannot be opened for that, it is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output(out: Path) -> None:
    """Fail before anything is converted when --out cannot be written: create its directory and a probe file
    there (os.access is no guide for root or a read-only mount). Raises ValueError naming the path."""
    single = out.suffix == ".jsonl"
    if single and out.is_dir():
        raise ValueError(f"--out {out} is a directory, but a .jsonl --out must be a file")
    folder = out.parent if single else out
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".prepare-probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out} cannot be written: {one_line(e)}") from None


def _not_written(dest: Path, why: str, log) -> None:
    log(f"not written: {dest} ({why}; " + ("existing file left unchanged)" if dest.exists() else "no file made)"))


def _prepare_tree(files: list[Path], src: Path, out: Path, sources, log) -> list[FileReport]:
    """One output per parquet file, mirroring the source tree; a file that failed or kept no record leaves its
    output as it was (an empty file would replace a good one from an earlier run)."""
    reports = []
    for f in files:
        records, report = convert_file(f, sources, log)
        reports.append(report)
        rel = f.relative_to(src) if src.is_dir() else Path(f.name)
        dest = (out / rel).with_suffix(".jsonl")
        if report.error:
            _not_written(dest, "its parquet file was not converted", log)
            continue
        if not records:
            _not_written(dest, f"no records kept from {f}", log)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        with AtomicJsonl(dest) as sink:
            sink.write(records)
            sink.commit()
        log(f"wrote {len(records)} records to {dest}")
    return reports


def _prepare_one_file(files: list[Path], out: Path, sources, log) -> list[FileReport]:
    """Every file's rows in one output, written only if every file converted and some record was kept: a file
    missing a whole source file would look complete, and an empty one would replace a good earlier output, so
    the existing output (if any) is kept instead."""
    reports = []
    with AtomicJsonl(out) as sink:
        for f in files:
            records, report = convert_file(f, sources, log)
            reports.append(report)
            sink.write(records)
        failed = sum(r.error is not None for r in reports)
        if not failed and sink.lines:
            sink.commit()
            log(f"wrote {sink.lines} records to {out}")
    if failed:
        _not_written(out, f"{failed} of {len(files)} parquet files were not converted", log)
    elif not sink.lines:
        _not_written(out, "no records kept", log)
    return reports


def prepare(src: Path, out: Path, sources: set[str] | None = None, split: str | None = None,
            log=print) -> list[FileReport]:
    """Convert every parquet file under src; write JSONL; return one report per file.

    --src and --out are both checked before any file is converted. Outputs are replaced atomically
    (AtomicJsonl), so neither a corrupt input nor a crash truncates a good output from an earlier run.
    """
    files = find_parquet(src, split)
    check_output(out)
    if out.suffix == ".jsonl":
        return _prepare_one_file(files, out, sources, log)
    return _prepare_tree(files, src, out, sources, log)


def summarize(reports: list[FileReport], log=print) -> None:
    log(f"{'file':60s} {'kept':>6s} {'skipped':>8s} {'filtered':>9s}")
    for r in reports:
        failed = f"  NOT CONVERTED: {r.error}" if r.error else ""
        log(f"{r.path[-60:]:60s} {r.kept:6d} {r.skipped:8d} {r.filtered:9d}{failed}")
        for note, n in sorted(r.notes.items()):
            log(f"    {n} rows: {note}")
    total = Counter()
    for r in reports:
        total.update(r.by_source)
    log("kept per data_source: " + ", ".join(f"{k} {v}" for k, v in sorted(total.items())))
    log(f"total: kept {sum(r.kept for r in reports)}, skipped {sum(r.skipped for r in reports)} (bad rows, listed above), "
        f"filtered out by --sources {sum(r.filtered for r in reports)}, "
        f"files not converted {sum(r.error is not None for r in reports)} (listed above)")


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
    except (ValueError, OSError) as e:  # bad arguments, --src missing, --out unwritable, a full disk
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    summarize(reports)
    if sum(r.kept for r in reports) == 0:
        print("error: no records were written", file=sys.stderr)
        return 1
    return 1 if any(r.error for r in reports) else 0  # the others were converted; still, not everything was


if __name__ == "__main__":
    sys.exit(main())
