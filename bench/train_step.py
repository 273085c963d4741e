"""Train-step benchmark on this machine: compile time, step time, samples/s for the debug and a
mid-size config (synthetic batches, so the input pipeline is not measured).

    python bench/train_step.py [--configs=debug,mid] [--steps=20] [--devices=1]

Step times are the median over --steps timed steps (after 2 warm-up steps), each ended with
block_until_ready. Prints one summary line and writes bench/results/train_step.json.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Benchmarked set-ups: the debug config as is, and the 'mid' preset (Llama 512 x 4 layers, 224 px).
SETUPS = {
    "debug": ["--config.model.preset=debug"],  # configs/debug.py: 112 px, fp32, batch 8
    "mid": ["--config.model.preset=mid", "--config.model.image_size=224", "--config.data.max_seq_len=64"],
}


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="debug,mid")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_step.json"))
    return p.parse_args()


def bench_one(name: str, steps: int) -> dict:
    import jax
    import numpy as np

    from vla_jax import sharding as shd
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.training import metrics as mlib
    from vla_jax.training import run, state as st, step as sp

    cfg = run._load_config_file(str(REPO / "configs" / "debug.py"))
    with cfg.unlocked():
        cfg.data_source = "synthetic"
        for arg in SETUPS[name]:
            key, value = arg[len("--config."):].split("=")
            parent, leaf = key.rsplit(".", 1)
            node = cfg
            for k in parent.split("."):
                node = node[k]
            node[leaf] = type(node[leaf])(value)
    model_cfg = run.model_config(cfg.model)
    model = OpenVLA(model_cfg)
    mesh = run.make_mesh(cfg.mesh)
    run.check_batch_layout(cfg, mesh)
    tx, schedule = st.make_optimizer(st.OptimConfig.from_config(cfg.optim), cfg.num_steps)
    example = run.example_inputs(run.batch_spec(cfg, model_cfg))
    mask = run.trainable(cfg, st.abstract_params(model, example, st.ParamHooks()), st.ParamHooks())
    t0 = time.perf_counter()
    state, shardings, abstract = st.create_train_state(model, tx, mesh, shd.LOGICAL_RULES, cfg.seed, example, mask)
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0
    data = run.make_data(cfg, model_cfg, cfg.global_batch_size, mesh)
    loss_cfg = sp.LossConfig.for_model(model_cfg, data.batch_spec)
    keys = data.batch_spec.keys
    batches = [next(data.iterator) for _ in range(4)]
    shapes = {k: batches[0][k].shape for k in keys}
    step = sp.jit_train_step(sp.make_train_step(model, tx, schedule, loss_cfg, mask, cfg.grad_accum_steps, mesh=mesh),
                             mesh, shardings, shapes)
    globals_ = [shd.host_batch_to_global({k: b[k] for k in keys}, mesh) for b in batches]
    t0 = time.perf_counter()
    compiled = step.lower(abstract, globals_[0]).compile()
    t_compile = time.perf_counter() - t0
    times = []
    for i in range(steps + 2):
        batch = shd.host_batch_to_global({k: batches[i % 4][k] for k in keys}, mesh)
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= 2:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = cfg.global_batch_size * mlib.train_flops_per_example(model_cfg, cfg.data.max_seq_len,
                                                                  loss_cfg.num_supervised)
    return {"config": name, "preset": cfg.model.preset, "image_size": model_cfg.image_size,
            "text_len": cfg.data.max_seq_len, "global_batch": cfg.global_batch_size, "dtype": cfg.model.dtype,
            "params": st.param_summary(abstract.params, mask)["total"], "devices": jax.device_count(),
            "init_compile_and_run_s": round(t_init, 2), "step_compile_s": round(t_compile, 2),
            "step_time_median_s": round(med, 4), "step_time_min_s": round(min(times), 4),
            "samples_per_s": round(cfg.global_batch_size / med, 2), "gflops_per_step": round(flops / 1e9, 1),
            "achieved_gflops_per_s": round(flops / med / 1e9, 1), "timed_steps": steps,
            "activation_constraints": step.constrain_activations,
            "final_loss": float(np.asarray(metrics["loss"]))}


def main():
    args = parse()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(REPO))
    results = [bench_one(name, args.steps) for name in args.configs.split(",")]
    out = {"benchmark": "train_step", "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "results": results}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("train_step: " + "; ".join(
        f"{r['config']} ({r['params'] / 1e6:.1f}M params, batch {r['global_batch']}, {r['image_size']}px): "
        f"compile {r['step_compile_s']:.1f} s, step {r['step_time_median_s'] * 1e3:.0f} ms, "
        f"{r['samples_per_s']:.1f} samples/s" for r in results))


if __name__ == "__main__":
    main()
