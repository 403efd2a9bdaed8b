"""One HTTP request to an OpenAI-compatible server under a total deadline: connect, send, read, all bounded;
no redirects; non-2xx and broken replies as typed errors. Standard library only.

send() opens a request with an opener built from DeadlineHTTPHandler, DeadlineHTTPSHandler and NoRedirects;
the request's Deadline shuts its sockets when its time is up (or when the caller expires it early). A non-2xx
answer is an HTTPStatus (with its Retry-After), a body over MAX_REPLY_BYTES a BadReply, and everything else
that can go wrong on the wire one of TRANSPORT_ERRORS; describe() names the cause in a few words.
The judge that uses it (prompts, retries, verdicts) is nano_gtalign/http_judge.py.
"""
from __future__ import annotations

import email.utils
import functools
import http.client
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

# A judge reply is a few kB; a body past this is garbage, and reading it all would only fill memory.
MAX_REPLY_BYTES = 16 * 2**20


class Deadline:
    """A total time limit for one HTTP request (connect, send, headers and body together).

    When it passes, every socket the request opened is shut down, which wakes a read or write
    blocked on it: a server that trickles one byte at a time cannot hold a request longer than
    `seconds`, as it could under a timeout per socket read."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(self.end - time.monotonic(), 1e-3)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if not self.expired:
                self._socks.append(sock)
                return
        _shut(sock)

    def expire(self) -> None:
        """Shut the request's sockets now (the timer does it at the deadline, HTTPJudge.cancel earlier)."""
        with self._lock:
            self.expired, socks, self._socks = True, self._socks, []
        for sock in socks:
            _shut(sock)

    def stop(self) -> bool:
        """Disarm; True if the deadline had passed (then whatever was read is not trusted)."""
        self._timer.cancel()
        with self._lock:
            self._socks = []
            return self.expired


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:   # already closed
        pass


class _WatchedConnection:
    """An http.client connection that connects within what is left of its deadline and hands
    its socket (after any TLS handshake) to the deadline."""

    def __init__(self, *args, deadline: Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self):
        self.timeout = self.deadline.remaining()
        super().connect()
        self.deadline.watch(self.sock)


class _WatchedHTTP(_WatchedConnection, http.client.HTTPConnection):
    pass


_WATCHED: dict[type, type] = {http.client.HTTPConnection: _WatchedHTTP}
if hasattr(http.client, "HTTPSConnection"):   # Python built with ssl
    class _WatchedHTTPS(_WatchedConnection, http.client.HTTPSConnection):
        pass
    _WATCHED[http.client.HTTPSConnection] = _WatchedHTTPS


class _DeadlineHandlerMixin:
    """urllib handler that opens the request's connection as a _WatchedConnection (urllib keeps
    doing proxies, TLS and redirects)."""

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(functools.partial(_WATCHED[http_class], deadline=req.deadline), req, **kwargs)


class DeadlineHTTPHandler(_DeadlineHandlerMixin, urllib.request.HTTPHandler):
    pass


class DeadlineHTTPSHandler(_DeadlineHandlerMixin, urllib.request.HTTPSHandler):
    pass


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would carry the Authorization header to whatever host the reply names and
    turn a POST into a GET without the prompt. The 3xx stays an HTTPError, a failed request."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class HTTPStatus(Exception):
    """A non-2xx answer: its code, the start of its body, and the seconds its Retry-After asked to wait
    (None: no readable Retry-After)."""

    def __init__(self, code: int, snippet: str, retry_after: float | None = None):
        super().__init__(f"HTTP {code}: {snippet}")
        self.code, self.snippet, self.retry_after = code, snippet, retry_after

    def asked(self) -> str:
        """What the server asked for, for an error message ('' when it asked nothing)."""
        if self.retry_after is None:
            return ""
        return f"; it asked to wait {math.ceil(self.retry_after)}s (Retry-After)"


def _retry_after(value: str | None) -> float | None:
    """The seconds a Retry-After header asks to wait: delay-seconds, or an HTTP-date (0 once past); None when
    absent or unreadable (then the backoff applies as for any retry)."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]+", value):
        return min(float(value), 1e9)   # 400 digits would be inf; any wait this long is past every deadline
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):   # not a date (the error type varies by version)
        return None
    if when.tzinfo is None:   # "-0000": an HTTP-date is GMT
        when = when.replace(tzinfo=timezone.utc)
    return max((when - datetime.now(timezone.utc)).total_seconds(), 0.0)


class BadReply(Exception):
    """A 2xx reply whose body is not a chat completion; the message says how."""


# What a request can raise besides HTTPStatus and BadReply: refused, reset, DNS, timeouts
# (URLError and TimeoutError are OSErrors), and broken HTTP (IncompleteRead, BadStatusLine, ...).
TRANSPORT_ERRORS = (OSError, http.client.HTTPException)


def describe(err: BaseException, timeout: float) -> str:
    """A short cause for a failed call: 'connection refused', 'timed out after 2s', ..."""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(reason, http.client.RemoteDisconnected):   # a ConnectionResetError: test it first
        return "the server closed the connection without a reply (RemoteDisconnected)"
    if isinstance(reason, ConnectionResetError):
        return "connection reset by the server (ConnectionResetError)"
    if isinstance(reason, http.client.IncompleteRead):
        more = f", {reason.expected} more expected" if reason.expected is not None else ""
        return (f"the reply body is incomplete: the connection closed mid-reply or the chunked encoding "
                f"broke (IncompleteRead: {len(reason.partial)} bytes read{more})")
    if isinstance(reason, http.client.BadStatusLine):
        return f"not an HTTP reply (BadStatusLine: {str(reason)[:80]!r})"
    if isinstance(reason, http.client.HTTPException):
        return f"broken HTTP reply ({type(reason).__name__}: {str(reason)[:80]})"
    if isinstance(reason, BadReply):
        return f"it sent {reason}"
    return f"{type(reason).__name__}: {reason}"


def _read_body(resp) -> bytes:
    body = resp.read(MAX_REPLY_BYTES + 1)
    if len(body) > MAX_REPLY_BYTES:
        raise BadReply(f"a reply body over {MAX_REPLY_BYTES} bytes")
    if resp.length:   # Content-Length promised more (read(n) returns a short body without raising)
        raise http.client.IncompleteRead(body, resp.length)
    return body


def send(opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float) -> bytes:
    """The body of a 2xx reply to `request`, opened with `opener` (build_opener with DeadlineHTTPHandler,
    DeadlineHTTPSHandler and NoRedirects) and bounded by request.deadline (a Deadline). Raises HTTPStatus
    (non-2xx; a redirect is refused), BadReply (body over MAX_REPLY_BYTES) or one of TRANSPORT_ERRORS; the
    caller stops the deadline after, since whatever was read once it expired is not trusted."""
    try:
        with opener.open(request, timeout=timeout) as resp:
            return _read_body(resp)
    except urllib.error.HTTPError as e:   # before OSError: HTTPError is one
        try:
            snippet = e.read(200).decode("utf-8", "replace").strip()
        except TRANSPORT_ERRORS:
            snippet = ""
        finally:
            e.close()
        if 300 <= e.code < 400:
            snippet = (f"redirect to {e.headers.get('Location')} refused (the judge client follows no "
                       "redirects: give --judge the URL that answers)")
        wait = _retry_after(e.headers.get("Retry-After")) if e.headers is not None else None
        raise HTTPStatus(e.code, snippet, wait) from None
