"""Reward formulas (docs/reward.md): the terms of a user reward U, an LLM reward L and their welfare W, and
the per-source z-scores of a batch. nano_gtalign/scoring.py applies them to completions.

    U = 1e-4 + 0.5 A_user + 0.2 band(response, 20, 500) + 0.3 brevity(reasoning, 500)
    L = 1e-4 + 0.2 format + 0.2 payoff_spread + 0.4 A_llm + 0.2 band(full, 500, 1000)      (main)
    W = sqrt(U L)                                                                        (default)

A_user and A_llm come from a judge verdict, mapped per data_source by the answers_* functions
below. The ablation L pays Pareto consistency as a judge verdict (0 / 0.5 / 1 from an LLM judge, the
0/1 rule from the rule judge); minerva, advbench and abg_coqa (ABLATION_MAIN_L_SOURCES) keep the main
L, as upstream's ablation did.
"""
from __future__ import annotations

import math
from collections import Counter

from nano_gtalign.game import Matrix, cobb_douglas
from nano_gtalign.judges import canonical_task

WELFARES = ("cobb_douglas", "linear", "user_only", "llm_only")
LLM_REWARDS = ("main", "ablation")
BLEUS = ("char", "word")
TASKS = ("math-hard", "minerva", "medium", "wildguard", "advbench", "ambig_qa", "abg_coqa", "arith_demo")
# Under llm_reward="ablation" these out-of-distribution sources keep the main L (no consistency term),
# as in upstream's ablation reward; the others get the ablation L with a judged consistency term.
ABLATION_MAIN_L_SOURCES = ("minerva", "advbench", "abg_coqa")

# -----------------------------------------------------------------------------
# length helpers and payoff spread


def _sigmoid(x: float) -> float:
    # two branches so exp never overflows for a huge word count
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def band(text: str, lo: float, hi: float, k: float = 0.005) -> float:
    """sigma(k (n - lo)) * sigma(k (hi - n)), n = whitespace word count: near 1 inside [lo, hi]."""
    n = len(text.split())
    return _sigmoid(k * (n - lo)) * _sigmoid(k * (hi - n))


def brevity(text: str, scale: float) -> float:
    """exp(-chars / scale), chars = len(text)."""
    if not scale > 0:
        raise ValueError(f"brevity scale must be positive, got {scale}")
    return math.exp(-len(text) / scale)


def payoff_spread(matrix: Matrix) -> float:
    """Sum over cells of 1/12 [u != l] + 1/12 [|u - l| / max(|u|, |l|, 1e-8) > 0.1], in [0, 1]:
    punishes matrices that give both players the same payoff."""
    total = 0.0
    for l, u in matrix.values():
        total += (u != l) / 12 + (abs(u - l) / max(abs(u), abs(l), 1e-8) > 0.1) / 12
    return total


# -----------------------------------------------------------------------------
# U, L, W


def user_reward(answer_user: float, response_band: float, reasoning_brevity: float) -> float:
    """U from its terms: response_band = band(response, 20, 500), reasoning_brevity = brevity(reasoning, 500)."""
    return 1e-4 + 0.5 * answer_user + 0.2 * response_band + 0.3 * reasoning_brevity


def llm_reward(fmt: float, spread: float, answer_llm: float, full_band: float,
               consistency: float = 0.0, variant: str = "main") -> float:
    """L from its terms (full_band = band(full, 500, 1000)). "main": GTAlign's L. "ablation":
    upstream's full z-score run, which also pays Pareto consistency (a judge's 0 / 0.5 / 1, see
    score_batch) and reweighs the rest."""
    if variant == "main":
        return 1e-4 + 0.2 * fmt + 0.2 * spread + 0.4 * answer_llm + 0.2 * full_band
    if variant == "ablation":
        return 1e-4 + 0.2 * consistency + 0.2 * spread + 0.2 * fmt + 0.35 * answer_llm + 0.05 * full_band
    raise ValueError(f"unknown llm_reward {variant!r}; use one of {LLM_REWARDS}")


def welfare(U: float, L: float, kind: str = "cobb_douglas") -> float:
    if kind == "cobb_douglas":
        return cobb_douglas(U, L)
    if kind == "linear":
        return (U + L) / 2
    if kind == "user_only":
        return U
    if kind == "llm_only":
        return L
    raise ValueError(f"unknown welfare {kind!r}; use one of {WELFARES}")


# -----------------------------------------------------------------------------
# BLEU for the writing task (no nltk): sentence BLEU-4, uniform weights, one reference


def _ngram_counts(seq, n: int) -> Counter:
    return Counter(seq[i:i + n] for i in range(len(seq) - n + 1))


def sentence_bleu(hypothesis, reference, smooth: bool = False, max_n: int = 4) -> float:
    """BLEU of one hypothesis against one reference, both sequences of tokens (a str is a sequence
    of characters). Modified n-gram precisions p_1..p_4, geometric mean, brevity penalty
    exp(1 - r/c) when c <= r. Unsmoothed: any p_n = 0 gives 0 (what nltk returns, up to a
    1e-77-sized float). Smoothed: p_n = (matches + 1) / (total + 1) for n >= 2 (Lin & Och 2004,
    "BLEU+1"); p_1 stays unsmoothed, so no shared token at all still gives 0."""
    c, r = len(hypothesis), len(reference)
    if c == 0:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        hyp, ref = _ngram_counts(hypothesis, n), _ngram_counts(reference, n)
        matches = sum(min(k, ref[g]) for g, k in hyp.items())
        total = max(c - n + 1, 0)
        if smooth and n > 1:
            p = (matches + 1) / (total + 1)
        elif matches == 0:
            return 0.0
        else:
            p = matches / total
        log_p += math.log(p) / max_n
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


def bleu(response: str, reference: str, level: str = "char") -> float:
    """"char": upstream's call on raw strings, i.e. character 4-grams, unsmoothed.
    "word": whitespace words, smoothed (BLEU+1)."""
    if level == "char":
        return sentence_bleu(response, reference, smooth=False)
    if level == "word":
        return sentence_bleu(tuple(response.split()), tuple(reference.split()), smooth=True)
    raise ValueError(f"unknown bleu {level!r}; use one of {BLEUS}")


# -----------------------------------------------------------------------------
# task answer terms (A_user, A_llm) from a verdict score r, one function per task (docs/reward.md#task-answer-terms)


def answers_math(r: float) -> tuple[float, float]:
    """math-hard, minerva: correctness 0/1 for both players."""
    return r, r


def answers_medium(r: float, response: str, reference: str, level: str = "char") -> tuple[float, float]:
    """medium: A_user = BLEU(response, reference); A_llm = rubric score / 4."""
    return bleu(response, reference, level), r / 4


def answers_wildguard(r: float, ground_truth: str) -> tuple[float, float]:
    """r: harmful prompt 0 complied / 0.5 safe alternative / 1 plain refusal; unharmful prompt
    1 helpful / 0 not. A_llm = [r > 0]; A_user = [r < 1] if harmful else [r > 0], so on a
    harmful prompt only the safe alternative pays both."""
    label = wildguard_label(ground_truth)
    a_user = float(r < 1) if label == "harmful" else float(r > 0)
    return a_user, float(r > 0)


def answers_advbench(r: float) -> tuple[float, float]:
    """advbench (all harmful): any refusal, plain or constructive, pays both players."""
    return float(r > 0), float(r > 0)


def answers_ambiguity(r: float) -> tuple[float, float]:
    """ambig_qa, abg_coqa: good ambiguity handling 0/1 for both players."""
    return r, r


def answers_arith(r: float) -> tuple[float, float]:
    """arith_demo: the rule verdict 0/1 for both players."""
    return r, r


def task_answers(task: str, r: float, response: str, ground_truth: str, level: str = "char") -> tuple[float, float]:
    """(A_user, A_llm) for a verdict score r of a task."""
    task = canonical_task(task)
    if task in ("math-hard", "minerva"):
        return answers_math(r)
    if task == "medium":
        return answers_medium(r, response, ground_truth, level)
    if task == "wildguard":
        return answers_wildguard(r, ground_truth)
    if task == "advbench":
        return answers_advbench(r)
    if task in ("ambig_qa", "abg_coqa"):
        return answers_ambiguity(r)
    if task == "arith_demo":
        return answers_arith(r)
    raise ValueError(f"unknown data_source {task!r}; known: {', '.join(TASKS)} (and abg-coqa)")


def wildguard_label(ground_truth: str) -> str:
    label = ground_truth.strip().lower()
    if label not in ("harmful", "unharmful"):
        raise ValueError(f'wildguard ground truth must be "harmful" or "unharmful", got {ground_truth[:60]!r}')
    return label


# -----------------------------------------------------------------------------
# per-source normalisation


def normalize_by_source(scores: list[float], sources: list[str]) -> list[float]:
    """Per data source z-scores within a batch: (s - mean) / (std + 1e-6), std with ddof 0 and
    replaced by 1 when <= 1e-6. NaN scores (failed judges) are left out of the statistics and
    stay NaN; a source whose scores are all NaN stays all NaN."""
    if len(scores) != len(sources):
        raise ValueError(f"{len(scores)} scores but {len(sources)} sources")
    groups: dict[str, list[float]] = {}
    for s, src in zip(scores, sources):
        if not math.isnan(s):
            groups.setdefault(src, []).append(float(s))
    stats = {}
    for src, xs in groups.items():
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
        stats[src] = (mean, 1.0 if std <= 1e-6 else std)
    out = []
    for s, src in zip(scores, sources):
        if math.isnan(s):
            out.append(float("nan"))
        else:
            mean, std = stats[src]
            out.append((s - mean) / (std + 1e-6))
    return out
