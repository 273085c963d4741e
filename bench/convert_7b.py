"""Full-size OpenVLA-7B conversion benchmark: HF -> vla_jax (orbax) -> HF, wall time and peak RSS.

    python bench/convert_7b.py [--workdir=/tmp] [--tokenizer=PATH/tokenizer.model] [--keep]

1. gen:    a synthetic openvla-7b HF folder: random bf16 values under exactly the released key names
           and shapes (tests/fixtures/openvla_7b_keys.txt, transcribed from OPENVLA_REFERENCE.md §8),
           ~15.1 GB in 4 shards written by the safetensors library, plus the released config.json
           layout, dataset_statistics.json and the Llama-2 tokenizer.
2. import: `vla_jax.hf.import_hf` (params kept in bf16, the stored dtype) -> orbax workdir.
3. export: `vla_jax.hf.export_checkpoint` -> HF folder (bf16, 5GB shards).
4. verify: every exported tensor is byte-identical to the input one.
Each phase runs in its own process; import/export report their wall time and peak RSS (ru_maxrss)
against the bf16 parameter bytes. Needs ~47 GB free disk; everything is deleted afterwards unless
--keep. Writes bench/results/convert_7b.json and prints one summary line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results", "convert_7b.json")
sys.path.insert(0, REPO)
from tests.fixtures.released_openvla_7b import released_config, released_keys  # noqa: E402

DEFAULT_TOKENIZER = os.path.join(REPO, "tests", "fixtures", "data", "llama2_tokenizer", "tokenizer.model")
GEN_SHARD_BYTES = 4 * 10 ** 9
STATS = {"bridge_orig": {
    "action": {"mean": [0.0] * 7, "std": [1.0] * 7, "max": [1.0] * 7, "min": [-1.0] * 7,
               "q01": [-0.03, -0.04, -0.03, -0.2, -0.2, -0.3, 0.0], "q99": [0.03, 0.04, 0.04, 0.2, 0.2, 0.3, 1.0],
               "mask": [True] * 6 + [False]},
    "proprio": {k: [0.0] * 7 for k in ("mean", "std", "max", "min", "q01", "q99")},
    "num_transitions": 1000, "num_trajectories": 10}}
CONFIG = released_config(STATS)  # the released config.json layout (OPENVLA_REFERENCE.md §8)


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("MemAvailable")) / 2 ** 20


def phase_gen(hf_dir: str, tokenizer: str) -> dict:
    import ml_dtypes
    import numpy as np
    import safetensors.numpy

    os.makedirs(hf_dir)
    rng = np.random.default_rng(0)
    rows = released_keys()
    shards, size = [[]], 0
    for key, shape in rows:
        n = math.prod(shape) * 2
        if shards[-1] and size + n > GEN_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += n
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard:
            bits = rng.integers(0, 2 ** 16, size=shape, dtype=np.uint16)
            # random sign and mantissa, exponent fixed: values +-[2^-7, 2^-6), finite, weight-like scale
            tensors[key] = ((bits & np.uint16(0x807F)) | np.uint16(0x3C00)).view(ml_dtypes.bfloat16)
            weight_map[key] = name
            total += tensors[key].nbytes
        safetensors.numpy.save_file(tensors, os.path.join(hf_dir, name), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(CONFIG, f)
    with open(os.path.join(hf_dir, "dataset_statistics.json"), "w") as f:
        json.dump(STATS, f)
    shutil.copyfile(tokenizer, os.path.join(hf_dir, "tokenizer.model"))
    return {"tensors": len(rows), "param_bytes": total, "shards": len(shards)}


def phase_import(hf_dir: str, work: str) -> dict:
    from vla_jax.hf import import_checkpoint

    import_checkpoint.use_host_devices()  # what the CLI does
    base = _rss_gib()
    t = time.perf_counter()
    s = import_checkpoint.import_hf(hf_dir, work, log=lambda m: print("  import:", m, flush=True))
    return {"wall_s": time.perf_counter() - t, "convert_s": s["convert_s"], "write_s": s["write_s"],
            "peak_rss_gib": _peak_gib(), "rss_after_imports_gib": base, "param_dtype": s["config"].param_dtype}


def phase_export(work: str, out: str) -> dict:
    from vla_jax.hf import exporter

    base = _rss_gib()
    t = time.perf_counter()
    files = exporter.export_checkpoint(work, out, dtype="bfloat16", max_shard_size="5GB")
    return {"wall_s": time.perf_counter() - t, "peak_rss_gib": _peak_gib(), "rss_after_imports_gib": base,
            "shards": len([f for f in files if f.endswith(".safetensors")]), "files": files}


def phase_verify(a: str, b: str) -> dict:
    from vla_jax.hf import safetensors_io as sio

    ta, tb = sio.index_tensors(a), sio.index_tensors(b)
    if {k: (v.shape, v.dtype) for k, v in ta.items()} != {k: (v.shape, v.dtype) for k, v in tb.items()}:
        return {"identical": False, "why": "key/shape/dtype sets differ"}
    digests = {}
    for info, arr in sio.iter_tensors(sio.read_order(ta.values())):
        digests[info.key] = hashlib.sha1(arr.tobytes()).hexdigest()
    bad = [info.key for info, arr in sio.iter_tensors(sio.read_order(tb.values()))
           if hashlib.sha1(arr.tobytes()).hexdigest() != digests[info.key]]
    return {"identical": not bad, "tensors": len(ta), "first_mismatch": bad[:1]}


def _child(phase: str, *args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase, *args]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout
    print(out, end="", flush=True)
    if proc.returncode:
        raise RuntimeError(f"phase {phase} failed with exit status {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--force", action="store_true", help="run even when less memory is available")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        fn = {"gen": lambda: phase_gen(a.paths[0], a.tokenizer), "import": lambda: phase_import(*a.paths),
              "export": lambda: phase_export(*a.paths), "verify": lambda: phase_verify(*a.paths)}[a.phase]
        print(json.dumps(fn()), flush=True)
        return 0

    free = shutil.disk_usage(a.workdir).free / 1e9
    if free < 47:
        print(f"need ~47 GB free in {a.workdir}, have {free:.0f} GB", file=sys.stderr)
        return 2
    avail = _mem_available_gib()
    if avail < 18.5 and not a.force:
        print(f"need ~18.5 GiB of available memory (the import holds 14 GiB of bf16 params), have {avail:.1f} GiB; "
              f"--force to try anyway", file=sys.stderr)
        return 2
    root = tempfile.mkdtemp(prefix="convert_7b-", dir=a.workdir)
    hf_in, work, hf_out = (os.path.join(root, n) for n in ("hf_in", "work", "hf_out"))
    try:
        t = time.perf_counter()
        gen = _child("gen", hf_in)
        gen["wall_s"] = time.perf_counter() - t
        imp = _child("import", hf_in, work)
        exp = _child("export", work, hf_out)
        ver = _child("verify", hf_in, hf_out)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    gb = gen["param_bytes"] / 2 ** 30
    shard_gib = 5e9 / 2 ** 30
    result = {
        "machine": {"cpus": os.cpu_count(), "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
                                                                 / 2 ** 30, 1), "python": platform.python_version()},
        "param_bytes_bf16": gen["param_bytes"], "param_gib_bf16": round(gb, 3), "tensors": gen["tensors"],
        "input_shards": gen["shards"], "gen": gen,
        "import": dict(imp, peak_rss_over_params=round(imp["peak_rss_gib"] / gb, 3)),
        "export": dict(exp, peak_rss_over_params=round(exp["peak_rss_gib"] / gb, 3),
                       target_gib_params_plus_one_shard=round(gb + shard_gib, 2)),
        "round_trip_bit_identical": ver["identical"], "verify": ver,
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=2)
    print(f"convert_7b: {gb:.2f} GiB bf16 params; import {imp['wall_s']:.0f} s, peak RSS {imp['peak_rss_gib']:.2f} GiB "
          f"({result['import']['peak_rss_over_params']:.2f}x params); export {exp['wall_s']:.0f} s, peak RSS "
          f"{exp['peak_rss_gib']:.2f} GiB ({result['export']['peak_rss_over_params']:.2f}x); round trip "
          f"{'bit-identical' if ver['identical'] else 'DIFFERS'}")
    return 0 if ver["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
