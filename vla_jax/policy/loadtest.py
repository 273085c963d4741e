"""Bounded load test for a running server on loopback: N concurrent clients x M requests each.

    python -m vla_jax.policy.loadtest --url=http://127.0.0.1:8000 --clients=8 --requests=50
    python -m vla_jax.policy.loadtest --connection=new --clients=64 --requests=20
    python -m vla_jax.policy.loadtest --connection=new --clients=64 --requests=20 --slow_clients=300

Clients send OpenVLA payloads (a random uint8 image per client, json_numpy encoded) back to back:
--connection=keepalive: each client keeps one HTTP/1.1 connection (a robot with a session);
--connection=new: a new connection per request, closed after the answer, as OpenVLA's clients do
  (`requests.post` without a session).
--slow_clients=S opens S half-open connections first (idle: connected, nothing sent; or partial: a
request line and one header, never finished) and holds them while the clients run, recording when the
server closes each (at most --hold_s). Reports p50/p90/p99 latency, throughput, failures, and the
server's threads / open file descriptors (from GET /health) before, during and after.
Only loopback addresses are accepted: this tool is for measuring your own server.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import socket
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional

import numpy as np

from vla_jax.policy import json_numpy


def make_payload(seed: int, size: int = 64, instruction: str = "put the carrot on the plate",
                 unnorm_key: Optional[str] = None) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    payload = {"image": json_numpy.encode_array(img), "instruction": instruction}
    if unnorm_key is not None:
        payload["unnorm_key"] = unnorm_key
    return json.dumps(payload).encode()


def _address(url: str):
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--url must name a loopback address (127.0.0.1, localhost, ::1), got {url!r}")
    return host, parsed.port or 80


def server_stats(url: str, timeout_s: float = 30.0) -> Dict[str, Any]:
    """The server's GET /health "connections" block (threads, open_fds, open, counters)."""
    host, port = _address(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/health")
        return json.loads(conn.getresponse().read()).get("connections", {})
    finally:
        conn.close()


def run(url: str, clients: int = 8, requests: int = 50, image_size: int = 64, timeout_s: float = 120.0,
        unnorm_key: Optional[str] = None, connection: str = "keepalive") -> Dict[str, Any]:
    """Runs the load; returns {'requests', 'failures', 'seconds', 'throughput_rps', 'latency_ms': {...}}.

    connection: "keepalive" (one connection per client) or "new" (a new connection per request)."""
    if connection not in ("keepalive", "new"):
        raise ValueError(f"connection must be 'keepalive' or 'new', got {connection!r}")
    host, port = _address(url)
    latencies: List[float] = []
    failures: List[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def connect() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as robot clients (urllib3) do
        return conn

    def client(i: int) -> None:
        body = make_payload(i, image_size, unnorm_key=unnorm_key)
        conn = connect() if connection == "keepalive" else None
        start.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = connect()  # the connect is part of the request's latency, as for requests.post
                conn.request("POST", "/act", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200 and json_numpy.loads(data).shape[0] > 0
                err = None if ok else f"HTTP {resp.status}: {data[:200]!r}"
            except Exception as e:  # noqa: BLE001 - counted as a failure
                err = f"{type(e).__name__}: {e}"
                if conn is not None:
                    conn.close()
                conn = None
            if connection == "new" and conn is not None:
                conn.close()
                conn = None
            dt = time.perf_counter() - t0
            with lock:
                (failures.append(err) if err else latencies.append(dt))
            if conn is None and connection == "keepalive":
                try:
                    conn = connect()
                except OSError as e:
                    with lock:
                        failures.append(f"reconnect: {type(e).__name__}: {e}")
                    return
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1e3
    pct = (lambda q: round(float(np.percentile(lat, q)), 2)) if lat.size else (lambda q: None)
    return {"clients": clients, "connection": connection, "requests": clients * requests,
            "failures": len(failures), "failure_examples": failures[:3], "seconds": round(seconds, 3),
            "throughput_rps": round(len(latencies) / seconds, 2) if seconds > 0 else None,
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99),
                           "max": round(float(lat.max()), 2) if lat.size else None}}


class SlowClients:
    """S half-open connections held open until the server closes them or `hold_s` passes (one thread);
    `closed_after` holds, per connection the server closed, the seconds from its connect to the close.

    kind "idle": connect and send nothing; "partial": send a request line and one header, never the rest."""

    def __init__(self, url: str, count: int, kind: str = "idle", hold_s: float = 60.0):
        if kind not in ("idle", "partial"):
            raise ValueError(f"kind must be 'idle' or 'partial', got {kind!r}")
        self.host, self.port = _address(url)
        self.count, self.kind, self.hold_s = int(count), kind, float(hold_s)
        self.socks: List[socket.socket] = []
        self.opened_at = 0.0
        self.closed_after: List[float] = []
        self.open_errors: List[str] = []
        self._opened: Dict[int, float] = {}  # fd -> when it was connected
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "SlowClients":
        for _ in range(self.count):
            try:
                s = socket.create_connection((self.host, self.port), timeout=10)
                if self.kind == "partial":
                    s.sendall(b"POST /act HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                s.setblocking(False)
                self.socks.append(s)
                self._opened[s.fileno()] = time.perf_counter()
            except OSError as e:
                self.open_errors.append(f"{type(e).__name__}: {e}")
        self.opened_at = time.perf_counter()
        self._thread = threading.Thread(target=self._watch, name="slow-clients", daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        for s in self.socks:
            sel.register(s, selectors.EVENT_READ)
        left = len(self.socks)
        while left and time.perf_counter() - self.opened_at < self.hold_s:
            for key, _ in sel.select(timeout=0.1):
                s = key.fileobj
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # closed by the server (a 503/408 answer first is fine too: we read until EOF)
                    self.closed_after.append(time.perf_counter() - self._opened[s.fileno()])
                    sel.unregister(s)
                    left -= 1
        sel.close()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def __exit__(self, *exc) -> None:
        self.wait()
        for s in self.socks:
            s.close()

    def report(self) -> Dict[str, Any]:
        c = sorted(self.closed_after)
        return {"slow_clients": self.count, "kind": self.kind, "opened": len(self.socks),
                "open_errors": self.open_errors[:3], "closed_by_server": len(c),
                "still_open_after_hold": len(self.socks) - len(c), "hold_s": self.hold_s,
                "closed_after_s": {"min": round(c[0], 2), "max": round(c[-1], 2)} if c else None}


def serve_and_load(policy, max_batch: int, clients: int, requests: int) -> Dict[str, Any]:
    """Starts an in-process server for `policy` (batches up to `max_batch` within a 5 ms window) on a free
    loopback port, runs `run` against it and returns its result plus the server's mean batch size."""
    from vla_jax.policy.server import PolicyService, Server

    server = Server(PolicyService(policy, max_batch=max_batch, window_ms=5.0, max_queue=64), "127.0.0.1", 0).start()
    try:
        result = run(server.url, clients=clients, requests=requests)
        result["mean_batch"] = server.service.health()["batching"]["mean_batch"]
    finally:
        server.shutdown()
    return result


def soak(url: str, clients: int, requests: int, slow_clients: int, slow_kind: str = "idle", hold_s: float = 60.0,
         settle_s: float = 30.0, **kw) -> Dict[str, Any]:
    """Normal load while `slow_clients` half-open connections are held; server threads/fds before, during, after."""
    before = server_stats(url)
    settle = time.perf_counter() + settle_s
    while before.get("open", 1) > 1 and time.perf_counter() < settle:  # earlier clients' connections still closing
        time.sleep(0.2)
        before = server_stats(url)
    with SlowClients(url, slow_clients, slow_kind, hold_s) as slow:
        time.sleep(0.5)
        during = server_stats(url)
        load = run(url, clients, requests, **kw)
        slow.wait()
    deadline = time.perf_counter() + settle_s  # connection threads end just after their sockets close
    after = server_stats(url)
    while (time.perf_counter() < deadline and (after.get("threads"), after.get("open_fds"))
           != (before.get("threads"), before.get("open_fds"))):
        time.sleep(0.2)
        after = server_stats(url)
    keys = ("threads", "open_fds", "open")
    return {"load": load, "slow": slow.report(),
            "server": {when: {k: s.get(k) for k in keys} for when, s in
                       (("before", before), ("during", during), ("after", after))}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vla_jax.policy.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="a loopback address only")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="per client")
    p.add_argument("--connection", choices=("keepalive", "new"), default="keepalive",
                   help="keepalive: one connection per client; new: a new connection per request (requests.post)")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--unnorm_key", default=None)
    p.add_argument("--slow_clients", type=int, default=0, help="half-open connections held during the load")
    p.add_argument("--slow_kind", choices=("idle", "partial"), default="idle")
    p.add_argument("--hold_s", type=float, default=60.0, help="longest time the slow connections are held")
    args = p.parse_args(argv)
    try:
        _address(args.url)
    except ValueError as e:
        p.error(str(e))
    kw = dict(image_size=args.image_size, unnorm_key=args.unnorm_key, connection=args.connection)
    if args.slow_clients:
        out = soak(args.url, args.clients, args.requests, args.slow_clients, args.slow_kind, args.hold_s, **kw)
    else:
        out = run(args.url, args.clients, args.requests, **kw)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
