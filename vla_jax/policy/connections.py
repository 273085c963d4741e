"""Connection handling for the HTTP front end: the stdlib threaded server, hardened for real clients.

Why the stdlib server and not uvicorn: see the docstring of `vla_jax/policy/server.py` (measured in
BENCHMARKS.md, "Serving under client load"). What `http.server.ThreadingHTTPServer` lacks, added here:

- Listen backlog: the stdlib default of 5 drops connections (`Connection reset by peer`) as soon as a
  few dozen OpenVLA clients, each opening a new connection per request, connect at once. `backlog`
  (default 1024; the kernel caps it at net.core.somaxconn) queues them instead.
- Deadlines per connection: a connection that has not started a request `idle_timeout_s` after it was
  opened (or after its previous response) is closed, and one that has started must deliver its headers
  and body within `read_timeout_s`, however slowly it trickles bytes (slowloris). Every socket read
  waits at most until the current deadline (`DeadlineReader`).
- Bounded threads: at most `max_connections` connections (one thread each) at a time; beyond that a
  new connection gets an immediate 503 JSON answer and is closed.
- Quiet client failures: a client that resets or times out is one log line, not a traceback.
- `peer_closed`: lets a request thread notice that its client went away, so that queued work for it
  is cancelled instead of run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Dict, Optional

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """backlog: listen queue length; idle_timeout_s: longest wait for a request to start (fresh or kept-alive
    connection); read_timeout_s: longest time from a request's first byte to the end of its body;
    write_timeout_s: longest block on sending a response; max_connections: concurrent connections (threads)."""

    backlog: int = 1024
    idle_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    max_connections: int = 512

    def __post_init__(self):
        for name in ("backlog", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ConnectionLimits.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("idle_timeout_s", "read_timeout_s", "write_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ConnectionLimits.{name} must be > 0 seconds, got {getattr(self, name)}")


class DeadlineExceeded(TimeoutError):
    """The client did not start or finish sending its request in time."""


class DeadlineReader(io.RawIOBase):
    """Raw byte reader over a socket whose every `recv` waits at most until the current deadline.

    `expect_request()` arms the idle deadline; the first bytes that arrive switch to the read deadline
    (counted from then); `request_read()` disarms it once the body is in. A BufferedReader on top
    gives the handler its `rfile`."""

    def __init__(self, sock: socket.socket, limits: ConnectionLimits, on_timeout=None):
        super().__init__()
        self.sock, self.limits, self.on_timeout = sock, limits, on_timeout
        self.deadline: Optional[float] = None
        self.idle = True

    def readable(self) -> bool:
        return True

    def expect_request(self) -> None:
        self.idle, self.deadline = True, time.monotonic() + self.limits.idle_timeout_s

    def request_read(self) -> None:
        self.idle, self.deadline = False, None

    def _expired(self) -> DeadlineExceeded:
        if self.on_timeout is not None:
            self.on_timeout()
        return DeadlineExceeded("no request within %.1f s" % self.limits.idle_timeout_s if self.idle else
                                "request not complete within %.1f s" % self.limits.read_timeout_s)

    def readinto(self, buf) -> int:
        if self.deadline is None:
            self.sock.settimeout(self.limits.read_timeout_s)
        else:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._expired()
            self.sock.settimeout(left)
        try:
            n = self.sock.recv_into(buf)
        except socket.timeout:
            raise self._expired() from None
        if n and self.idle:  # a request has started: it now has read_timeout_s to arrive in full
            self.idle, self.deadline = False, time.monotonic() + self.limits.read_timeout_s
        return n


class SocketWriter(io.BufferedIOBase):
    """wfile that sends everything it is given (socket.sendall), bounded by write_timeout_s."""

    def __init__(self, sock: socket.socket, timeout_s: float):
        super().__init__()
        self.sock, self.timeout_s = sock, timeout_s

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sock.settimeout(self.timeout_s)
        self.sock.sendall(b)
        with memoryview(b) as view:
            return view.nbytes


def peer_closed(sock: socket.socket) -> bool:
    """True when the client has closed or reset its side (it can no longer read an answer).

    A non-blocking peek: no data -> still connected; b'' -> closed; bytes -> a pipelined request, still there."""
    timeout = sock.gettimeout()
    try:
        sock.settimeout(0)
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    finally:
        try:
            sock.settimeout(timeout)
        except OSError:
            pass


def _open_fds() -> Optional[int]:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux
        return None


_BUSY = json.dumps({"error": "too many open connections; retry later", "status": 503}).encode()
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
                  b"Content-Length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)


class HardenedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a deep backlog, a connection cap and one-line logs for client failures.

    The request handler must build its rfile/wfile from `DeadlineReader` / `SocketWriter` with
    `self.limits` (server.py's handler does)."""

    daemon_threads = True
    block_on_close = False  # shutdown does not wait for kept-alive connections

    def __init__(self, address, handler_class, limits: ConnectionLimits = ConnectionLimits()):
        self.limits = limits
        self.request_queue_size = limits.backlog  # read by server_activate -> listen(backlog)
        self._lock = threading.Lock()
        self.open_connections = 0
        self.counts: Dict[str, int] = {"accepted": 0, "rejected_busy": 0, "timed_out": 0, "client_errors": 0,
                                       "cancelled": 0}
        super().__init__(address, handler_class)

    def count(self, key: str) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0) + 1

    def process_request(self, request, client_address):
        with self._lock:
            busy = self.open_connections >= self.limits.max_connections
            if not busy:
                self.open_connections += 1
                self.counts["accepted"] += 1
            else:
                self.counts["rejected_busy"] += 1
        if busy:
            try:
                request.setblocking(False)
                request.send(_BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # thread could not start: undo the count
            with self._lock:
                self.open_connections -= 1
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self.open_connections -= 1

    def handle_error(self, request, client_address):
        """Client-side failures (reset, broken pipe, timeout) are one line; anything else keeps its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            self.count("client_errors")
            log.info("client %s:%s: %s: %s", client_address[0], client_address[1], type(exc).__name__, exc)
        else:
            log.exception("error while serving %s:%s", client_address[0], client_address[1])

    def stats(self) -> Dict[str, object]:
        """Connection counters for GET /health (threads and file descriptors of the whole process)."""
        with self._lock:
            out: Dict[str, object] = {"open": self.open_connections, "max": self.limits.max_connections,
                                      **self.counts}
        out.update(threads=threading.active_count(), open_fds=_open_fds(), backlog=self.limits.backlog,
                   idle_timeout_s=self.limits.idle_timeout_s, read_timeout_s=self.limits.read_timeout_s)
        return out
