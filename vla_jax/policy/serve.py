"""Serve a policy over HTTP, compatible with OpenVLA's deploy.py clients.

    python -m vla_jax.serve --checkpoint=CKPT [--host=127.0.0.1] [--port=8000] [--mesh=1,1,4]

CKPT is a vla_jax workdir / step folder or an HF OpenVLA folder. Clients POST OpenVLA's payload
to /act (see vla_jax/policy/server.py); GET /health reports the model, batching and connection state.
Binds to localhost unless --host says otherwise.

Before serving, every decoder bucket a request can hit is compiled and run once: batch buckets up to
--max_batch times prompt lengths padded to multiples of --prompt_bucket (32) up to --prompt_len (64
tokens: instructions of up to ~45 words), plus the image-resize trace and one full request
(vla_jax/policy/warmup.py); the log says which buckets and how long. Connections: one that starts no
request within --idle_timeout_s (10 s) or does not deliver a started request within --read_timeout_s
(30 s) is closed; at most --max_connections (512) are open at once (vla_jax/policy/connections.py).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from typing import Optional, Sequence

log = logging.getLogger("vla_jax.serve")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vla_jax.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="vla_jax workdir/step folder or HF OpenVLA folder")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch", type=int, default=8, help="most requests decoded together")
    p.add_argument("--window_ms", type=float, default=5.0, help="how long the first request waits for company")
    p.add_argument("--max_queue", type=int, default=256, help="waiting requests beyond this get HTTP 503")
    p.add_argument("--timeout_s", type=float, default=60.0, help="per-request limit (HTTP 504)")
    p.add_argument("--max_body_mb", type=float, default=32.0, help="larger request bodies get HTTP 413")
    p.add_argument("--center_crop", choices=("auto", "true", "false"), default="auto",
                   help="test-time 0.9-area crop; auto = as the checkpoint's batch_spec says (older checkpoints: "
                        "their image_aug setting; HF folders: no crop)")
    p.add_argument("--action_tokens_only", action="store_true", help="restrict argmax to the action tokens")
    p.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
    p.add_argument("--param_dtype", default=None, help="parameter dtype override, e.g. bfloat16")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to use instead of the checkpoint's")
    p.add_argument("--compilation_cache", default=None,
                   help="persistent XLA cache folder, 'default' (~/.cache/vla_jax/jax_cache) or 'off'; "
                        "unset: $VLA_JAX_COMPILATION_CACHE decides")
    p.add_argument("--no_warmup", action="store_true", help="compile on first request instead of at start")
    p.add_argument("--prompt_bucket", type=int, default=32,
                   help="prompts are padded to a multiple of this many tokens (one compiled decoder per multiple)")
    p.add_argument("--prompt_len", type=int, default=64,
                   help="prompts up to this many tokens are compiled at start-up (longer ones on first use)")
    p.add_argument("--idle_timeout_s", type=float, default=10.0,
                   help="close a connection that starts no request within this time (new or kept-alive)")
    p.add_argument("--read_timeout_s", type=float, default=30.0,
                   help="close a connection whose request (headers and body) is not complete this long after "
                        "its first byte")
    p.add_argument("--max_connections", type=int, default=512,
                   help="open connections (one thread each) beyond this get HTTP 503")
    p.add_argument("--backlog", type=int, default=1024, help="listen queue for connections not yet accepted")
    p.add_argument("--verbose", action="store_true", help="also show third-party INFO logs (absl/orbax/TF/jax)")
    p.add_argument("--mesh", default=None,
                   help="shard the model over devices: data,fsdp,tensor sizes, e.g. 1,1,4 (tensor-parallel over "
                        "4 chips); unset: one device")
    return p


def _cache_setting(value: Optional[str]):
    if value is None:
        return None
    return {"default": True, "off": False}.get(value.lower(), value)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from vla_jax import logs

    logs.setup(verbose=args.verbose)
    from vla_jax.policy import Policy
    from vla_jax.policy.connections import ConnectionLimits
    from vla_jax.policy.server import PolicyService, Server
    from vla_jax.policy.warmup import warm_up

    try:  # checked before the (slow) model load
        limits = ConnectionLimits(backlog=args.backlog, idle_timeout_s=args.idle_timeout_s,
                                  read_timeout_s=args.read_timeout_s, max_connections=args.max_connections)
    except ValueError as e:
        build_parser().error(str(e).replace("ConnectionLimits.", "--"))
    if args.prompt_bucket < 1 or args.prompt_len < 1:
        build_parser().error(f"--prompt_bucket and --prompt_len must be >= 1, got {args.prompt_bucket}, "
                             f"{args.prompt_len}")
    if args.host not in LOCAL_HOSTS:
        log.warning("binding to %s: the server is reachable from other machines and has no authentication",
                    args.host)
    t0 = time.perf_counter()
    crop = {"auto": None, "true": True, "false": False}[args.center_crop]
    policy = Policy.load(args.checkpoint, center_crop=crop, action_tokens_only=args.action_tokens_only,
                         dtype=args.dtype, param_dtype=args.param_dtype, tokenizer=args.tokenizer,
                         compilation_cache=_cache_setting(args.compilation_cache), prompt_bucket=args.prompt_bucket,
                         mesh=args.mesh)
    log.info("loaded %s in %.1f s (image %d px, unnorm keys %s, center crop %s)", args.checkpoint,
             time.perf_counter() - t0, policy.image_size, policy.unnorm_keys, policy.center_crop)
    service = PolicyService(policy, max_batch=args.max_batch, window_ms=args.window_ms, max_queue=args.max_queue,
                            timeout_s=args.timeout_s, max_body=int(args.max_body_mb * 1024 * 1024))
    if not args.no_warmup:
        log.info("compiling and warming up the request path ...")
        w = warm_up(service, prompt_len=args.prompt_len)
        log.info("compiled %d decoder bucket(s) in %.1f s: batch %s x prompt length %s tokens (prompts up to %d "
                 "tokens need no compile), %s action tokens; image resize traced in %.1f s; a request then took "
                 "%.0f ms; warm-up %.1f s in all", w["compiled"], w["compile_s"], w["batch_buckets"],
                 w["prompt_buckets"], w["prompt_buckets"][-1], w["action_tokens"], w["resize_trace_s"],
                 w["request_ms"], w["seconds"])
    server = Server(service, args.host, args.port, limits)
    log.info("serving on %s (POST /act, GET /health)", server.url)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("shutting down")
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
