"""python -m vla_jax.plan: compile the real programs for a target and report per-chip memory and time.

    python -m vla_jax.plan --config=configs/oxe.py --topology=v5p-128 [--mesh=1,-1,1] [--batch=2048]
        [--grad_accum=1] [--remat_policy=nothing_saveable] [--find_batch] [--budget_gb=40] [--json=plan.json]
    python -m vla_jax.plan --config=configs/oxe.py --topology=v5e-4 --program=predict_action --batch=1,8,32
    python -m vla_jax.plan --config=configs/oft.py:cameras=1,proprio=0 --topology=v5e-4 --program=oft_predict --batch=1,8,32
    python -m vla_jax.plan --config=configs/oft.py:cameras=1,proprio=0 --topology=v5p:1x1x1 --batch=8 --budget_gb=40   # OFT LoRA step
    python -m vla_jax.plan --config=configs/oxe.py --devices=64          # simulated CPU devices

See vla_jax/plan/__init__.py for what is compiled and reported.
"""

from __future__ import annotations

import os
import sys


def _early_env(argv) -> None:
    """--devices must act before JAX initialises its CPU backend; a TPU topology plan never needs (or
    grabs) a local accelerator: the TPU compiler runs on this host."""
    n = None
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            n = a.split("=", 1)[1]
        elif a == "--devices" and i + 1 < len(argv):
            n = argv[i + 1]
    if n is not None and not any(a.startswith("--topology") for a in argv):
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={int(n)}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _early_env(sys.argv)

import json  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
    flags.DEFINE_string("topology", "", "TPU slice to compile for with the TPU compiler (libtpu), e.g. v5p-128, "
                        "v5e-16, v4-32, v6e-8, or a topology string such as v5e:2x2.")
    flags.DEFINE_integer("devices", 8, "Number of simulated CPU devices (when no --topology).")
    flags.DEFINE_enum("program", "train", ["train", "predict_action", "oft_predict"],
                      "Which program to compile: the train step, autoregressive predict_action (prefill + 6 "
                      "cached steps), or OpenVLA-OFT's single pass (needs an OFT config, e.g. configs/oft.py).")
    flags.DEFINE_string("mesh", "", "data,fsdp,tensor sizes (overrides config.mesh; predict_action default "
                        "1,1,-1 = tensor parallel), e.g. 1,-1,1.")
    flags.DEFINE_string("batch", "", "Global batch size (train: default the config's; predict_action and "
                        "oft_predict: a comma list, default 1,8,32).")
    flags.DEFINE_integer("grad_accum", 0, "Micro-batches per step (0: the config's).")
    flags.DEFINE_enum("remat_policy", "nothing_saveable", ["nothing_saveable", "dots_with_no_batch_dims_saveable"],
                      "What the Llama layers keep for the backward pass.")
    flags.DEFINE_bool("find_batch", False, "Search the largest per-chip batch that fits (and the fewest "
                      "micro-batches for the config's global batch); compiles several times.")
    flags.DEFINE_float("mfu", 0.40, "Model-FLOPs utilisation assumed for the step-time estimate.")
    flags.DEFINE_integer("llama_layers", 0, "Train: build the Llama with this many layers (0: the preset's); "
                         "the guard-rail test's reduced depth at full width.")
    flags.DEFINE_integer("text_len", 32, "predict_action / oft_predict: prompt tokens (padded bucket).")
    flags.DEFINE_float("budget_gb", 0.0, "Also compare the per-chip peak with this many GB (e.g. 40 for a "
                       "40 GB accelerator), besides the chip's HBM.")
    flags.DEFINE_string("hlo", "", "Also write the compiled (optimized, per-chip) HLO text to this file "
                        "(predict_action: one per batch, suffixed .batchN).")
    flags.DEFINE_string("json", "", "Also write the report(s) as JSON to this file.")
    flags.mark_flags_as_required(["config"])


def _target(topology: str, devices: int):
    """-> (device list, description). ValueError for an unknown topology (lists the known ones)."""
    import jax

    from vla_jax.plan import chips

    if topology:
        topo = chips.parse(topology)
        return chips.devices(topo), f"{topo.name} ({topo.topology}, {topo.num_chips} chips)"
    if jax.device_count() != devices:
        raise ValueError(f"--devices={devices} but JAX sees {jax.device_count()} devices (run as "
                         f"`python -m vla_jax.plan`, which sets XLA_FLAGS before JAX starts)")
    return list(jax.devices()), f"{devices} simulated CPU devices"


def _batches(text: str, default):
    if not text:
        return list(default)
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--batch={text!r}: expected an integer or a comma list of integers") from None


def _jsonable(r):
    return {k: v for k, v in r.items() if not k.startswith("_")}


def _save(path: str, reports) -> None:
    if path:
        with open(path, "w") as f:
            json.dump([_jsonable(r) for r in reports] if len(reports) != 1 else _jsonable(reports[0]), f, indent=2)


def main(argv):
    del argv
    F = flags.FLAGS
    from vla_jax.plan import planner, report

    try:
        devs, where = _target(F.topology, F.devices)
        mesh = planner.parse_mesh(F.mesh)
        out = []
        if F.program in ("predict_action", "oft_predict"):
            sizes = planner.check_mesh(mesh or (1, 1, -1), len(devs), where)
            for b in _batches(F.batch, (1, 8, 32)):
                if F.program == "predict_action":
                    from vla_jax.plan import inference

                    r = inference.compile_predict_action(devs, sizes, b, F.text_len, F.config.model.preset)
                    passes = r["new_tokens"]  # prefill + cached steps: each reads every weight once
                else:
                    from vla_jax.plan import oft_inference

                    r = oft_inference.compile_oft_predict(devs, F.config.model, sizes, b, F.text_len)
                    passes = 1
                r["target"] = where
                planner.inference_verdicts(r, F.budget_gb, passes)
                out.append(r)
                _save(F.json, out)
                if F.hlo and "_hlo" in r:
                    with open(f"{F.hlo}.batch{b}", "w") as f:
                        f.write(r["_hlo"])
                print(report.format_inference(r), flush=True)
        elif F.find_batch:
            batches = _batches(F.batch, ())
            res = planner.find_batch(F.config, devs, where, mesh, F.remat_policy, start=batches[0] if batches else 0)
            print(f"{where}: largest per-chip batch that fits: {res['largest_per_chip_batch']}; config global batch "
                  f"{F.config.global_batch_size} needs --grad_accum={res.get('grad_accum_steps', 'n/a')}", flush=True)
            out.append(res)
            _save(F.json, out)
        else:
            batches = _batches(F.batch, (0,))
            if len(batches) != 1:
                raise ValueError(f"--batch={F.batch!r}: the train program takes one global batch size")
            r = planner.train_plan(F.config, devs, where, mesh, batches[0], F.grad_accum, F.remat_policy,
                                  llama_layers=F.llama_layers, mfu=F.mfu, keep_compiled=bool(F.hlo))
            if F.budget_gb:
                r["budget"] = planner.fit_verdict(r["per_device_bytes"]["peak"], F.budget_gb * 1e9)
            if F.hlo and "_hlo" in r:
                with open(F.hlo, "w") as f:
                    f.write(r["_hlo"])
            out.append(r)
            _save(F.json, out)
            print(report.format_train(r), flush=True)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    from vla_jax.training.run import parse_flags

    app.run(main, flags_parser=parse_flags)
