"""The vla_jax side of `bench/compare_torch.py`, on the weights and batch `torch_side.py prepare` wrote.

    python bench/jax_side.py --setup=mid --dir=RUN --train-reps=20 --infer-reps=20

Before timing anything it reproduces torch's reference values (RUN/reference.json): the loss at
step 0 (rtol LOSS_RTOL), the loss after one AdamW step (rtol LOSS_AFTER_STEP_RTOL) and the 7 greedy
tokens at batch 1 (exactly); a mismatch raises and nothing is timed.

Training: vla_jax's real train step (`vla_jax.training.step`, jitted, state donated, one CPU device,
fp32, no remat), the same AdamW hyperparameters; the lm_head runs only at the supervised positions.
`--steps-per-call=1,4` also times 4 optimizer steps per compiled call (train.py's
config.steps_per_call; the same updates, one call, one temporary buffer), reported per step.
Inference: `Policy.predict_action(s)` end to end (image check and resize, prompt tokenization,
jitted prefill + 7 greedy steps, un-normalization); images arrive at the model's resolution, as on
the torch side. Compilation is timed separately. Writes RUN/jax.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare_setup as cs  # noqa: E402


def check_close(name: str, got: float, want: float, rtol: float) -> float:
    rel = abs(got - want) / max(abs(want), 1e-12)
    if rel > rtol:
        raise AssertionError(f"{name}: vla_jax {got!r} vs torch {want!r} (relative difference {rel:.2e} > {rtol})")
    return rel


def inference_side(setup: str, params_np: dict, ref: dict, images: np.ndarray, infer_reps: int,
                   batch_reps: int) -> dict:
    import jax

    from vla_jax.policy import Policy
    from vla_jax.tokenizer import VLATokenizer

    cfg = cs.model_config(setup)
    tok = VLATokenizer.from_file(cs.tokenizer_path())
    policy = Policy(cfg, jax.device_put(params_np), tok, cs.norm_stats(), source=f"compare_torch {setup}")
    prompt = policy.prompt_ids(cs.INSTRUCTION)
    if prompt != ref["prompt_ids"]:
        raise AssertionError(f"prompt ids differ: vla_jax {prompt} vs torch {ref['prompt_ids']}")
    compiled = policy.warmup(batch_sizes=cs.INFER_BATCHES, prompt_lengths=(len(prompt),), num_tokens=cs.NUM_TOKENS)
    tokens = policy.predict_tokens([images[0]], [cs.INSTRUCTION], cs.NUM_TOKENS)[0]
    if tokens.tolist() != ref["tokens"]:
        raise AssertionError(f"greedy tokens differ: vla_jax {tokens.tolist()} vs torch {ref['tokens']}")
    out = {"compile_s": {f"batch{k[1]}_len{k[2]}": round(v, 2) for k, v in compiled.items()},
           "tokens_equal": True, "tokens": tokens.tolist()}
    for b in cs.INFER_BATCHES:
        reps = infer_reps if b == 1 else batch_reps
        if b == 1:
            fn = lambda: policy.predict_action(images[0], cs.INSTRUCTION)  # noqa: E731
        else:
            imgs, instr = list(images[:b]), [cs.INSTRUCTION] * b
            fn = lambda: policy.predict_actions(imgs, instr)  # noqa: E731
        t = cs.time_calls(fn, reps)
        px, prompts = images[:b], [prompt] * b
        dec = cs.time_calls(lambda: policy.decode_tokens(px, prompts, cs.NUM_TOKENS), max(3, reps // 2))
        t.update(ms_per_action=round(t["median_ms"] / b, 3), actions_per_s=round(1e3 * b / t["median_ms"], 2),
                 decode_only_median_ms=dec["median_ms"])
        out[str(b)] = t
    return out


def build_train_step(setup: str, batch: dict, params_np: Optional[dict] = None, steps_per_call: int = 1):
    """vla_jax's real train step for a setup on one CPU device, compiled for `batch`'s shapes.
    params_np: weights (vla_jax layout) or None for a random init. steps_per_call n > 1: n steps per
    call (`jit_train_step(steps_per_call=n)`), fed n copies of the batch stacked [n, ...].
    -> (compiled step, train state, put_batch() -> the batch as a global array tree (a fresh host ->
    device transfer per call, as every real step makes), {'state_init_s', 'compile_s'})."""
    import jax

    from vla_jax import sharding as shd
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.spec import BatchSpec
    from vla_jax.training import run, state as st, step as sp

    cfg = cs.model_config(setup)
    model = OpenVLA(cfg)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    o = cs.OPTIM
    tx, schedule = st.make_optimizer(st.OptimConfig(o["learning_rate"], o["weight_decay"], o["b1"], o["b2"], o["eps"],
                                                    o["grad_clip"], schedule="constant"), num_steps=1000)
    spec = BatchSpec.for_model(cfg, batch["input_ids"].shape[1])
    example = run.example_inputs(spec)
    mask = st.trainable_mask(st.abstract_params(model, example))
    params = None
    if params_np is not None:
        shardings, _ = st.abstract_train_state(model, tx, mesh, shd.LOGICAL_RULES, 0, example, mask)
        params = jax.device_put(params_np, shardings.params)
    t0 = time.perf_counter()
    state, shardings, abstract = st.create_train_state(model, tx, mesh, shd.LOGICAL_RULES, 0, example, mask,
                                                       params=params)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    host = spec.select(batch)
    step = sp.jit_train_step(sp.make_train_step(model, tx, schedule, sp.LossConfig.for_model(cfg, spec), mask, 1,
                                                 mesh=mesh),
                             mesh, shardings, {k: v.shape for k, v in host.items()}, steps_per_call=steps_per_call)
    if steps_per_call > 1:
        host = sp.stack_batches([host] * steps_per_call, spec.keys)

    def put_batch():
        return shd.host_batch_to_global(host, mesh, stacked=steps_per_call > 1)

    t0 = time.perf_counter()
    compiled = step.lower(abstract, put_batch()).compile()
    return compiled, state, put_batch, {"state_init_s": init_s, "compile_s": time.perf_counter() - t0}


def train_side(setup: str, params_np: dict, ref: dict, batch: dict, train_reps: int, steps_per_call: int = 1) -> dict:
    """Times train_reps calls of steps_per_call steps each (after 2 warm-up calls); times are per step."""
    import jax

    n = steps_per_call
    compiled, state, put_batch, setup_s = build_train_step(setup, batch, params_np, n)

    losses, times, cpu = [], [], []
    for i in range(train_reps + 2):  # the first 2 calls give the equality checks and warm up
        c0, t0 = time.process_time(), time.perf_counter()
        state, metrics = compiled(state, put_batch())
        jax.block_until_ready((state, metrics))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.extend(np.atleast_1d(np.asarray(metrics["loss"])).astype(float).tolist())
        if i == 1:  # checked before any timed step
            rel0 = check_close("loss at step 0", losses[0], ref["loss_step0"], cs.LOSS_RTOL)
            rel1 = check_close("loss after one AdamW step", losses[1], ref["loss_after_step"], cs.LOSS_AFTER_STEP_RTOL)
        if i >= 2:
            times.append(dt / n)
            cpu.append(dc / n)
    t = cs.summarize(times, cpu)
    b = int(batch["input_ids"].shape[0])
    t.update(batch=b, steps_per_call=n, samples_per_s=round(b * 1e3 / t["median_ms"], 3),
             compile_s=round(setup_s["compile_s"], 2), state_init_s=round(setup_s["state_init_s"], 2),
             loss_step0=losses[0], loss_after_step=losses[1], loss_rel_diff_step0=rel0, loss_rel_diff_after_step=rel1)
    return t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", choices=sorted(cs.SETUPS), required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--train-reps", type=int, default=20)
    p.add_argument("--infer-reps", type=int, default=20)
    p.add_argument("--batch-reps", type=int, default=5)
    p.add_argument("--steps-per-call", default="1", help="comma-separated train variants, e.g. 1,4: optimizer "
                   "steps per compiled call (train.py's config.steps_per_call); 1 is always measured")
    a = p.parse_args(argv)
    variants = sorted({int(v) for v in a.steps_per_call.split(",") if v.strip()} - {1})  # 1: out["train"]
    info = cs.process_info()
    # One CPU device (a test harness may have asked for 8 simulated ones); other XLA flags pass through.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from vla_jax.hf import keys_openvla

    with open(os.path.join(a.dir, "reference.json")) as f:
        ref = json.load(f)
    batch = dict(np.load(os.path.join(a.dir, "batch.npz")))
    cfg = cs.model_config(a.setup)
    params_np = keys_openvla.hf_to_params(dict(np.load(os.path.join(a.dir, "weights.npz"))), cfg)
    out = {"side": "vla_jax", "setup": a.setup, "jax": jax.__version__, "device": str(jax.devices()[0]),
           "xla_flags": os.environ["XLA_FLAGS"], "start": info, "rss_after_setup_mb": cs.rss_mb()}
    out["inference"] = inference_side(a.setup, params_np, ref, batch.pop("images"), a.infer_reps, a.batch_reps)
    out["train"] = train_side(a.setup, params_np, ref, batch, a.train_reps)
    # Each variant in turn, one train state alive at a time; per step, so comparable with "train".
    out["train_steps_per_call"] = {str(n): train_side(a.setup, params_np, ref, batch, a.train_reps, n)
                                   for n in variants}
    out["peak_rss_mb"] = cs.peak_rss_mb()
    out["end"] = cs.process_info()
    with open(os.path.join(a.dir, "jax.json"), "w") as f:
        json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
