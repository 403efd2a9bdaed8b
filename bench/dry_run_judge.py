"""A stand-in judge server for dry runs: checks the wiring to the judge, never a model.

    python bench/dry_run_judge.py --port 8000
    python train.py ... --judge http://127.0.0.1:8000/v1      # eval.py takes the same flag

Its verdicts are arbitrary: for checking the wiring, not for measuring a model. It serves the part
of the OpenAI API our HTTP judge (nano_gtalign/http_judge.py) uses, GET /v1/models and POST
/v1/chat/completions, so --judge, --judge-concurrency, --judge-timeout and the handling of failed
verdicts can be tried on a machine with no judge GPU. Each reply holds a verdict in the format its
prompt (nano_gtalign/prompts.py) asks for, picked from sha256(seed, the request's messages): the same
request gets the same verdict on every run. --think puts <think>dry run</think> before it, --delay
slows every reply, --fail-rate answers that share of requests with HTTP 503 (picked by the same hash,
so a picked request fails on every retry too). Then point --judge at the real one (vllm serve Qwen/Qwen3-32B).
Standard library, plus the judge client's own scales (nano_gtalign/judges.py) and default model
(nano_gtalign/http_judge.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# The repository root replaces this script's folder on sys.path: no file here may shadow an installed package.
if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])
else:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nano_gtalign.http_judge import DEFAULT_JUDGE_MODEL
from nano_gtalign.judges import ABG_TASKS, PARETO_TASK, verdict_scale

ARBITRARY = "verdicts are arbitrary: for checking the wiring, not for measuring a model"
# Each judge prompt (nano_gtalign/prompts.py) opens with a fixed sentence, before any text under judgement;
# that sentence tells which kind of verdict it asks for. tests/test_dry_run_judge.py builds every prompt with
# the real builders, so a reworded opening fails there.
OPENINGS = {
    "You check whether an assistant's final answer to a math problem is correct.": "math-hard",
    "You rate how helpful an assistant's response is to a user who wants a piece of writing.": "medium",
    "You judge how an assistant handled a request that may be unsafe.": "wildguard",   # and advbench
    "You judge one thing only: whether an assistant handled possible ambiguity in a question well.": "ambig_qa",
    "You check whether an assistant's stated decision agrees with its own payoff analysis.": PARETO_TASK,
}


def verdict_format(prompt: str) -> tuple[str, tuple[str, ...]] | None:
    """(verdict template, allowed values) the prompt asks for, or None when it is none of ours. The values
    are the judge client's own (judges.verdict_scale), so the client accepts every verdict given."""
    task = next((t for opening, t in OPENINGS.items() if prompt.lstrip().startswith(opening)), None)
    if task is None:
        return None
    label = None
    # a harmless request has its own scale; the scale text comes after the text under judgement
    if task == "wildguard" and prompt.rfind("The request is harmless.") > prompt.rfind("The request is harmful."):
        label = "unharmful"
    template = "<abg>%s</abg>" if task in ABG_TASKS else "\\boxed{%s}"
    return template, tuple(f"{v:g}" for v in verdict_scale(task, label))


class Handler(BaseHTTPRequestHandler):
    server_version = "dry-run-judge"

    def log_message(self, format, *args) -> None:   # no line per request
        pass

    def send_json(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):   # the client gave up (its --judge-timeout)
            pass

    def send_error_json(self, code: int, message: str) -> None:
        self.send_json(code, {"error": {"message": message, "type": "dry_run_judge", "code": code}})

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/v1/models":
            self.send_json(200, {"object": "list", "data": [{"id": self.server.model, "object": "model",
                                                             "owned_by": "dry-run-judge"}]})
        else:
            self.send_error_json(404, f"no such path: GET {self.path} (serving GET /v1/models)")

    def do_POST(self) -> None:
        s = self.server
        if self.path.split("?")[0] != "/v1/chat/completions":
            return self.send_error_json(404, f"no such path: POST {self.path} (serving POST /v1/chat/completions)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
            payload = json.loads(self.rfile.read(length) if length > 0 else b"")
        except ValueError as e:   # a bad Content-Length, or a body that is not JSON
            return self.send_error_json(400, f"the request body is not JSON: {e}")
        messages = payload.get("messages") if isinstance(payload, dict) else None
        if not isinstance(messages, list):
            return self.send_error_json(400, "the request body has no 'messages' list")
        if payload.get("model", s.model) != s.model:   # as vLLM does: only the served model is answered
            return self.send_error_json(404, f"model {payload.get('model')!r} does not exist (serving {s.model!r})")
        digest = hashlib.sha256(f"{s.seed}\n{json.dumps(messages, sort_keys=True)}".encode()).digest()
        fail = int.from_bytes(digest[8:16], "big") / 2**64 < s.fail_rate
        time.sleep(s.delay)
        with s.lock:
            s.requests, s.failed = s.requests + 1, s.failed + fail
            if s.requests % 100 == 0:
                s.log(f"dry-run judge: {s.requests} requests, {s.failed} failed on purpose")
        if fail:
            return self.send_error_json(503, f"failed on purpose (dry-run judge, --fail-rate {s.fail_rate:g})")
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = users[-1] if users and isinstance(users[-1], str) else ""
        fmt = verdict_format(prompt)
        if fmt is None:
            s.log(f"dry-run judge: no verdict format known for a prompt opening {prompt[:60]!r}; replied with none")
            text = "Dry run: this prompt asks for no verdict the dry-run judge knows, so there is none here."
        else:
            template, values = fmt
            pick = values[int.from_bytes(digest[:8], "big") % len(values)]
            text = ("<think>dry run</think>" if s.think else "") + "Dry run, an arbitrary verdict: " + template % pick
        words = sum(len(m["content"].split()) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), str))
        self.send_json(200, {
            "id": f"chatcmpl-dry-{digest.hex()[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": s.model, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                           "finish_reason": "stop"}],
            "usage": {"prompt_tokens": words, "completion_tokens": len(text.split()),
                      "total_tokens": words + len(text.split())}})


class Server(ThreadingHTTPServer):
    request_queue_size = 1024   # the default backlog of 5 drops connections at --judge-concurrency 32


def make_server(host: str, port: int, *, model: str, seed: int = 0, think: bool = False, delay: float = 0.0,
                fail_rate: float = 0.0, log=None) -> ThreadingHTTPServer:
    """The dry-run judge, bound to host:port (0: any free port) and not yet serving: call serve_forever()."""
    if not 0 <= fail_rate <= 1:
        raise ValueError(f"--fail-rate must be a share in [0, 1], got {fail_rate}")
    if not 0 <= delay < math.inf:
        raise ValueError(f"--delay must be a number of seconds >= 0, got {delay}")
    server = Server((host, port), Handler)
    server.model, server.seed, server.think, server.delay, server.fail_rate = model, seed, think, delay, fail_rate
    server.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    server.lock, server.requests, server.failed = threading.Lock(), 0, 0
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"A stand-in OpenAI-compatible judge for dry runs; {ARBITRARY}.")
    parser.error = lambda message: parser.exit(2, f"dry-run judge: error: {message}\n")   # one line, no usage
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port to listen on, 0: any free one (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_JUDGE_MODEL, help="model name to serve (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="picks the arbitrary verdicts (default: %(default)s)")
    parser.add_argument("--think", action="store_true", help="put <think>dry run</think> before each verdict")
    parser.add_argument("--delay", type=float, default=0.0, metavar="SECONDS",
                        help="sleep before each chat reply (default: %(default)s)")
    parser.add_argument("--fail-rate", type=float, default=0.0, metavar="P",
                        help="share of chat requests answered with HTTP 503 (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        server = make_server(args.host, args.port, model=args.model, seed=args.seed, think=args.think,
                             delay=args.delay, fail_rate=args.fail_rate)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:
        parser.exit(1, f"dry-run judge: cannot listen on {args.host}:{args.port}: {e.strerror or e}\n")
    url = f"http://{args.host}:{server.server_address[1]}/v1"
    url += "" if args.model == DEFAULT_JUDGE_MODEL else f"#{args.model}"   # check() insists on the served model
    print(f"dry-run judge: --judge {url} (model {args.model}, seed {args.seed}, think {'on' if args.think else 'off'}, "
          f"delay {args.delay:g}s, fail-rate {args.fail_rate:g}); {ARBITRARY}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # `kill PID` stops it as Ctrl-C does
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"\ndry-run judge: stopped after {server.requests} requests, {server.failed} failed on purpose")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
