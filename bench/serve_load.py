"""The server under client load (issue 18's targets), on loopback, against `python -m vla_jax.serve`.

    python bench/serve_load.py [--clients=64] [--requests=20] [--slow_clients=300] [--idle_timeout_s=10]

Writes a debug-preset checkpoint with random weights (the geometry the tests use, 56 px images), starts
`python -m vla_jax.serve` on it in a subprocess (port 0: it reports its URL), then runs
`vla_jax.policy.loadtest`:
1. first request after start-up vs the next 20 (one client, new connection each);
2. --clients clients x --requests requests, a new connection per request (OpenVLA's `requests.post`);
3. the same while --slow_clients idle half-open connections are held; then their close times, and the
   server's threads / open file descriptors before, during and after (GET /health);
4. the same with partially sent requests (slowloris);
5. a client that resets its connection mid-request: the server log lines it caused.
Prints one JSON object and writes it to bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def start_server(checkpoint: str, extra, log_path: str):
    cmd = [sys.executable, "-m", "vla_jax.serve", f"--checkpoint={checkpoint}", "--port=0", *extra]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while time.time() - t0 < 600:
        text = open(log_path).read()
        m = re.search(r"serving on (http://\S+)", text)
        if m:
            return proc, m.group(1), text
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}:\n{text}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("serve did not start within 600 s")


def reset_mid_request(url: str) -> None:
    """Sends half a request body, then closes with RST (SO_LINGER 0)."""
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"{" * 100)
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--slow_clients", type=int, default=300)
    p.add_argument("--idle_timeout_s", type=float, default=10.0)
    p.add_argument("--read_timeout_s", type=float, default=30.0)
    p.add_argument("--max_batch", type=int, default=8)
    args = p.parse_args(argv)

    import numpy as np

    from tests.policy.test_policy_helpers import model_config, random_params, stats_entry, write_checkpoint
    from vla_jax.policy import loadtest

    tok = os.path.join(REPO, "tests", "fixtures", "data", "llama2_tokenizer", "tokenizer.model")
    work = tempfile.mkdtemp(prefix="vla_serve_load_")
    cfg = model_config()
    write_checkpoint(work, cfg, random_params(cfg), {"bridge_dataset": stats_entry(0.01)}, tok)
    log_path = os.path.join(work, "serve.log")
    proc, url, startup_log = start_server(work, [f"--idle_timeout_s={args.idle_timeout_s}",
                                                 f"--read_timeout_s={args.read_timeout_s}",
                                                 f"--max_batch={args.max_batch}"], log_path)
    out = {"startup_log": [ln for ln in startup_log.splitlines() if "compiled" in ln or "serving on" in ln]}
    try:
        first = loadtest.run(url, clients=1, requests=1, connection="new")
        later = loadtest.run(url, clients=1, requests=20, connection="new")
        out["first_request_ms"] = first["latency_ms"]["p50"]
        out["next_20_requests_ms"] = later["latency_ms"]
        out["new_connection_load"] = loadtest.run(url, args.clients, args.requests, connection="new")
        hold = args.idle_timeout_s + 20
        out["idle_slow_clients"] = loadtest.soak(url, args.clients, args.requests, args.slow_clients, "idle",
                                                 hold_s=hold, connection="new")
        hold = args.read_timeout_s + 20
        out["partial_slow_clients"] = loadtest.soak(url, args.clients, args.requests, args.slow_clients,
                                                    "partial", hold_s=hold, connection="new")
        mark = len(open(log_path).read().splitlines())
        reset_mid_request(url)
        time.sleep(1.0)
        out["reset_log_lines"] = open(log_path).read().splitlines()[mark:]
        out["health_connections"] = loadtest.server_stats(url)
    finally:
        proc.terminate()
        proc.wait(30)
    out["machine"] = f"{os.cpu_count()}-core CPU; load average {os.getloadavg()[0]:.1f} at the end"
    text = json.dumps(out, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
    print(text)
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", "serve_load.json"), "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
