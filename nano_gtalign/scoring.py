"""Scoring: score completions against their records with ONE judge call per batch, as the user reward U,
the LLM reward L and their welfare W of nano_gtalign/reward.py (docs/reward.md), with every term kept in a
RewardBreakdown. score_batch scores a batch; score_completion is a batch of one.

The steps of a batch:
1. check every record (data_source, ground truth, question) before any judging;
2. parse each completion's four blocks (game.split_blocks). A completion without a <response> block or
   with an unparseable payoff scores all zeros and is not judged;
3. the rule-computable terms: format, payoff spread, the rule's Pareto consistency, the length terms;
4. one judge.judge_many call for the batch: an answer request per parsed completion and, for the
   ablation L, a Pareto-consistency request (minerva, advbench and abg_coqa keep the main L and ask none);
5. the judged terms A_user, A_llm from the answer verdict (reward.task_answers), then U, L and W.

A failed verdict is not silently a zero: the breakdown has judge_failed=True and, with
judge_failure="exclude" (default), A_user, A_llm, U, L, W = NaN, and training must drop such samples
from the update; judge_failure="zero" scores it as a verdict of 0, as upstream did.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from nano_gtalign.game import (
    KEYS, STRATEGIES, Matrix, PayoffError, analyze_choice, format_ok, parse_payoff, pareto_consistency,
    pareto_frontier, split_blocks,
)
from nano_gtalign.judges import (
    JUDGE_FAILURES, PARETO_TASK, VERDICT_SCALES, JudgeRequest, Verdict, canonical_task,
)
from nano_gtalign.reward import (
    ABLATION_MAIN_L_SOURCES, BLEUS, LLM_REWARDS, TASKS, WELFARES, band, brevity, llm_reward, payoff_spread,
    task_answers, user_reward, welfare, wildguard_label,
)


@dataclass
class RewardBreakdown:
    format: float
    payoff_spread: float
    pareto_consistency: float
    answer_user: float
    answer_llm: float
    response_band: float
    reasoning_brevity: float
    full_band: float
    user: float
    llm: float
    welfare: float          # U, L, W
    action: str | None      # what <analyze> chose: a key, or a bare strategy if only that was named
    question_type: str | None
    strategy: str | None
    judge_failed: bool
    parse_error: str | None  # why the completion scored all zeros, else None
    data_source: str
    judge_error: str | None = None  # the failed verdict's error (also under judge_failure="zero")
    # The consistency term that entered the ablation L: the judge's 0 / 0.5 / 1 (the rule judge's 0/1);
    # None when L had none (main L, or a source in ABLATION_MAIN_L_SOURCES). pareto_consistency above is
    # always the rule's, for the metrics.
    pareto_judged: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _record_fields(record: dict, i: int) -> tuple[str, str, str]:
    """(task, question, ground_truth) of a record, or a ValueError naming what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"record {i} must be a dict, got {type(record).__name__}")
    source = record.get("data_source")
    task = canonical_task(source) if isinstance(source, str) else source
    if task not in TASKS:
        raise ValueError(f"record {i}: unknown data_source {source!r}; known: {', '.join(TASKS)} (and abg-coqa)")
    reward_model = record.get("reward_model")
    gt = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if not isinstance(gt, str):
        raise ValueError(f"record {i} ({source}): reward_model.ground_truth must be a string, got {type(gt).__name__}")
    if task == "wildguard":
        wildguard_label(gt)
    extra = record.get("extra_info") if isinstance(record.get("extra_info"), dict) else {}
    question = extra.get("single_turn_prompt")
    if not isinstance(question, str) or not question:
        # fall back to the last user message: of the conversation, else of the prompt
        messages = list(extra.get("chat_history") or []) or list(record.get("prompt") or [])
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        question = users[-1] if users else None
    if not isinstance(question, str) or not question:
        raise ValueError(f"record {i} ({source}): no extra_info.single_turn_prompt and no user message")
    return task, question, gt


def _choice_parts(action: str | None) -> tuple[str | None, str | None]:
    if action in KEYS:
        return action[:2], action[3:]
    if action in STRATEGIES:
        return None, action
    return None, None


def _zero(source: str, action: str | None, error: str) -> RewardBreakdown:
    qtype, strategy = _choice_parts(action)
    return RewardBreakdown(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                           action, qtype, strategy, False, error, source)


def _verdict_error(task: str, verdict: Verdict) -> str | None:
    """Why a verdict cannot be used, or None. An off-scale score is a judge failure, not a clamp."""
    if verdict.failed or verdict.score is None:
        return verdict.error or "judge returned no score"
    if isinstance(verdict.score, bool) or not isinstance(verdict.score, (int, float)):
        return f"{task} verdict score must be a number, got {type(verdict.score).__name__}"
    scale = VERDICT_SCALES[task]
    if not any(abs(verdict.score - s) <= 1e-9 for s in scale):
        return f"{task} verdict {verdict.score!r} is not on the scale {', '.join(f'{s:g}' for s in scale)}"
    return None


def score_completion(completion: str, record: dict, judge, *, welfare: str = "cobb_douglas",
                     llm_reward: str = "main", bleu: str = "char", judge_failure: str = "exclude") -> RewardBreakdown:
    """Score one completion against its record (one judge call unless it scores all zeros)."""
    return score_batch([completion], [record], judge, welfare=welfare, llm_reward=llm_reward, bleu=bleu,
                       judge_failure=judge_failure)[0]


def score_batch(completions: list[str], records: list[dict], judge, *, welfare: str = "cobb_douglas",
                llm_reward: str = "main", bleu: str = "char", judge_failure: str = "exclude") -> list[RewardBreakdown]:
    """Score each completion against its record with ONE judge.judge_many call for the batch.

    judge_failure: what a failed verdict counts as. "exclude" (ours): A_user, A_llm, U, L, W are NaN
    and training leaves the sample out. "zero" (upstream): it is scored as a verdict of 0 (through the
    task's mapping, so a harmful wildguard prompt still gets A_user = 1), giving finite U, L, W. Either
    way judge_failed=True and judge_error say what failed, so the failure is counted.
    llm_reward="ablation" adds one "pareto" request per completion (not for ABLATION_MAIN_L_SOURCES) to
    the same batch: the frontier keys and the <analyze> text, scored 0 / 0.5 / 1 by the judge."""
    # the keyword names shadow the welfare/llm_reward functions imported from reward, hence the hand-off
    return _score_batch(completions, records, judge, _Options(welfare, llm_reward, bleu, judge_failure))


@dataclass
class _Options:
    welfare: str
    llm_reward: str
    bleu: str
    judge_failure: str

    def check(self) -> None:
        # checked up front so a typo fails before any parsing or judging
        if self.welfare not in WELFARES:
            raise ValueError(f"unknown welfare {self.welfare!r}; use one of {WELFARES}")
        if self.llm_reward not in LLM_REWARDS:
            raise ValueError(f"unknown llm_reward {self.llm_reward!r}; use one of {LLM_REWARDS}")
        if self.bleu not in BLEUS:
            raise ValueError(f"unknown bleu {self.bleu!r}; use one of {BLEUS}")
        if self.judge_failure not in JUDGE_FAILURES:
            raise ValueError(f"unknown judge_failure {self.judge_failure!r}; use one of {JUDGE_FAILURES}")


@dataclass
class _Pending:
    """A completion that parsed, with every term the judge does not decide, awaiting its verdicts.
    pareto: how the ablation's consistency term is had: "none" (main L), "judge" (a second request
    follows the answer request), "empty" (no <analyze> text to judge: 0 without asking)."""
    index: int
    task: str
    response: str
    ground_truth: str
    source: str
    action: str | None
    terms: dict[str, float]
    pareto: str = "none"


def _check_batch(completions, records) -> list[tuple[str, str, str]]:
    """(task, question, ground_truth) per record, or a ValueError for a malformed batch."""
    if not isinstance(completions, list) or not isinstance(records, list):
        raise ValueError("score_batch needs a list of completions and a list of records")
    if len(completions) != len(records):
        raise ValueError(f"{len(completions)} completions but {len(records)} records")
    # validate every record before any judging so a bad record costs no judge calls
    return [_record_fields(r, i) for i, r in enumerate(records)]


def _judge_free_terms(completion: str, response: str, matrix: Matrix, response_start: int) -> dict[str, float]:
    return dict(
        format=float(format_ok(completion)), payoff_spread=payoff_spread(matrix),
        pareto_consistency=pareto_consistency(completion),
        response_band=band(response, 20, 500),
        reasoning_brevity=brevity(completion[:response_start], 500),
        full_band=band(completion, 500, 1000),
    )


def _prepare(i: int, completion: str, record: dict, fields: tuple[str, str, str], llm_variant: str
             ) -> RewardBreakdown | tuple[_Pending, list[JudgeRequest]]:
    """The judge-free part of scoring completion i: a finished all-zero breakdown when it has no
    response or no parseable payoff, else its pending terms and the requests for its verdicts (the
    answer, then, for the ablation L, the Pareto-consistency check)."""
    if not isinstance(completion, str):
        raise ValueError(f"completion {i} must be a str, got {type(completion).__name__}")
    task, question, gt = fields
    source = record["data_source"]
    blocks = split_blocks(completion)
    action = analyze_choice(blocks.analyze)
    if blocks.response is None:
        return _zero(source, action, "no <response>...</response> block")
    if blocks.payoff is None:
        return _zero(source, action, "no <payoff>...</payoff> block")
    try:
        matrix = parse_payoff(blocks.payoff)
    except PayoffError as e:
        return _zero(source, action, str(e))
    response = blocks.response.strip()
    terms = _judge_free_terms(completion, response, matrix, blocks.response_start)
    requests = [JudgeRequest(task=task, question=question, response=response, ground_truth=gt,
                             extra={"data_source": source, "extra_info": record.get("extra_info") or {}})]
    pareto = "none"
    if llm_variant == "ablation" and task not in ABLATION_MAIN_L_SOURCES:
        analyze = (blocks.analyze or "").strip()
        pareto = "judge" if analyze else "empty"   # nothing to judge scores 0, as a missing choice would
        if analyze:
            requests.append(JudgeRequest(task=PARETO_TASK, question=question, response=analyze,
                                         ground_truth=", ".join(pareto_frontier(matrix)),
                                         extra={"data_source": source}))
    return _Pending(i, task, response, gt, source, action, terms, pareto), requests


def _judge_all(judge, requests: list[JudgeRequest]) -> list[Verdict]:
    # one call for the whole batch lets a judge batch or parallelise its work
    verdicts = judge.judge_many(requests) if requests else []
    if len(verdicts) != len(requests):
        raise RuntimeError(f"judge returned {len(verdicts)} verdicts for {len(requests)} requests")
    return verdicts


def _judged_scores(p: _Pending, verdicts: list[Verdict], zero_failures: bool
                   ) -> tuple[float | None, float | None, str | None]:
    """(answer verdict r, Pareto-consistency score, error) of a pending completion. A failed verdict is
    None, or 0 when zero_failures (upstream); error joins the failures' causes, None if all succeeded."""
    errors = []
    error = _verdict_error(p.task, verdicts[0])
    if error is None:
        r = float(verdicts[0].score)
    else:
        errors.append(error)
        r = 0.0 if zero_failures else None
    consistency = None if p.pareto == "none" else 0.0
    if p.pareto == "judge":
        error = _verdict_error(PARETO_TASK, verdicts[1])
        if error is None:
            consistency = float(verdicts[1].score)
        else:
            errors.append(f"Pareto-consistency check: {error}")
            consistency = 0.0 if zero_failures else None
    return r, consistency, "; ".join(errors) or None


def _finish(p: _Pending, verdicts: list[Verdict], opts: _Options) -> RewardBreakdown:
    """The final breakdown of a pending completion from its verdicts. A failed verdict gives NaN answer
    terms and rewards (not zeros) so training can drop the sample, or, with judge_failure="zero", is
    scored as 0; judge_failed is set either way."""
    t = p.terms
    qtype, strategy = _choice_parts(p.action)
    r, consistency, error = _judged_scores(p, verdicts, opts.judge_failure == "zero")
    nan = float("nan")
    if r is None or (p.pareto == "judge" and consistency is None):
        a_user = a_llm = U = L = W = nan
        consistency = nan if consistency is None else consistency
    else:
        a_user, a_llm = task_answers(p.task, r, p.response, p.ground_truth, opts.bleu)
        U = user_reward(a_user, t["response_band"], t["reasoning_brevity"])
        if p.pareto == "none":
            L = llm_reward(t["format"], t["payoff_spread"], a_llm, t["full_band"])
        else:
            L = llm_reward(t["format"], t["payoff_spread"], a_llm, t["full_band"], consistency, "ablation")
        W = welfare(U, L, opts.welfare)
    return RewardBreakdown(
        format=t["format"], payoff_spread=t["payoff_spread"], pareto_consistency=t["pareto_consistency"],
        answer_user=a_user, answer_llm=a_llm, response_band=t["response_band"],
        reasoning_brevity=t["reasoning_brevity"], full_band=t["full_band"], user=U, llm=L, welfare=W,
        action=p.action, question_type=qtype, strategy=strategy, judge_failed=error is not None,
        parse_error=None, data_source=p.source, judge_error=error, pareto_judged=consistency)


def _score_batch(completions, records, judge, opts: _Options) -> list[RewardBreakdown]:
    opts.check()
    fields = _check_batch(completions, records)
    results: list[RewardBreakdown | None] = [None] * len(completions)
    pending: list[tuple[_Pending, int, int]] = []   # (completion, its first request, its request count)
    requests: list[JudgeRequest] = []
    for i, (completion, record, f) in enumerate(zip(completions, records, fields)):
        prepared = _prepare(i, completion, record, f, opts.llm_reward)
        if isinstance(prepared, RewardBreakdown):
            results[i] = prepared
        else:
            pending.append((prepared[0], len(requests), len(prepared[1])))
            requests += prepared[1]
    verdicts = _judge_all(judge, requests)
    for p, start, n in pending:
        results[p.index] = _finish(p, verdicts[start:start + n], opts)
    return results
