"""Training checkpoints (nano_gtalign/checkpoint.py): every file verifies itself, the manifest's messages only
call a checkpoint intact after checking it, failed saves keep the earlier ones, stale temporaries go away.

The checkpoints here hold a small nn.Linear and its AdamW state, written by the real save_checkpoint
(single process); train.py's own resume path is tested in tests/test_train.py.

Run: python -m pytest tests/test_checkpoint.py -q
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import nano_gtalign.checkpoint as ckpt
from nano_gtalign.checkpoint import CHECKPOINT_FORMAT, MANIFEST, atomic_write_bytes, load_checkpoint, save_checkpoint
from nano_gtalign.data import Cursor
from nano_gtalign.distributed import Dist
from nano_gtalign.loader import CheckpointError


def trained(step: int):
    """(model, optimizer, scheduler) after one AdamW step; the weights differ per `step`."""
    torch.manual_seed(step)
    model = nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    optimizer.step()
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def save(out: Path, step: int) -> Path:
    """A real checkpoint at `step`, written the way train.py writes one."""
    model, optimizer, scheduler = trained(step)
    return save_checkpoint(out, step, model, optimizer, scheduler, Cursor(0, step), torch.Generator(),
                           {"lr": 1.0}, False, Dist())


def flip_byte(path: Path, where: float = 0.5) -> None:
    blob = bytearray(path.read_bytes())
    blob[int(len(blob) * where)] ^= 0xFF
    path.write_bytes(bytes(blob))


def one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture
def run_dir(tmp_path):
    """OUT_DIR with the checkpoints of steps 1, 2, 3 saved (2 and 3 kept)."""
    out = tmp_path / "run"
    out.mkdir()
    for step in (1, 2, 3):
        save(out, step)
    return out


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fails the test if anything is unpickled: a refused file must not be loaded at all."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a file that should have been refused")
    monkeypatch.setattr(torch, "load", refuse)


def test_round_trip_and_manifest(run_dir):
    entries = json.loads((run_dir / MANIFEST).read_text())["checkpoints"]
    assert [e["file"] for e in entries] == ["step_000002.pt", "step_000003.pt"]
    assert not (run_dir / "step_000001.pt").exists()
    state, path = load_checkpoint("latest", run_dir)
    assert path == run_dir / "step_000003.pt" and state["step"] == 3 and state["format"] == CHECKPOINT_FORMAT
    assert state["cursor"] == {"epoch": 0, "pos": 3}
    model, optimizer, _ = trained(3)
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert sorted(p.name for p in run_dir.iterdir()) == [MANIFEST, "step_000002.pt", "step_000003.pt"]


# ---------------------------------------------------------------- 4: every file carries its own check

def test_stray_copy_verifies_itself(run_dir, tmp_path):
    stray = tmp_path / "elsewhere" / "copy.pt"  # outside any manifest
    stray.parent.mkdir()
    shutil.copy(run_dir / "step_000003.pt", stray)
    state, path = load_checkpoint(str(stray), run_dir)
    assert path == stray and state["step"] == 3


def test_stray_copy_with_a_flipped_byte_is_refused_unloaded(run_dir, tmp_path, no_torch_load):
    stray = tmp_path / "copy.pt"
    shutil.copy(run_dir / "step_000003.pt", stray)
    flip_byte(stray, 0.5)  # inside the tensor data: torch.load alone would load it without complaint
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(stray), run_dir)
    assert one_line(info).startswith(f"{stray}: corrupt checkpoint (SHA-256")


def test_truncated_stray_copy_is_refused(run_dir, tmp_path, no_torch_load):
    stray = tmp_path / "copy.pt"
    blob = (run_dir / "step_000003.pt").read_bytes()
    stray.write_bytes(blob[:-100])
    with pytest.raises(CheckpointError, match=r"copy\.pt: truncated checkpoint"):
        load_checkpoint(str(stray), run_dir)
    stray.write_bytes(blob[:100])  # not even the whole header
    with pytest.raises(CheckpointError, match=r"copy\.pt: truncated checkpoint"):
        load_checkpoint(str(stray), run_dir)


def test_damaged_header_is_refused(run_dir, tmp_path, no_torch_load):
    stray = tmp_path / "copy.pt"
    blob = bytearray((run_dir / "step_000003.pt").read_bytes())
    at = blob.index(b'"sha256": "') + len(b'"sha256": "')
    blob[at] = ord("0") if blob[at] != ord("0") else ord("1")  # the recorded hash itself damaged
    stray.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"copy\.pt: corrupt checkpoint \(SHA-256"):
        load_checkpoint(str(stray), run_dir)


def test_old_format_and_foreign_files_are_named(tmp_path, no_torch_load):
    old = tmp_path / "old.pt"
    with open(old, "wb") as f:  # what train.py wrote before format 2: a bare torch.save file
        torch.save({"format": 1, "step": 1}, f)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(old), tmp_path)
    assert one_line(info).startswith(f"{old}: not a train.py checkpoint (format {CHECKPOINT_FORMAT})")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match=r"junk\.pt: unreadable checkpoint"):
        load_checkpoint(str(junk), tmp_path)


# ---------------------------------------------------------------- 13: manifest messages

def test_intact_is_said_only_after_verifying(run_dir):
    latest, previous = run_dir / "step_000003.pt", run_dir / "step_000002.pt"
    flip_byte(latest)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("latest", run_dir)
    assert f"the previous checkpoint {previous} is intact: --resume {previous}" in one_line(info)

    flip_byte(previous)  # now both are corrupt: neither message may call the other intact
    for spec, other in (("latest", previous), (str(previous), latest)):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(spec, run_dir)
        msg = one_line(info)
        assert "corrupt checkpoint (SHA-256" in msg and "intact:" not in msg, msg
        assert f"no other checkpoint in {run_dir / MANIFEST} is intact" in msg, msg

    previous.unlink()  # a missing previous file is not intact either
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("latest", run_dir)
    assert "intact:" not in one_line(info)


def test_explicit_file_loads_despite_a_corrupt_manifest(run_dir, capsys):
    (run_dir / MANIFEST).write_text("{not json")
    state, path = load_checkpoint(str(run_dir / "step_000002.pt"), run_dir)
    assert state["step"] == 2
    with pytest.raises(CheckpointError) as info:  # "latest" needs the manifest: refused, one line
        load_checkpoint("latest", run_dir)
    assert one_line(info).startswith(f"{run_dir / MANIFEST}: unreadable checkpoint manifest")
    # The resumed run's next save must not die on the broken manifest: it writes a new one, keeps the files.
    save(run_dir, 4)
    assert "warning" in capsys.readouterr().out
    entries = json.loads((run_dir / MANIFEST).read_text())["checkpoints"]
    assert [e["file"] for e in entries] == ["step_000004.pt"]
    assert (run_dir / "step_000002.pt").exists() and (run_dir / "step_000003.pt").exists()


@pytest.mark.parametrize("entry, problem", [
    ({"step": 3, "bytes": 1, "sha256": "0"}, "no 'file'"),
    ({"step": 3, "file": "../../x.pt", "bytes": 1, "sha256": "0"}, "'file'"),
    ({"step": "3", "file": "step_000003.pt", "bytes": 1, "sha256": "0"}, "'step'"),
    ("step_000003.pt", "not an object"),
])
def test_malformed_manifest_entry_is_one_line(run_dir, entry, problem):
    (run_dir / MANIFEST).write_text(json.dumps({"checkpoints": [entry]}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint("latest", run_dir)
    msg = one_line(info)
    assert msg.startswith(f"{run_dir / MANIFEST}: malformed checkpoint manifest") and problem in msg, msg
    (run_dir / MANIFEST).write_text(json.dumps({"runs": []}))
    with pytest.raises(CheckpointError, match="malformed checkpoint manifest"):
        load_checkpoint("latest", run_dir)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    (tmp_path / "step_000002.pt").write_bytes(b"kept")
    stale = [tmp_path / f".step_000003.pt.tmp-{dead}", tmp_path / f".checkpoints.json.tmp-{dead}",
             tmp_path / f".step_000004.pt.tmp-{os.getpid()}"]  # our own pid at start: a dead writer's, reused
    for p in stale:
        p.write_bytes(b"partial")
    export = tmp_path / f".final.tmp-{dead}"  # save_pretrained's half-written export directory
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / f".step_000005.pt.tmp-{alive}"  # a writer still running: left alone
    live.write_bytes(b"in progress")
    other = [tmp_path / ".hidden", tmp_path / "notes.tmp-1", tmp_path / f".final.old-{dead}"]
    other[0].write_bytes(b"")
    other[1].write_bytes(b"")
    other[2].mkdir()  # the previous export while final/ is absent: the only complete copy, kept
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale + [export])
    assert not any(p.exists() for p in stale + [export])
    assert live.exists() and all(p.exists() for p in other) and (tmp_path / "step_000002.pt").exists()
    (tmp_path / "final").mkdir()  # with final/ complete, a leftover previous export is stale
    assert ckpt.remove_stale_temporaries(tmp_path) == [other[2]]


# ---------------------------------------------------------------- 14: file modes, permission errors

def test_checkpoint_files_are_readable_by_others(run_dir):
    old = os.umask(0o022)
    try:
        save(run_dir, 4)
        atomic_write_bytes(run_dir / "x.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    for name in ("step_000004.pt", MANIFEST, "x.bin"):
        assert oct(os.stat(run_dir / name).st_mode & 0o777) == oct(0o644), name


def test_permission_denied_is_reported_as_such(run_dir, monkeypatch):
    target = run_dir / "step_000003.pt"
    real = open

    def deny(file, *args, **kwargs):
        if Path(file) == target:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(target), run_dir)
    assert one_line(info).startswith(f"permission denied reading {target}")


# ---------------------------------------------------------------- 11: a failed save keeps the earlier ones

def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_disk_full_during_save_keeps_earlier_checkpoints(run_dir, monkeypatch):
    before = snapshot(run_dir)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)  # part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError) as info:
        save(run_dir, 4)
    msg = one_line(info)
    assert msg.startswith(f"{run_dir / 'step_000004.pt'}: ") and "No space left on device" in msg, msg
    assert snapshot(run_dir) == before  # no temporary left, manifest and checkpoints untouched
    assert load_checkpoint("latest", run_dir)[0]["step"] == 3


def test_manifest_write_failure_names_the_manifest(run_dir, monkeypatch):
    before = json.loads((run_dir / MANIFEST).read_text())
    real = ckpt.atomic_write_bytes

    def fail_manifest(path, write):
        if path.name == MANIFEST:
            raise OSError(errno.EROFS, "Read-only file system")
        real(path, write)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", fail_manifest)
    with pytest.raises(CheckpointError) as info:
        save(run_dir, 4)
    msg = one_line(info)
    assert msg.startswith(f"{run_dir / MANIFEST}: ") and "Read-only file system" in msg, msg
    assert f"--resume {run_dir / 'step_000004.pt'}" in msg  # the new checkpoint itself is complete
    assert json.loads((run_dir / MANIFEST).read_text()) == before
    assert (run_dir / "step_000002.pt").exists() and (run_dir / "step_000003.pt").exists()


def test_save_into_a_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    with pytest.raises(CheckpointError) as info:
        save(out, 1)
    assert one_line(info).startswith(f"{out / 'step_000001.pt'}: ")


# ---------------------------------------------------------------- through train.py

@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    """train.py argv for a 2-prompt-per-step run of a tiny random model; a stand-in reward (as in
    tests/test_train.py: a random model never writes the four blocks) so the update has a gradient."""
    import train
    from nano_gtalign import evaluate, rollout
    from nano_gtalign.scoring import RewardBreakdown
    from tests.tiny import make_hf_model

    def score(completions, records, judge, **kwargs):
        out = []
        for text, record in zip(completions, records):
            w = len(set(text)) / 20
            out.append(RewardBreakdown(
                format=0.0, payoff_spread=0.0, pareto_consistency=0.0, answer_user=w, answer_llm=w,
                response_band=0.0, reasoning_brevity=0.0, full_band=0.0, user=w, llm=w, welfare=w, action=None,
                question_type=None, strategy="DA", judge_failed=False, parse_error=None,
                data_source=record["data_source"]))
        return out

    monkeypatch.setattr(rollout, "score_batch", score)
    monkeypatch.setattr(evaluate, "score_batch", score)
    model = make_hf_model(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    record = {"prompt": [{"role": "user", "content": "What is 3 + 4?"}], "data_source": "arith_demo",
              "reward_model": {"ground_truth": "7"}}
    data.write_text("".join(json.dumps(record) + "\n" for _ in range(8)))
    out = tmp_path / "run"
    argv = ["--model", str(model), "--data", str(data), "--eval-data", str(data), "--out-dir", str(out),
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "-1",
            "--save-every", "1"]
    return train, argv, out


def test_train_refuses_a_corrupt_stray_copy_and_resumes_beside_a_corrupt_manifest(tiny_run, tmp_path):
    train, argv, out = tiny_run
    train.main(argv + ["--steps", "2"])
    stray = tmp_path / "copy.pt"
    shutil.copy(out / "step_000002.pt", stray)
    flip_byte(stray)
    with pytest.raises(CheckpointError, match=r"copy\.pt: corrupt checkpoint \(SHA-256"):
        train.main(argv + ["--steps", "3", "--resume", str(stray)])
    (out / MANIFEST).write_text("{}")  # unreadable: --resume FILE still works, and the run saves on
    res = train.main(argv + ["--steps", "3", "--resume", str(out / "step_000002.pt")])
    assert [m["step"] for m in res.history] == [3] and res.final_dir is not None
    assert [e["file"] for e in json.loads((out / MANIFEST).read_text())["checkpoints"]] == ["step_000003.pt"]


# ---------------------------------------------------------------- a checkpoint is untrusted input

class _RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint from anywhere could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "step_000001.pt"
    # A valid header and SHA-256 over a payload that carries a __reduce__ call: integrity, not origin.
    atomic_write_bytes(bad, lambda f: ckpt._write_checkpoint(f, {"format": CHECKPOINT_FORMAT, "step": 1,
                                                                 "x": _RunsCode(marker)}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(bad), tmp_path)
    assert not marker.exists(), "loading the checkpoint ran its payload"
    assert one_line(info).startswith(f"{bad}: refused: the checkpoint holds something other than tensors")


def test_a_real_checkpoint_loads_without_unpickling_code(run_dir, monkeypatch):
    loads = []
    real_load = torch.load

    def spy(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    state, _ = load_checkpoint("latest", run_dir)
    assert loads == [True] and state["step"] == 3
    generator = torch.Generator()
    ckpt.set_rng_state(state["rng"][0], generator)  # numpy's state too, kept without numpy objects


def test_the_previous_format_is_refused_before_unpickling(tmp_path, no_torch_load, monkeypatch):
    old = tmp_path / "step_000001.pt"
    monkeypatch.setattr(ckpt, "CHECKPOINT_FORMAT", 2)
    atomic_write_bytes(old, lambda f: ckpt._write_checkpoint(f, {"format": 2, "step": 1}))
    monkeypatch.undo()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(old), tmp_path)
    assert "format 2" in one_line(info) and "could run code" in one_line(info)
