"""The HTTP judge: an LLM judge behind an OpenAI-compatible chat-completions server.

HTTPJudge sends each request's judge prompt (nano_gtalign/prompts.py) to the server (e.g. vLLM serving
Qwen3-32B) and reads the verdict from its reply (judges.parse_verdict), many requests in flight at once,
each under a total deadline, with retries; whatever still fails is a failed Verdict. make_judge,
open_judge and open_configured_judge turn a --judge spec (and the options of judges.judge_options)
into a judge ready to use: the rule judge, or an HTTPJudge whose server answers. Each request itself is
nano_gtalign/http_transport.py's (a total deadline, no redirects, typed errors). Standard library only.
"""
from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from nano_gtalign.errors import UsageError
from nano_gtalign.http_transport import (
    TRANSPORT_ERRORS, BadReply, Deadline, DeadlineHTTPHandler, DeadlineHTTPSHandler, HTTPStatus, NoRedirects, describe,
    send,
)
from nano_gtalign.judges import (
    MATH_TASKS, PAPER_EXTRA_BODY, RULE_TASKS, VERDICT_SCALES, Judge, JudgeOptions, JudgeRequest, JudgeSettings,
    JudgeUnavailableError, RuleJudge, Verdict, canonical_task, check_extra_body, check_sampling, failed_verdict,
    parse_verdict, redact_url,
)

DEFAULT_JUDGE_MODEL = "Qwen/Qwen3-32B"   # the paper's judge: what HTTPJudge asks for when --judge names no model


def _default_prompt(request: JudgeRequest) -> str:
    from nano_gtalign.prompts import judge_prompt
    extra_info = request.extra.get("extra_info") if isinstance(request.extra, dict) else None
    return judge_prompt(canonical_task(request.task), request.question, request.response, request.ground_truth,
                        extra_info=extra_info if isinstance(extra_info, dict) else None)




def _chat_completion(body: bytes) -> tuple[str, str | None]:
    """(choices[0].message.content, finish_reason) of a chat-completions body, or BadReply."""
    try:
        reply = json.loads(body)
    except (ValueError, RecursionError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadReply(f"a body that is not JSON ({type(e).__name__}): {body[:200]!r}") from None
    try:
        choice = reply["choices"][0]
        text = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise BadReply(f"a reply that is not a chat completion (no choices[0].message): {body[:200]!r}") from None
    if text is None:   # some servers send null content for an empty reply
        text = ""
    if not isinstance(text, str):
        raise BadReply(f"a reply that is not a chat completion (message.content is {type(text).__name__}, "
                        f"not text): {body[:200]!r}")
    finish_reason = choice.get("finish_reason")
    return text, finish_reason if isinstance(finish_reason, str) else None


def _check_api_key(key: str | None, source: str) -> str | None:
    """The key without surrounding whitespace (None when nothing is left: no key). A control character or one
    outside printable ASCII inside it is refused with a ValueError that names the character, never the key:
    http.client's own error would print the whole header, key and all, into every failed verdict."""
    if key is None:
        return None
    key = key.strip()   # a trailing newline from `export JUDGE_API_KEY=$(cat key.txt)` is not part of the key
    bad = next((i for i, c in enumerate(key) if not " " <= c <= "~"), None)
    if bad is not None:
        raise ValueError(f"{source} has an unprintable or non-ASCII character (U+{ord(key[bad]):04X}, character "
                         f"{bad + 1} of {len(key)}), which a Bearer token cannot hold: check how the key was set")
    return key or None


def _split_userinfo(base_url: str) -> tuple[str, str | None]:
    """(base_url without its user:password@, the Basic credentials "user:password" percent-decoded, or None).

    urllib would take "user:password@host" for the host name (and fail to resolve it); the credentials go in
    an Authorization header instead, to this server only (http_transport.NoRedirects). ValueError, showing the
    URL redacted, when an '@' is left after the host (an unencoded '/', '?' or '#' in a password splits it
    there) or the port is not a number."""
    scheme, _, rest = base_url.partition("://")
    netloc = rest[:min([i for i in map(rest.find, "/?#") if i >= 0], default=len(rest))]   # as RFC 3986 ends it
    userinfo, at, host = netloc.rpartition("@")
    url = f"{scheme}://{host}{rest[len(netloc):]}"
    if "@" in url:
        raise ValueError(f"judge URL {redact_url(base_url)} has an '@' after its host: in a user name or "
                         "password write '@' as %40, '/' as %2F, '?' as %3F and '#' as %23")
    try:
        urllib.parse.urlsplit(url).port
    except ValueError:
        raise ValueError(f"judge URL {redact_url(base_url)} has a port that is not a number from 0 to 65535") from None
    if not at:
        return url, None
    user, _, password = userinfo.partition(":")
    return url, f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


class HTTPJudge:
    """LLM judge behind an OpenAI-compatible server (POST {base_url}/chat/completions).

    judge_many sends up to max_concurrency requests at once. Each attempt must
    be over within `timeout` seconds in all (connect, send, headers and the
    whole body: a server that trickles bytes is cut off at the deadline, see
    http_transport.Deadline). Transport faults (refused, reset, closed mid-reply,
    broken HTTP, a body that is not JSON or not a chat completion), timeouts, HTTP 5xx and
    429 are retried `retries` times, waiting backoff * 2**k between tries;
    other HTTP 4xx are not retried. A 429 or 5xx with a Retry-After is retried
    after the wait it asks for when that fits in the request's time
    ((retries + 1) * timeout plus the backoff sleeps, less what the attempts so
    far took and the rest may take), else the request fails at once, saying
    what the server asked. Whatever still fails becomes a failed Verdict naming
    the URL and the cause; judge_many never raises.

    cancel() ends every request at once, for good: eval.py calls it on Ctrl-C so
    that exiting does not wait out the attempts and sleeps of the requests in flight.

    Credentials: api_key (else $JUDGE_API_KEY, surrounding whitespace dropped;
    a control or non-ASCII character inside is refused) is sent as a Bearer
    token; a base_url with user:password@ connects to the host without them and
    sends them as HTTP Basic auth (both at once are refused). Neither ever
    appears in a message: base_url and url hold the URL without the userinfo.

    rule_first: math-hard/minerva answers the RuleJudge finds correct are
    scored 1 without a request; the others are asked to the LLM, whose verdict
    (or failure) is final, so the judge may override the rule's "incorrect"
    (docs/reward.md). arith_demo is always scored by rule: it has no LLM prompt.

    Sampling defaults are JudgeSettings' (the paper's judge). top_k is sent as
    the `top_k` field unless None; extra_body (None: PAPER_EXTRA_BODY, thinking
    on; {}: nothing) is merged into every request and may not set a field that
    has its own argument.
    """

    def __init__(self, base_url: str, model: str = DEFAULT_JUDGE_MODEL, temperature: float = 0.6,
                 top_p: float = 0.95, max_tokens: int = 32768, timeout: float = 60.0, retries: int = 3,
                 max_concurrency: int = 32, *, top_k: int | None = 20, backoff: float = 0.5,
                 rule_first: bool = True, prompt_fn: Callable[[JudgeRequest], str] | None = None,
                 api_key: str | None = None, extra_body: dict | None = None):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base_url must start with http:// or https://, got {redact_url(base_url)!r}")
        if timeout <= 0 or retries < 0 or max_concurrency < 1 or backoff < 0:
            raise ValueError(f"bad HTTPJudge settings: timeout={timeout} (>0), retries={retries} (>=0), "
                             f"max_concurrency={max_concurrency} (>=1), backoff={backoff} (>=0)")
        check_sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k)
        url, basic = _split_userinfo(base_url)
        key_source = "api_key" if api_key is not None else "JUDGE_API_KEY"
        api_key = _check_api_key(api_key if api_key is not None else os.environ.get("JUDGE_API_KEY"), key_source)
        if basic is not None and api_key:
            raise ValueError(f"judge URL {redact_url(base_url)} has a user:password@ and {key_source} is set: both "
                             "would be the Authorization header; give one")
        self.base_url = url.rstrip("/")   # no credentials in it: every message shows it as it is
        self.url = self.base_url + "/chat/completions"
        self.model, self.temperature, self.top_p, self.max_tokens = model, temperature, top_p, max_tokens
        self.top_k = top_k
        self.timeout, self.retries, self.max_concurrency, self.backoff = timeout, retries, max_concurrency, backoff
        self.rule_first = rule_first
        self.prompt_fn = prompt_fn or _default_prompt
        self.api_key = api_key
        self._basic = base64.b64encode(basic.encode()).decode() if basic is not None else None
        self.extra_body = check_extra_body(PAPER_EXTRA_BODY if extra_body is None else extra_body)
        self._rule = RuleJudge()
        self._opener = urllib.request.build_opener(DeadlineHTTPHandler, DeadlineHTTPSHandler, NoRedirects)
        self._cancelled = threading.Event()
        self._in_flight: set[Deadline] = set()   # the attempts cancel() must cut off
        self._in_flight_lock = threading.Lock()

    def cancel(self) -> None:
        """Stop every request now and for good: no attempt, retry or wait starts any more, the attempts in flight
        have their sockets shut (their deadlines expire at once), and each request ends in a failed verdict
        within moments. Only eval.py's Ctrl-C calls it: train.py's first Ctrl-C lets the step's judging finish."""
        with self._in_flight_lock:
            self._cancelled.set()
            in_flight = list(self._in_flight)
        for deadline in in_flight:
            deadline.expire()

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        elif self._basic:
            headers["Authorization"] = f"Basic {self._basic}"
        return headers

    def _fetch(self, url: str, data: bytes | None = None) -> bytes:
        """The body of a 2xx reply to GET (data None) or POST `url`, all within `timeout` seconds.
        Raises HTTPStatus (non-2xx), BadReply (body over MAX_REPLY_BYTES), TimeoutError (past the
        deadline) or one of TRANSPORT_ERRORS."""
        request = urllib.request.Request(url, data=data, headers=self._headers(),
                                         method="GET" if data is None else "POST")
        request.deadline = deadline = Deadline(self.timeout)
        with self._in_flight_lock:
            self._in_flight.add(deadline)
            if self._cancelled.is_set():   # cancel() came after _ask looked: this attempt is cut off too
                deadline.expire()
        body, error = b"", None
        try:
            body = send(self._opener, request, self.timeout)
        except (HTTPStatus, BadReply, *TRANSPORT_ERRORS) as e:
            error = e
        with self._in_flight_lock:
            self._in_flight.discard(deadline)
        if deadline.stop():   # whatever the reads saw, it was cut off by the deadline
            raise TimeoutError(f"timed out after {self.timeout:g}s")
        if error is not None:
            raise error
        return body

    def check(self) -> None:
        """Fail fast: raise JudgeUnavailableError unless the server answers
        GET {base_url}/models and (when it lists models) serves self.model."""
        url = self.base_url + "/models"
        try:
            body = json.loads(self._fetch(url))
        except HTTPStatus as e:
            why = f": {e.snippet}" if 300 <= e.code < 400 else ""
            raise JudgeUnavailableError(f"judge server at {url} answered HTTP {e.code}{why}{e.asked()}") from None
        except (BadReply, ValueError, RecursionError, *TRANSPORT_ERRORS) as e:
            raise JudgeUnavailableError(f"judge server at {url} is unreachable: {describe(e, self.timeout)}") from None
        served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
        if served and self.model not in served:
            raise JudgeUnavailableError(f"judge server at {self.base_url} does not serve model {self.model!r}; "
                                        f"it serves {served}")

    def _ask(self, prompt: str) -> tuple[str | None, str | None, str | None]:
        """(reply text, finish_reason, None) or (None, None, error) after retries."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.top_k is not None:   # a vLLM/sglang field: servers that refuse it get None (not sent)
            payload["top_k"] = self.top_k
        payload.update(self.extra_body)   # checked at construction: never one of the fields above
        data = json.dumps(payload).encode()
        # The request keeps the bound docs/judges.md states, (retries + 1) attempts of `timeout` plus the backoff
        # sleeps: a server's Retry-After may use what the attempts so far left unused of it, no more.
        sleeps = [self.backoff * 2 ** k for k in range(self.retries)]
        end = time.monotonic() + (self.retries + 1) * self.timeout + sum(sleeps)
        error, wait = "", 0.0
        for attempt in range(self.retries + 1):
            if wait:
                self._cancelled.wait(wait)   # a sleep that cancel() cuts short
            if self._cancelled.is_set():
                # not the cut-off attempt's error: the deadline cancel() expired reads as a timeout
                return None, None, f"judge server {self.url}: request cancelled"
            wait = sleeps[attempt] if attempt < self.retries else 0.0
            try:
                text, finish_reason = _chat_completion(self._fetch(self.url, data))
            except HTTPStatus as e:
                error = f"judge server {self.url} answered HTTP {e.code}: {e.snippet}{e.asked()}"
                if e.code != 429 and e.code < 500:
                    return None, None, error
                if attempt < self.retries and e.retry_after is not None and e.retry_after > wait:
                    left = (end - time.monotonic() - (self.retries - attempt) * self.timeout
                            - sum(sleeps[attempt + 1:]))
                    if e.retry_after > left:   # waiting would overrun the request's time: fail now, not later
                        return None, None, (f"{error}, more than the {max(left, 0.0):.1f}s this request has left "
                                            f"(gave up after {_attempts(attempt + 1)})")
                    wait = e.retry_after
                continue
            except BadReply as e:   # a broken reply is a transport fault: retried like a 5xx
                error = f"judge server {self.url} sent {e}"
                continue
            except TRANSPORT_ERRORS as e:
                error = f"judge server {self.url}: {describe(e, self.timeout)}"
                continue
            return text, finish_reason, None
        return None, None, f"{error} (gave up after {_attempts(self.retries + 1)})"

    def _judge_llm(self, request: JudgeRequest) -> Verdict:
        try:
            prompt = self.prompt_fn(request)
        except ValueError as e:   # a record the prompt cannot describe (e.g. a bad safety label)
            return failed_verdict(f"cannot build the judge prompt: {e}")
        try:
            text, finish_reason, error = self._ask(prompt)
        except Exception as e:   # a fault nobody foresaw still costs one sample, not the run
            return failed_verdict(f"judge server {self.url}: unexpected {type(e).__name__}: {e}")
        if text is None:
            return failed_verdict(error or "judge call failed")
        verdict = parse_verdict(request.task, text, request.ground_truth)
        if verdict.failed and finish_reason == "length":   # the usual cause with a thinking judge
            verdict.error += (f" (the reply was cut at max_tokens={self.max_tokens}: raise --judge-max-tokens "
                              "or turn the judge's thinking off)")
        return verdict

    def judge_many(self, requests: list[JudgeRequest]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(requests)
        to_ask: list[int] = []
        for i, r in enumerate(requests):
            task = canonical_task(r.task)
            if task not in VERDICT_SCALES:
                verdicts[i] = failed_verdict(f"unknown task {r.task!r} (known: {', '.join(VERDICT_SCALES)})")
            elif task == "arith_demo":
                verdicts[i] = self._rule.judge(task, r.question, r.response, r.ground_truth, r.extra)
            elif task in MATH_TASKS and self.rule_first:
                rule = self._rule.judge(task, r.question, r.response, r.ground_truth, r.extra)
                if rule.score == 1.0:
                    verdicts[i] = rule
                else:
                    to_ask.append(i)
            else:
                to_ask.append(i)
        if to_ask:
            pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(to_ask)))
            try:
                for i, v in zip(to_ask, pool.map(lambda k: self._judge_llm(requests[k]), to_ask)):
                    verdicts[i] = v
            finally:
                # Every future is done unless a KeyboardInterrupt left the loop: then drop the queued requests and
                # do not wait for those in flight (a `with` block would wait out all their retries); the
                # caller's cancel() ends them.
                pool.shutdown(wait=False, cancel_futures=True)
        return verdicts   # type: ignore[return-value]  # every slot is filled above

    def judge(self, task: str, question: str, response: str, ground_truth: str,
              extra: dict | None = None) -> Verdict:
        return self.judge_many([JudgeRequest(task, question, response, ground_truth, extra or {})])[0]


def make_judge(spec: str, **http_options) -> Judge:
    """"rule" -> RuleJudge; "http(s)://host:port/v1" or "...#model-name" -> HTTPJudge
    (model defaults to Qwen/Qwen3-32B; http_options go to HTTPJudge)."""
    if spec == "rule":
        if http_options:
            raise ValueError(f"the rule judge takes no options, got {sorted(http_options)}")
        return RuleJudge()
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if "@" in model:   # the '#' was a password's: it would have split the password into the model name
            raise ValueError(f"judge spec {redact_url(spec)!r} has an '@' after '#': write '#' in a password as %23")
        if model:
            http_options["model"] = model
        return HTTPJudge(url, **http_options)
    raise ValueError(f"judge spec must be 'rule' or an http(s) URL like http://localhost:8000/v1[#model], "
                     f"got {redact_url(spec)!r}")


def open_judge(spec: str, *, sources: list[str] = (), timeout: float | None = None,
               max_concurrency: int | None = None, settings: JudgeSettings | None = None) -> Judge:
    """The judge a script asked for, ready to use: the rule judge only when it can score every data
    source given, an HTTP judge only once its server answers (an unreachable judge would otherwise turn
    every sample into a failure). settings (None: HTTPJudge's own defaults, which are the same paper
    values) set how an HTTP judge samples; the rule judge samples nothing. settings.failure is the
    reward's business: pass it to scoring.score_batch as judge_failure. Raises UsageError naming the problem."""
    if spec == "rule":
        unscorable = sorted({s for s in sources if canonical_task(s) not in RULE_TASKS})
        if unscorable:
            raise UsageError(f"the rule judge cannot score data_source {', '.join(unscorable)}; "
                             "pass --judge http://HOST:PORT/v1 (an OpenAI-compatible server)")
        return RuleJudge()
    options = {k: v for k, v in (("timeout", timeout), ("max_concurrency", max_concurrency)) if v is not None}
    if settings is not None:
        options.update(settings.request_options())
    try:
        judge = make_judge(spec, **options)
        judge.check()
    except (ValueError, JudgeUnavailableError) as e:
        raise UsageError(str(e)) from None
    return judge


def open_configured_judge(options: JudgeOptions, sources: list[str]) -> Judge:
    """open_judge with a run's JudgeOptions (judges.judge_options reads them from the flags)."""
    return open_judge(options.spec, sources=sources, timeout=options.timeout, max_concurrency=options.concurrency,
                      settings=options.settings)
