"""After the server's start-up warm-up, requests compile nothing (issue 17 §3): instructions of new lengths
within the compiled prompt buckets and images of new sizes reuse what the warm-up built.

Compiles are counted with JAX's own monitoring events (every XLA backend compile records
'/jax/core/compile/backend_compile_duration') and TF's tracing counter of the image-resize function,
never with timings. A prompt longer than the warmed buckets must show up as a compile, so the counter
is known to see them."""

import json

import jax
import numpy as np
import pytest

from tests.policy.test_policy_helpers import random_checkpoint

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = []


def _listener(event, duration, **kwargs):
    if event == COMPILE_EVENT:
        _compiles.append(duration)


@pytest.fixture(scope="module")
def warmed(llama_tokenizer_path):
    from vla_jax.policy import Policy
    from vla_jax.policy.server import PolicyService
    from vla_jax.policy.warmup import warm_up

    # Its own instance (not the shared cached_policy): the other serve tests count that one's compiled buckets.
    policy = Policy.load(random_checkpoint(str(llama_tokenizer_path)), batch_buckets=(1, 8), prompt_bucket=16,
                         compilation_cache=False)
    service = PolicyService(policy, max_batch=8, window_ms=5.0)
    report = warm_up(service, prompt_len=32)
    jax.monitoring.register_event_duration_secs_listener(_listener)
    yield policy, service, report
    jax.monitoring.unregister_event_duration_listener(_listener)
    service.close()


def body(img: np.ndarray, instruction: str) -> bytes:
    from vla_jax.policy import json_numpy

    return json.dumps({"image": json_numpy.encode_array(img), "instruction": instruction}).encode()


def test_warm_up_covers_the_buckets(warmed):
    policy, _, report = warmed
    assert report["batch_buckets"] == [1, 8] and report["prompt_buckets"] == [16, 32]
    for b in (1, 8):
        for length in (16, 32):
            assert (7, b, length) in policy.compile_seconds


def test_new_instruction_lengths_and_image_sizes_do_not_recompile(warmed):
    policy, service, _ = warmed
    instructions = ["go", "open the drawer", "put the carrot on the plate"]
    lengths = [len(policy.prompt_ids(s)) for s in instructions]
    assert len(set(lengths)) == 3 and max(lengths) <= 32, lengths  # three lengths, all within the buckets
    tf_fn = policy._image_fn()
    traces = tf_fn.experimental_get_tracing_count()
    del _compiles[:]
    rng = np.random.default_rng(3)
    for instruction, (h, w) in zip(instructions, [(100, 80), (480, 640), (37, 211)]):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        action, _ = service.act(body(img, instruction))
        np.testing.assert_array_equal(action, policy.predict_action(img, instruction))
    assert _compiles == [], f"{len(_compiles)} XLA compile(s) while serving warmed buckets"
    assert tf_fn.experimental_get_tracing_count() == traces

    # Beyond the warmed buckets a compile does happen (and is seen by the counter).
    long_instruction = "open the top drawer of the cabinet and then put the red block inside it and close it again"
    assert 32 < len(policy.prompt_ids(long_instruction)) <= 48
    service.act(body(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), long_instruction))
    assert len(_compiles) >= 1
