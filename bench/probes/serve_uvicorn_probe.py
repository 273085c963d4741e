"""The measurement behind serving with the hardened stdlib server rather than uvicorn (server.py's docstring).

    pip install "uvicorn[standard]==0.54.0" "starlette==1.10.0"    # not project dependencies
    python bench/serve_uvicorn_probe.py [--slow_clients=300] [--hold_s=40]

Starts uvicorn (its defaults: backlog 2048, keep-alive timeout 5 s, httptools) in a thread with a
Starlette app that answers POST /act with a json_numpy action at once (no model: only connection
handling is compared), then runs `vla_jax.policy.loadtest` against it on loopback: 64 clients x 20
requests with a new connection per request, and the same while --slow_clients idle, then partially
sent, half-open connections are held for --hold_s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--slow_clients", type=int, default=300)
    p.add_argument("--hold_s", type=float, default=40.0)
    args = p.parse_args(argv)

    import numpy as np
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from vla_jax.policy import json_numpy, loadtest

    action = json_numpy.dumps(np.zeros(7))

    async def act(request):
        json.loads(await request.body())
        return Response(action, media_type="application/json")

    async def health(request):
        return Response(json.dumps({"connections": {"threads": threading.active_count(),
                                                    "open_fds": len(os.listdir("/proc/self/fd"))}}),
                        media_type="application/json")

    app = Starlette(routes=[Route("/act", act, methods=["POST"]), Route("/health", health)])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    out = {"uvicorn": uvicorn.__version__, "defaults": {"backlog": server.config.backlog,
                                                         "timeout_keep_alive": server.config.timeout_keep_alive}}
    out["new_connection_load"] = loadtest.run(url, args.clients, args.requests, connection="new")
    for kind in ("idle", "partial"):
        out[f"{kind}_slow_clients"] = loadtest.soak(url, args.clients, args.requests, args.slow_clients, kind,
                                                    hold_s=args.hold_s, settle_s=5, connection="new")
    server.should_exit = True
    thread.join(10)
    out["machine"] = f"{os.cpu_count()}-core CPU; load average {os.getloadavg()[0]:.1f} at the end"
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
