"""What both sides of `bench/compare_torch.py` share: the geometries, the optimizer, the prompt,
timing statistics and resource readings. Imports neither torch nor JAX's backend (vla_jax's config
module imports jax.numpy, which does not start a backend).

A run folder (made by `torch_side.py prepare`) holds everything both sides read:
  weights.npz     the model in the released HF key layout (torch layouts), fp32
  batch.npz       one training batch: pixel_values uint8 [B, S, S, 3], input_ids / attention_mask /
                  labels int32 [B, T], dataset_index int32 [B]; images uint8 [32, S, S, 3] for inference
  reference.json  torch's loss before and after one AdamW step, its 7 greedy tokens at batch 1 and
                  the prompt ids, which the JAX side must reproduce before it times anything
"""

from __future__ import annotations

import dataclasses
import os
import resource
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Benchmarked geometries: as bench/train_step.py and bench/inference.py run them.
SETUPS = {
    "debug": dict(preset="debug", image_size=112, text_len=40, batch=8),  # configs/debug.py
    "mid": dict(preset="mid", image_size=224, text_len=64, batch=8),      # Llama 512 x 4, 224 px
}
# One set of AdamW hyperparameters for both sides (torch.optim.AdamW / optax.adamw + global-norm clip).
OPTIM = dict(learning_rate=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0)
INSTRUCTION = "put the carrot on the plate"
INFER_BATCHES = (1, 8, 32)
NUM_TOKENS = 7
# Fixed tolerances of the equality checks (fp32 on both sides).
LOSS_RTOL = 1e-4          # loss at step 0
LOSS_AFTER_STEP_RTOL = 1e-3  # loss after one AdamW step (Adam normalises tiny gradients: more spread)


# Action statistics (un-normalization) used by both sides: 6 normalized dims + a raw gripper.
Q01, Q99, MASK = [-0.02] * 6 + [0.0], [0.02] * 6 + [1.0], [True] * 6 + [False]


def action_stats():
    """(q01, q99, mask) lists."""
    return Q01, Q99, MASK


def norm_stats() -> dict:
    """The statistics in the dataset_statistics layout the JAX Policy reads."""
    return {"bench": {"action": {"q01": Q01, "q99": Q99, "mask": MASK, "mean": [0.0] * 7, "std": [1.0] * 7,
                                 "min": Q01, "max": Q99}}}


def tokenizer_path() -> str:
    return os.path.join(REPO, "tests", "fixtures", "data", "llama2_tokenizer", "tokenizer.model")


def model_config(name: str):
    """fp32 OpenVLAConfig of a benchmarked setup, towers at its image size."""
    from vla_jax.models.config import get_preset, with_dtypes

    s = SETUPS[name]
    cfg = with_dtypes(get_preset(s["preset"]), "float32", remat=False)
    size = s["image_size"]
    return dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, image_size=size),
                               siglip=dataclasses.replace(cfg.siglip, image_size=size))


def training_batch(name: str) -> dict:
    """The synthetic training batch of a setup (vla_jax.training.synthetic rows): pixel_values uint8
    [B, S, S, 3], input_ids / attention_mask / labels int32 [B, T], dataset_index int32 [B]."""
    import numpy as np

    from vla_jax.spec import BatchSpec
    from vla_jax.training.synthetic import synthetic_row

    s = SETUPS[name]
    spec = BatchSpec(image_size=s["image_size"], text_len=s["text_len"])
    rows = [synthetic_row(0, 0, r, spec) for r in range(s["batch"])]
    batch = {k: np.stack([r[k] for r in rows]) for k in ("pixel_values", "input_ids", "attention_mask", "labels")}
    batch["dataset_index"] = np.zeros((s["batch"],), np.int32)
    return batch


def summarize(times: List[float], cpu: Optional[List[float]] = None) -> Dict[str, float]:
    """Wall seconds (and optionally process CPU seconds, all threads) per repetition ->
    {'median_ms', 'p90_ms', 'min_ms', 'n'[, 'cpu_median_ms']}. CPU time is far less sensitive than
    wall time to other jobs sharing the cores, so it is the cross-check when the machine is busy."""
    ts = sorted(times)
    p90 = ts[min(len(ts) - 1, int(round(0.9 * (len(ts) - 1))))]
    out = {"median_ms": round(statistics.median(ts) * 1e3, 3), "p90_ms": round(p90 * 1e3, 3),
           "min_ms": round(ts[0] * 1e3, 3), "n": len(ts)}
    if cpu:
        out["cpu_median_ms"] = round(statistics.median(cpu) * 1e3, 3)
    return out


def time_calls(fn: Callable[[], None], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Runs fn warmup times untimed, then `repeats` timed calls (fn must block until its result exists)."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return summarize(times, cpu)


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss, KB on Linux -> MB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def process_info() -> Dict[str, object]:
    return {"cores": sorted(os.sched_getaffinity(0)), "loadavg": [round(x, 2) for x in os.getloadavg()]}
