"""Tests for nano_gtalign/config.py: train.py's options defined once, ranges checked at parse time, presets."""
from __future__ import annotations

from dataclasses import fields, replace

import pytest

import train
from nano_gtalign.config import TrainConfig, applicable_flags, build_parser, parse_config
from nano_gtalign.errors import UsageError
from nano_gtalign.judges import JudgeOptions

REAL = ["--model", "m", "--data", "d.jsonl"]


def test_no_flags_give_the_dataclass_defaults():
    cfg = parse_config(REAL, TrainConfig())
    assert cfg == replace(TrainConfig(), model="m", data=["d.jsonl"])
    assert cfg.judge == JudgeOptions() and cfg.mini_batches == 1


def test_every_field_is_one_flag_and_flags_keep_their_names():
    parser = build_parser(TrainConfig())
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    cfg = parse_config(REAL, TrainConfig())
    assert set(cfg.flags()) == dests  # checkpoints and metrics.jsonl keep every flag by its name
    assert cfg.flags()["judge"] == "rule" and cfg.flags()["judge_timeout"] == 60.0
    assert parse_config(REAL + ["--ppo-epochs", "3"], TrainConfig()).epochs == 3  # the old name still works
    assert parse_config(REAL + ["--epochs", "2", "--prompts-per-step", "8", "--mini-batch-size", "2"],
                        TrainConfig()).mini_batches == 4


def test_every_numeric_option_has_a_range():
    unchecked = [f.name for f in fields(TrainConfig) if f.name != "judge"
                 and f.type.split("|")[0].strip() in ("int", "float") and f.metadata["check"] is None]
    assert unchecked == []


@pytest.mark.parametrize("flag, value, words", [
    ("--top-p", "2", "--top-p must be in (0, 1], got 2.0"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--top-k", "-1", "--top-k must be >= 0, got -1"),
    ("--clip-low", "-1", "--clip-low must be in [0, 1), got -1.0"),
    ("--clip-high", "-5", "--clip-high must be a finite number >= 0, got -5.0"),
    ("--dual-clip", "-1", "--dual-clip must be 0 (off) or a finite number > 1, got -1.0"),
    ("--dual-clip", "0.5", "--dual-clip must be 0 (off) or a finite number > 1, got 0.5"),
    ("--adv-eps", "-1", "--adv-eps must be a finite number > 0, got -1.0"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0, got -1.0"),
    ("--beta1", "2", "--beta1 must be in [0, 1), got 2.0"),
    ("--threads", "-1", "--threads must be >= 0, got -1"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--eval-temperature", "nan", "--eval-temperature must be a finite number >= 0, got nan"),
    ("--grad-clip", "-1", "--grad-clip must be a finite number >= 0, got -1.0"),
    ("--gamma", "1.5", "--gamma must be in [0, 1], got 1.5"),
    ("--steps", "0", "--steps must be >= 1, got 0"),
    ("--eval-every", "-2", "--eval-every must be >= -1, got -2"),
    ("--seed", "-1", "--seed must be in [0, 2^32), got -1"),
])
def test_a_bad_value_is_one_line_naming_the_flag(flag, value, words):
    with pytest.raises(UsageError) as e:
        parse_config(REAL + [flag, value], TrainConfig())
    assert str(e.value) == words


def test_checks_that_involve_several_options():
    for argv, words in [(["--prompts-per-step", "6", "--mini-batch-size", "4"], "must divide"),
                        (["--eval-samples", "3"], "--eval-temperature must be > 0 when --eval-samples > 1"),
                        (["--old-logp", "sampler", "--top-p", "0.9"], "--old-logp sampler needs --top-k 0"),
                        (["--critic-model", "c"], "--critic-model needs --algo ppo")]:
        with pytest.raises(UsageError, match=words):
            parse_config(REAL + argv, TrainConfig())


def test_presets_are_replacements_of_the_defaults():
    assert train.parse_args([]) == replace(TrainConfig(), **train.DEMO_DEFAULTS)
    assert train.parse_args(["--algo", "ppo"]) == replace(
        TrainConfig(), **train.DEMO_DEFAULTS | train.PPO_DEFAULTS | train.DEMO_PPO_DEFAULTS, algo="ppo")
    assert train.parse_args(REAL + ["--algo", "ppo"]) == replace(
        TrainConfig(), **train.PPO_DEFAULTS, algo="ppo", model="m", data=["d.jsonl"])
    assert train.parse_args(["--lr", "0.5"]).lr == 0.5  # a flag given wins over the preset


def test_help_says_which_flags_may_change_on_resume(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "With --resume only these may change: --resume, --steps," in text and "--judge-timeout" in text


def test_the_config_line_lists_what_the_run_reads():
    real = applicable_flags(parse_config(REAL, TrainConfig()))
    assert "sft_steps" not in real and "critic_lr" not in real and real["judge_failure"] == "exclude"
    ppo = applicable_flags(parse_config(REAL + ["--algo", "ppo"], TrainConfig()))
    assert ppo["critic_lr"] == 2e-6
