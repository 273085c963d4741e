"""Shared set-up for the policy, eval and serve tests (no tests here).

`random_checkpoint` writes a vla_jax checkpoint through `vla_jax.checkpoints.Checkpointer` (the
layout training writes) holding random parameters of the debug geometry at a small image size,
the real Llama-2 tokenizer and hand-written statistics. `cached_policy` loads it once per process,
so the test files share compiled decoders.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile

import numpy as np

IMAGE_SIZE = 56  # 4x4 patches of 14 px: compiles and runs in seconds on 2 CPU cores
DIM_NAMES = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


def stats_entry(scale: float) -> dict:
    """An OpenVLA statistics entry with distinct bounds per dimension; gripper un-normalized."""
    q01 = [-scale * (i + 1) for i in range(6)] + [0.0]
    q99 = [scale * (i + 2) for i in range(6)] + [1.0]
    return {"action": {"mean": [0.1 * scale] * 6 + [0.5], "std": [scale] * 7, "min": [q - scale for q in q01],
                       "max": [q + scale for q in q99], "q01": q01, "q99": q99, "mask": [True] * 6 + [False]},
            "proprio": {k: [0.0] * 7 for k in ("mean", "std", "min", "max", "q01", "q99")},
            "num_transitions": 100, "num_trajectories": 10}


def model_config(image_size: int = IMAGE_SIZE):
    from vla_jax.models.config import get_preset, with_dtypes

    cfg = with_dtypes(get_preset("debug"), "float32")
    return dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, image_size=image_size),
                               siglip=dataclasses.replace(cfg.siglip, image_size=image_size))


def random_params(cfg, seed: int = 0) -> dict:
    """Params of `cfg`'s shapes filled from numpy (no model.init compile), norm scales 1."""
    import flax.linen as nn
    import jax
    from flax import traverse_util

    from vla_jax.models.openvla import OpenVLA

    s, n = cfg.image_size, int(getattr(cfg, "num_images", 1))
    pixels = np.zeros((1, n, s, s, 3) if n > 1 else (1, s, s, 3), np.uint8)
    p_dim = getattr(cfg, "proprio_dim", None)
    kw = {"proprio": np.zeros((1, p_dim), np.float32)} if p_dim else {}
    shapes = jax.eval_shape(lambda: OpenVLA(cfg).init(jax.random.PRNGKey(0), pixels, np.ones((1, 4), np.int32),
                                                      **kw))["params"]
    flat = traverse_util.flatten_dict(nn.meta.unbox(shapes))
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in flat.items():
        if path[-1] == "scale":
            out[path] = np.ones(leaf.shape, np.float32)
        else:
            std = 0.05 if path[-1] == "embedding" or "lm_head" in path else 0.1  # layers outweigh the embedding
            out[path] = (std * rng.standard_normal(leaf.shape)).astype(np.float32)
    # Random heads almost never pick one of the 256 action ids among 32064 (and every other id decodes to
    # the same clipped value): keep only the action ids and 256 ordinary ids (1000..1255) in the running,
    # so decoded actions vary with the input and unrestricted decoding still emits non-action ids.
    head = out[("llm", "lm_head", "kernel")]
    keep = np.zeros(head.shape[-1], bool)
    keep[cfg.base_vocab_size - cfg.n_action_bins:cfg.base_vocab_size] = True
    keep[1000:1256] = True
    head[:, ~keep] = 0.0
    return traverse_util.unflatten_dict(out)


def write_checkpoint(workdir: str, cfg, params: dict, stats: dict, tokenizer_path: str, image_aug: bool = False,
                     step: int = 1, image_aug_ops=None, batch_spec=None, lora=None) -> str:
    """Saves params + assets as training does (`Checkpointer.save`); returns `workdir`.
    image_aug_ops: recorded in the run config's data section when given (else absent, as in old runs).
    batch_spec: a vla_jax.spec.BatchSpec written as the `batch_spec` asset (else absent, as in old runs).
    lora: the run config's lora section (e.g. {"enabled": True, "rank": 4, "alpha": 8.0}) for params
    holding adapters under params['lora'], as a LoRA run saves them (default: LoRA off)."""
    from vla_jax.checkpoints import Checkpointer, encode_data_states, tokenizer_asset
    from vla_jax.tokenizer import VLATokenizer

    tok = VLATokenizer.from_file(tokenizer_path, max_len=40)
    data = {"image_aug": image_aug} if image_aug_ops is None else {"image_aug": image_aug,
                                                                    "image_aug_ops": list(image_aug_ops)}
    assets = {"config": {"data": data, "lora": dict(lora) if lora is not None else {"enabled": False}},
              "dataset_statistics": stats, "tokenizer": tokenizer_asset(tok, cfg.action_dim)}
    if batch_spec is not None:
        assets["batch_spec"] = batch_spec.to_json()
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None, async_save=False)
    ck.save(step, {"params": params}, encode_data_states([]), assets, dataclasses.asdict(cfg), force=True)
    ck.close()
    return workdir


@functools.lru_cache(maxsize=None)
def random_checkpoint(tokenizer_path: str, datasets: tuple = ("bridge_dataset",), image_aug: bool = False) -> str:
    """A checkpoint folder (created once per process) with statistics for `datasets`."""
    cfg = model_config()
    stats = {name: stats_entry(0.01 * (i + 1)) for i, name in enumerate(datasets)}
    workdir = tempfile.mkdtemp(prefix="vla_policy_ckpt_")
    return write_checkpoint(workdir, cfg, random_params(cfg), stats, str(tokenizer_path), image_aug)


@functools.lru_cache(maxsize=None)
def cached_policy(tokenizer_path: str, datasets: tuple = ("bridge_dataset",)):
    """Policy.load of `random_checkpoint` with batch buckets (1, 8): two compiles serve every test."""
    from vla_jax.policy import Policy

    return Policy.load(random_checkpoint(str(tokenizer_path), datasets), batch_buckets=(1, 8),
                       compilation_cache=False)


def random_images(n: int, seed: int, size: int = 64) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def openvla_unnormalize(tokens, entry: dict) -> np.ndarray:
    """OpenVLA's predict_action post-processing, written out from OPENVLA_REFERENCE.md §3-§4 (float64)."""
    bins = np.linspace(-1.0, 1.0, 256)
    centers = (bins[:-1] + bins[1:]) / 2.0
    d = 32000 - np.asarray(tokens, np.int64)
    normalized = centers[np.clip(d - 1, 0, centers.shape[0] - 1)]
    a = entry["action"]
    low, high = np.array(a["q01"]), np.array(a["q99"])
    mask = np.array(a.get("mask", np.ones_like(low, dtype=bool)))
    return np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)


PROPRIO_DIM = 4


def camera_stats_entry() -> dict:
    """`stats_entry` plus 4-D proprio statistics; dim 3 was constant in training (min == max == q01 == q99),
    where upstream's inference rule and the training rule disagree (OFT_REFERENCE.md §7)."""
    entry = stats_entry(0.01)
    entry["proprio"] = {"q01": [-0.5, -0.2, 0.0, 0.3], "q99": [0.5, 0.4, 1.0, 0.3], "min": [-0.6, -0.3, -0.1, 0.3],
                        "max": [0.6, 0.5, 1.1, 0.3], "mean": [0.0, 0.1, 0.5, 0.3], "std": [0.3, 0.2, 0.3, 0.0]}
    return entry


def camera_model_config():
    """The debug geometry at 56 px with two cameras and a 4-D proprio token."""
    return dataclasses.replace(model_config(), num_images=2, proprio_dim=PROPRIO_DIM)


@functools.lru_cache(maxsize=None)
def camera_checkpoint(tokenizer_path: str) -> str:
    """A checkpoint of `camera_model_config` (random weights) whose batch_spec says cameras ('primary',
    'wrist') and proprio_dim 4, with `camera_stats_entry` statistics for 'bridge_dataset'."""
    from vla_jax.spec import BatchSpec

    cfg = camera_model_config()
    workdir = tempfile.mkdtemp(prefix="vla_policy_cams_")
    return write_checkpoint(workdir, cfg, random_params(cfg, seed=1), {"bridge_dataset": camera_stats_entry()},
                            str(tokenizer_path), batch_spec=BatchSpec.for_model(cfg, text_len=40))


@functools.lru_cache(maxsize=None)
def camera_policy(tokenizer_path: str):
    """Policy.load of `camera_checkpoint` with batch buckets (1, 4)."""
    from vla_jax.policy import Policy

    return Policy.load(camera_checkpoint(str(tokenizer_path)), batch_buckets=(1, 4), compilation_cache=False)
