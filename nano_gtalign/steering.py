"""Pricing steering at inference (docs/steering.md): reprice the model's own payoff matrix, choose again,
and let the model answer for the new choice in the same generation.

A pricing policy is a small dataclass with `apply(matrix) -> matrix`:
- `none`                  leaves the matrix as it is (to see the steering pipeline alone);
- `upstream-llm:S`        upstream's price on the LLM side: every LLM payoff += S, the user
                          gets +0 (DA), +0.5 (CQ), +1 (AQ); S = 0 leaves the matrix unchanged
                          (upstream's transform only shifts when the price is not 0);
- `upstream-user:S`       upstream's price on the user side: every user payoff += S, the LLM
                          gets +1 (DA), +0.5 (AQ), +0 (CQ); S = 0 leaves it unchanged too;
- `token:per_1k=P,payer=user|llm,DA=n,CQ=n,AQ=n`
                          a per-token price: the payer's payoff of every cell drops by
                          P * (expected tokens of the cell's strategy) / 1000. P is in payoff
                          points (the matrix's scale, roughly -5..5) per 1,000 tokens.
`parse_pricing` reads those specs (sample.py --price).

The choice after repricing is game.choose_action(matrix, rule="cobb_douglas"): among the
Pareto frontier, the cell with the largest sqrt(l'*u') after shifting both coordinates by the
matrix's most negative payoff, so a cell where both players lose can never win by a product of
two negatives (upstream compared raw l*u, and (-3,-3) beat (2,2)). rule="product" is upstream's
raw l*u itself, ties drawn with a seeded random.Random, to see where the two differ.

`steer` runs the two stages: generate until `</payoff>`; parse and reprice the matrix; then
continue from the prompt + the model's own text before `<payoff>` (its <thinking>) + the
repriced `<payoff>` + an `<analyze>` written here that states the new frontier and choice +
`<response>`, and let the model write the response.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from nano_gtalign.game import (
    KEYS, STRATEGIES, Matrix, PayoffError, choose_action, format_payoff, parse_payoff, pareto_frontier,
)
from nano_gtalign.sampling import SamplingParams, generate

# Upstream's per-strategy bonuses (docs/steering.md), given to the side that is NOT priced.
UPSTREAM_LLM_USER_BONUS = {"DA": 0.0, "CQ": 0.5, "AQ": 1.0}
UPSTREAM_USER_LLM_BONUS = {"DA": 1.0, "AQ": 0.5, "CQ": 0.0}

# Expected response tokens per strategy for the token price, when the spec does not say: a direct
# answer of a few short paragraphs (DA), one question (CQ), and an answer plus one question (AQ).
DEFAULT_TOKENS = {"DA": 300, "CQ": 60, "AQ": 360}

# Payoffs after repricing are rounded to this many decimals so the matrix the model reads in its
# context (and the one the choice is made on) carries no float noise like 0.30000000000000004.
ROUND_DECIMALS = 6

PRICING_HELP = """\
pricing policies for --price (payoffs are on the matrix's scale, roughly -5..5):
  none                 keep the model's matrix (runs the two-stage pipeline without repricing)
  upstream-llm:S       price S on the LLM side (upstream): every LLM payoff += S;
                       user payoff += 0 (DA), 0.5 (CQ), 1 (AQ); S = 0 changes nothing
  upstream-user:S      price S on the user side (upstream): every user payoff += S;
                       LLM payoff += 1 (DA), 0.5 (AQ), 0 (CQ); S = 0 changes nothing
  token:per_1k=P[,payer=user|llm][,DA=N][,CQ=N][,AQ=N]
                       a token price: the payer (default user: billed per token; llm: the
                       service pays for the compute) loses P payoff points per 1,000 tokens,
                       times the expected tokens of each cell's strategy (defaults DA=300,
                       CQ=60, AQ=360). E.g. token:per_1k=2,payer=user makes a 300-token direct
                       answer cost the user 0.6 and a clarifying question 0.12.
after repricing the action is chosen again, by default with the sign-safe Cobb-Douglas welfare
over the Pareto frontier (game.choose_action rule "cobb_douglas"; "sum" = max LLM + user;
"product" = upstream's largest raw LLM x user over all six cells, ties drawn with --seed)."""


class PricingError(ValueError):
    """A --price spec that cannot be read, or a price whose effect on a payoff is not finite;
    the message names the bad part."""


def _strategy(key: str) -> str:
    return key.split("_", 1)[1]


def _rounded(matrix: Matrix) -> Matrix:
    return {k: (round(l, ROUND_DECIMALS) + 0.0, round(u, ROUND_DECIMALS) + 0.0) for k, (l, u) in matrix.items()}


def _finite(priced: Matrix, raw: Matrix, policy: Pricing) -> Matrix:
    """priced, or PricingError naming the price and the first cell it pushed past the float range
    (a non-finite payoff would only fail later, far from its cause, in the welfare)."""
    for k, (l, u) in priced.items():
        for who, x, before in (("LLM", l, raw[k][0]), ("user", u, raw[k][1])):
            if not math.isfinite(x):
                raise PricingError(f"price {policy.spec()!r} makes the {who} payoff of {k} {x:g} (from {before:g}), "
                                   "which is not finite (the price or the matrix is too large)")
    return priced


@dataclass
class NoPrice:
    def apply(self, matrix: Matrix) -> Matrix:
        return _finite(dict(matrix), matrix, self)

    def spec(self) -> str:
        return "none"

    def describe(self) -> str:
        return "none (the model's own matrix)"


@dataclass
class UpstreamLLM:
    s: float

    def apply(self, matrix: Matrix) -> Matrix:
        if self.s == 0:   # upstream's transform shifts nothing, bonuses included, when the price is 0
            return _finite(dict(matrix), matrix, self)
        priced = {k: (l + self.s, u + UPSTREAM_LLM_USER_BONUS[_strategy(k)]) for k, (l, u) in matrix.items()}
        return _rounded(_finite(priced, matrix, self))

    def spec(self) -> str:
        return f"upstream-llm:{self.s:g}"

    def describe(self) -> str:
        if self.s == 0:
            return "upstream-llm:0 (a price of 0: the matrix is unchanged, as upstream)"
        return f"upstream-llm:{self.s:g} (LLM +{self.s:g} on every cell; user +0 DA, +0.5 CQ, +1 AQ)"


@dataclass
class UpstreamUser:
    s: float

    def apply(self, matrix: Matrix) -> Matrix:
        if self.s == 0:   # as UpstreamLLM: no price, no bonuses
            return _finite(dict(matrix), matrix, self)
        priced = {k: (l + UPSTREAM_USER_LLM_BONUS[_strategy(k)], u + self.s) for k, (l, u) in matrix.items()}
        return _rounded(_finite(priced, matrix, self))

    def spec(self) -> str:
        return f"upstream-user:{self.s:g}"

    def describe(self) -> str:
        if self.s == 0:
            return "upstream-user:0 (a price of 0: the matrix is unchanged, as upstream)"
        return f"upstream-user:{self.s:g} (user +{self.s:g} on every cell; LLM +1 DA, +0.5 AQ, +0 CQ)"


@dataclass
class TokenPrice:
    per_1k: float                 # payoff points per 1,000 tokens
    payer: str = "user"           # "user" (billed per token) or "llm" (the service pays the compute)
    tokens: dict = field(default_factory=lambda: dict(DEFAULT_TOKENS))  # expected tokens per strategy

    def cost(self, strategy: str) -> float:
        return self.per_1k * self.tokens[strategy] / 1000.0

    def apply(self, matrix: Matrix) -> Matrix:
        out = {}
        for k, (l, u) in matrix.items():
            c = self.cost(_strategy(k))
            out[k] = (l - c, u) if self.payer == "llm" else (l, u - c)
        return _rounded(_finite(out, matrix, self))

    def spec(self) -> str:
        tokens = ",".join(f"{s}={self.tokens[s]:g}" for s in STRATEGIES)
        return f"token:per_1k={self.per_1k:g},payer={self.payer},{tokens}"

    def describe(self) -> str:
        costs = ", ".join(f"{s} {self.tokens[s]:g} tok = -{self.cost(s):g}" for s in STRATEGIES)
        return f"token:per_1k={self.per_1k:g},payer={self.payer} ({self.payer} pays: {costs})"


Pricing = NoPrice | UpstreamLLM | UpstreamUser | TokenPrice


def _number(text: str, what: str, spec: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise PricingError(f"--price {spec!r}: {what} must be a number, got {text!r}") from None
    if not math.isfinite(x):
        raise PricingError(f"--price {spec!r}: {what} must be finite, got {text!r}")
    return x


def parse_pricing(spec: str) -> Pricing:
    """Read a policy spec (see PRICING_HELP); PricingError names the part that is wrong, and
    refuses a price whose effect on a payoff is not finite (e.g. token:per_1k=1e308, whose cost
    per 1,000 tokens times 300 tokens overflows)."""
    policy = _parse_pricing(spec)
    try:   # the effect of the price alone: its shift of each cell of an all-zero matrix
        policy.apply({k: (0.0, 0.0) for k in KEYS})
    except PricingError:
        raise PricingError(f"--price {spec!r}: the price's effect on a payoff is not finite "
                           f"({policy.spec()}); use a smaller price or token count") from None
    return policy


def _parse_pricing(spec: str) -> Pricing:
    name, sep, arg = spec.strip().partition(":")
    name = name.strip().lower()
    if name == "none":
        if arg.strip():
            raise PricingError(f"--price {spec!r}: 'none' takes no argument")
        return NoPrice()
    if name in ("upstream-llm", "upstream-user"):
        if not arg.strip():
            raise PricingError(f"--price {spec!r}: {name} needs a price, e.g. {name}:1.5")
        s = _number(arg.strip(), "the price S", spec)
        return UpstreamLLM(s) if name == "upstream-llm" else UpstreamUser(s)
    if name in ("token", "token-price"):
        per_1k, payer, tokens = None, "user", dict(DEFAULT_TOKENS)
        for part in filter(None, (p.strip() for p in arg.split(","))):
            key, eq, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not value:
                raise PricingError(f"--price {spec!r}: {part!r} must be KEY=VALUE")
            if key == "per_1k":
                per_1k = _number(value, "per_1k", spec)
                if per_1k < 0:
                    raise PricingError(f"--price {spec!r}: per_1k must be >= 0, got {value}")
            elif key == "payer":
                if value not in ("user", "llm"):
                    raise PricingError(f"--price {spec!r}: payer must be 'user' or 'llm', got {value!r}")
                payer = value
            elif key.upper() in STRATEGIES:
                n = _number(value, f"expected tokens for {key.upper()}", spec)
                if n < 0:
                    raise PricingError(f"--price {spec!r}: expected tokens for {key.upper()} must be >= 0, got {value}")
                tokens[key.upper()] = n
            else:
                raise PricingError(f"--price {spec!r}: unknown token-price field {key!r} "
                                  "(fields: per_1k, payer, DA, CQ, AQ)")
        if per_1k is None:
            raise PricingError(f"--price {spec!r}: the token price needs per_1k=P, e.g. token:per_1k=2,payer=user")
        return TokenPrice(per_1k, payer, tokens)
    raise PricingError(f"--price {spec!r}: unknown policy {name!r} (use none, upstream-llm:S, upstream-user:S "
                      "or token:per_1k=P,...)")


# -----------------------------------------------------------------------------
# two-stage generation

def _num(x: float) -> str:
    return f"{x:g}"


def write_analyze(frontier: list[str], action: str, rule: str = "cobb_douglas") -> str:
    """The <analyze> text for the repriced matrix, in the compact form the demo transcripts use:
    "Frontier: K1, K2. Chosen: K, the largest LLM x user." (the numbers are in the <payoff> block
    just before it; for cobb_douglas "LLM x user" is the product after game.choose_action's shift
    out of the negatives, for product the raw one, whose cell may be off the frontier). Kept short
    and plain on purpose: the model has to carry on from it into <response>, and a long text unlike
    its own analyses pulls a small model off course (measured on the demo's warm-started model).
    game.analyze_choice reads the key after "Chosen"."""
    why = "the largest LLM + user" if rule == "sum" else "the largest LLM x user"
    return f"Frontier: {', '.join(frontier)}. Chosen: {action}, {why}."


@dataclass
class SteerResult:
    policy: str                            # the policy's description
    payoff_raw: Matrix | None              # the model's matrix (None: it did not parse)
    payoff_priced: Matrix | None
    frontier_raw: list[str]
    frontier_priced: list[str]
    action_raw: str | None                 # the choice on the raw matrix, by the same rule
    action_priced: str | None
    response: str | None                   # the <response> content the model wrote after the rewrite
    text: str                              # the whole completion as it now reads (or the raw stage-one text)
    stage_one: str                         # what the model wrote before we intervened
    finish_reason: str | None = None       # of the last generation stage
    error: str | None = None               # why steering stopped early (None: it ran through)

    def to_json(self) -> dict:
        def m(x):
            return None if x is None else {k: {"LLM": l, "user": u} for k, (l, u) in x.items()}
        return {"policy": self.policy, "payoff_raw": m(self.payoff_raw), "payoff_priced": m(self.payoff_priced),
                "frontier_raw": self.frontier_raw, "frontier_priced": self.frontier_priced,
                "action_raw": self.action_raw, "action_priced": self.action_priced, "response": self.response,
                "text": self.text, "stage_one": self.stage_one, "finish_reason": self.finish_reason,
                "error": self.error}


def steer(model, tokenizer, messages: list[dict], pricing: Pricing, params: SamplingParams,
          generate_fn=generate, rule: str = "cobb_douglas", rng: random.Random | None = None) -> SteerResult:
    """Two-stage pricing steering of one chat prompt. generate_fn has sampling.generate's
    signature (tests pass a stub); params apply to both stages, with the stop string replaced by
    `</payoff>` in stage one and `</response>` in stage two (max_new_tokens is per stage).
    rng draws the ties of rule "product" (game.choose_action), the repriced choice first, so a
    seed gives the same repriced choice whatever the raw matrix's ties were.
    A payoff that cannot be reached or parsed gives a result with `error` set and the raw text."""
    prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    first = generate_fn(model, tokenizer, [prompt_ids], replace(params, stop_strings=("</payoff>",)))
    stage_one, reason = first.texts[0], first.finish_reasons[0]

    def stopped(error: str, raw: Matrix | None = None) -> SteerResult:
        return SteerResult(pricing.describe(), raw, None, pareto_frontier(raw) if raw else [], [],
                           choose_action(raw, rule, rng=rng) if raw else None, None, None, stage_one, stage_one,
                           reason, error)

    end = stage_one.find("</payoff>")
    if end < 0:
        return stopped(f"the model ended stage one ({reason}) without writing </payoff>, so there is no payoff "
                       "matrix to reprice")
    start = stage_one.rfind("<payoff>", 0, end)
    if start < 0:
        return stopped("the model wrote </payoff> without an opening <payoff> tag")
    try:
        raw = parse_payoff(stage_one[start + len("<payoff>"): end])
    except PayoffError as e:
        return stopped(f"the model's payoff does not parse: {e}")
    try:
        priced = pricing.apply(raw)
    except PricingError as e:   # a huge matrix pushed past the float range by the price
        return stopped(f"repricing failed: {e}", raw)
    frontier_raw, frontier_priced = pareto_frontier(raw), pareto_frontier(priced)
    action_priced = choose_action(priced, rule, rng=rng)
    action_raw = choose_action(raw, rule, rng=rng)
    # Keep the model's own words before <payoff> (its thinking) verbatim; everything after is ours
    # up to <response>, which the model then fills in.
    context = (stage_one[:start] + "<payoff>" + format_payoff(priced) + "</payoff>"
               + "<analyze>" + write_analyze(frontier_priced, action_priced, rule) + "</analyze><response>")
    second = generate_fn(model, tokenizer, [prompt_ids + tokenizer.encode(context)],
                         replace(params, stop_strings=("</response>",)))
    cont = second.texts[0]
    close = cont.find("</response>")
    response = (cont if close < 0 else cont[:close]).strip()
    return SteerResult(pricing.describe(), raw, priced, frontier_raw, frontier_priced, action_raw, action_priced,
                       response, context + cont, stage_one, second.finish_reasons[0])


def format_side_by_side(result: SteerResult) -> str:
    """The raw and repriced matrices as one table: * = on the Pareto frontier, < = chosen."""
    def half(m: Matrix | None, frontier: list[str], action: str | None, k: str) -> str:
        if m is None:
            return f"{'-':>7s} {'-':>7s}   "
        return f"{_num(m[k][0]):>7s} {_num(m[k][1]):>7s} {'*' if k in frontier else ' '}{'<' if k == action else ' '}"
    lines = [f"{'':6s} {'raw':^15s}     {'priced':^15s}".rstrip(),
             f"{'cell':6s} {'LLM':>7s} {'user':>7s}    {'LLM':>7s} {'user':>7s}"]
    for k in KEYS:
        lines.append(f"{k:6s} {half(result.payoff_raw, result.frontier_raw, result.action_raw, k)}  "
                     f"{half(result.payoff_priced, result.frontier_priced, result.action_priced, k)}".rstrip())
    lines.append("(* = on the Pareto frontier, < = chosen)")
    lines.append(f"frontier before: {', '.join(result.frontier_raw) or '-'}   chosen: {result.action_raw or '-'}")
    lines.append(f"frontier after:  {', '.join(result.frontier_priced) or '-'}   chosen: {result.action_priced or '-'}")
    return "\n".join(lines)
