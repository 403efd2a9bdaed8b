"""The game a completion plays: its four blocks, its payoff matrix, and the choices on it.

A completion is `<thinking>…</thinking><payoff>…</payoff><analyze>…</analyze><response>…</response>`
(docs/format.md). The payoff block is a 2x3 game: question type (DQ clear / VQ vague) x assistant
strategy (DA direct answer / CQ clarifying question / AQ answer + one follow-up), each cell an
(LLM, user) payoff. This file parses that matrix, finds its Pareto frontier, applies the welfare
choice rules (docs/game.md) and checks whether the model's own <analyze> picked a frontier cell.

Everything here is linear in the completion length: blocks are found with str.find, never with
backtracking regexes, and the payoff parser refuses blocks over MAX_PAYOFF_CHARS.
"""
from __future__ import annotations

import ast
import json
import math
import random
import re
import warnings
from dataclasses import dataclass

KEYS = ("DQ_AQ", "DQ_CQ", "DQ_DA", "VQ_AQ", "VQ_CQ", "VQ_DA")
STRATEGIES = ("DA", "CQ", "AQ")
FIELDS = ("LLM", "user")
TAGS = ("thinking", "payoff", "analyze", "response")
RULES = ("sum", "cobb_douglas", "product")  # choose_action's rules (docs/game.md#choice-rules)

Matrix = dict[str, tuple[float, float]]  # key -> (llm, user), keys in KEYS order

# A real payoff block is ~300 characters; 100 kB is far beyond any honest one and small enough
# that json/ast parse it in milliseconds, so junk cannot make parsing slow or exhaust memory.
MAX_PAYOFF_CHARS = 100_000

_CURLY_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


class PayoffError(ValueError):
    """The payoff block is not the six-key {"LLM": x, "user": y} object; the message says why."""


# -----------------------------------------------------------------------------
# payoff parsing

def _short(x: object, n: int = 40) -> str:
    r = repr(x)
    return r if len(r) <= n else r[: n - 3] + "..."


def _name(key: object) -> str:
    return f'"{key}"' if isinstance(key, str) else _short(key)


def _first_repeat(keys: list) -> list:
    """[the first key written a second time] or [] (a list, not a set: a literal's keys may be
    equal but of different types, 1 and 1.0, and a dict would merge them too)."""
    seen: list = []
    for k in keys:
        if k in seen:
            return [k]
        seen.append(k)
    return []


def _refuse_repeats(top: list, cells: list[tuple[object, list]]) -> None:
    """PayoffError for a key written twice at the top (top = [that key]) or a field written twice
    in a cell (cells = [(cell key, [that field])]): the matrix is ambiguous, and both parsers would
    silently keep the last value."""
    if top:
        raise PayoffError(f"payoff has the key {_name(top[0])} twice: an ambiguous matrix")
    for cell, field in cells:
        if field:
            raise PayoffError(f"payoff[{_name(cell)}] has the field {_name(field[0])} twice: an ambiguous cell")


def _load_json(text: str) -> object:
    """json.loads, refusing repeated keys in the object and in its cells (ValueError if not JSON)."""
    # id of a parsed object -> (the object, kept alive so its id is never reused, [its first repeat])
    repeats: dict[int, tuple[dict, list]] = {}

    def hook(pairs: list[tuple[str, object]]) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            repeats[id(obj)] = (obj, _first_repeat([k for k, _ in pairs]))
        return obj

    def repeat(obj: object) -> list:
        return repeats.get(id(obj), (None, []))[1]

    obj = json.loads(text, object_pairs_hook=hook)
    if isinstance(obj, dict):
        _refuse_repeats(repeat(obj), [(k, repeat(v)) for k, v in obj.items()])
    return obj


def _load_literal(text: str) -> object:
    """ast.literal_eval (never eval), refusing repeated keys in the dict and in its cells."""
    try:
        with warnings.catch_warnings():  # junk such as a backslash before a letter warns (invalid escape)
            warnings.simplefilter("ignore")
            tree = ast.parse(text, mode="eval")
            obj = ast.literal_eval(tree)
    # parse/literal_eval raise SyntaxError, ValueError, TypeError (unhashable dict keys),
    # MemoryError/RecursionError (deep nesting) and more on junk; all of it means "not a literal".
    except Exception as e:
        raise PayoffError(f"payoff is neither JSON nor a Python literal ({type(e).__name__})") from None
    root = tree.body
    if isinstance(root, ast.Dict):   # it evaluated, so every key in it is a literal
        def keys(node: ast.Dict) -> list:
            return [ast.literal_eval(k) for k in node.keys]
        _refuse_repeats(_first_repeat(keys(root)),
                        [(ast.literal_eval(k), _first_repeat(keys(v)) if isinstance(v, ast.Dict) else [])
                         for k, v in zip(root.keys, root.values)])
    return obj


def _load(text: str) -> object:
    try:
        return _load_json(text)
    except PayoffError:   # a repeated key: JSON, but ambiguous (PayoffError is a ValueError too)
        raise
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError; deep nesting recurses
        pass
    return _load_literal(text.translate(_CURLY_QUOTES))


def _number(value: object, where: str) -> float:
    # bool is an int subclass in Python, so it must be refused before the int check
    if isinstance(value, bool):
        raise PayoffError(f"{where} is a boolean ({value}), not a number")
    if not isinstance(value, (int, float)):
        raise PayoffError(f"{where} must be a number, got {type(value).__name__} {_short(value)}")
    try:
        x = float(value)
    except OverflowError:  # a huge int literal such as 10**400 written out
        raise PayoffError(f"{where} is too large to be a payoff") from None
    if not math.isfinite(x):
        raise PayoffError(f"{where} is {value}, payoffs must be finite")
    return x


def parse_payoff(text: str) -> Matrix:
    """Parse a <payoff> block into {key: (llm, user)} in KEYS order, or raise PayoffError (also for
    a key or a cell's field written twice: an ambiguous matrix, docs/format.md#payoff-parsing)."""
    if not isinstance(text, str):
        raise PayoffError(f"payoff must be text, got {type(text).__name__}")
    if len(text) > MAX_PAYOFF_CHARS:
        raise PayoffError(f"payoff block is {len(text)} characters, more than {MAX_PAYOFF_CHARS}")
    text = text.strip()
    if not text:
        raise PayoffError("payoff block is empty")
    obj = _load(text)
    if not isinstance(obj, dict):
        raise PayoffError(f"payoff must be an object with the six keys, got {type(obj).__name__}")
    missing = [k for k in KEYS if k not in obj]
    extra = [k for k in obj if k not in KEYS]
    if missing or extra:
        parts = []
        if missing:
            parts.append("missing key(s) " + ", ".join(missing))
        if extra:
            parts.append("unexpected key(s) " + ", ".join(_short(k) for k in extra[:5]))
        raise PayoffError("payoff has " + " and ".join(parts))
    matrix: Matrix = {}
    for key in KEYS:
        cell = obj[key]
        if not isinstance(cell, dict):
            raise PayoffError(f'payoff["{key}"] must be an object {{"LLM": x, "user": y}}, '
                              f"got {type(cell).__name__}")
        if set(cell) != set(FIELDS) or len(cell) != 2:
            raise PayoffError(f'payoff["{key}"] must have exactly the fields "LLM" and "user", '
                              f"got {', '.join(_short(f) for f in list(cell)[:5]) or 'none'}")
        llm = _number(cell["LLM"], f'payoff["{key}"]["LLM"]')
        user = _number(cell["user"], f'payoff["{key}"]["user"]')
        matrix[key] = (llm, user)
    return matrix


def format_payoff(matrix: Matrix) -> str:
    """Strict JSON in the published shape: {"DQ_AQ": {"LLM": 1.0, "user": 2.0}, ...}."""
    if set(matrix) != set(KEYS):
        raise PayoffError(f"matrix must have exactly the keys {', '.join(KEYS)}, got {', '.join(map(str, matrix))}")
    cells = {}
    for k in KEYS:
        llm, user = matrix[k]
        cells[k] = {"LLM": _number(llm, f'matrix["{k}"] LLM'), "user": _number(user, f'matrix["{k}"] user')}
    return json.dumps(cells)


# -----------------------------------------------------------------------------
# the four blocks

@dataclass
class Blocks:
    thinking: str | None
    payoff: str | None
    analyze: str | None
    response: str | None
    response_start: int | None = None  # index of the "<response>" tag: the reasoning is completion[:response_start]


def split_blocks(completion: str) -> Blocks:
    """Contents of the four blocks, leniently: each is searched after the end of the previous
    block that was found; a block is the text between its first opening tag and the first
    closing tag after it, None when either tag is missing. Contents are not stripped."""
    found: dict[str, str | None] = {}
    cursor, response_start = 0, None
    for tag in TAGS:
        open_tag, close_tag = f"<{tag}>", f"</{tag}>"
        start = completion.find(open_tag, cursor)
        end = completion.find(close_tag, start + len(open_tag)) if start >= 0 else -1
        if end < 0:
            found[tag] = None
            continue
        found[tag] = completion[start + len(open_tag): end]
        cursor = end + len(close_tag)
        if tag == "response":
            response_start = start
    return Blocks(found["thinking"], found["payoff"], found["analyze"], found["response"], response_start)


_SPACES = re.compile(r"\s*")


def _strict_blocks(completion: str) -> Blocks | None:
    """The four blocks if the completion is exactly them, in order, separated and followed only by
    whitespace; else None. Same language as the regex in docs/format.md except that a block may not contain
    its own closing tag (the regex could backtrack over one); nothing may precede <thinking>,
    not even whitespace, as the regex's `^<thinking>` says."""
    pos, contents = 0, []
    for i, tag in enumerate(TAGS):
        open_tag, close_tag = f"<{tag}>", f"</{tag}>"
        if i > 0:  # whitespace only between blocks
            pos = _SPACES.match(completion, pos).end()
        if not completion.startswith(open_tag, pos):
            return None
        end = completion.find(close_tag, pos + len(open_tag))
        if end < 0:
            return None
        contents.append(completion[pos + len(open_tag): end])
        response_start = pos
        pos = end + len(close_tag)
    if completion[pos:].strip():
        return None
    return Blocks(*contents, response_start=response_start)


def format_ok(completion: str) -> bool:
    """The format check of docs/format.md: the exact four-block layout with nothing after </response> but
    whitespace, AND a payoff that parses."""
    blocks = _strict_blocks(completion)
    if blocks is None:
        return False
    try:
        parse_payoff(blocks.payoff)
    except PayoffError:
        return False
    return True


# -----------------------------------------------------------------------------
# Pareto frontier, welfare and choice

def pareto_frontier(matrix: Matrix, eps: float = 1e-9) -> list[str]:
    """Keys of non-dominated cells, in the matrix's order. j dominates k if it is at least as good
    for both players and better for one, comparing with tolerance eps; equal cells all stay."""
    frontier = []
    for k, (lk, uk) in matrix.items():
        dominated = any(
            lj >= lk - eps and uj >= uk - eps and (lj > lk + eps or uj > uk + eps)
            for j, (lj, uj) in matrix.items() if j != k
        )
        if not dominated:
            frontier.append(k)
    return frontier


def welfare_sum(l: float, u: float) -> float:
    """l + u: the measure the four-block prompt asks the model to maximise."""
    return l + u


def cobb_douglas(l: float, u: float) -> float:
    """sqrt(l*u); only defined for l, u >= 0 (a product of two negatives must not look good)."""
    if not (l >= 0 and u >= 0):  # also catches NaN
        raise ValueError(f"cobb_douglas needs non-negative payoffs, got l={l}, u={u}")
    product = l * u
    if math.isinf(product) and math.isfinite(l) and math.isfinite(u):   # l, u near 1e308: no overflow
        return math.sqrt(l) * math.sqrt(u)
    return math.sqrt(product)


def _better_by_sum(a: tuple[float, float], b: tuple[float, float], eps: float) -> bool:
    """The prompt's order: higher l+u, then higher user, then higher LLM; eps-equal counts as a tie."""
    (la, ua), (lb, ub) = a, b
    for x, y in ((welfare_sum(la, ua), welfare_sum(lb, ub)), (ua, ub), (la, lb)):
        if x > y + eps:
            return True
        if x < y - eps:
            return False
    return False


def _sums_overflow(matrix: Matrix) -> bool:
    """Whether a finite matrix has payoffs so large (near 1e308: parse_payoff takes any finite
    number, and so does a price) that l+u or the Cobb-Douglas shift l-min overflows to inf, which
    would tie every such cell. Never true for an ordinary matrix."""
    values = [x for cell in matrix.values() for x in cell]
    if not all(math.isfinite(x) for x in values):
        return False
    shift = min(0.0, min(values))
    return any(not (math.isfinite(l + u) and math.isfinite(l - shift) and math.isfinite(u - shift))
               for l, u in matrix.values())


def _largest_product(matrix: Matrix, rng: random.Random | None) -> str:
    """Upstream's choice (inference_v2.py): keep every cell whose raw l*u no other cell beats (all
    six cells, exact comparison, negatives as they are), list the strategies of those cells in matrix
    order without repeats, draw one with rng.choice, and return the first kept cell with it. The draw
    is over strategies, not cells, because upstream's continuation only names the strategy; it is
    made even when one strategy is left, as upstream's random.choice was, so a seeded rng advances
    the same way whatever the matrix."""
    best = max(l * u for l, u in matrix.values())
    kept = [k for k, (l, u) in matrix.items() if l * u == best]
    strategies = list(dict.fromkeys(k.split("_", 1)[-1] for k in kept))
    pick = (rng if rng is not None else random.Random(0)).choice(strategies)
    return next(k for k in kept if k.split("_", 1)[-1] == pick)


def choose_action(matrix: Matrix, rule: str = "sum", eps: float = 1e-9, rng: random.Random | None = None) -> str:
    """Pick one key. "sum": the prompt's rule, max l+u, ties by user, then LLM, then the first in
    the matrix order. "cobb_douglas" (sign-safe): among the Pareto frontier only, shift both
    coordinates by min(0, smallest payoff in the matrix) so every point is >= 0, then maximise
    sqrt(l'*u'); ties by the "sum" order. With no negative payoffs this is plain sqrt(l*u), and
    (-3,-3) can never beat (2,2) as it did with upstream's raw product. "product": upstream's own
    rule, the largest raw l*u over all six cells, ties drawn with rng (see _largest_product; no rng
    means random.Random(0), so the call stays deterministic); (-3,-3) does beat (2,2) there, which
    is the point of offering it: to see where upstream chose differently. A matrix whose sums or
    shifted payoffs would overflow (payoffs near 1e308) is halved first, exactly, so no score is inf."""
    if not matrix:
        raise ValueError("choose_action needs a non-empty matrix")
    if _sums_overflow(matrix):   # huge payoffs: halving is exact and keeps the order of cells
        matrix = {k: (l / 2, u / 2) for k, (l, u) in matrix.items()}
    if rule == "product":
        return _largest_product(matrix, rng)
    if rule == "sum":
        candidates = list(matrix)
        score = {k: 0.0 for k in candidates}
    elif rule == "cobb_douglas":
        candidates = pareto_frontier(matrix, eps)
        shift = min(0.0, min(min(l, u) for l, u in matrix.values()))
        score = {k: cobb_douglas(matrix[k][0] - shift, matrix[k][1] - shift) for k in candidates}
    else:
        raise ValueError(f'unknown choice rule {rule!r}; use one of {", ".join(map(repr, RULES))}')
    best = candidates[0]
    for k in candidates[1:]:
        if score[k] > score[best] + eps or (
            abs(score[k] - score[best]) <= eps and _better_by_sum(matrix[k], matrix[best], eps)
        ):
            best = k
    return best


# -----------------------------------------------------------------------------
# what the <analyze> block chose, and whether it is on the frontier

_KEY_RE = re.compile(r"(?<![A-Za-z0-9])(DQ|VQ)[_\-/ ]?(DA|CQ|AQ)(?![A-Za-z0-9])")
_STRATEGY_RE = re.compile(r"(?<![A-Za-z0-9_])(DA|CQ|AQ)(?![A-Za-z0-9_])")
_CHOICE_RE = re.compile(r"\b(?:choos|chose|choice|pick|select|recommend|opt for|go with|going with)",
                        re.IGNORECASE)
_CHOICE_WINDOW = 40  # characters between a choice word and the key it introduces


def _last_named(text: str, pattern: re.Pattern, verbs: list[int]) -> str | None:
    """The last name that is the first match of pattern within _CHOICE_WINDOW characters after a
    choice word ("choose DQ_DA over DQ_AQ" names DQ_DA), else the last match at all. One pass
    over both sorted position lists, so linear."""
    last = explicit = None
    vi, verb_end = 0, None  # end of the latest choice word not yet followed by a name
    for m in pattern.finditer(text):
        while vi < len(verbs) and verbs[vi] <= m.start():
            verb_end = verbs[vi]
            vi += 1
        name = "_".join(m.groups())
        last = name
        if verb_end is not None and m.start() - verb_end <= _CHOICE_WINDOW:
            explicit = name
        verb_end = None
    return explicit or last


def analyze_choice(analyze_text: str | None) -> str | None:
    """The key the <analyze> block chose. Rule: take every choice word (choose/chose/chosen/
    choice/pick/select/recommend/opt for/go with) and the first key (DQ_DA; also DQ-DA, "DQ DA")
    after it if that key starts within 40 characters; the last such key wins. Failing that, the
    last key mentioned. If no full key is named, the same rule on bare strategies (DA/CQ/AQ)
    returns the strategy. None if nothing is named. Negations ("not DQ_CQ") are not understood."""
    if not analyze_text:
        return None
    verbs = [m.end() for m in _CHOICE_RE.finditer(analyze_text)]
    return _last_named(analyze_text, _KEY_RE, verbs) or _last_named(analyze_text, _STRATEGY_RE, verbs)


def choice_on_frontier(matrix: Matrix, choice: str | None, eps: float = 1e-9) -> bool:
    """A key is consistent if it is on the frontier; a bare strategy if any frontier key uses it."""
    if choice is None:
        return False
    frontier = pareto_frontier(matrix, eps)
    if choice in STRATEGIES:
        return any(k.endswith("_" + choice) for k in frontier)
    return choice in frontier


def pareto_consistency(completion: str) -> float:
    """1.0 if the <analyze> block names a frontier choice of the completion's own payoff matrix,
    else 0.0 (also when there is no payoff/analyze block or the payoff does not parse)."""
    blocks = split_blocks(completion)
    if blocks.payoff is None or blocks.analyze is None:
        return 0.0
    try:
        matrix = parse_payoff(blocks.payoff)
    except PayoffError:
        return 0.0
    return 1.0 if choice_on_frontier(matrix, analyze_choice(blocks.analyze)) else 0.0
