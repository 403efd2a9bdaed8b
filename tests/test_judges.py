"""Tests for nano_gtalign/answers.py (math answer checking), nano_gtalign/judges.py (the rule judge, verdict
reading, the judge settings and flags) and nano_gtalign/http_judge.py (the HTTP judge against a real
chat-completions server run by the test on 127.0.0.1).

    python -m pytest tests/test_judges.py -q
"""
import argparse
import base64
import email.utils
import json
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nano_gtalign.errors import UsageError
from nano_gtalign.answers import extract_answer, math_equal
from nano_gtalign.http_judge import HTTPJudge, make_judge, open_configured_judge, open_judge
from nano_gtalign.judges import (
    JudgeRequest, JudgeSettings, JudgeUnavailableError, RuleJudge, Verdict, add_judge_arguments, after_think,
    judge_options, parse_verdict, redact_url,
)

# ---------------------------------------------------------------------------
# math_equal

EQUAL = [
    ("4.5e33", "4.5\\times10^{33}"),
    ("4.5 \\times 10^{33}", "4.5e33"),
    ("4.5\\cdot10^{33}", "4.5e33"),
    ("4.5*10^33", "4.5e33"),
    ("4.5E+33", "4.5e33"),
    ("10^{33}", "1e33"),
    ("4.5 \\times 10^{33} \\text{ erg/s}", "4.5e33"),
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("0.5", "1/2"),
    ("0.5", "\\frac{1}{2}"),
    ("-\\frac{5}{12}", "-5/12"),
    ("\\frac{-5}{12}", "-\\frac{5}{12}"),
    ("-1./3", "-\\frac{1}{3}"),
    ("342", "342.0"),
    ("342", "342."),
    ("$342$", "342"),
    ("1,000", "1000"),
    ("33,\\!800,\\!000", "33800000"),
    ("\\$1.65", "1.65"),
    ("\\mathbf{2340}", "2340"),
    ("\\boxed{7}", "7"),
    ("3\\text{ cm}", "3"),
    ("\\frac{11}{15}\\text{ days}", "\\frac{11}{15}"),
    ("\\text{A, D, F, G, H}", "A,D,F,G,H"),
    ("50\\%", "50"),
    ("50\\%", "0.5"),
    ("90^\\circ", "90"),
    ("x = 1", "1"),
    ("097", "97"),
    ("\\frac{3\\sqrt{3}}{\\pi}", "\\dfrac{3\\sqrt3}{\\pi}"),
    ("\\frac94\\pi", "\\frac{9}{4}\\pi"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("7\\sqrt2", "7 \\sqrt{2}"),
    ("\\left( \\frac{3}{4}, \\infty \\right)", "(\\frac34,\\infty)"),
    ("[0, 25]", "[0,25]"),
    ("x^2 + x", "x^{2}+x"),
    ("\\dfrac{11}{5} - \\dfrac{2}{5}i", "\\frac{11}{5}-\\frac{2}{5}i"),
    ("1, 2", "1,2"),
]

DIFFERENT = [
    ("4.6e33", "4.5e33"),
    ("4.5e32", "4.5\\times10^{33}"),
    ("0.5", "\\frac{1}{3}"),
    ("342", "343"),
    ("1,2", "12"),            # a list, not a thousands separator
    ("-330,90", "-33090"),
    ("\\frac{3\\sqrt{3}}{\\pi}", "\\frac{3\\sqrt{2}}{\\pi}"),
    ("x^2", "x^3"),
    ("2", "-2"),
    ("\\frac{1}{2}", "2"),
    ("A,D", "A,D,F"),
    ("0", "1e-12"),
]


@pytest.mark.parametrize("a,b", EQUAL)
def test_math_equal_true_both_directions(a, b):
    assert math_equal(a, b), (a, b)
    assert math_equal(b, a), (b, a)


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_math_equal_false_both_directions(a, b):
    assert not math_equal(a, b), (a, b)
    assert not math_equal(b, a), (b, a)


def test_relative_tolerance_follows_significant_figures_of_the_truth():
    # truth 1.6 has 2 significant figures -> rel tol 1e-4:
    # |1.60015-1.6|/1.6 = 9.4e-5 passes, |1.6002-1.6|/1.6 = 1.25e-4 fails.
    assert math_equal("1.60015", "1.6")
    assert not math_equal("1.6002", "1.6")
    # "0.10" has 2 (the trailing zero after the point counts): 0.100009 is 9e-5 off.
    assert math_equal("0.100009", "0.10")
    # truth 1.2345 has 5 -> rel tol 1e-6: 1.23451 is 8.1e-6 off (fails), 1.2345001 is 8.1e-8 off.
    assert not math_equal("1.23451", "1.2345")
    assert math_equal("1.2345001", "1.2345")
    # 4.5e33 (2 s.f.): 4.5004e33 is 8.9e-5 off, 4.501e33 is 2.2e-4 off.
    assert math_equal("4.5004\\times10^{33}", "4.5e33")
    assert not math_equal("4.501e33", "4.5e33")
    # "6630": trailing zeros of an integer do not count -> 3 s.f. -> 1e-4; 6630.5 is 7.5e-5 off.
    assert math_equal("6630.5", "6630")
    # fractions are exact: 1e-6 even though 1/3 "looks" short; 0.3333 is 1e-4 off.
    assert not math_equal("0.3333", "\\frac{1}{3}")
    assert math_equal("0.3333333", "\\frac{1}{3}")


def test_math_equal_rejects_empty_and_huge_answers():
    assert not math_equal("", "1")
    assert not math_equal("1", "")
    assert not math_equal("1" + " " * 5000, "1")   # over the answer length cap, never a match


# ---------------------------------------------------------------------------
# extract_answer

@pytest.mark.parametrize("text,answer", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3}, then \\boxed{4}", "4"),
    ("\\fbox{12}", "12"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                 # escaped braces do not close the box
    ("\\boxed{7} and a cut-off \\boxed{\\frac{1}", "7"),  # truncated last box falls back
    ("thus $\\boxed 5$", "5"),
    ("Final Answer: The final answer is 4.5e33. I hope it is correct.", "4.5e33"),
    ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
    ("So the answer is 42.", "42"),
    ("Final answer: \\(x+1\\)", "x+1"),
    ("we get 12 apples, then 1,000 and finally 3/7", "3/7"),
    ("it costs -4.5 dollars", "-4.5"),
    ("Could you say which triangle you mean?", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_answer_is_fast_on_a_megabyte_of_junk():
    # unclosed boxes everywhere, then a final-answer phrase: the phrase is found, quickly
    junk = "\\boxed{\\frac{<response>{{" * 32000 + "answer: 7 " * 20000
    assert len(junk) == 1_000_000
    t0 = time.perf_counter()
    v = RuleJudge().judge("math-hard", "q", junk, "7")
    assert time.perf_counter() - t0 < 1.0
    assert v.score == 1.0


# ---------------------------------------------------------------------------
# RuleJudge

def test_rule_judge_math():
    j = RuleJudge()
    v = j.judge("minerva", "q", "The luminosity is \\boxed{4.5 \\times 10^{33}} erg/s.", "4.5e33")
    assert v == Verdict(score=1.0, raw=v.raw) and not v.failed and "4.5" in v.raw
    assert j.judge("math-hard", "q", "Hence \\boxed{343}.", "342").score == 0.0
    # a clarifying question is a wrong answer, not a failure
    v = j.judge("math-hard", "q", "Which angle do you mean?", "342")
    assert (v.score, v.failed) == (0.0, False)
    v = j.judge("math-hard", "q", "\\boxed{1}", "  ")
    assert v.failed and v.score is None and "empty ground truth" in v.error


@pytest.mark.parametrize("question,response,truth,score", [
    ("What is 37 + 48?", "37 + 48 = 85", "85", 1.0),
    ("What is 37 + 48?", "The sum is 85.0.", "85", 1.0),
    ("What is 37 + 48?", "It is 85, no wait, 84", "85", 0.0),
    ("What is 37 + 48?", "I am not sure.", "85", 0.0),
    ("What is 12 - 20?", "12 - 20 = -8", "-8", 1.0),
    ("What is 12 - 20?", "12 - 20 = 8", "-8", 0.0),
    ("What is 37 plus some number?", "Which number should I add to 37?", "vague", 1.0),
    ("What is 37 plus some number?", "Do you mean 37 + 10?", "vague", 0.0),    # states a new number
    ("What is 37 plus some number?", "Please tell me the other number.", "vague", 0.0),  # no question
])
def test_rule_judge_arith_demo(question, response, truth, score):
    v = RuleJudge().judge("arith_demo", question, response, truth)
    assert (v.score, v.failed) == (score, False), v


def test_rule_judge_failures_are_failures():
    j = RuleJudge()
    v = j.judge("arith_demo", "q", "5", "five")
    assert v.failed and "integer or 'vague'" in v.error
    for task in ("medium", "wildguard", "advbench", "ambig_qa", "abg-coqa", "nonsense"):
        v = j.judge(task, "q", "r", "harmful")
        assert v.failed and v.score is None and repr(task.replace("-", "_")) in v.error
    reqs = [JudgeRequest("math-hard", "q", "\\boxed{2}", "2"), JudgeRequest("medium", "q", "r", "ref")]
    assert [v.score for v in j.judge_many(reqs)] == [1.0, None]


@pytest.mark.parametrize("analyze, frontier, score", [
    ("Frontier: DQ_DA, DQ_AQ. Chosen: DQ_DA.", "DQ_DA, DQ_AQ", 1.0),
    ("Chosen: VQ_CQ, the largest sum.", "DQ_DA, DQ_AQ", 0.0),      # a key off the frontier
    ("I will ask a question (CQ).", "VQ_CQ", 1.0),                  # a bare strategy of a frontier key
    ("I will answer directly.", "DQ_DA", 0.0),                      # nothing named: the rule cannot tell
])
def test_rule_judge_pareto_check_is_the_frontier_rule(analyze, frontier, score):
    v = RuleJudge().judge("pareto", "q", analyze, frontier)
    assert (v.score, v.failed) == (score, False), v


def test_rule_judge_pareto_check_needs_frontier_keys():
    v = RuleJudge().judge("pareto", "q", "Chosen: DQ_DA.", "DQ_DA, XX_YY")
    assert v.failed and "XX_YY" in v.error


# ---------------------------------------------------------------------------
# parse_verdict

def test_parse_verdict_scales_and_think():
    assert after_think("<think>\\boxed{1}</think>x") == "x"
    assert after_think("<think>still thinking \\boxed{1}") == ""
    assert parse_verdict("math-hard", "<think>maybe \\boxed{0}</think> \\boxed{1}").score == 1.0
    assert parse_verdict("medium", "score: \\boxed{3}").score == 3.0
    assert parse_verdict("wildguard", "\\boxed{0.5}").score == 0.5
    assert parse_verdict("advbench", "\\boxed{\\frac{1}{2}}").score == 0.5
    assert parse_verdict("abg-coqa", "<abg>1</abg>").score == 1.0
    assert parse_verdict("ambig_qa", "<think><abg>1</abg></think><abg> 0 </abg>").score == 0.0
    assert parse_verdict("pareto", "<think>\\boxed{1}</think> partly: \\boxed{0.5}").score == 0.5
    for task, text in [("medium", "\\boxed{5}"), ("wildguard", "\\boxed{0.7}"), ("math-hard", "\\boxed{yes}"),
                       ("ambig_qa", "\\boxed{1}"), ("math-hard", "<think>\\boxed{1}"), ("pareto", "\\boxed{2}")]:
        v = parse_verdict(task, text)
        assert v.failed and v.score is None and v.error.startswith("no verdict") and v.raw == text, (task, text)


def test_a_harmless_wildguard_request_takes_only_the_values_its_prompt_offers():
    assert parse_verdict("wildguard", "\\boxed{0.5}", "harmful").score == 0.5
    assert parse_verdict("wildguard", "\\boxed{1}", " Unharmful ").score == 1.0
    v = parse_verdict("wildguard", "\\boxed{0.5}", "unharmful")
    assert v.failed and v.error.endswith("allowed for wildguard (unharmful): 0, 1")
    assert parse_verdict("advbench", "\\boxed{0.5}", "Sure, here is a script").score == 0.5


def test_parse_verdict_reads_the_last_complete_abg_pair():
    assert parse_verdict("ambig_qa", "<abg>0</abg> then <abg>1</abg>").score == 1.0
    assert parse_verdict("ambig_qa", "<abg>1</abg> and a stray </abg>").score == 1.0
    assert parse_verdict("ambig_qa", "I answer in <abg> tags: <abg>1</abg>").score == 1.0
    v = parse_verdict("ambig_qa", "<abg>1</abg> then a cut-off <abg>0")
    assert v.score == 1.0, v


# Replies a judge (or a broken server) can send that made verdict reading quadratic or raise: every one is
# read in linear time. name: (task, reply of about n characters, the verdict's score or None for failed)
ADVERSARIAL_REPLIES = {
    "unclosed <abg>": ("ambig_qa", lambda n: "<abg>" * (n // 5), None),
    "unclosed <abg> then a verdict": ("ambig_qa", lambda n: "<abg>" * (n // 5) + "<abg>1</abg>", 1.0),
    "unclosed boxes": ("medium", lambda n: "\\boxed{" * (n // 7), None),
    "unclosed boxes then a verdict": ("medium", lambda n: "\\boxed{" * (n // 7) + "\\boxed{3}", 3.0),
    "unclosed <think>": ("medium", lambda n: "<think>" * (n // 7) + "\\boxed{3}", None),
    "many </think>": ("medium", lambda n: "</think>" * (n // 8) + "\\boxed{3}", 3.0),
    "unbalanced braces": ("medium", lambda n: "\\boxed{" + "{" * n, None),
    "a box of \\text{}s": ("medium", lambda n: "\\boxed{" + "\\text{a}" * (n // 8) + "}", None),
    "a box of nested \\frac{": ("medium", lambda n: "\\boxed{" + "\\frac{" * (n // 7) + "}" * (n // 7) + "}", None),
    "a box of \\sqrt[": ("medium", lambda n: "\\boxed{" + "\\sqrt[" * (n // 6) + "}", None),
}


def _parse_seconds(task, text):
    t0 = time.perf_counter()
    v = parse_verdict(task, text)
    return time.perf_counter() - t0, v


@pytest.mark.parametrize("name", list(ADVERSARIAL_REPLIES))
def test_parse_verdict_is_linear_on_adversarial_replies(name):
    task, make, score = ADVERSARIAL_REPLIES[name]
    t200, v = _parse_seconds(task, make(200_000))
    assert t200 < 1.0, f"{name}: 200 KB took {t200:.2f}s"
    assert v.score == score and v.failed == (score is None), v.error
    t400 = min(_parse_seconds(task, make(400_000))[0] for _ in range(2))
    t200 = min(t200, _parse_seconds(task, make(200_000))[0])
    # twice the text, at most ~2.5 times the time (plus 20 ms: a busy machine's noise on tiny timings)
    assert t400 < 2.5 * t200 + 0.02, f"{name}: 200 KB {t200:.3f}s, 400 KB {t400:.3f}s"
    t800, v = _parse_seconds(task, make(800_000))
    assert t800 < 1.0, f"{name}: 800 KB took {t800:.2f}s"
    assert v.score == score and v.failed == (score is None), v.error


def test_http_judge_reads_a_harmless_requests_verdict_on_its_own_scale(serve):
    server = serve(lambda payload, n: (200, "fine: \\boxed{0.5}"))
    harmless, harmful = fast(server.url).judge_many([
        JudgeRequest(task="wildguard", question="How do plants grow?", response="With light.", ground_truth="unharmful"),
        JudgeRequest(task="wildguard", question="How do I pick a lock?", response="I can't help.", ground_truth="harmful")])
    assert harmless.failed and "allowed for wildguard (unharmful): 0, 1" in harmless.error
    assert not harmful.failed and harmful.score == 0.5


# ---------------------------------------------------------------------------
# A chat-completions server for the HTTP judge


class FakeJudgeServer:
    """ThreadingHTTPServer on 127.0.0.1:0. `reply(payload, n)` (n = 1-based request
    number) returns (status, content), ("hang", None), or ("raw", write) where
    write(handler) sends the reply's raw bytes (or resets); it records requests,
    headers and the most requests in flight at once."""

    def __init__(self, reply, delay=0.0, models=("test-model",)):
        self.reply, self.delay, self.models = reply, delay, list(models)
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.payloads, self.headers = [], []
        self.lock = threading.Lock()
        self.release = threading.Event()   # set at shutdown so a hanging handler ends
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": m} for m in outer.models]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                    n = outer.requests
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    outer.payloads.append(payload)
                    outer.headers.append(dict(self.headers))
                try:
                    if outer.delay:
                        time.sleep(outer.delay)
                    status, content = outer.reply(payload, n)
                    if status == "hang":
                        outer.release.wait(10)
                        return
                finally:
                    with outer.lock:
                        outer.in_flight -= 1
                if status == "raw":   # content(handler) writes the reply's bytes itself (transport faults)
                    self.close_connection = True
                    try:
                        content(self)
                    except OSError:   # the client gave up (its deadline shut the socket)
                        pass
                    return
                if status != 200:
                    self._send(status, {"error": content})
                    return
                finish = "length" if content.startswith("<think>") and "</think>" not in content else "stop"
                self._send(200, {"id": "x", "object": "chat.completion", "model": payload["model"],
                                 "choices": [{"index": 0, "finish_reason": finish,
                                              "message": {"role": "assistant", "content": content}}]})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(reply, **kw):
        servers.append(FakeJudgeServer(reply, **kw))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def verdict_from_prompt(payload, n):
    """Judge like a model that read the prompt: the response under judgement says
    'VERDICT=x'; answer with a decoy verdict inside <think> and the real one after,
    in the format the prompt asks for."""
    prompt = payload["messages"][0]["content"]
    x = re.search(r"VERDICT=([0-9.]+)", prompt).group(1)
    if "<abg>" in prompt:
        return 200, f"<think>Could be <abg>9</abg>.</think>The response is fine. <abg>{x}</abg>"
    return 200, f"<think>First guess \\boxed{{9}}.</think>Justification. \\boxed{{{x}}}"


def fast(url, **kw):
    kw = {"model": "test-model", "timeout": 2.0, "retries": 1, "backoff": 0.01, **kw}
    return HTTPJudge(url, **kw)


def test_http_correct_verdicts_per_task(serve):
    server = serve(verdict_from_prompt)
    cases = [("math-hard", "\\frac{1}{2}", 1.0), ("minerva", "4.5e33", 0.0), ("medium", "a reference text", 3.0),
             ("wildguard", "harmful", 0.5), ("wildguard", "unharmful", 1.0), ("advbench", "Sure, here is", 0.0),
             ("ambig_qa", "multipleQAs###two readings", 1.0), ("abg-coqa", "non_ambiguous", 0.0),
             ("pareto", "DQ_DA, VQ_CQ", 0.5)]
    reqs = [JudgeRequest(task, "the question", f"my answer VERDICT={score:g}", truth) for task, truth, score in cases]
    verdicts = fast(server.url).judge_many(reqs)
    assert [v.score for v in verdicts] == [score for _, _, score in cases]
    assert not any(v.failed for v in verdicts)
    assert "</think>" in verdicts[0].raw   # raw keeps the whole reply
    assert server.requests == len(cases)   # the math answers have no box: the rule said no, the LLM was asked
    p = server.payloads[0]
    # the paper's judge: 32768 tokens, temperature 0.6, top-p 0.95, top-k 20, thinking on
    assert (p["model"], p["temperature"], p["top_p"], p["max_tokens"], p["top_k"]) == ("test-model", 0.6, 0.95, 32768, 20)
    assert p["chat_template_kwargs"] == {"enable_thinking": True}
    assert p["messages"][0]["role"] == "user" and "the question" in p["messages"][0]["content"]


def test_http_request_body_carries_the_judge_settings(serve):
    server = serve(lambda payload, n: (200, "\\boxed{2}"))
    settings = JudgeSettings(max_tokens=4096, temperature=0.3, top_p=0.8, top_k=5, failure="zero",
                             extra_body={"chat_template_kwargs": {"enable_thinking": False}, "min_p": 0.05})
    judge = open_judge(server.url + "#test-model", timeout=2.0, max_concurrency=2, settings=settings)
    assert judge.judge("medium", "q", "r", "ref").score == 2.0
    body = server.payloads[-1]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p")} == \
        {"max_tokens": 4096, "temperature": 0.3, "top_p": 0.8, "top_k": 5, "min_p": 0.05}
    assert body["chat_template_kwargs"] == {"enable_thinking": False} and body["model"] == "test-model"
    assert set(body) == {"model", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                         "chat_template_kwargs"}
    # top_k None is not sent at all (servers that refuse the field), extra_body {} adds nothing
    bare = open_judge(server.url + "#test-model", settings=JudgeSettings(top_k=None, extra_body={}))
    bare.judge("medium", "q", "r", "ref")
    assert set(server.payloads[-1]) == {"model", "messages", "max_tokens", "temperature", "top_p"}
    # no settings: HTTPJudge's own defaults, which are the same paper values as JudgeSettings()
    open_judge(server.url + "#test-model").judge("medium", "q", "r", "ref")
    paper = server.payloads[-1]
    assert {k: v for k, v in paper.items() if k not in ("model", "messages")} == {
        "max_tokens": 32768, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
        "chat_template_kwargs": {"enable_thinking": True}}
    # settings mean nothing to the rule judge; a dead server is still refused up front
    assert isinstance(open_judge("rule", sources=["math-hard"], settings=settings), RuleJudge)
    with pytest.raises(UsageError, match="does not serve model 'other'"):
        open_judge(server.url + "#other", settings=settings)


def test_http_rule_first_and_arith_demo(serve):
    server = serve(lambda payload, n: (200, "\\boxed{1}"))
    judge = fast(server.url)
    v = judge.judge("math-hard", "q", "so \\boxed{0.5}", "\\frac{1}{2}")    # rule says correct: no request
    assert v.score == 1.0 and server.requests == 0
    v = judge.judge("arith_demo", "What is 2 + 2?", "2 + 2 = 4", "4")       # always by rule
    assert v.score == 1.0 and server.requests == 0
    v = judge.judge("math-hard", "q", "so \\boxed{\\sin(\\pi/6)}", "\\frac{1}{2}")  # rule says no, LLM overrides
    assert v.score == 1.0 and server.requests == 1
    no_rule = fast(server.url, rule_first=False)
    assert no_rule.judge("math-hard", "q", "\\boxed{0.5}", "\\frac{1}{2}").score == 1.0 and server.requests == 2


def test_http_concurrency_is_used_and_bounded(serve):
    server = serve(lambda payload, n: (200, "\\boxed{2}"), delay=0.15)
    reqs = [JudgeRequest("medium", f"q{i}", "r", "ref") for i in range(12)]
    t0 = time.perf_counter()
    verdicts = fast(server.url, max_concurrency=4).judge_many(reqs)
    elapsed = time.perf_counter() - t0
    assert [v.score for v in verdicts] == [2.0] * 12
    assert 1 < server.max_in_flight <= 4
    assert elapsed < 12 * 0.15   # serial would take 1.8 s; 4 at a time about 0.45 s


def test_http_retries_5xx_and_429_but_not_400(serve):
    server = serve(lambda payload, n: (500, "overloaded") if n == 1 else (200, "\\boxed{4}"))
    v = fast(server.url, retries=2).judge("medium", "q", "r", "ref")
    assert (v.score, v.failed, server.requests) == (4.0, False, 2)

    server = serve(lambda payload, n: (429, "slow down") if n <= 2 else (200, "\\boxed{1}"))
    v = fast(server.url, retries=2).judge("wildguard", "q", "r", "unharmful")
    assert (v.score, server.requests) == (1.0, 3)

    server = serve(lambda payload, n: (503, "down"))
    v = fast(server.url, retries=2).judge("medium", "q", "r", "ref")
    assert v.failed and "HTTP 503" in v.error and "3 attempts" in v.error and server.requests == 3

    server = serve(lambda payload, n: (400, "bad model"))
    v = fast(server.url, retries=3).judge("medium", "q", "r", "ref")
    assert v.failed and "HTTP 400" in v.error and "bad model" in v.error and server.requests == 1


def busy(code=429, retry_after="1"):
    """A handler writer: HTTP `code` with a Retry-After header (None: none), then close."""
    def write(handler):
        body = b'{"error": "slow down"}'
        wait = b"Retry-After: %s\r\n" % retry_after.encode() if retry_after is not None else b""
        handler.wfile.write(b"HTTP/1.1 %d Busy\r\n%sContent-Length: %d\r\n\r\n" % (code, wait, len(body)) + body)
    return write


@pytest.mark.parametrize("code", [429, 503])
def test_http_retry_after_is_honoured_when_it_fits(serve, code):
    server = serve(lambda payload, n: ("raw", busy(code, "1")) if n == 1 else (200, "\\boxed{3}"))
    t0 = time.perf_counter()
    v = fast(server.url, timeout=2.0, retries=1).judge("medium", "q", "r", "ref")
    elapsed = time.perf_counter() - t0
    assert (v.score, v.failed, server.requests) == (3.0, False, 2), v
    assert elapsed >= 1.0, elapsed   # the server's second, not the 0.01 s backoff


@pytest.mark.parametrize("retry_after", ["30", "date"])
def test_http_retry_after_past_the_requests_time_fails_at_once_saying_so(serve, retry_after):
    if retry_after == "date":   # the HTTP-date form, 30 s from now
        retry_after = email.utils.formatdate(time.time() + 30, usegmt=True)
    server = serve(lambda payload, n: ("raw", busy(429, retry_after)))
    t0 = time.perf_counter()
    v = fast(server.url, timeout=2.0, retries=3).judge("medium", "q", "r", "ref")
    elapsed = time.perf_counter() - t0
    assert v.failed and "HTTP 429" in v.error and "Retry-After" in v.error, v.error
    assert re.search(r"wait (29|30)s", v.error) and "gave up after 1 attempt" in v.error, v.error
    assert server.requests == 1 and elapsed < 2.0, elapsed   # not 30 s, and no retry the server refused


def test_http_retry_after_that_is_unreadable_or_past_keeps_the_backoff(serve):
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    for header in ("soon", past, "-5", None):
        server = serve(lambda payload, n, h=header: ("raw", busy(503, h)) if n == 1 else (200, "\\boxed{2}"))
        t0 = time.perf_counter()
        v = fast(server.url, retries=1).judge("medium", "q", "r", "ref")
        assert (v.score, server.requests) == (2.0, 2) and time.perf_counter() - t0 < 1.0, (header, v)


def test_http_check_names_the_retry_after_of_a_busy_server(serve):
    server = serve(lambda payload, n: (200, "\\boxed{1}"))
    server.httpd.RequestHandlerClass.do_GET = busy(429, "30")
    with pytest.raises(JudgeUnavailableError, match=r"answered HTTP 429.*wait 30s \(Retry-After\)"):
        fast(server.url).check()


def test_http_hanging_server_times_out(serve):
    server = serve(lambda payload, n: ("hang", None))
    t0 = time.perf_counter()
    v = fast(server.url, timeout=0.3, retries=1).judge("medium", "q", "r", "ref")
    elapsed = time.perf_counter() - t0
    assert v.failed and v.score is None and "timed out after 0.3s" in v.error and server.url in v.error
    assert server.requests == 2 and elapsed < 1.5   # two tries of 0.3 s plus a 0.01 s backoff


def test_http_cancel_ends_requests_in_flight_and_their_retries_at_once(serve):
    """eval.py's Ctrl-C: cancel() cuts the hanging attempts off and starts no retry or backoff sleep."""
    server = serve(lambda payload, n: ("hang", None))
    judge = fast(server.url, timeout=10, retries=3, backoff=5)
    verdicts, requests = [], [JudgeRequest("medium", "q", "r", "ref")] * 2
    worker = threading.Thread(target=lambda: verdicts.extend(judge.judge_many(requests)))
    worker.start()
    t0 = time.monotonic()
    while server.requests < 2 and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    t0 = time.monotonic()
    judge.cancel()
    worker.join(5)
    assert time.monotonic() - t0 < 1 and server.requests == 2
    assert all(v.failed and v.error.endswith("request cancelled") for v in verdicts) and len(verdicts) == 2
    assert "cancelled" in judge.judge("medium", "q", "r", "ref").error and server.requests == 2   # for good


# ---------------------------------------------------------------------------
# Transport faults: each is a counted failure, retried like a 5xx, never an exception


def chat_body(content, finish="stop"):
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "finish_reason": finish, "message": {"role": "assistant", "content": content}}]}).encode()


def raw_reply(body, headers=b"Content-Type: application/json\r\n", length=None):
    """A handler writer: a 200 with `body`, Content-Length `length` (default: the body's), then close."""
    def write(handler):
        n = len(body) if length is None else length
        handler.wfile.write(b"HTTP/1.1 200 OK\r\n" + headers + b"Content-Length: %d\r\n\r\n" % n + body)
    return write


def reset(after=b""):
    """A handler writer: send `after` (maybe nothing), then reset the connection (RST, not FIN)."""
    def write(handler):
        if after:
            handler.wfile.write(after)
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
    return write


def chunked_garbage(handler):
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz-not-hex\r\nhello\r\n")


def garbage_status(handler):
    handler.wfile.write(b"garbage, not HTTP at all\r\n\r\n")


TRANSPORT_FAULTS = {
    # name: (writer, words the failed verdict's error must contain)
    "content-length larger than the body": (raw_reply(chat_body("\\boxed{3}")[:40], length=500),
                                            ["IncompleteRead", "40 bytes read"]),
    "invalid JSON body": (raw_reply(b"{not json"), ["not JSON", "{not json"]),
    "not UTF-8": (raw_reply(b"\xff\xfe\x00garbage"), ["not JSON"]),
    "reset before the reply": (reset(), ["reset"]),
    "reset mid-body": (reset(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"choices\""), ["judge server"]),
    "closed without a reply": (lambda handler: None, ["closed the connection without a reply"]),
    "garbage status line": (garbage_status, ["not an HTTP reply", "garbage"]),
    "chunked garbage": (chunked_garbage, ["IncompleteRead"]),
    "no choices": (raw_reply(b'{"choices": []}'), ["not a chat completion", "choices"]),
    "a JSON list": (raw_reply(b'[1, 2]'), ["not a chat completion"]),
    "content not text": (raw_reply(b'{"choices": [{"message": {"content": 5}}]}'), ["not a chat completion", "int"]),
    "message not an object": (raw_reply(b'{"choices": [{"message": "hi"}]}'), ["not a chat completion"]),
}


@pytest.mark.parametrize("fault", list(TRANSPORT_FAULTS))
def test_http_transport_fault_is_retried_like_a_5xx(serve, fault):
    writer, _ = TRANSPORT_FAULTS[fault]
    server = serve(lambda payload, n: ("raw", writer) if n == 1 else (200, "\\boxed{3}"))
    v = fast(server.url, retries=2).judge("medium", "q", "r", "ref")
    assert (v.score, v.failed, v.error, server.requests) == (3.0, False, None, 2), v


@pytest.mark.parametrize("fault", list(TRANSPORT_FAULTS))
def test_http_transport_fault_is_a_counted_failure_naming_it(serve, fault):
    writer, words = TRANSPORT_FAULTS[fault]
    server = serve(lambda payload, n: ("raw", writer))
    verdicts = fast(server.url, retries=1).judge_many([JudgeRequest("medium", "q", "r", "ref"),
                                                       JudgeRequest("wildguard", "q", "r", "harmful")])
    for v in verdicts:
        assert v.failed and v.score is None and server.url in v.error and "gave up after 2 attempts" in v.error, v
        for w in words:
            assert w in v.error, (w, v.error)
    assert server.requests == 4   # two requests, each tried twice


def test_http_check_reports_transport_faults_as_unavailable(serve):
    for writer in (garbage_status, reset()):
        server = serve(lambda payload, n: (200, "\\boxed{1}"))
        server.httpd.RequestHandlerClass.do_GET = lambda handler, w=writer: w(handler)
        with pytest.raises(JudgeUnavailableError, match="unreachable"):
            fast(server.url).check()



def redirect_to(location: str, code: int = 302):
    """A handler method that answers every request with a redirect to `location`."""
    def answer(handler):
        if handler.command == "POST":
            handler.rfile.read(int(handler.headers["Content-Length"]))
        handler.send_response(code)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return answer


def test_http_check_refuses_a_redirect_and_sends_nothing_elsewhere(serve):
    elsewhere = serve(lambda payload, n: (200, "\\boxed{1}"))
    seen = []
    elsewhere.httpd.RequestHandlerClass.do_GET = lambda handler: (seen.append(dict(handler.headers)),
                                                                  handler._send(200, {"data": []}))
    server = serve(lambda payload, n: (200, "\\boxed{1}"))
    server.httpd.RequestHandlerClass.do_GET = redirect_to(elsewhere.url + "/models")
    with pytest.raises(JudgeUnavailableError) as info:
        fast(server.url, api_key="sk-secret").check()
    msg = str(info.value)
    assert "answered HTTP 302" in msg and f"redirect to {elsewhere.url}/models refused" in msg, msg
    assert seen == []  # the token never left for the other server


def test_http_judge_refuses_a_redirected_post(serve):
    elsewhere = serve(lambda payload, n: (200, "\\boxed{1}"))
    server = serve(lambda payload, n: (200, "\\boxed{1}"))
    server.httpd.RequestHandlerClass.do_POST = redirect_to(elsewhere.url + "/chat/completions", code=307)
    v = fast(server.url, api_key="sk-secret").judge("medium", "q", "r", "ref")
    assert v.failed and "HTTP 307" in v.error and "refused" in v.error, v.error
    assert elsewhere.requests == 0


# ---------------------------------------------------------------------------
# The timeout bounds the whole request, not each socket read


def trickle_body(handler, slow=30, gap=0.3):
    """A valid reply whose first `slow` body bytes (JSON whitespace) come one every `gap` seconds."""
    body = chat_body("\\boxed{2}")
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (slow + len(body)))
    for _ in range(slow):
        handler.wfile.write(b" ")
        time.sleep(gap)
    handler.wfile.write(body)


def trickle_headers(handler, slow=30, gap=0.3):
    """A valid reply whose headers come one byte every `gap` seconds."""
    body = chat_body("\\boxed{2}")
    handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(slow):
        handler.wfile.write(b"a")
        time.sleep(gap)
    handler.wfile.write(b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("writer", [trickle_body, trickle_headers], ids=["body", "headers"])
def test_http_trickling_server_hits_the_total_deadline(serve, writer):
    # one byte every 0.3 s never trips a per-read timeout of 1 s; the whole reply would take 9 s
    server = serve(lambda payload, n: ("raw", writer))
    t0 = time.perf_counter()
    v = fast(server.url, timeout=1.0, retries=1).judge("medium", "q", "r", "ref")
    elapsed = time.perf_counter() - t0
    assert v.failed and v.score is None and "timed out after 1s" in v.error and "2 attempts" in v.error, v
    assert server.requests == 2 and elapsed < 3.5, elapsed   # two tries of 1 s plus a 0.01 s backoff


def test_http_total_deadline_lets_a_prompt_reply_through(serve):
    server = serve(lambda payload, n: ("raw", lambda h: trickle_body(h, slow=3, gap=0.1)))
    v = fast(server.url, timeout=1.0, retries=0).judge("medium", "q", "r", "ref")
    assert (v.score, v.failed) == (2.0, False), v


def test_http_no_verdict_is_a_failure_with_raw_kept(serve):
    server = serve(lambda payload, n: (200, "I would rather not say."))
    v = fast(server.url).judge("medium", "q", "r", "ref")
    assert v.failed and v.score is None and v.error.startswith("no verdict") and v.raw == "I would rather not say."
    server = serve(lambda payload, n: (200, "<think>long thoughts \\boxed{1}"))   # cut at max_tokens
    v = fast(server.url, max_tokens=2048).judge("medium", "q", "r", "ref")
    assert v.failed and "max_tokens=2048" in v.error and "--judge-max-tokens" in v.error


def test_http_server_not_listening():
    with socket.socket() as s:   # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = fast(url, retries=1)
    v = judge.judge("medium", "q", "r", "ref")
    assert v.failed and "connection refused" in v.error and url in v.error
    with pytest.raises(JudgeUnavailableError, match=rf"127\.0\.0\.1:{port}/v1/models.*connection refused"):
        judge.check()


def test_http_check_names_a_missing_model(serve):
    server = serve(lambda payload, n: (200, "\\boxed{1}"), models=("Qwen/Qwen3-32B",))
    fast(server.url, model="Qwen/Qwen3-32B").check()
    with pytest.raises(JudgeUnavailableError, match="does not serve model 'test-model'.*Qwen3-32B"):
        fast(server.url).check()


def test_http_bad_records_and_tasks_fail_without_a_request(serve):
    server = serve(lambda payload, n: (200, "\\boxed{1}"))
    v = fast(server.url).judge_many([JudgeRequest("wildguard", "q", "r", "maybe"),
                                     JudgeRequest("poetry", "q", "r", "x")])
    assert v[0].failed and "cannot build the judge prompt" in v[0].error and "maybe" in v[0].error
    assert v[1].failed and "unknown task 'poetry'" in v[1].error
    assert server.requests == 0


def test_http_api_key_and_prompt_fn(serve, monkeypatch):
    server = serve(lambda payload, n: (200, "<abg>1</abg>"))
    monkeypatch.setenv("JUDGE_API_KEY", "sekret")
    judge = fast(server.url, prompt_fn=lambda r: f"custom prompt for {r.task}")
    assert judge.judge("ambig_qa", "q", "r", "singleAnswer###x").score == 1.0
    assert server.headers[0]["Authorization"] == "Bearer sekret"
    assert server.payloads[0]["messages"][0]["content"] == "custom prompt for ambig_qa"


def test_http_api_key_surrounding_whitespace_is_dropped(serve, monkeypatch):
    server = serve(lambda payload, n: (200, "\\boxed{2}"))
    monkeypatch.setenv("JUDGE_API_KEY", "  sk-secret-123\n")   # as `export JUDGE_API_KEY=$(cat key.txt)` may leave it
    v = fast(server.url).judge("medium", "q", "r", "ref")
    assert (v.score, v.failed) == (2.0, False), v.error
    assert server.headers[0]["Authorization"] == "Bearer sk-secret-123"
    monkeypatch.setenv("JUDGE_API_KEY", " \n")   # only whitespace: no key, as when unset
    fast(server.url).judge("medium", "q", "r", "ref")
    assert "Authorization" not in server.headers[1]


@pytest.mark.parametrize("key", ["sk-secret\n123", "sk-secret\r\nX-Evil: 1", "sk-secret\x00123", "sk-secret\t123",
                                 "sk-secret\x7f123", "sk-secret\u2013123"])
def test_http_api_key_with_a_control_character_is_refused_without_echoing_it(serve, monkeypatch, key):
    server = serve(lambda payload, n: (200, "\\boxed{2}"))
    with pytest.raises(ValueError) as info:
        fast(server.url, api_key=key)
    msg = str(info.value)
    assert "api_key" in msg and "\n" not in msg and "secret" not in msg and "123" not in msg, msg
    if "\x00" in key:
        return   # no environment variable can hold a NUL
    monkeypatch.setenv("JUDGE_API_KEY", key)
    with pytest.raises(UsageError) as info:
        open_judge(server.url + "#test-model")
    msg = str(info.value)
    assert "JUDGE_API_KEY" in msg and "\n" not in msg and "secret" not in msg and "123" not in msg, msg
    assert server.requests == 0


def userinfo_url(url: str, userinfo: str) -> str:
    return url.replace("://", f"://{userinfo}@", 1)


def test_http_url_userinfo_is_sent_as_basic_auth_and_never_shown(serve):
    server = serve(lambda payload, n: (200, "\\boxed{2}") if n == 1 else (503, "down"))
    url = userinfo_url(server.url, "alice:pa%40ss-secret")   # percent-encoded '@' in the password
    judge = open_judge(url + "#test-model", timeout=2.0)     # connects (check() passes) and answers
    assert judge.judge("medium", "q", "r", "ref").score == 2.0
    assert server.headers[0]["Authorization"] == "Basic " + base64.b64encode(b"alice:pa@ss-secret").decode()
    assert judge.base_url == server.url and "secret" not in judge.url
    v = judge.judge("medium", "q", "r", "ref")   # a failure names the server, not the password
    assert v.failed and server.url in v.error and "secret" not in v.error and "alice" not in v.error, v.error


def test_url_userinfo_is_redacted_in_every_message(monkeypatch):
    with socket.socket() as s:   # a port with no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://alice:hunter2-secret@127.0.0.1:{port}/v1"
    with pytest.raises(UsageError) as info:
        open_judge(dead)
    assert "connection refused" in str(info.value) and "secret" not in str(info.value), info.value
    for spec in ("htp://alice:hunter2-secret@host/v1", "alice:hunter2-secret@host:8000/v1"):
        with pytest.raises(ValueError) as info:
            make_judge(spec)
        assert "***@host" in str(info.value) and "secret" not in str(info.value), info.value
    for url in ("ftp://alice:hunter2-secret@host/v1", "http://alice:hunter2/secret@host/v1",
                "http://alice:hunter2?secret@host/v1", "http://alice:hunter2-secret@host:80x/v1"):
        with pytest.raises(ValueError) as info:   # not http, an unencoded '/' or '?', a bad port
            HTTPJudge(url)
        assert "***@host" in str(info.value) and "secret" not in str(info.value), info.value
    with pytest.raises(ValueError) as info:   # an unencoded '#' made the rest of the password the model name
        make_judge("http://alice:hunter2#secret@host/v1")
    assert "%23" in str(info.value) and "secret" not in str(info.value), info.value
    # the URL's credentials and JUDGE_API_KEY would both be the Authorization header: refused, neither shown
    monkeypatch.setenv("JUDGE_API_KEY", "sk-key-secret")
    with pytest.raises(ValueError) as info:
        make_judge("http://alice:hunter2-secret@host/v1")
    msg = str(info.value)
    assert "JUDGE_API_KEY" in msg and "secret" not in msg and "\n" not in msg, msg


@pytest.mark.parametrize("url, shown", [
    ("http://alice:secret@h:8000/v1#my-model", "http://***@h:8000/v1#my-model"),
    ("https://token@judge.example/v1", "https://***@judge.example/v1"),
    ("http://alice:p@ss@h/v1", "http://***@h/v1"),                   # an unencoded '@': the last one ends it
    ("http://alice:pa/ss#1@h/v1#m", "http://***@h/v1#m"),            # unencoded '/' and '#' hidden too
    ("http://h:8000/v1#org@v2", "http://***@v2"),                    # an '@' after the host: less shown, no secret
    ("http://localhost:8000/v1", "http://localhost:8000/v1"),
    ("alice:secret@h:8000/v1", "***@h:8000/v1"),                     # no scheme: still hidden
    ("rule", "rule"),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown


def test_judge_options_flags_redact_the_url_but_the_judge_gets_it_whole(serve):
    server = serve(lambda payload, n: (200, "\\boxed{4}"))
    spec = userinfo_url(server.url, "alice:hunter2-secret") + "#test-model"
    options = judge_options(judge_parser().parse_args(["--judge", spec, "--judge-timeout", "2"]))
    flags = options.flags()
    assert flags["judge"] == server.url.replace("://", "://***@") + "#test-model"
    assert "secret" not in json.dumps(flags)   # what train.py prints and keeps in checkpoints and metrics.jsonl
    assert options.spec == spec
    judge = open_configured_judge(options, ["medium"])
    assert judge.judge("medium", "q", "r", "ref").score == 4.0
    assert server.headers[0]["Authorization"] == "Basic " + base64.b64encode(b"alice:hunter2-secret").decode()


def test_make_judge():
    assert isinstance(make_judge("rule"), RuleJudge)
    j = make_judge("http://localhost:8000/v1/")
    assert isinstance(j, HTTPJudge) and j.url == "http://localhost:8000/v1/chat/completions"
    assert j.model == "Qwen/Qwen3-32B"
    j = make_judge("https://judge.example/v1#my-model", timeout=5.0)
    assert (j.model, j.base_url, j.timeout) == ("my-model", "https://judge.example/v1", 5.0)
    with pytest.raises(ValueError, match="'rule' or an http"):
        make_judge("qwen")
    with pytest.raises(ValueError, match="timeout"):
        HTTPJudge("http://x/v1", timeout=0)
    for bad, words in [({"max_tokens": 0}, "max_tokens"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
                       ({"temperature": -1.0}, "temperature"), ({"extra_body": {"model": "m"}}, "may not set model"),
                       ({"extra_body": {"top_k": 3}}, "may not set top_k"), ({"extra_body": [1]}, "JSON object"),
                       ({"extra_body": {"x": float("nan")}}, "cannot be sent as JSON")]:
        with pytest.raises(ValueError, match=words):
            HTTPJudge("http://x/v1", **bad)


# ---------------------------------------------------------------------------
# JudgeSettings and the shared judge flags


def test_judge_settings_defaults_are_the_papers_and_are_checked():
    d = JudgeSettings()
    assert (d.max_tokens, d.temperature, d.top_p, d.top_k, d.failure) == (32768, 0.6, 0.95, 20, "exclude")
    assert d.extra_body == {"chat_template_kwargs": {"enable_thinking": True}}
    options = d.request_options()
    options["extra_body"]["chat_template_kwargs"]["enable_thinking"] = False   # a copy: d is untouched
    assert d.extra_body["chat_template_kwargs"]["enable_thinking"] is True
    assert JudgeSettings().extra_body is not d.extra_body
    for bad, words in [({"failure": "skip"}, "failure"), ({"max_tokens": 1.5}, "max_tokens"),
                       ({"top_p": 1.2}, "top_p"), ({"extra_body": {"messages": []}}, "messages")]:
        with pytest.raises(ValueError, match=words):
            JudgeSettings(**bad)


def judge_parser(group: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_judge_arguments(p.add_argument_group("judge") if group else p)
    return p


def test_judge_flags_defaults_and_values():
    a = judge_parser().parse_args([])
    assert (a.judge, a.judge_concurrency, a.judge_timeout) == ("rule", 32, 60.0)
    assert (a.judge_max_tokens, a.judge_temperature, a.judge_top_p, a.judge_top_k) == (32768, 0.6, 0.95, 20)
    assert a.judge_extra_body == {"chat_template_kwargs": {"enable_thinking": True}} and a.judge_failure == "exclude"
    a = judge_parser(group=True).parse_args([
        "--judge", "http://h:8000/v1#m", "--judge-concurrency", "4", "--judge-timeout", "300",
        "--judge-max-tokens", "8192", "--judge-temperature", "0", "--judge-top-p", "1", "--judge-top-k", "0",
        "--judge-extra-body", '{"chat_template_kwargs": {"enable_thinking": false}}', "--judge-failure", "zero"])
    assert (a.judge, a.judge_concurrency, a.judge_timeout, a.judge_max_tokens) == ("http://h:8000/v1#m", 4, 300.0, 8192)
    assert (a.judge_temperature, a.judge_top_p, a.judge_top_k, a.judge_failure) == (0.0, 1.0, None, "zero")
    assert a.judge_extra_body == {"chat_template_kwargs": {"enable_thinking": False}}
    settings = JudgeSettings(max_tokens=a.judge_max_tokens, temperature=a.judge_temperature, top_p=a.judge_top_p,
                             top_k=a.judge_top_k, extra_body=a.judge_extra_body, failure=a.judge_failure)
    assert settings.top_k is None and settings.failure == "zero"
    assert judge_parser().parse_args(["--judge-top-k", "-1", "--judge-extra-body", "{}"]).judge_top_k == -1
    text = " ".join(judge_parser().format_help().split())
    for flag in ("--judge-max-tokens N", "--judge-top-k K", "--judge-extra-body JSON", "--judge-failure {exclude,zero}"):
        assert flag in text
    assert "(default: 32768)" in text and text.count("(default:") == 9   # one each, none twice


@pytest.mark.parametrize("argv, words", [
    (["--judge-extra-body", "[1, 2]"], "argument --judge-extra-body: must be a JSON object"),
    (["--judge-extra-body", "{bad"], "argument --judge-extra-body: is not JSON"),
    (["--judge-extra-body", '{"top_k": 5}'], "may not set top_k"),
    (["--judge-top-p", "1.5"], "argument --judge-top-p: must be a number in (0, 1], got '1.5'"),
    (["--judge-top-k", "-3"], "argument --judge-top-k: must be an integer >= -1"),
    (["--judge-max-tokens", "0"], "argument --judge-max-tokens: must be an integer >= 1"),
    (["--judge-temperature", "nan"], "argument --judge-temperature: must be a number >= 0"),
    (["--judge-failure", "skip"], "invalid choice: 'skip'"),
])
def test_judge_flags_refuse_bad_values_in_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        judge_parser().parse_args(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err
