"""HTTP front end compatible with OpenVLA's `vla-scripts/deploy.py` clients (stdlib only).

POST /act  body: {"image": <json_numpy uint8 [H, W, 3]>, "instruction": str, "unnorm_key": str (optional),
                  "gripper": "openvla" (default: 1 = open, 0 = closed) | "dataset" (optional; the dataset's
                  registered convention, `Policy.convert_gripper`)}
           or {"encoded": "<that object as a JSON string>"}. A checkpoint with several cameras and/or proprio
           takes each camera by name (its spec's names, or OpenVLA-OFT's "full_image" / "wrist_image";
           "image" is the primary) and the raw proprio "state" (json_numpy or a list of numbers), as
           OpenVLA-OFT's deploy.py clients send them (vla_jax/policy/payload.py, observation.py).
           -> the action as a json_numpy float64 [action_dim] object; for the "encoded" form, that
              object serialised into a JSON string (exactly what deploy.py returns). A parallel-decoding
              (OpenVLA-OFT) checkpoint answers with its whole chunk, float64 [K, action_dim] (row 0 first);
              such a model refuses the autoregressive decoding options (`payload.AUTOREGRESSIVE_ONLY_FIELDS`)
              with a 400 naming the option and its codec.
           Images deploy.py accepts are accepted and converted as it does (PIL `convert("RGB")`):
           uint8 grayscale [H, W] (or [H, W, 1]), gray+alpha [H, W, 2], RGB [H, W, 3], RGBA [H, W, 4].
GET /health -> {"status": "ok", ...model, batching and connection details}. HEAD mirrors GET.

Unlike deploy.py (which answers "error" with status 200), every failure is an HTTP error with a
JSON body {"error": message, "status": code}: 400 malformed or invalid payload (bad JSON, JSON nested
too deeply, missing field or camera, unknown camera field, image shape/dtype, state length, empty
instruction, unknown unnorm_key), 404 unknown path,
405 wrong method (OPTIONS included), 411 no Content-Length, 413 body over the limit, 501 unknown method,
503 queue full or too many connections, 504 timed out, 500 model failure. The request threads parse and
validate; a single batching worker resizes and runs the model. A request whose client disconnects while
it waits is cancelled (the model does not run for it unless its batch had already started); a client
that half-closes its sending side (shutdown(SHUT_WR)) after the body looks the same and is cancelled
too, which HTTP/1.1 clients (requests, http.client, curl) do not do.

Why the hardened stdlib server and not uvicorn (+ starlette/FastAPI, as deploy.py uses): measured on
loopback with `python -m vla_jax.policy.loadtest` (BENCHMARKS.md, "Serving under client load"), both
serve 64 clients opening a new connection per request without failures once the backlog is deep, but
uvicorn 0.54 arms no timer on a connection until its first request completes: idle or half-sent
connections stay open for as long as the client likes (300 of them were all still open after the test
window), which is the slowloris case this server must close. Fixing that would mean patching uvicorn's
protocol classes; the stdlib server needs only a deadline per read (`connections.py`), keeps the error
contract above byte for byte, and adds no dependency. Its cost, one thread per open connection, is
bounded by `ConnectionLimits.max_connections`.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Dict, Optional, Sequence, Tuple


from vla_jax.policy import json_numpy
from vla_jax.policy.batcher import Batcher, Example, QueueFull
from vla_jax.policy.connections import (ConnectionLimits, DeadlineReader, HardenedHTTPServer, SocketWriter,
                                         peer_closed)
from vla_jax.policy.payload import RequestError, parse_payload

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 32 * 1024 * 1024  # a 2048x2048 RGB image is 12 MiB raw, 16 MiB as base64
DRAIN_FACTOR = 4  # over-limit bodies up to this many times the limit are read (and dropped) before the 413
GONE_POLL_S = 0.05  # how often a waiting request checks that its client is still connected


class ClientGone(Exception):
    """The client disconnected before its action was ready: nothing to answer."""


class PolicyService:
    """Validation, preprocessing and batching around a `vla_jax.policy.Policy`."""

    def __init__(self, policy, max_batch: int = 8, window_ms: float = 5.0, max_queue: int = 256,
                 timeout_s: float = 60.0, max_body: int = DEFAULT_MAX_BODY):
        self.policy, self.timeout_s, self.max_body = policy, float(timeout_s), int(max_body)
        self.batcher = Batcher(self._run_batch, max_batch=max_batch, window_ms=window_ms, max_queue=max_queue)
        self.started = time.time()
        self.errors = 0
        self.cancelled = 0
        self._errors_lock = threading.Lock()

    def count_error(self) -> None:
        with self._errors_lock:
            self.errors += 1

    def _run_batch(self, examples: Sequence[Example]):
        """One model call for the batch (`Policy.predict`, per-row keys and gripper conventions) -> one float64
        action per example. Resizing here, batched, costs far less CPU than per request in the handler
        threads, and keeps the handlers quick so concurrent requests reach the queue close together."""
        p = self.policy
        compiled = set(p.compile_seconds)
        pred = p.predict([ex.observation for ex in examples], [ex.instruction for ex in examples],
                         [ex.unnorm_key for ex in examples], [ex.gripper for ex in examples])
        for key in set(p.compile_seconds) - compiled:
            log.warning("compiled decoder bucket (tokens %d, batch %d, prompt length %d) while serving, in %.1f s: "
                        "a bucket the start-up warm-up did not cover (see serve --prompt_len)", *key,
                        p.compile_seconds[key])
        return list(pred.rows)

    def act(self, body: bytes, client_gone: Optional[Callable[[], bool]] = None) -> Tuple[Any, bool]:
        """Request body -> (float64 action, encoded_form). Raises RequestError, or ClientGone when
        `client_gone()` turns true while the request waits (its queued work is then cancelled)."""
        p = self.policy
        req = parse_payload(body, self.max_body, p.codec, p.cameras, p.spec.proprio_dim)
        instruction, key, gripper = req.instruction, req.unnorm_key, req.gripper
        try:
            key = p.resolve_unnorm_key(key)
            p.check_gripper(gripper, key)
            prompt = p.prompt_ids(instruction)  # the prompt's length is checked here (a 400, not a failed batch)
            # cameras by name, image shapes, the state's length: a 400 naming the field, not a failed batch
            obs = p.check_observation(req.observation)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        try:
            future = self.batcher.submit(Example(obs, prompt, key, instruction, gripper))
        except QueueFull as e:
            raise RequestError(503, str(e)) from None
        except RuntimeError as e:
            raise RequestError(503, str(e)) from None
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                result = future.result(timeout=max(0.0, min(GONE_POLL_S, left)) if client_gone else max(0.0, left))
            except FutureTimeout:
                if client_gone is not None and client_gone():
                    queued = future.cancel()  # False once its batch is running: the result is then dropped
                    with self._errors_lock:
                        self.cancelled += 1
                    raise ClientGone("cancelled while queued" if queued else "its batch was already running") \
                        from None
                if time.monotonic() >= deadline:
                    future.cancel()
                    raise RequestError(504, f"no result within {self.timeout_s} s") from None
            except Exception as e:  # noqa: BLE001 - model failure: reported, server stays up
                raise RequestError(500, f"inference failed: {type(e).__name__}: {e}") from None
            else:
                return result, req.encoded

    def health(self) -> Dict[str, Any]:
        b = self.batcher
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1), "model": self.policy.describe(),
                "batching": {"max_batch": b.max_batch, "window_ms": b.window * 1e3, "waiting": b.waiting,
                             "batches": b.batches, "requests": b.examples,
                             "mean_batch": round(b.examples / b.batches, 3) if b.batches else 0.0},
                "errors": self.errors, "cancelled": self.cancelled}

    def close(self) -> None:
        self.batcher.close()


def _handler_class(service: PolicyService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: robots reuse their connection
        server_version = "vla_jax"

        def log_message(self, fmt, *args):  # route through logging instead of stderr
            log.debug("%s - " + fmt, self.address_string(), *args)

        def setup(self):
            self.connection = self.request
            # Small request/response pairs on a kept-alive connection: without TCP_NODELAY, Nagle's
            # algorithm and delayed ACKs add ~40 ms stalls.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            limits = self.server.limits
            self.reader = DeadlineReader(self.connection, limits, lambda: self.server.count("timed_out"))
            self.rfile = io.BufferedReader(self.reader, 1 << 16)
            self.wfile = SocketWriter(self.connection, limits.write_timeout_s)

        def handle_one_request(self):
            self.reader.expect_request()
            super().handle_one_request()

        def _send(self, status: int, text: str, head: bool = False, headers: Sequence[Tuple[str, str]] = ()) -> None:
            data = text.encode("utf-8")
            if self.request_version == "HTTP/0.9":  # a garbled request line: answer with a status line anyway
                self.request_version, self.close_connection = "HTTP/1.0", True
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers:
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self._headers_buffer.append(b"\r\n" + (b"" if head else data))  # headers and body leave in one write
            self.flush_headers()

        def _error(self, status: int, message: str, close: bool = False, head: bool = False,
                   headers: Sequence[Tuple[str, str]] = ()) -> None:
            service.count_error()
            if close:
                self.close_connection = True
            self._send(status, json.dumps({"error": message, "status": status}), head=head, headers=headers)

        def send_error(self, code, message=None, explain=None):
            """The stdlib's own errors (bad request line, header too long, unknown method): JSON like ours."""
            self.close_connection = True
            text = message or self.responses.get(code, ("error",))[0]
            self._error(code, f"{text}{': ' + explain if explain else ''}", close=True,
                        head=getattr(self, "command", None) == "HEAD")

        def _get(self, head: bool = False):
            self.reader.request_read()
            path = self.path.split("?")[0]
            if path == "/health":
                info = service.health()
                info["connections"] = self.server.stats()
                self._send(200, json.dumps(info), head=head)
            elif path == "/act":
                self._error(405, "use POST /act", head=head, headers=[("Allow", "POST")])
            else:
                self._error(404, f"unknown path {self.path!r}; use POST /act or GET /health", head=head)

        def do_GET(self):
            self._get()

        def do_HEAD(self):
            self._get(head=True)

        def do_OPTIONS(self):
            self.reader.request_read()
            self._error(405, "OPTIONS is not supported; use POST /act or GET /health", close=True,
                        headers=[("Allow", "GET, HEAD, POST")])

        def _drain(self, n: int) -> None:
            """Reads and drops an over-limit body (up to DRAIN_FACTOR x the limit), so the client finishes
            sending and can read the 413 instead of failing with a broken pipe."""
            left = n if n <= DRAIN_FACTOR * service.max_body else 0
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)

        def do_POST(self):
            path = self.path.split("?")[0]
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                return self._error(411, "POST needs a Content-Length header", close=True)
            n = int(length)
            if n > service.max_body:
                self._drain(n)
                return self._error(413, f"body of {n} bytes exceeds the {service.max_body}-byte limit", close=True)
            body = self.rfile.read(n)
            self.reader.request_read()
            if len(body) != n:
                return self._error(400, f"body ended after {len(body)} of {n} bytes", close=True)
            if path == "/health":
                return self._error(405, "use GET /health", headers=[("Allow", "GET, HEAD")])
            if path != "/act":
                return self._error(404, f"unknown path {self.path!r}; use POST /act")
            try:
                action, encoded = service.act(body, client_gone=lambda: peer_closed(self.connection))
            except ClientGone as e:
                self.server.count("cancelled")
                log.info("client %s:%s left before its action was ready (%s)", *self.client_address[:2], e)
                self.close_connection = True
                return
            except RequestError as e:
                return self._error(e.status, e.message)
            except Exception as e:  # noqa: BLE001 - never let a request take the server down
                log.exception("unexpected error")
                return self._error(500, f"{type(e).__name__}: {e}")
            out = json_numpy.dumps(action)
            self._send(200, json.dumps(out) if encoded else out)

        def do_PUT(self):
            self.reader.request_read()
            self._error(405, "use POST /act or GET /health", close=True, headers=[("Allow", "GET, HEAD, POST")])

        do_DELETE = do_PATCH = do_PUT

    return Handler


class Server:
    """Hardened threaded HTTP server (`connections.py`) on (host, port) serving `service`; port 0 picks a free port."""

    def __init__(self, service: PolicyService, host: str = "127.0.0.1", port: int = 8000,
                 limits: ConnectionLimits = ConnectionLimits()):
        self.service = service
        self.httpd = HardenedHTTPServer((host, port), _handler_class(service), limits)
        self._thread: Optional[threading.Thread] = None

    @property
    def address(self) -> Tuple[str, int]:
        return self.httpd.server_address[:2]

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "Server":
        """Serves in a background thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="vla-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.service.close()
        if self._thread is not None:
            self._thread.join(10)
