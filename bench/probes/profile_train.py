"""Where a train step's time goes, on both sides of `bench/compare_torch.py`, by the same categories.

    python bench/profile_train.py [--setup=mid] [--steps=3] [--cores=0,1]

Runs each side in its own process pinned to the same cores (as compare_torch does), random weights,
the compare_torch geometry and batch shapes, fp32:
- vla_jax: the real jitted train step, traced with `jax.profiler` (perfetto trace) after 3 warm-up
  steps; each XLA op is mapped to its JAX source through the compiled HLO's `op_name` metadata.
  XLA:CPU may run independent ops at the same time, so time in which k ops overlap is split k ways
  (the categories then sum to the busy time of the step). Ops that XLA:CPU runs asynchronously
  (some copies and dots; their completion is a separate 'end: NAME' marker) appear with their launch
  time only, so they are undercounted (e.g. the zero-fill copies of the layer scan's buffers).
- torch: OpenVLA's step (full logits) and the diagnostic step with the lm_head at the supervised
  positions only (vla_jax's FLOPs; `torch_side.supervised_logits_loss`), under `torch.profiler`,
  self CPU time of each aten op (one op at a time, each using all threads).

Categories: dense matmuls (every Linear/projection incl. lm_head), attention (scores, softmax, mask,
weighted sum and their backward; the fused SDPA kernel on the torch side), layer-stack bookkeeping
(XLA only: dynamic slices of the stacked [L, ...] weights and the zero-filled buffers that the layer
scan stacks its residuals and gradients into), optimizer (gradient norm, clipping, AdamW), other
(norms, activations, residual adds, RoPE, embedding, loss). Writes bench/results/profile_train.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, for compare_setup
import compare_setup as cs  # noqa: E402

CATEGORIES = ("dense matmuls", "attention", "layer-stack bookkeeping", "optimizer", "other")


def _jax_category(hlo_name: str, op_name: str) -> str:
    path = op_name.split("/")
    in_model = "jvp(" in op_name or "transpose(" in op_name
    if hlo_name.startswith("wrapped_broadcast") and not op_name:
        return "layer-stack bookkeeping"  # zero-filled [L, ...] buffers of the layer scans
    if "dynamic_slice" in op_name or "dynamic_update_slice" in op_name or "dynamic-slice" in hlo_name \
            or "dynamic-update-slice" in hlo_name:
        return "layer-stack bookkeeping"
    if not in_model:
        return "optimizer"
    attn = any(p in ("self_attn", "attn") for p in path)
    projection = any(p in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "proj") for p in path)
    if attn and not projection:
        return "attention"
    if path[-1] == "dot_general":
        return "dense matmuls"
    return "other"


def _split_overlaps(ops):
    """[(start, dur)] -> time per op, with time in which k ops overlap split k ways."""
    points = sorted([(s, 1, i) for i, (s, _) in enumerate(ops)] + [(s + d, -1, i) for i, (s, d) in enumerate(ops)])
    share, active, last = [0.0] * len(ops), set(), None
    for t, kind, i in points:
        if last is not None and active:
            for j in active:
                share[j] += (t - last) / len(active)
        last = t
        (active.add if kind == 1 else active.discard)(i)
    return share


def jax_side(setup: str, steps: int) -> dict:
    os.environ["XLA_FLAGS"] = " ".join([f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
                                       + ["--xla_force_host_platform_device_count=1"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from jax_side import build_train_step

    compiled, state, put_batch, _ = build_train_step(setup, cs.training_batch(setup))
    meta = {m.group(1): m.group(2) for m in re.finditer(r"^\s*%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"",
                                                        compiled.as_text(), re.M)}
    for _ in range(3):
        state, metrics = compiled(state, put_batch())
    jax.block_until_ready((state, metrics))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state, metrics = compiled(state, put_batch())
                jax.block_until_ready((state, metrics))
        with gzip.open(glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    # XLA ops are the complete events named after HLO instructions (runtime/host events carry '::', '$'
    # or a space in their names).
    ops = [e for e in events if e.get("ph") == "X" and "dur" in e and re.fullmatch(r"[\w.\-]+", e["name"])
           and not e["name"].startswith(("SlinkyThreadPool", "ThreadpoolListener"))]
    share = _split_overlaps([(e["ts"], e["dur"]) for e in ops])
    per_cat, per_op = collections.Counter(), collections.Counter()
    for e, t in zip(ops, share):
        op_name = meta.get(e["name"], "")
        per_cat[_jax_category(e["name"], op_name)] += t
        per_op[(e["name"], op_name[-100:])] += t
    ms = lambda us: round(us / steps / 1e3, 1)  # noqa: E731
    return {"side": "vla_jax", "jax": jax.__version__, "steps": steps,
            "busy_ms_per_step": ms(sum(share)), "ms_per_step": {c: ms(per_cat[c]) for c in CATEGORIES},
            "top_ops": [{"op": k[0], "source": k[1], "ms_per_step": ms(v)} for k, v in per_op.most_common(25)]}


def _torch_category(name: str) -> str:
    if "scaled_dot_product" in name:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "dense matmuls"
    if "adamw" in name or name in ("aten::linalg_vector_norm", "aten::_foreach_norm") or "zero_grad" in name:
        return "optimizer"
    return "other"


def torch_side(setup: str, steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import torch_side as ts

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cfg = cs.model_config(setup)
    torch.manual_seed(0)
    model = ts.build_model(cfg, "sdpa").randomize(seed=0)
    model.train()
    batch = cs.training_batch(setup)
    opt = ts.make_optimizer(model)
    out = {"side": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps}
    for name, loss_fn in (("openvla_full_logits", ts.train_loss), ("supervised_logits", ts.supervised_logits_loss)):
        for _ in range(2):
            ts.train_step(model, opt, batch, loss_fn)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                ts.train_step(model, opt, batch, loss_fn)
        per_cat = collections.Counter()
        for ev in prof.key_averages():
            per_cat[_torch_category(ev.key)] += ev.self_cpu_time_total
        out[name] = {"busy_ms_per_step": round(sum(per_cat.values()) / steps / 1e3, 1),
                     "ms_per_step": {c: round(per_cat[c] / steps / 1e3, 1) for c in CATEGORIES}}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("side", nargs="?", default="both", choices=("both", "jax", "torch"))
    p.add_argument("--setup", default="mid", choices=sorted(cs.SETUPS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cores", default=",".join(map(str, sorted(os.sched_getaffinity(0)))))
    p.add_argument("--out", default=os.path.join(cs.REPO, "bench", "results", "profile_train.json"))
    a = p.parse_args(argv)
    if a.side != "both":
        res = (jax_side if a.side == "jax" else torch_side)(a.setup, a.steps)
        print(json.dumps(res))
        return 0
    sides = {}
    for side, env in (("jax", {}), ("torch", {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})):
        cmd = ["taskset", "-c", a.cores, sys.executable, os.path.abspath(__file__), side, f"--setup={a.setup}",
               f"--steps={a.steps}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cs.REPO,
                              env=dict(os.environ, PYTHONPATH=cs.REPO, TF_CPP_MIN_LOG_LEVEL="2", **env))
        if proc.returncode != 0:
            raise RuntimeError(f"{side} side failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        sides[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    report = {"benchmark": "profile_train", "setup": a.setup, "geometry": cs.SETUPS[a.setup], "cores": a.cores, **sides}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    cols = [("vla_jax", sides["jax"]), ("torch (our FLOPs)", sides["torch"]["supervised_logits"]),
            ("torch (OpenVLA)", sides["torch"]["openvla_full_logits"])]
    print(f"{a.setup} train step, ms per step by category:")
    print(f"{'':26}" + "".join(f"{n:>20}" for n, _ in cols))
    for c in CATEGORIES + ("busy total",):
        vals = [r["busy_ms_per_step"] if c == "busy total" else r["ms_per_step"][c] for _, r in cols]
        print(f"{c:26}" + "".join(f"{v:20.1f}" for v in vals))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
