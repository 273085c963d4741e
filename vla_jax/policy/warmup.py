"""Start-up warm-up: run, before the first client, the exact path a request takes.

Without it the first request pays for XLA compilation of its decoder bucket, the trace of the TF
image-resize function and the first execution of each executable, and every instruction whose prompt
falls into a new length bucket compiles again while a robot waits. `warm_up`:

1. decodes (compiles and runs) every (action tokens, batch bucket, prompt-length bucket) the service
   can hit for prompts up to `prompt_len` tokens: batch buckets up to the batcher's `max_batch`,
   prompt lengths the policy's multiples of `prompt_bucket` (e.g. 32 and 64 for the defaults of
   `python -m vla_jax.serve`);
2. resizes two batches of different image and batch sizes, so the TF function is traced once more with
   the shapes generalised (`reduce_retracing`) and later image sizes reuse that trace;
3. sends one request through `PolicyService.act` (parsing, tokenisation, batching, un-normalisation).

Prompts longer than `prompt_len` still work; their bucket compiles on first use (the service logs it).
"""

from __future__ import annotations

import json
import time
from typing import Any, Dict, List

import numpy as np

from vla_jax.policy import json_numpy

WARMUP_INSTRUCTION = "pick up the object and put it in the bowl"
WARMUP_IMAGE_SIZES = ((224, 224), (256, 320))  # OpenVLA clients' usual 224x224, and another size


def prompt_buckets(policy, prompt_len: int) -> List[int]:
    """Padded prompt lengths (the policy's buckets) covering every prompt of 1..prompt_len tokens."""
    top = max(1, min(int(prompt_len), policy.max_prompt_len()))
    return sorted({policy.buckets_for(1, n)[1] for n in range(1, top + 1)})


def batch_buckets(policy, max_batch: int) -> List[int]:
    """Padded batch sizes the batcher's batches of 1..max_batch requests run with."""
    return sorted({policy.buckets_for(b, 1)[0] for b in range(1, int(max_batch) + 1)})


def warm_up(service, prompt_len: int = 64) -> Dict[str, Any]:
    """Warms `service` (a PolicyService); returns what was compiled and how long each part took."""
    p = service.policy
    t0 = time.perf_counter()
    before = set(p.compile_seconds)
    dims = sorted({p.action_dim(k) for k in p.unnorm_keys})
    batches, lengths = batch_buckets(p, service.batcher.max_batch), prompt_buckets(p, prompt_len)
    ids = p.prompt_ids(WARMUP_INSTRUCTION)
    p_dim = p.spec.proprio_dim
    # parallel decoding (OFT) has one slot count whatever the statistics: K * D action slots + </s>
    counts = [p.default_num_tokens()] if getattr(p, "parallel", False) else dims
    for n in counts:
        for b in batches:
            for length in lengths:
                prompt = (ids * (length // len(ids) + 1))[:length]  # exactly `length` real token ids
                p.decode_tokens(np.zeros(p.pixel_shape(b), np.uint8), [prompt] * b, n,
                                None if not p_dim else np.zeros((b, p_dim), np.float32))
    new = {k: v for k, v in p.compile_seconds.items() if k not in before}
    decode_s = time.perf_counter() - t0

    t1 = time.perf_counter()
    for (h, w), b in zip(WARMUP_IMAGE_SIZES, (1, 2)):
        p.preprocess(np.zeros((b, h, w, 3), np.uint8))
    resize_s = time.perf_counter() - t1

    img = np.random.default_rng(0).integers(0, 256, (*WARMUP_IMAGE_SIZES[0], 3), dtype=np.uint8)
    payload = {cam: json_numpy.encode_array(img) for cam in p.cameras}
    if p_dim:  # a state inside the statistics' bounds of the first dataset (its q01)
        payload["state"] = json_numpy.encode_array(np.asarray(p.norm_stats[p.unnorm_keys[0]]["proprio"]["q01"],
                                                              np.float64))
    body = json.dumps({**payload, "instruction": WARMUP_INSTRUCTION}).encode()
    t2 = time.perf_counter()
    service.act(body)
    request_ms = (time.perf_counter() - t2) * 1e3
    return {"action_tokens": counts, "batch_buckets": batches, "prompt_buckets": lengths, "compiled": len(new),
            "compile_s": round(sum(new.values()), 2), "decode_s": round(decode_s, 2),
            "resize_trace_s": round(resize_s, 2), "request_ms": round(request_ms, 1),
            "seconds": round(time.perf_counter() - t0, 2)}
