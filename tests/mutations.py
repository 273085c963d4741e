"""Mutation check (not part of CI): does the suite catch realistic one-line bugs?

    python tests/mutations.py                 # every mutant, its targeted tests only
    python tests/mutations.py --only=clip     # mutants whose name contains 'clip'
    python tests/mutations.py --list

Copies the checkout (the files git tracks or would track) to a temporary folder once, then for
each mutant: replaces one exact snippet in one file (it must occur exactly once, so a mutant that
no longer applies is reported, not silently skipped), runs the mutant's targeted tests there with
`pytest -x`, and restores the file. A mutant is KILLED when the tests fail, SURVIVED when they pass
(a gap in the suite), ERROR when pytest could not run them (exit code >= 2, e.g. a syntax error).
Prints a markdown table; exits 1 if any mutant survived or errored.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Tuple

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: Tuple[str, ...]


MUTANTS = (
    Mutant("FiLM gamma applied without 1 +", "vla_jax/models/vit.py",
           "x = x * (1 + gamma[:, None, :].astype(x.dtype)) + beta[:, None, :].astype(x.dtype)",
           "x = x * gamma[:, None, :].astype(x.dtype) + beta[:, None, :].astype(x.dtype)",
           ("tests/models/test_film_parity.py::test_film_l1_chunk_matches_reference",)),
    Mutant("FiLM after the MLP instead of before", "vla_jax/models/vit.py",
           """        if film is not None:
            gamma, beta = film
            x = x * (1 + gamma[:, None, :].astype(x.dtype)) + beta[:, None, :].astype(x.dtype)
        y = Mlp(cfg.mlp_dim, name="mlp", **lin)(LayerNorm(cfg.ln_eps, name="norm2", **kw)(x))
        if cfg.layer_scale:
            y = LayerScale(name="ls2", **kw)(y)
        return nn.with_logical_constraint(x + y, _ACT), None""",
           """        y = Mlp(cfg.mlp_dim, name="mlp", **lin)(LayerNorm(cfg.ln_eps, name="norm2", **kw)(x))
        if cfg.layer_scale:
            y = LayerScale(name="ls2", **kw)(y)
        x = x + y
        if film is not None:
            gamma, beta = film
            x = x * (1 + gamma[:, None, :].astype(x.dtype)) + beta[:, None, :].astype(x.dtype)
        return nn.with_logical_constraint(x, _ACT), None""",
           ("tests/models/test_film_parity.py::test_film_l1_chunk_matches_reference",)),
    Mutant("FiLM language vector averages the action slots", "vla_jax/models/parallel.py",
           "lang = language_vector(text, keys & ~action_mask) if cfg.film else None",
           "lang = language_vector(text, keys) if cfg.film else None",
           ("tests/models/test_film_parity.py::test_film_language_vector_positions",)),
    Mutant("FiLM language vector averages the pads", "vla_jax/models/parallel.py",
           "lang = language_vector(text, keys & ~action_mask) if cfg.film else None",
           "lang = language_vector(text, ~action_mask) if cfg.film else None",
           ("tests/models/test_film_parity.py::test_film_language_vector_positions",)),
    Mutant("RoPE sign flipped", "vla_jax/models/llama.py",
           "rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)",
           "rotated = jnp.concatenate([x[..., half:], -x[..., :half]], axis=-1)",
           ("tests/models/test_llama_parity.py::test_full_forward_matches_hf",)),
    Mutant("action id off by one", "vla_jax/spec/actions.py",
           "return (self.base_vocab_size - np.digitize(a, self.bin_edges)).astype(np.int32)",
           "return (self.base_vocab_size - 1 - np.digitize(a, self.bin_edges)).astype(np.int32)",
           ("tests/test_tokenizer.py",)),
    Mutant("action clip to [-1, 1] dropped", "vla_jax/spec/actions.py",
           "a = np.clip(np.asarray(normalized), -1.0, 1.0)",
           "a = np.asarray(normalized)",
           ("tests/test_tokenizer.py",)),
    Mutant("normalization clip dropped (numpy)", "vla_jax/data/normalization.py",
           "y = np.where(mask, np.clip(2 * (x - q01) / (q99 - q01 + np.float32(1e-8)) - 1, -1, 1), x)",
           "y = np.where(mask, 2 * (x - q01) / (q99 - q01 + np.float32(1e-8)) - 1, x)",
           ("tests/data/test_normalization.py",)),
    Mutant("normalization clip dropped (tf.data)", "vla_jax/data/normalization.py",
           "y = tf.where(mask, tf.clip_by_value(2 * (x - q01) / (q99 - q01 + np.float32(1e-8)) - 1, -1.0, 1.0), x)",
           "y = tf.where(mask, 2 * (x - q01) / (q99 - q01 + np.float32(1e-8)) - 1, x)",
           ("tests/data/test_normalization.py",)),
    Mutant("data position not restored", "vla_jax/data/pipeline.py",
           'self._build(skip_batches=int(s["batches"]))',
           "self._build(skip_batches=0)",
           ("tests/data/test_data_pipeline.py::test_resume_continues_with_the_next_batch",)),
    Mutant("action chunk starts after the current action", "vla_jax/data/transforms.py",
           "idx = tf.range(n)[:, None] + tf.range(k)[None, :]  # [n, k]",
           "n = n - 1\n    idx = tf.range(n)[:, None] + tf.range(1, k + 1)[None, :]  # [n, k]",
           ("tests/data/test_data_chunks.py::test_chunks_are_the_next_k_normalized_actions_of_each_frame",)),
    Mutant("action chunks padded at the episode end (pre-OFT clamp)", "vla_jax/data/transforms.py",
           "idx = tf.range(n)[:, None] + tf.range(k)[None, :]  # [n, k]",
           "n = tf.shape(action)[0]\n    idx = tf.minimum(tf.range(n)[:, None] + tf.range(k)[None, :], n - 1)  # [n, k]",
           ("tests/data/test_data_chunks.py::test_chunks_are_the_next_k_normalized_actions_of_each_frame",)),
    Mutant("action chunk tokens column-major", "vla_jax/tokenizer.py",
           "            return a.reshape(b, k * d)",
           "            return a.reshape(b, k, d).transpose(0, 2, 1).reshape(b, k * d) if a.ndim == 3 else a",
           ("tests/data/test_data_chunks.py::test_encode_batch_chunk_layout",)),
    Mutant("short episodes dropped silently", "vla_jax/data/pipeline.py",
           "        warnings.warn(text, DataWarning, stacklevel=3)\n    return out",
           "    return out",
           ("tests/data/test_data_chunks.py::test_episodes_shorter_than_k_are_dropped_and_counted",)),
    Mutant("loss not masked by valid", "vla_jax/training/step.py",
           '"ce_sum": jnp.sum(ce * validf), "tokens": jnp.sum(validf),',
           '"ce_sum": jnp.sum(ce), "tokens": jnp.sum(validf),',
           ("tests/training/test_loss_mask.py",)),
    Mutant("supervised logit position off by one", "vla_jax/training/step.py",
           "positions = jnp.maximum(order + num_inserted - 1, 0)",
           "positions = jnp.maximum(order + num_inserted, 0)",
           ("tests/training/test_loss_mask.py",)),
    Mutant("loss divided per micro-batch, not by the global count", "vla_jax/training/step.py",
           "(_, sums), g = grad_of(mb, jax.random.fold_in(step_rng, i))",
           "(_, sums), g = jax.value_and_grad(lambda t: loss_fn(merge(mask, t, frozen), mb, jnp.maximum("
           "jnp.sum((mb['labels'] != IGNORE_INDEX).astype(jnp.float32)), 1.0), jax.random.fold_in(step_rng, i)), "
           "has_aux=True)(trainable)",
           ("tests/training/test_loss_mask.py",)),
    Mutant("gradient clipping dropped", "vla_jax/training/state.py",
           "parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []",
           "parts = []",
           ("tests/training/test_optimizer_vs_torch.py",)),
    Mutant("clipping after Adam instead of before", "vla_jax/training/state.py",
           "return optax.chain(*parts), schedule",
           "return optax.chain(*parts[::-1]), schedule",
           ("tests/training/test_optimizer_vs_torch.py",)),
    Mutant("Adam eps inside the square root", "vla_jax/training/state.py",
           "parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, eps_root=0.0,",
           "parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=0.0, eps_root=cfg.eps,",
           ("tests/training/test_optimizer_vs_torch.py",)),
    Mutant("weight decay not passed to AdamW", "vla_jax/training/state.py",
           "weight_decay=cfg.weight_decay, mask=None))",
           "weight_decay=0.0, mask=None))",
           ("tests/training/test_optimizer_vs_torch.py",)),
    Mutant("warmup one step late", "vla_jax/training/state.py",
           "return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), optax.constant_schedule(lr)], [warm])",
           "return optax.join_schedules([optax.linear_schedule(0.0, lr, warm + 1), optax.constant_schedule(lr)], [warm + 1])",
           ("tests/training/test_optimizer_vs_torch.py",)),
    Mutant("unused tower params trained", "vla_jax/training/state.py",
           'UNUSED_VISION_PARAMS = ("last_block", "norm", "attn_pool")',
           'UNUSED_VISION_PARAMS = ("last_block", "attn_pool")',
           ("tests/training/test_optimizer_vs_torch.py",)),
    Mutant("LoRA adapters of unused modules trained", "vla_jax/models/lora.py",
           "return bool(keys and keys[-1] in (LORA_A, LORA_B) and not _is_unused(keys))",
           "return bool(keys and keys[-1] in (LORA_A, LORA_B))",
           ("tests/training/test_optimizer_vs_torch.py",)),
    Mutant("augmentation: saturation never applied", "vla_jax/data/transforms.py",
           "x = tf.image.stateless_random_saturation(x, p[0], p[1], sd)",
           "x = x",
           ("tests/data/test_augment_reference.py",)),
    Mutant("augmentation: hue never applied", "vla_jax/data/transforms.py",
           "x = tf.image.stateless_random_hue(x, p[0], sd)",
           "x = x",
           ("tests/data/test_augment_reference.py",)),
    Mutant("augmentation: contrast never applied", "vla_jax/data/transforms.py",
           "x = tf.image.stateless_random_contrast(x, p[0], p[1], sd)",
           "x = x",
           ("tests/data/test_augment_reference.py",)),
    Mutant("augmentation: brightness never applied", "vla_jax/data/transforms.py",
           "x = tf.image.stateless_random_brightness(x, p[0], sd)",
           "x = x",
           ("tests/data/test_augment_reference.py",)),
    Mutant("augmentation: crop never applied", "vla_jax/data/transforms.py",
           "x = random_resized_crop(x, sd, **p)",
           "x = x",
           ("tests/data/test_augment_reference.py",)),
    Mutant("augmentation: every op gets the same seed", "vla_jax/data/transforms.py",
           "p, sd = params[op], seeds[i]",
           "p, sd = params[op], seeds[0]",
           ("tests/data/test_augment_reference.py",)),
    Mutant("augmentation: saturation range widened", "vla_jax/data/transforms.py",
           '"random_saturation": (0.8, 1.2),',
           '"random_saturation": (0.5, 1.5),',
           ("tests/data/test_augment_reference.py",)),
    Mutant("augmentation: no clip between ops", "vla_jax/data/transforms.py",
           "        x = tf.clip_by_value(x, 0.0, 1.0)\n    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)",
           "    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)",
           ("tests/data/test_augment_reference.py",)),
    Mutant("augmentation: frame seed ignores the process", "vla_jax/data/transforms.py",
           "base = tf.constant([base_seed, process_index], tf.int64)",
           "base = tf.constant([base_seed, 0], tf.int64)",
           ("tests/data/test_augment_reference.py",)),
    # Last: its targeted test runs the accelerator suite's whole CPU smoke run (~2 CPU minutes).
    Mutant("cameras: stacked in reverse order", "vla_jax/data/transforms.py",
           "for key in camera_keys(dataset_cfg, cameras)], axis=1)",
           "for key in camera_keys(dataset_cfg, cameras)][::-1], axis=1)",
           ("tests/data/test_data_cameras.py::test_two_cameras_in_order_with_normalized_proprio",)),
    Mutant("cameras: one augmentation seed for all", "vla_jax/data/transforms.py",
           "img = augment_image(img, seed + i, params)", "img = augment_image(img, seed, params)",
           ("tests/data/test_data_cameras.py::test_cameras_get_their_own_augmentation_seed",)),
    Mutant("proprio: constant dims not zeroed in training", "vla_jax/data/normalization.py",
           "- 1, -1.0, 1.0)\n    return tf.where(zero, tf.zeros_like(y), y)",
           "- 1, -1.0, 1.0)\n    return y",
           ("tests/data/test_data_cameras.py::test_two_cameras_in_order_with_normalized_proprio",)),
    Mutant("cameras: missing-camera check skipped", "vla_jax/data/pipeline.py",
           "        if data_cfg.cameras > 1:\n            check_cameras",
           "        if False:\n            check_cameras",
           ("tests/data/test_data_cameras.py::test_camera_missing_in_an_episode_is_named",)),
    Mutant("gpu suite: tokens/s without the image patches", "bench/gpu_suite.py",
           "tokens = batch_size * (a.text_len + cfg.num_inserted_tokens)",
           "tokens = batch_size * a.text_len",
           ("tests/test_gpu_suite.py::test_train_throughput_and_mfu_follow_from_the_raw_fields",)),
    Mutant("cameras: batch and camera axes mixed when folding", "vla_jax/models/openvla.py",
           "patches = self.encode_image(pixel_values.reshape((b * n,) + tuple(pixel_values.shape[2:])))",
           "patches = self.encode_image(jnp.swapaxes(pixel_values, 0, 1).reshape((b * n,) + tuple(pixel_values.shape[2:])))",
           ("tests/models/test_cams_model.py::test_cameras_fold_into_the_batch_in_order",)),
    Mutant("proprio token before the patches", "vla_jax/models/openvla.py",
           "return jnp.concatenate([x, token.astype(x.dtype)], axis=1)",
           "return jnp.concatenate([token.astype(x.dtype), x], axis=1)",
           ("tests/models/test_cams_parity.py::test_parallel_l1_two_cameras_and_proprio_match_reference",)),
    Mutant("inserted positions forget the proprio token", "vla_jax/models/config.py",
           "return self.num_images * self.num_patches + int(self.proprio_dim is not None)",
           "return self.num_images * self.num_patches",
           ("tests/models/test_cams_parity.py::test_parallel_l1_two_cameras_and_proprio_match_reference",)),
)


def copy_checkout(dst: pathlib.Path) -> None:
    """The files git tracks plus untracked ones it does not ignore (what CI copies)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = REPO / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)


def run_mutant(root: pathlib.Path, m: Mutant, timeout_s: float) -> Tuple[str, float, str]:
    path = root / m.path
    original = path.read_text()
    n = original.count(m.old)
    if n != 1:
        return f"ERROR (snippet found {n} times)", 0.0, ""
    path.write_text(original.replace(m.old, m.new))
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                              cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired:
        rc, out = -1, "timeout"
    finally:
        path.write_text(original)
    secs = time.perf_counter() - t0
    tail = next((l for l in reversed(out.splitlines()) if l.strip()), "")
    if rc == 0:
        return "SURVIVED", secs, tail
    if rc == 1:
        first = next((l for l in out.splitlines() if l.startswith("FAILED")), tail)
        return "killed", secs, first
    return f"ERROR (exit {rc})", secs, tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run only mutants whose name contains this (case-insensitive)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per mutant")
    a = p.parse_args(argv)
    mutants = [m for m in MUTANTS if a.only.lower() in m.name.lower()]
    if a.list:
        for m in mutants:
            print(f"{m.name}: {m.path} -> {' '.join(m.tests)}")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="vla_mutants_") as tmp:
        root = pathlib.Path(tmp)
        copy_checkout(root)
        for m in mutants:
            verdict, secs, detail = run_mutant(root, m, a.timeout_s)
            rows.append((m, verdict, secs, detail))
            print(f"{verdict:>10}  {secs:6.0f} s  {m.name}  ({detail[:150]})", flush=True)
    print("\n| mutant | file | targeted tests | result | time |\n|---|---|---|---|---|")
    for m, verdict, secs, _ in rows:
        tests = ", ".join(t.replace("tests/", "") for t in m.tests)
        print(f"| {m.name} | {m.path} | {tests} | {verdict} | {secs:.0f} s |")
    bad = [m.name for m, v, _, _ in rows if v != "killed"]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} killed" + (f"; not killed: {bad}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
