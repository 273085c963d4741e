"""Bounded load test on loopback: 8 concurrent clients x 50 requests, no failures; concurrent requests
are decoded together (mean server batch > 2) and a server limited to batch 1 really decodes one at a
time; no compile happens while serving. (The throughput gain of batching is a wall-clock ratio:
`python bench/serve_batching.py` measures it, BENCHMARKS.md reports it.)"""

import json

import pytest

from tests.policy.test_policy_helpers import cached_policy
from vla_jax.policy import loadtest

pytestmark = pytest.mark.slow  # a server under 560 requests


@pytest.fixture(scope="module")
def policy(llama_tokenizer_path):
    p = cached_policy(str(llama_tokenizer_path))
    p.warmup(batch_sizes=(1, 8), prompt_lengths=(22,))  # compile before serving
    return p


def test_load_8_clients_x_50_requests_batched_and_one_at_a_time(policy):
    batched = loadtest.serve_and_load(policy, max_batch=8, clients=8, requests=50)
    print("\nbatched (max_batch 8):", json.dumps(batched))
    assert batched["failures"] == 0 and batched["requests"] == 400, batched["failure_examples"]
    assert batched["mean_batch"] > 2.0, batched  # concurrent requests really were decoded together
    single = loadtest.serve_and_load(policy, max_batch=1, clients=8, requests=20)
    print("one at a time (max_batch 1):", json.dumps(single))
    assert single["failures"] == 0 and single["requests"] == 160 and single["mean_batch"] == 1.0
    assert set(policy.compile_seconds) == {(7, 1, 32), (7, 8, 32)}  # no compile during serving
