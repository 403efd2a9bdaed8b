"""Judges: turn (task, question, response, ground truth) into a verdict score.

This module holds what every judge shares, and the offline judge:
- the protocol (`judge`, `judge_many`; Verdict, JudgeRequest), the task names and canonical_task;
- RuleJudge, which scores math answers and the synthetic arith_demo task offline, with no model
  (the math answer extraction and LaTeX/number normalisation it uses are in nano_gtalign/answers.py);
- reading a verdict from an LLM judge's reply (parse_verdict) and the scale each task allows;
- JudgeSettings, JudgeOptions and the judge flags (add_judge_arguments, judge_options) train.py and eval.py
  share.
The HTTP judge (HTTPJudge: an OpenAI-compatible chat-completions server, e.g. vLLM serving Qwen3-32B) and
the entry points that build a judge from a --judge spec (make_judge, open_judge, open_configured_judge) are
in nano_gtalign/http_judge.py.

A verdict that could not be had is Verdict(failed=True, error=...), never a
silent score of 0 (docs/reward.md): the reward counts it and, by default, drops the sample.
Scales per task (docs/reward.md, docs/judges.md): math-hard/minerva/arith_demo 0|1, medium 0..4,
wildguard/advbench 0|0.5|1, ambig_qa/abg_coqa 0|1, and the ablation's Pareto-consistency check
("pareto") 0|0.5|1.

JudgeSettings holds how the HTTP judge samples (defaults: the paper's thinking Qwen3-32B) and what a
failed verdict counts as; JudgeOptions adds which judge and its concurrency and deadline;
add_judge_arguments gives train.py and eval.py one set of judge flags, judge_options reads them back.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

from nano_gtalign.answers import extract_answer, last_boxed, math_equal, normalize_answer, parse_number
from nano_gtalign.game import KEYS, STRATEGIES, analyze_choice


# ---------------------------------------------------------------------------
# Verdicts, requests, the protocol


@dataclass
class Verdict:
    score: float | None      # on the task's scale (see VERDICT_SCALES); None when failed
    failed: bool = False     # True when no verdict could be had (never a silent 0)
    error: str | None = None
    raw: str = ""            # the judge's reply (HTTP) or a one-line account (rule)


@dataclass
class JudgeRequest:
    task: str
    question: str
    response: str
    ground_truth: str
    extra: dict = field(default_factory=dict)


class Judge(Protocol):
    def judge(self, task: str, question: str, response: str, ground_truth: str,
              extra: dict | None = None) -> Verdict: ...

    def judge_many(self, requests: list[JudgeRequest]) -> list[Verdict]: ...


class JudgeUnavailableError(RuntimeError):
    """The judge server cannot be used at all (raised by HTTPJudge.check)."""


# The allowed verdict values per task; anything else from a judge is a failure.
VERDICT_SCALES: dict[str, tuple[float, ...]] = {
    "math-hard": (0.0, 1.0),
    "minerva": (0.0, 1.0),
    "arith_demo": (0.0, 1.0),
    "medium": (0.0, 1.0, 2.0, 3.0, 4.0),
    "wildguard": (0.0, 0.5, 1.0),
    "advbench": (0.0, 0.5, 1.0),
    "ambig_qa": (0.0, 1.0),
    "abg_coqa": (0.0, 1.0),
    "pareto": (0.0, 0.5, 1.0),
}
MATH_TASKS = ("math-hard", "minerva")
ABG_TASKS = ("ambig_qa", "abg_coqa")   # verdict in <abg>x</abg>; the others use \boxed{x}
# Not a data source: the ablation's check that <analyze> settles on a Pareto-optimal move. Its request
# carries the frontier keys, comma-separated, as ground_truth and the <analyze> text as response.
PARETO_TASK = "pareto"


def canonical_task(task: str) -> str:
    """The published data spells one source "abg-coqa"; everything here uses abg_coqa."""
    return "abg_coqa" if task == "abg-coqa" else task


def failed_verdict(error: str, raw: str = "") -> Verdict:
    return Verdict(score=None, failed=True, error=error, raw=raw)


# ---------------------------------------------------------------------------
# Judge settings and the judge flags shared by train.py and eval.py

JUDGE_FAILURES = ("exclude", "zero")   # what a failed verdict counts as (scoring.score_batch)
# What the paper's judge requests carried besides the sampling fields: Qwen3's thinking switched on.
PAPER_EXTRA_BODY = {"chat_template_kwargs": {"enable_thinking": True}}
# Request fields with a setting of their own; extra_body may not replace them behind that setting's back.
_OWN_FIELDS = ("model", "messages", "stream", "max_tokens", "temperature", "top_p", "top_k")


def check_extra_body(extra_body: object) -> dict:
    """A deep copy of extra_body, after checking it is a JSON object that leaves the request's own
    fields (model, messages, stream and the sampling fields) alone. Raises ValueError."""
    if not isinstance(extra_body, dict):
        raise ValueError(f"judge extra_body must be a JSON object, got {type(extra_body).__name__}")
    taken = [k for k in _OWN_FIELDS if k in extra_body]
    if taken:
        raise ValueError(f"judge extra_body may not set {', '.join(taken)}: the model comes from the judge "
                         "URL#model, the sampling fields from their own settings (--judge-max-tokens, "
                         "--judge-temperature, --judge-top-p, --judge-top-k)")
    try:   # a round trip: proves it can be sent, and nothing outside can change it afterwards
        return json.loads(json.dumps(extra_body, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"judge extra_body cannot be sent as JSON: {e}") from None


def check_sampling(*, max_tokens: int, temperature: float, top_p: float, top_k: int | None) -> None:
    """Raise ValueError naming the first sampling setting a chat-completions server would refuse."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"judge max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < math.inf):
        raise ValueError(f"judge temperature must be a finite number >= 0, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"judge top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1):
        raise ValueError(f"judge top_k must be None (not sent), -1 (no top-k) or an integer >= 1, got {top_k!r}")


@dataclass
class JudgeSettings:
    """How the HTTP judge samples, and what a failed verdict counts as.

    The defaults are the paper's judge, a thinking Qwen3-32B: replies of up to 32768 tokens (a
    thinking judge needs room, or its reply is cut before the verdict), temperature 0.6, top-p 0.95,
    top-k 20 (sent as the `top_k` field vLLM and sglang read; None: not sent) and extra_body, merged
    into every request, switching thinking on. failure: "exclude" (ours) leaves a failed judgement
    out of the update; "zero" (upstream) scores it as a verdict of 0 (scoring.score_batch). The rule
    judge samples nothing, so it ignores everything here except failure.
    """
    max_tokens: int = 32768
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = 20
    extra_body: dict = field(default_factory=lambda: copy.deepcopy(PAPER_EXTRA_BODY))
    failure: str = "exclude"

    def __post_init__(self):
        check_sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                       top_k=self.top_k)
        if self.failure not in JUDGE_FAILURES:
            raise ValueError(f"judge failure must be one of {JUDGE_FAILURES}, got {self.failure!r}")
        self.extra_body = check_extra_body(self.extra_body)

    def request_options(self) -> dict:
        """The HTTPJudge keyword arguments these settings stand for."""
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, extra_body=copy.deepcopy(self.extra_body))


def _flag_type(convert: Callable[[str], object], check: Callable[[object], bool], need: str):
    """An argparse type: convert the text, then refuse a value `check` rejects, saying what is needed."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return value
    return parse


def _top_k_flag(text: str) -> int | None:
    value = _flag_type(int, lambda k: k >= -1, "an integer >= -1 (0: not sent)")(text)
    return None if value == 0 else value


def parse_extra_body(text: str) -> dict:
    """--judge-extra-body: a JSON object (argparse type; a clear error for anything else)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"is not JSON ({e}); give an object such as "
                                         '\'{"chat_template_kwargs": {"enable_thinking": true}}\'') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got a JSON {type(value).__name__}: {text!r}")
    try:
        return check_extra_body(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def redact_url(url: str) -> str:
    """url with its user:password@ (if any) shown as ***@: what every message and record shows of a judge URL.

    Everything between the scheme and the last '@' counts as the userinfo, so a password with an unencoded
    '/', '?', '#' or '@' is hidden whole too; a URL with an '@' in its path or model name shows less than it
    could, never a password. A text without '://' is read from its start ("user:pw@host:8000/v1")."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"


@dataclass
class JudgeOptions:
    """The judge a run asked for: --judge SPEC ('rule', or an OpenAI-compatible URL[#model]), the HTTP
    requests in flight, each request's deadline in seconds, and how the judge samples. spec is the URL as
    given, credentials included (open_configured_judge needs them); flags() shows it redacted."""
    spec: str = "rule"
    concurrency: int = 32
    timeout: float = 60.0
    settings: JudgeSettings = field(default_factory=JudgeSettings)

    def flags(self) -> dict:
        """These options by their flags' names, as train.py prints them and checkpoints and metrics.jsonl keep
        them: the judge URL redacted (redact_url), so a password in it is never written down."""
        s = self.settings
        return dict(judge=redact_url(self.spec), judge_concurrency=self.concurrency, judge_timeout=self.timeout,
                    judge_max_tokens=s.max_tokens, judge_temperature=s.temperature, judge_top_p=s.top_p,
                    judge_top_k=s.top_k, judge_extra_body=s.extra_body, judge_failure=s.failure)


def add_judge_arguments(parser, defaults: JudgeOptions | None = None) -> None:
    """Add every judge flag to an argparse parser or argument group: train.py and eval.py share this one
    definition, and judge_options reads them back. Defaults: `defaults`, else JudgeOptions() (the paper's
    judge)."""
    o = defaults or JudgeOptions()
    d = o.settings
    parser.add_argument("--judge", default=o.spec, metavar="SPEC",
                        help="'rule' (offline: math-hard, minerva, arith_demo) or an OpenAI-compatible URL, "
                             "URL#model (default: %(default)s)")
    parser.add_argument("--judge-concurrency", type=_flag_type(int, lambda n: n >= 1, "an integer >= 1"),
                        default=o.concurrency, metavar="N",
                        help="HTTP judge requests in flight (train.py: per rank) (default: %(default)s)")
    parser.add_argument("--judge-timeout", type=_flag_type(float, lambda t: 0 < t < math.inf, "a number > 0"),
                        default=o.timeout, metavar="SECONDS",
                        help="seconds per HTTP judge request, a total deadline per attempt; a thinking judge "
                             "writing thousands of tokens may need more (default: %(default)s)")
    parser.add_argument("--judge-max-tokens", type=_flag_type(int, lambda n: n >= 1, "an integer >= 1"),
                        default=d.max_tokens, metavar="N", help="longest judge reply, thinking included (default: %(default)s)")
    parser.add_argument("--judge-temperature", type=_flag_type(float, lambda t: 0 <= t < math.inf, "a number >= 0"),
                        default=d.temperature, metavar="T", help="judge sampling temperature (default: %(default)s)")
    parser.add_argument("--judge-top-p", type=_flag_type(float, lambda p: 0 < p <= 1, "a number in (0, 1]"),
                        default=d.top_p, metavar="P", help="judge nucleus sampling (default: %(default)s)")
    parser.add_argument("--judge-top-k", type=_top_k_flag, default=d.top_k, metavar="K",
                        help="sent as the top_k field vLLM and sglang accept; 0: not sent (for servers that "
                             "refuse it), -1: no top-k (default: %(default)s)")
    parser.add_argument("--judge-extra-body", type=parse_extra_body, default=json.dumps(d.extra_body), metavar="JSON",
                        help="JSON object merged into every judge request; '{}' sends nothing extra "
                             "(default: %(default)s)")
    parser.add_argument("--judge-failure", choices=JUDGE_FAILURES, default=d.failure,
                        help="a judgement that failed: 'exclude' leaves the sample out of the update and the "
                             "means, 'zero' scores it as a verdict of 0 as upstream did (default: %(default)s)")


def judge_options(flags: argparse.Namespace) -> JudgeOptions:
    """The JudgeOptions of the flags add_judge_arguments defined (the parsed namespace of train.py or eval.py)."""
    settings = JudgeSettings(max_tokens=flags.judge_max_tokens, temperature=flags.judge_temperature,
                             top_p=flags.judge_top_p, top_k=flags.judge_top_k, extra_body=flags.judge_extra_body,
                             failure=flags.judge_failure)
    return JudgeOptions(flags.judge, flags.judge_concurrency, flags.judge_timeout, settings)

# ---------------------------------------------------------------------------
# The rule judge

_INT = re.compile(r"(?<![\d.])-?\d+(?:\.\d+)?")   # integers, and decimals so "85.0" is one token


def _arith_verdict(question: str, response: str, ground_truth: str) -> Verdict:
    """arith_demo: clear question -> 1 iff the last number in the response equals
    the integer ground truth; vague (ground truth "vague") -> 1 iff the response
    asks ("?") and states no integer that is not already in the question."""
    truth = ground_truth.strip()
    said = [float(x) for x in _INT.findall(response)]
    if truth == "vague":
        asked = {float(x) for x in _INT.findall(question)}
        new = [x for x in said if x not in asked]
        ok = "?" in response and not new
        why = "asks and adds no number" if ok else ("no question mark" if "?" not in response else f"states new number {new[0]:g}")
        return Verdict(score=float(ok), raw=f"vague question: {why}")
    if not re.fullmatch(r"-?\d+", truth):
        return failed_verdict(f"arith_demo ground truth must be an integer or 'vague', got {ground_truth!r}")
    if not said:
        return Verdict(score=0.0, raw="no number in response")
    return Verdict(score=float(said[-1] == int(truth)), raw=f"last number {said[-1]:g} vs truth {truth}")


def _math_verdict(response: str, ground_truth: str) -> Verdict:
    if not ground_truth.strip():
        return failed_verdict("empty ground truth: the rule judge cannot score this math record")
    answer = extract_answer(response)
    if answer is None:
        return Verdict(score=0.0, raw="no answer found in response")
    ok = math_equal(answer, ground_truth)
    return Verdict(score=float(ok), raw=f"answer {answer!r} vs truth {ground_truth!r}: {'equal' if ok else 'different'}")


def parse_frontier(text: str) -> list[str]:
    """The frontier keys of a "pareto" request's ground_truth ("DQ_DA, VQ_CQ"); ValueError if one is not a key."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in keys if k not in KEYS]
    if not keys or bad:
        raise ValueError(f"a Pareto frontier must be comma-separated payoff keys, got {text[:80]!r}")
    return keys


def _pareto_verdict(analyze: str, frontier_text: str) -> Verdict:
    """The rule for the ablation's Pareto-consistency check: 1 if the move <analyze> chose
    (game.analyze_choice: a key, or a bare strategy) is on the frontier, else 0, the same rule as
    game.pareto_consistency. It never gives the LLM judge's in-between 0.5."""
    try:
        frontier = parse_frontier(frontier_text)
    except ValueError as e:
        return failed_verdict(str(e))
    choice = analyze_choice(analyze)
    on = choice in frontier or (choice in STRATEGIES and any(k.endswith("_" + choice) for k in frontier))
    return Verdict(score=float(on), raw=f"analyze chose {choice}; frontier {', '.join(frontier)}")


RULE_TASKS = ("math-hard", "minerva", "arith_demo")  # the data sources the offline rule judge can score


class RuleJudge:
    """Offline judge for math-hard, minerva, arith_demo and the "pareto" check; other tasks fail."""

    def judge(self, task: str, question: str, response: str, ground_truth: str,
              extra: dict | None = None) -> Verdict:
        task = canonical_task(task)
        if task in MATH_TASKS:
            return _math_verdict(response, ground_truth)
        if task == "arith_demo":
            return _arith_verdict(question, response, ground_truth)
        if task == PARETO_TASK:
            return _pareto_verdict(response, ground_truth)
        return failed_verdict(f"rule judge cannot score task {task!r} (it scores math-hard, minerva, arith_demo; use an HTTP judge)")

    def judge_many(self, requests: list[JudgeRequest]) -> list[Verdict]:
        return [self.judge(r.task, r.question, r.response, r.ground_truth, r.extra) for r in requests]


# ---------------------------------------------------------------------------
# Reading a verdict from an LLM judge's reply


def after_think(text: str) -> str:
    """The reply with its thinking dropped: text after the last </think>; an
    unclosed <think> (reply cut off while thinking) leaves nothing."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return ""
    return text


def last_abg(text: str) -> str | None:
    """Content of the last complete <abg>x</abg> (x holding no tag), stripped, else None.

    Found from the end with rfind, so reading a reply is linear: a lazy regex, tried from every <abg>,
    rescanned the rest of the reply each time (57 s of CPU for a reply of 40,000 unclosed <abg>)."""
    end = text.rfind("</abg>")
    start = text.rfind("<abg>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    close = text.find("</abg>", start + len("<abg>"))   # no tag between <abg> and this one
    return text[start + len("<abg>"):close].strip()


_MAX_VERDICT_CHARS = 100   # the longest \boxed{} or <abg></abg> content read as a verdict


def verdict_scale(task: str, ground_truth: str | None = None) -> tuple[float, ...]:
    """The values a verdict may take: the task's VERDICT_SCALES, except that a WildGuard request labelled
    unharmful is scored 0 or 1 only (its prompt offers no 0.5, which means a safe alternative to a refusal)."""
    if task == "wildguard" and ground_truth is not None and ground_truth.strip().lower() == "unharmful":
        return (0.0, 1.0)
    return VERDICT_SCALES[task]


def parse_verdict(task: str, text: str, ground_truth: str | None = None) -> Verdict:
    """The task's verdict from a judge reply: \\boxed{x} (or <abg>x</abg> for
    ambig_qa/abg_coqa) after any thinking, x in verdict_scale(task, ground_truth)."""
    task = canonical_task(task)
    if task not in VERDICT_SCALES:
        return failed_verdict(f"unknown task {task!r} (known: {', '.join(VERDICT_SCALES)})", raw=text)
    answer = after_think(text)
    if task in ABG_TASKS:
        value, where = last_abg(answer), "<abg></abg>"
    else:
        value, where = last_boxed(answer), "\\boxed{}"
    if value is None:
        return failed_verdict(f"no verdict in the judge reply (expected {where} after any </think>)", raw=text)
    # Every value on a scale is a few characters (1, 0.5, \frac{1}{2}); a long one is no verdict, and
    # normalising it would cost more than linear time (and recurse once per nested \frac).
    number = parse_number(normalize_answer(value)[0]) if len(value) <= _MAX_VERDICT_CHARS else None
    allowed = verdict_scale(task, ground_truth)
    if number is None or number[0] not in allowed:
        which = task if allowed == VERDICT_SCALES[task] else f"{task} ({ground_truth.strip()})"
        return failed_verdict(f"no verdict in the judge reply: {where} holds {value[:40]!r}, "
                       f"allowed for {which}: {', '.join(f'{a:g}' for a in allowed)}", raw=text)
    return Verdict(score=number[0], raw=text)
