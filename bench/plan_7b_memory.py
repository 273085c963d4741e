"""Per-device memory of OpenVLA-7B, measured from XLA's compiled programs on simulated CPU devices.

    python bench/plan_7b_memory.py [--parts=train,infer,oft] [--infer_devices=1,2,4,8] [--infer_batches=1,8,32]
        [--backend=cpu|tpu]

(a) train: the LoRA fine-tuning step of `configs/finetune.py:lora=True` (OpenVLA's recipe: r=32 on
    every linear layer, bf16 frozen base, fp32 adapters + AdamW state, bf16 compute, remat; batch 8
    on one device, 224 px, 128 text tokens), compiled by `vla_jax.plan.plan` twice: with the adapters
    merged into full-size kernels before the layer scan (`lora.hook_functions(per_layer=False)`, the
    code before per-layer LoRA) and applied per layer (the default now).
(b) infer: the policy's greedy decoder (prefill + 7 action tokens, prompt bucket 32 tokens) for
    bf16 7B parameters placed over a (data=1, fsdp=1, tensor=N) mesh by `vla_jax.policy.mesh`, at
    batch 1, 8 and 32 and N = 1, 2, 4, 8 devices.
(c) oft: OpenVLA-OFT's single parallel pass (`vla_jax.models.parallel_decode`: K=8 chunks of 7-D
    actions, 56 zeroed slots + </s> after a 32-token prompt, bidirectional, no KV cache, the L1
    head) for the same bf16 7B weights (+ the bf16 L1 head) over the same meshes and batches
    (`--infer_devices` / `--infer_batches`; not part of the default --parts).

Peak per device = XLA argument + output - aliased + temporary bytes (`compiled.memory_analysis()`).
--backend=cpu compiles for simulated CPU devices: its temporaries are XLA:CPU's buffer assignment,
which with bf16 weights also holds float32 copies made for the CPU's matmuls (an overestimate);
--backend=tpu compiles the same programs with libtpu's TPU compiler (no TPU needed), whose figures
are what a chip would hold, and which refuses a program that exceeds the chip's memory. Nothing
is allocated. Each part runs in its own process (the device count is fixed when JAX starts) and
compiles one program at a time (~1 GB RSS each). Writes bench/results/plan_7b_memory.json and
prints one summary line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results", "plan_7b_memory.json")
GB = 1e9


def _child_env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


TPU_TRAIN_TOPOLOGY = "v5p:2x2x1"  # one v5p chip (95 GB HBM) holds the 7B LoRA step
TPU_INFER_TOPOLOGY = "v5e:2x4"    # v5e chips (16 GB HBM): the v5e-4 serving target
OFT_CHUNK = 8                     # OpenVLA-OFT's LIBERO recipe (configs/oft.py): K=8, L1 head


def _tpu_devices(topology: str) -> list:
    """The devices of a TPU topology for ahead-of-time compiles with libtpu's compiler (no TPU needed)."""
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)


def train_part(variant: str, backend: str = "cpu") -> dict:
    """One device, batch 8: the LoRA step with merged (`merged`) or per-layer (`per_layer`) adapters."""
    from vla_jax import plan as plan_lib
    from vla_jax.models import lora
    from vla_jax.training import run, state

    if backend == "tpu":  # plan() builds its mesh with run.make_mesh: give it one TPU chip instead
        chip, make_mesh = _tpu_devices(TPU_TRAIN_TOPOLOGY)[:1], run.make_mesh
        run.make_mesh = lambda mesh_cfg, devices=None: make_mesh(mesh_cfg, chip)

    cfg = run._load_config_file(os.path.join(REPO, "configs", "finetune.py") + ":lora=True")
    if variant == "merged":
        def merged_hooks(c):  # the previous default: every adapter folded into its kernel before the scan
            lcfg = lora.LoraConfig(rank=int(c.lora.rank), alpha=float(c.lora.alpha))
            return state.ParamHooks(**lora.hook_functions(lcfg, per_layer=False))
        run.param_hooks = merged_hooks  # plan() looks it up at call time
    elif variant != "per_layer":
        raise ValueError(f"variant {variant!r}: expected merged or per_layer")
    report = plan_lib.plan(cfg, 1, "1,1,1", batch=8)
    report["variant"], report["backend"] = variant, backend
    if backend == "tpu":
        report["device"] = f"{TPU_TRAIN_TOPOLOGY} chip 0"
    return report


def infer_part(devices_list, batches, prompt_len: int = 32, num_tokens: int = 7, backend: str = "cpu",
               oft_chunk: int = 0) -> list:
    """Rows of per-device memory of the policy's compiled decoder. oft_chunk > 0: OpenVLA-OFT's single
    pass with the L1 head and chunks of that many actions instead of the greedy decoder."""
    import dataclasses

    import jax

    from vla_jax.policy import mesh as policy_mesh
    from vla_jax.models.config import get_preset, with_dtypes
    from vla_jax.models.openvla import OpenVLA

    cfg = with_dtypes(get_preset("openvla-7b"), "bfloat16", "bfloat16", remat=False)
    if oft_chunk:
        cfg = dataclasses.replace(cfg, parallel_decoding=True, chunk_size=oft_chunk, action_head="l1")
        num_tokens = cfg.num_action_slots + 1  # the slots + </s>, all in one pass
    model = OpenVLA(cfg)
    out = []
    devices = _tpu_devices(TPU_INFER_TOPOLOGY) if backend == "tpu" else jax.devices()
    for n in devices_list:
        mesh = policy_mesh.as_mesh((1, 1, n), devices[:n])
        params = (policy_mesh.abstract_params if oft_chunk else policy_mesh.abstract_split_params)(cfg, mesh)
        for b in batches:
            t0 = time.perf_counter()
            row = {"devices": n, "mesh": dict(mesh.shape), "batch": b, "prompt_len": prompt_len,
                   "num_tokens": num_tokens, "backend": backend}
            if oft_chunk:
                row.update(decoder="oft_parallel_l1", chunk=oft_chunk)
            try:
                compiled = policy_mesh.compile_decoder(model, params, mesh, b, prompt_len, num_tokens)
            except Exception as e:  # the TPU compiler refuses programs larger than a chip's memory
                row.update(error=str(e).splitlines()[0][:400], compile_s=time.perf_counter() - t0)
                print(json.dumps(row), flush=True)
                out.append(row)
                continue
            mem = policy_mesh.memory_per_device(compiled)
            row.update(per_device_bytes=mem, compile_s=time.perf_counter() - t0)
            print(json.dumps(row), flush=True)
            out.append(row)
            del compiled
    return out


def _run_child(args: list, devices: int, backend: str, on_row=None) -> list:
    """Runs this script in a child process; returns the JSON rows it printed (each also passed to
    `on_row` as it arrives, so that a long run keeps what it has measured)."""
    env = _child_env(devices)
    if backend == "tpu":  # libtpu's compiler only (no TPU attached); other processes may hold its lock file
        env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + args + ["--backend", backend], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rows = []
    for line in proc.stdout:
        if line.startswith("{"):
            rows.append(json.loads(line))
            if on_row is not None:
                on_row(rows)
    err = proc.stderr.read()
    if proc.wait():
        raise RuntimeError(f"{args} failed:\n{err[-4000:]}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="train,infer")
    p.add_argument("--infer_devices", default="1,2,4,8")
    p.add_argument("--infer_batches", default="1,8,32")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--backend", default="cpu", choices=("cpu", "tpu"),
                   help="compiler: simulated CPU devices, or libtpu's TPU compiler ahead of time (needs libtpu; "
                        f"train on one chip of {TPU_TRAIN_TOPOLOGY}, inference on {TPU_INFER_TOPOLOGY} chips)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, _, arg = args.child.partition(":")
        if kind == "train":
            print(json.dumps(train_part(arg, args.backend)), flush=True)
        else:
            infer_part([int(x) for x in args.infer_devices.split(",")], [int(x) for x in args.infer_batches.split(",")],
                       backend=args.backend, oft_chunk=OFT_CHUNK if kind == "oft" else 0)
        return

    parts = args.parts.split(",")
    result = json.load(open(args.out)) if os.path.exists(args.out) else {}
    result.update({"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                              f"(simulated CPU devices; shared with other jobs)",
                   "command": "python bench/plan_7b_memory.py " + " ".join(sys.argv[1:])})
    sfx = "" if args.backend == "cpu" else "_" + args.backend
    if "train" in parts:
        result["train" + sfx] = [_run_child(["--child", f"train:{v}"], 1, args.backend)[0]
                                 for v in ("merged", "per_layer")]
        json.dump(result, open(args.out, "w"), indent=2)
    for part in ("infer", "oft"):
        if part not in parts:
            continue
        key = ("infer" if part == "infer" else "infer_oft") + sfx
        previous = [r for r in result.get(key, []) if (r["devices"], r["batch"]) not in {
            (int(d), int(b)) for d in args.infer_devices.split(",") for b in args.infer_batches.split(",")}]

        def save(rows, key=key, previous=previous):  # rows of other (devices, batch) points are kept
            result[key] = sorted(previous + list(rows), key=lambda r: (r["devices"], r["batch"]))
            json.dump(result, open(args.out, "w"), indent=2)

        save(_run_child(["--child", part, "--infer_devices", args.infer_devices, "--infer_batches",
                         args.infer_batches], max(int(x) for x in args.infer_devices.split(",")), args.backend, save))
    bits = []
    if "train" + sfx in result:
        m, pl = (r["per_device_bytes"]["peak_estimate"] / GB for r in result["train" + sfx])
        bits.append(f"[{args.backend}] 7B LoRA step, batch 8, 1 device: peak {m:.2f} GB merged -> {pl:.2f} GB "
                    f"per layer ({m - pl:.2f} GB less)")
    if "infer" + sfx in result:
        bits.append(f"[{args.backend}] 7B bf16 decode peak GB/device " + ", ".join(
            f"b{r['batch']}x{r['devices']}dev=" + (f"{r['per_device_bytes']['peak'] / GB:.2f}" if "error" not in r
                                                   else "does-not-fit") for r in result["infer" + sfx]))
    if "infer_oft" + sfx in result:
        bits.append(f"[{args.backend}] 7B bf16 OFT pass (K={OFT_CHUNK}, L1) peak GB/device " + ", ".join(
            f"b{r['batch']}x{r['devices']}dev=" + (f"{r['per_device_bytes']['peak'] / GB:.2f}" if "error" not in r
                                                   else "does-not-fit") for r in result["infer_oft" + sfx]))
    print("; ".join(bits))


if __name__ == "__main__":
    main()
