"""Request batching in the REST server: throughput of concurrent loopback clients when the server
batches up to --max-batch requests per decode, against the same server (same policy, same compiled
buckets) forced to decode one request at a time.

    python bench/serve_batching.py [--preset=debug] [--clients=8] [--requests=50]

Random weights (speed does not depend on the values), fp32 on CPU. Prints one summary line and
writes bench/results/serve_batching.json. (This ratio used to be asserted by tests/policy/test_serve_load.py;
a wall-clock ratio belongs here, the test keeps the correctness of the load.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from inference import make_policy  # noqa: E402  (bench/inference.py: a random-weight Policy)
from vla_jax.policy import loadtest  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="debug", choices=("tiny", "debug", "mid"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="per client, batched server")
    p.add_argument("--single-requests", type=int, default=20, help="per client, one-at-a-time server")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--tokenizer", default=os.path.join(REPO, "tests", "fixtures", "data", "llama2_tokenizer",
                                                       "tokenizer.model"))
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results", "serve_batching.json"))
    a = p.parse_args(argv)
    policy = make_policy(a.preset, a.tokenizer)
    # Compile every batch bucket a server batch of 1..max_batch can land in, outside the timed runs.
    policy.warmup(batch_sizes=tuple(range(1, a.max_batch + 1)))
    compiled_before = set(policy.compile_seconds)
    # An untimed pass first: the first batches of each size pay one-off costs outside the decoder's
    # compile (host-side preprocessing programs), which showed up as a 17 s stall in the p99.
    loadtest.serve_and_load(policy, a.max_batch, a.clients, 3)
    batched = loadtest.serve_and_load(policy, a.max_batch, a.clients, a.requests)
    single = loadtest.serve_and_load(policy, 1, a.clients, a.single_requests)
    report = {"benchmark": "serve_batching", "preset": a.preset, "clients": a.clients,
              "machine": platform.machine(), "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
              "batched": batched, "single": single,
              "batching_gain": round(batched["throughput_rps"] / single["throughput_rps"], 3),
              "compiled_during_serving": sorted(map(list, set(policy.compile_seconds) - compiled_before))}
    if report["compiled_during_serving"]:  # the timings would include compiles: not a valid measurement
        raise RuntimeError(f"buckets compiled while serving: {report['compiled_during_serving']}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"serve_batching {a.preset}: batched {batched['throughput_rps']:.1f} req/s (mean batch "
          f"{batched['mean_batch']:.1f}, failures {batched['failures']}) vs one at a time "
          f"{single['throughput_rps']:.1f} req/s: {report['batching_gain']:.2f}x; wrote {a.out}")
    return report


if __name__ == "__main__":
    main()
