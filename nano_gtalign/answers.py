"""Math answers: the final answer a response commits to, and whether it equals the ground truth.

extract_answer takes the last \\boxed{} (or \\fbox{}), else the text after "final answer:"/"the answer
is", else the last number; math_equal compares two answers after LaTeX/number normalisation (numbers
within a relative tolerance). The rule judge (nano_gtalign/judges.py) scores math-hard and minerva with
them, and reads an LLM judge's \\boxed{} verdict with last_boxed. Standard library only.
"""
from __future__ import annotations

import math
import re

# ---------------------------------------------------------------------------
# Math answers: extraction


def _match_brace(s: str, i: int) -> int:
    """Index of the '}' closing the '{' at s[i], or -1 if unbalanced. \\{ and \\} are literal."""
    depth = 0
    j = i
    while j < len(s):
        c = s[j]
        if c == "\\":
            j += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    return -1


_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BARE_TOKEN = re.compile(r"[^\s$]+")


def last_boxed(text: str) -> str | None:
    """Content of the last complete \\boxed{...} / \\fbox{...} (or `\\boxed 5`), else None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    # A truncated last box falls back to the one before it; only a few, so junk
    # full of unclosed boxes cannot make this quadratic.
    for i in reversed(starts[-8:]):
        j = i
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _match_brace(text, j)
            if end >= 0:
                return text[j + 1:end].strip()
        elif j > i:   # `\boxed 5`: one token up to whitespace or $ (matched in place: no copy of the rest)
            m = _BARE_TOKEN.match(text, j)
            if m:
                return m.group(0)
    return None


_FINAL_PHRASE = re.compile(r"(?:final answer\s*(?:is|:)|the answer is|answer\s*:)\s*:?\s*", re.IGNORECASE)
# Thousands groups first so "1,000" is one number; "3/7" kept whole.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?")


def _phrase_answer(rest: str) -> str | None:
    rest = rest.split("\n", 1)[0].strip()
    if rest.startswith("$"):
        m = re.match(r"\$+([^$]+)\$", rest)
        if m:
            return m.group(1).strip()
    if rest.startswith("\\("):
        end = rest.find("\\)")
        if end > 0:
            return rest[2:end].strip()
    # The sentence ends at ". " (a decimal point is never followed by a space).
    rest = re.split(r"\.\s", rest, maxsplit=1)[0].strip().rstrip(".").strip()
    return rest or None


def extract_answer(text: str) -> str | None:
    """The final answer a response commits to: the last \\boxed{} (or \\fbox{}),
    else the text after the last "final answer:"/"the answer is", else the last
    number; None when there is none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    phrases = list(_FINAL_PHRASE.finditer(text))
    if phrases:
        ans = _phrase_answer(text[phrases[-1].end():])
        if ans is not None:
            return ans
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


# ---------------------------------------------------------------------------
# Math answers: normalisation and comparison

_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|boxed|fbox)\s*\{")
_UNITS = re.compile(r"[a-zA-Z][a-zA-Z0-9\s./^\-]*")


def _unwrap_text(s: str) -> str:
    """Replace \\text{X}-style wrappers by X, and drop a trailing units wrapper
    after a value ("3\\text{ cm}" -> "3", but "\\text{A, D}" -> "A, D")."""
    while True:
        m = _WRAPPER.search(s)
        if m is None:
            return s
        end = _match_brace(s, m.end() - 1)
        if end < 0:   # unbalanced: drop just the command name
            return s[:m.start()] + s[m.end() - 1:]
        inner = s[m.end():end]
        before, after = s[:m.start()], s[end + 1:]
        is_units = (before.strip() != "" and after.strip(" .") == ""
                    and _UNITS.fullmatch(inner.strip()) is not None
                    and not s[m.start():].startswith(("\\boxed", "\\fbox")))
        s = before + ("" if is_units else inner) + after


_ARG_CMD = re.compile(r"\\(frac|sqrt)(?![a-zA-Z])")


def _brace_args(s: str) -> str:
    """Give \\frac and \\sqrt braced arguments: \\frac94 -> \\frac{9}{4}, \\sqrt3 -> \\sqrt{3}."""
    out: list[str] = []
    i = 0
    while i < len(s):
        m = _ARG_CMD.match(s, i)
        if m is None:
            out.append(s[i])
            i += 1
            continue
        out.append(m.group(0))
        i = m.end()
        nargs = 2 if m.group(1) == "frac" else 1
        if m.group(1) == "sqrt":
            k = i
            while k < len(s) and s[k] == " ":
                k += 1
            if k < len(s) and s[k] == "[" and "]" in s[k:]:   # \sqrt[3]{x}: keep the index
                close = s.index("]", k)
                out.append(s[k:close + 1])
                i = close + 1
        for _ in range(nargs):
            while i < len(s) and s[i] == " ":
                i += 1
            if i >= len(s):
                break
            if s[i] == "{":
                end = _match_brace(s, i)
                if end < 0:
                    break
                out.append("{" + _brace_args(s[i + 1:end]) + "}")
                i = end + 1
            elif s[i] == "\\":
                tok = re.match(r"\\[a-zA-Z]+|\\.", s[i:]).group(0)
                out.append("{" + tok + "}")
                i += len(tok)
            else:
                out.append("{" + s[i] + "}")
                i += 1
    return "".join(out)


def normalize_answer(s: str) -> tuple[str, bool]:
    """Canonical string of a math answer and whether it carried a percent sign."""
    s = s.strip().replace("\u2212", "-").replace("\u00d7", "\\times ").replace("\u00b7", "\\cdot ")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[!,;: ]|~", " ", s)
    s = re.sub(r"\\displaystyle(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|\u00b0", "", s)   # degrees
    percent = "%" in s
    s = s.replace("\\%", "").replace("%", "")
    s = _unwrap_text(s)
    s = _brace_args(s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = re.sub(r"\^([0-9a-zA-Z])(?![0-9a-zA-Z])", r"^{\1}", s)   # x^2 -> x^{2}; 10^33 left alone
    if s.count("=") == 1:
        s = re.sub(r"^[a-zA-Z]=", "", s)   # "x=5" answers "5"
    m = re.fullmatch(r"([\w.\\{}^]+)/([\w.\\{}^]+)", s)
    if m:   # a/b and \frac{a}{b} are the same answer
        s = "\\frac{%s}{%s}" % (m.group(1), m.group(2))
    return s, percent


_DECIMAL = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_PLAIN = re.compile(rf"({_DECIMAL})(?:[eE]([+-]?\d+))?")
_SCI = re.compile(rf"({_DECIMAL})(?:\\times|\\cdot|\*|x)10\^(?:\{{([+-]?\d+)\}}|([+-]?\d+))")
_POW10 = re.compile(r"10\^(?:\{([+-]?\d+)\}|([+-]?\d+))")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


def parse_number(s: str) -> tuple[float, str | None] | None:
    """(value, decimal mantissa or None) of a normalised numeric answer, else None.
    The mantissa ("4.5" of "4.5e33") is what significant figures are counted on;
    fractions have none."""
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    m = _PLAIN.fullmatch(s)
    if m:
        return float(s), m.group(1)
    m = _SCI.fullmatch(s)
    if m:
        exp = m.group(2) or m.group(3)
        return float(f"{m.group(1)}e{exp}"), m.group(1)
    m = _POW10.fullmatch(s)
    if m:
        return float(f"1e{m.group(1) or m.group(2)}"), "1"
    sign, body = (-1.0, s[1:]) if s.startswith("-") else (1.0, s)
    num = den = None
    if body.startswith("\\frac{"):
        end = _match_brace(body, 5)
        if end > 0 and body[end + 1:end + 2] == "{" and _match_brace(body, end + 1) == len(body) - 1:
            num, den = body[6:end], body[end + 2:-1]
    elif body.count("/") == 1:
        num, den = body.split("/")
    if num is not None and den is not None:
        a, b = _PLAIN.fullmatch(num), _PLAIN.fullmatch(den)
        if a and b and float(den) != 0.0:
            return sign * float(num) / float(den), None
    return None


def _significant_figures(mantissa: str) -> int:
    digits = mantissa.lstrip("+-")
    has_point = "." in digits
    digits = digits.replace(".", "").lstrip("0")
    if not has_point:   # trailing zeros of an integer are not significant ("6630" has 3)
        digits = digits.rstrip("0")
    return max(len(digits), 1)


_MAX_ANSWER_CHARS = 2000


def math_equal(predicted: str, truth: str) -> bool:
    """Whether a predicted math answer equals the ground truth.

    Both are normalised (no $, spaces, \\left/\\right, \\! \\, spacing, \\text{}
    wrappers and trailing units, trailing '.', \\dfrac/\\tfrac -> \\frac,
    \\frac94 -> \\frac{9}{4}, \\sqrt3 -> \\sqrt{3}, a/b -> \\frac{a}{b}, "x=5" -> "5").
    If both are numbers (decimals, "1,000", 4.5e33, 4.5\\times10^{33},
    4.5\\cdot10^{33}, \\frac{a}{b} or a/b of numbers, with a percent sign
    meaning either the number or a hundredth of it) they are compared with a
    relative tolerance: 1e-4 when the ground truth is a decimal with at most 3
    significant figures (a rounded measurement, as in minerva: 4.5e33, 0.10),
    else 1e-6. Otherwise the normalised strings must be identical. A predicted
    answer over 2000 characters (and 10x the truth) never matches.
    """
    if len(predicted) > max(_MAX_ANSWER_CHARS, 10 * len(truth)):
        return False   # not a final answer; also keeps the normalisation cheap on junk
    p, p_pct = normalize_answer(predicted)
    t, t_pct = normalize_answer(truth)
    if not p or not t:
        return False
    pn, tn = parse_number(p), parse_number(t)
    if pn is not None and tn is not None:
        tol = 1e-4 if tn[1] is not None and _significant_figures(tn[1]) <= 3 else 1e-6
        preds = [pn[0], pn[0] / 100] if p_pct else [pn[0]]
        truths = [tn[0], tn[0] / 100] if t_pct else [tn[0]]
        return any(math.isclose(a, b, rel_tol=tol, abs_tol=0.0) for a in preds for b in truths)
    return p == t
