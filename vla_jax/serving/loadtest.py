"""Bounded load test for a running server: N concurrent clients x M requests each (loopback).

    python -m vla_jax.serving.loadtest --url=http://127.0.0.1:8000 --clients=8 --requests=50

Each client keeps one HTTP/1.1 connection and sends OpenVLA payloads (a random uint8 image per
client, json_numpy encoded) back to back. Reports p50/p90/p99 latency, throughput and failures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
import urllib.parse
from typing import Any, Dict, List, Optional

import numpy as np

from vla_jax.serving import json_numpy


def make_payload(seed: int, size: int = 64, instruction: str = "put the carrot on the plate",
                 unnorm_key: Optional[str] = None) -> bytes:
    img = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    payload = {"image": json_numpy.encode_array(img), "instruction": instruction}
    if unnorm_key is not None:
        payload["unnorm_key"] = unnorm_key
    return json.dumps(payload).encode()


def run(url: str, clients: int = 8, requests: int = 50, image_size: int = 64, timeout_s: float = 120.0,
        unnorm_key: Optional[str] = None) -> Dict[str, Any]:
    """Runs the load; returns {'requests', 'failures', 'seconds', 'throughput_rps', 'latency_ms': {...}}."""
    parsed = urllib.parse.urlparse(url)
    latencies: List[float] = []
    failures: List[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def connect() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout_s)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as a robot client should
        return conn

    def client(i: int) -> None:
        body = make_payload(i, image_size, unnorm_key=unnorm_key)
        conn = connect()
        start.wait()
        for _ in range(requests):
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/act", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200 and json_numpy.loads(data).shape[0] > 0
                err = None if ok else f"HTTP {resp.status}: {data[:200]!r}"
            except Exception as e:  # noqa: BLE001 - counted as a failure
                err = f"{type(e).__name__}: {e}"
                conn.close()
                conn = connect()
            dt = time.perf_counter() - t0
            with lock:
                (failures.append(err) if err else latencies.append(dt))
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
    return {"clients": clients, "requests": clients * requests, "failures": len(failures),
            "failure_examples": failures[:3], "seconds": round(seconds, 3),
            "throughput_rps": round(len(latencies) / seconds, 2) if seconds > 0 else None,
            "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99),
                           "max": round(float(lat.max()), 2) if lat.size else None}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vla_jax.serving.loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="per client")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--unnorm_key", default=None)
    args = p.parse_args(argv)
    print(json.dumps(run(args.url, args.clients, args.requests, args.image_size, unnorm_key=args.unnorm_key)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
