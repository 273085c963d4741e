"""vla_jax next to OpenVLA's PyTorch stack (timm + transformers), on the same machine, in the same run.

    python bench/compare_torch.py [--setups=debug,mid] [--cores=0,1] [--train-reps=20] [--infer-reps=20]

For each setup (the 'debug' and 'mid' geometries of bench/compare_setup.py), fp32 on both sides:
1. `torch_side.py prepare`: random weights (TorchOpenVLA.randomize) saved in the released HF key
   layout, one synthetic training batch, and torch's reference values (loss at step 0, loss after one
   AdamW step, 7 greedy tokens).
2. `jax_side.py`: imports the same weights, asserts it reproduces those values, then times.
3. `torch_side.py time`: times the same work.
Each step is its own process pinned with `taskset -c CORES`, so each side's peak RSS (ru_maxrss) is
its own and neither allocator affects the other. Timings: median and p90 of --train-reps optimizer
steps (after 2 warm-up steps) and of --infer-reps batch-1 actions; batch 8/32 throughput over
--batch-reps calls. JAX compile time is measured and reported separately.

--malloc picks glibc's allocator settings, the same for both sides: 'system' (glibc's defaults) and/or
'reuse' (`REUSE_MALLOC_ENV`: one arena, no mmap-backed blocks, no trimming, so freed memory is reused
instead of being unmapped and faulted back in page by page; XLA:CPU maps a fresh 1.4 GB temporary
buffer for every 'mid' train step under the defaults). The headline ratios are the 'system' ones.

--steps-per-call=4 (default) also times vla_jax with 4 optimizer steps per compiled call (train.py's
config.steps_per_call: the same updates; XLA:CPU's temporary buffer is then mapped once per call);
that variant is the training headline, one step per call is reported beside it.

Writes bench/results/compare_torch.json (top-level `train_speedup_vs_torch` and
`latency_speedup_vs_torch`: vla_jax speed / torch speed at the 'mid' setup, > 1 = vla_jax faster;
`train_steps_per_call` says which variant; `train_speedup_vs_torch_one_step_per_call`)
and prints a table. The load average is recorded at start and end: other jobs on the same cores
make every number noisier.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import compare_setup as cs  # noqa: E402

HEADLINE_SETUP = "mid"
# glibc malloc settings of --malloc=reuse (environment variables read at process start).
REUSE_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}
MALLOCS = {"system": {}, "reuse": REUSE_MALLOC_ENV}


def _run(args, cores: str, env_extra: dict, what: str) -> float:
    env = dict(os.environ, PYTHONPATH=cs.REPO, TF_CPP_MIN_LOG_LEVEL="2", **env_extra)
    cmd = ["taskset", "-c", cores, sys.executable] + args
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cs.REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return round(time.perf_counter() - t0, 1)


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": model,
            "cpus": os.cpu_count(), "memory_gb": round(mem_gb, 1)}


def ratio(a, b) -> float:
    return round(a / b, 2) if a and b else float("nan")


def train_ratios(j: dict, th: dict) -> dict:
    """A vla_jax train timing `j` against torch's (`th`: torch_side's JSON): wall, CPU-time and
    same-FLOPs ratios (the last against torch with the lm_head at the supervised positions only)."""
    return {"speedup": ratio(j["samples_per_s"], th["train"]["samples_per_s"]),
            "speedup_cpu_time": ratio(th["train"].get("cpu_median_ms"), j.get("cpu_median_ms")),
            "speedup_same_flops": ratio(j["samples_per_s"], th["train_supervised_logits"]["samples_per_s"])}


def summarize(setup: str, malloc: str, jx: dict, th: dict, ref: dict) -> dict:
    """Per-setup record; ratios are vla_jax speed / torch speed (> 1: vla_jax faster)."""
    out = {"setup": setup, "malloc": malloc, "geometry": cs.SETUPS[setup], "reference": ref,
           "train": {"vla_jax": jx["train"], "torch": th["train"], **train_ratios(jx["train"], th),
                     # Diagnostic: torch with the lm_head at the supervised positions only (our FLOPs).
                     "torch_supervised_logits": th["train_supervised_logits"]},
           "inference": {}, "peak_rss_mb": {"vla_jax": jx["peak_rss_mb"], "torch": th["peak_rss_mb"]},
           "rss_after_setup_mb": {"vla_jax": jx["rss_after_setup_mb"], "torch": th["rss_after_setup_mb"]},
           "jax_compile_s": {"train_step": jx["train"]["compile_s"], **jx["inference"]["compile_s"]},
           "load": {"jax_start": jx["start"]["loadavg"], "jax_end": jx["end"]["loadavg"],
                    "torch_start": th["start"]["loadavg"], "torch_end": th["end"]["loadavg"]},
           "versions": {"jax": jx["jax"], "torch": th["torch"], "torch_threads": th["threads"],
                        "torch_attn": th["attn_implementation"]}}
    # vla_jax with several optimizer steps per compiled call (train.py's config.steps_per_call), per step.
    out["train"]["steps_per_call"] = {n: {"vla_jax": j, **train_ratios(j, th)}
                                      for n, j in jx.get("train_steps_per_call", {}).items()}
    for b in map(str, cs.INFER_BATCHES):
        j, t = jx["inference"][b], th["inference"][b]
        out["inference"][b] = {"vla_jax": j, "torch": t, "speedup": ratio(t["median_ms"], j["median_ms"]),
                               "speedup_cpu_time": ratio(t.get("cpu_median_ms"), j.get("cpu_median_ms"))}
    return out


def print_table(results: list) -> None:
    print(f"{'setup':6} {'train samples/s (jax / torch = x)':34} {'batch-1 ms/action (jax / torch = x)':38} "
          f"{'b8 actions/s':22} {'b32 actions/s':22} {'peak RSS MB jax/torch':22}")
    for r in results:
        tr, inf = r["train"], r["inference"]
        print(f"{r['setup']:6} (malloc: {r.get('malloc', 'system')})")
        print(f"{'':6} {tr['vla_jax']['samples_per_s']:8.2f} / {tr['torch']['samples_per_s']:8.2f} = "
              f"{tr['speedup']:5.2f}x       "
              f"{inf['1']['vla_jax']['median_ms']:8.1f} / {inf['1']['torch']['median_ms']:8.1f} = "
              f"{inf['1']['speedup']:5.2f}x        "
              f"{inf['8']['vla_jax']['actions_per_s']:7.1f} / {inf['8']['torch']['actions_per_s']:7.1f}    "
              f"{inf['32']['vla_jax']['actions_per_s']:7.1f} / {inf['32']['torch']['actions_per_s']:7.1f}    "
              f"{r['peak_rss_mb']['vla_jax']:7.0f} / {r['peak_rss_mb']['torch']:7.0f}", flush=True)
        print(f"{'':6} by process CPU time (less sensitive to other jobs): train {tr['speedup_cpu_time']}x, "
              f"batch 1 {inf['1']['speedup_cpu_time']}x, batch 8 {inf['8']['speedup_cpu_time']}x, "
              f"batch 32 {inf['32']['speedup_cpu_time']}x; vla_jax compile: train step "
              f"{r['jax_compile_s']['train_step']} s, decode buckets "
              f"{sum(v for k, v in r['jax_compile_s'].items() if k != 'train_step'):.1f} s", flush=True)
        for n, v in tr.get("steps_per_call", {}).items():
            print(f"{'':6} vla_jax with {n} steps per call: {v['vla_jax']['samples_per_s']:.2f} samples/s = "
                  f"{v['speedup']}x torch (CPU time {v['speedup_cpu_time']}x)", flush=True)
        print(f"{'':6} diagnostic: torch with logits only at the supervised positions (vla_jax's FLOPs) "
              f"{tr['torch_supervised_logits']['samples_per_s']:.2f} samples/s; vla_jax / that = "
              f"{tr['speedup_same_flops']}x", flush=True)


def markdown(report: dict) -> str:
    """The BENCHMARKS.md table of a results JSON (python bench/compare_torch.py --markdown FILE)."""
    rows = ["| setup | | train samples/s | batch-1 ms/action (p90) | batch 8 actions/s | batch 32 actions/s "
            "| peak RSS MB | compile s |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        tr, inf = r["train"], r["inference"]
        r = dict(r, setup=f"{r['setup']} ({r.get('malloc', 'system')} malloc)")
        for side in ("vla_jax", "torch"):
            comp = (f"{r['jax_compile_s']['train_step']} + "
                    f"{sum(v for k, v in r['jax_compile_s'].items() if k != 'train_step'):.1f}") if side == "vla_jax" else "-"
            rows.append(f"| {r['setup']} | {side} | {tr[side]['samples_per_s']:.2f} | "
                        f"{inf['1'][side]['median_ms']:.1f} ({inf['1'][side]['p90_ms']:.1f}) | "
                        f"{inf['8'][side]['actions_per_s']:.1f} | {inf['32'][side]['actions_per_s']:.1f} | "
                        f"{r['peak_rss_mb'][side]:.0f} | {comp} |")
        rows.append(f"| {r['setup']} | **ratio** (wall; CPU time) | **{tr['speedup']}x** ({tr['speedup_cpu_time']}x) | "
                    f"**{inf['1']['speedup']}x** ({inf['1']['speedup_cpu_time']}x) | {inf['8']['speedup']}x "
                    f"({inf['8']['speedup_cpu_time']}x) | {inf['32']['speedup']}x ({inf['32']['speedup_cpu_time']}x) | | |")
        for n, v in tr.get("steps_per_call", {}).items():
            rows.append(f"| {r['setup']} | vla_jax, {n} steps per call (ratio: wall; CPU time) | "
                        f"{v['vla_jax']['samples_per_s']:.2f} (**{v['speedup']}x**; {v['speedup_cpu_time']}x) "
                        f"| | | | | {v['vla_jax']['compile_s']} |")
        if "torch_supervised_logits" in tr:
            same = tr["torch_supervised_logits"]
            more = "; ".join(f"{n} steps per call {v['speedup_same_flops']}x" for n, v in tr.get("steps_per_call", {}).items()
                             if "speedup_same_flops" in v)
            rows.append(f"| {r['setup']} | torch, logits at the supervised positions only (diagnostic) | "
                        f"{same['samples_per_s']:.2f} (vla_jax {tr['speedup_same_flops']}x{'; ' + more if more else ''}) "
                        f"| | | | | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", default="debug,mid")
    p.add_argument("--cores", default=",".join(map(str, sorted(os.sched_getaffinity(0)))))
    p.add_argument("--train-reps", type=int, default=20)
    p.add_argument("--infer-reps", type=int, default=20)
    p.add_argument("--batch-reps", type=int, default=5)
    p.add_argument("--malloc", default="system,reuse", help="glibc malloc settings to run, both sides alike: "
                   "system (defaults) and/or reuse (REUSE_MALLOC_ENV)")
    p.add_argument("--steps-per-call", default="4", help="vla_jax train variants besides one step per call "
                   "(comma-separated; config.steps_per_call); the largest is the training headline")
    p.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention (torch side)")
    p.add_argument("--out", default=os.path.join(cs.REPO, "bench", "results", "compare_torch.json"))
    p.add_argument("--markdown", metavar="RESULTS_JSON", help="only print the BENCHMARKS.md table of a results file")
    a = p.parse_args(argv)
    if a.markdown:
        with open(a.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    setups = [s.strip() for s in a.setups.split(",") if s.strip()]
    unknown = [s for s in setups if s not in cs.SETUPS]
    if unknown:
        raise ValueError(f"--setups has unknown names {unknown}; known: {sorted(cs.SETUPS)}")
    mallocs = [m.strip() for m in a.malloc.split(",") if m.strip()]
    if not mallocs or any(m not in MALLOCS for m in mallocs):
        raise ValueError(f"--malloc={a.malloc!r}: expected a comma-separated subset of {sorted(MALLOCS)}")
    reps = ["--train-reps", str(a.train_reps), "--infer-reps", str(a.infer_reps), "--batch-reps", str(a.batch_reps)]
    torch_env = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    report = {"benchmark": "compare_torch", "machine": machine(), "cores": a.cores,
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "reps": {k: v for k, v in vars(a).items() if k != "out"},
              "torch_env": torch_env, "results": []}
    t_all = time.perf_counter()
    for setup in setups:
        with tempfile.TemporaryDirectory(prefix=f"compare_torch_{setup}_") as d:
            prepare_s = _run([os.path.join(BENCH, "torch_side.py"), "prepare", f"--setup={setup}", f"--dir={d}",
                              f"--attn={a.attn}"], a.cores, torch_env, "torch prepare")
            for malloc in mallocs:
                env = MALLOCS[malloc]
                walls = {"prepare_s": prepare_s}
                walls["jax_s"] = _run([os.path.join(BENCH, "jax_side.py"), f"--setup={setup}", f"--dir={d}",
                                       f"--steps-per-call={a.steps_per_call}"] + reps,
                                      a.cores, env, f"vla_jax side ({malloc} malloc)")
                walls["torch_s"] = _run([os.path.join(BENCH, "torch_side.py"), "time", f"--setup={setup}",
                                         f"--dir={d}", f"--attn={a.attn}"] + reps, a.cores, dict(torch_env, **env),
                                        f"torch side ({malloc} malloc)")
                loaded = {}
                for name in ("jax", "torch", "reference"):
                    with open(os.path.join(d, f"{name}.json")) as f:
                        loaded[name] = json.load(f)
                r = summarize(setup, malloc, loaded["jax"], loaded["torch"], loaded["reference"])
                r["wall_s"] = walls
                report["results"].append(r)
                print_table([r])
    setup_rows = [r for r in report["results"] if r["setup"] == HEADLINE_SETUP] or report["results"][-1:]
    head = next((r for r in setup_rows if r["malloc"] == "system"), setup_rows[0])
    reuse = next((r for r in setup_rows if r["malloc"] == "reuse"), None)
    report["headline_malloc"] = head["malloc"]
    report["headline_setup"] = head["setup"]
    # Training headline: the largest steps_per_call measured (what train.py runs with that setting);
    # one step per call stays beside it.
    def train_headline(r):  # -> (steps per call, its ratios)
        variants = r["train"].get("steps_per_call", {})
        n = max(variants, key=int) if variants else None
        return (1, r["train"]) if n is None else (int(n), variants[n])

    report["train_steps_per_call"], tr = train_headline(head)
    report["train_speedup_vs_torch"] = tr["speedup"]
    report["train_speedup_vs_torch_one_step_per_call"] = head["train"]["speedup"]
    report["latency_speedup_vs_torch"] = head["inference"]["1"]["speedup"]
    report["train_speedup_vs_torch_cpu_time"] = tr["speedup_cpu_time"]
    report["latency_speedup_vs_torch_cpu_time"] = head["inference"]["1"]["speedup_cpu_time"]
    report["train_speedup_vs_torch_same_flops"] = tr["speedup_same_flops"]
    if reuse is not None and head is not reuse:
        report["train_speedup_vs_torch_malloc_reuse"] = train_headline(reuse)[1]["speedup"]
        report["train_speedup_vs_torch_one_step_per_call_malloc_reuse"] = reuse["train"]["speedup"]
        report["latency_speedup_vs_torch_malloc_reuse"] = reuse["inference"]["1"]["speedup"]
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"compare_torch ({head['setup']}): train {report['train_speedup_vs_torch']}x torch's samples/s "
          f"({report['train_steps_per_call']} steps per call; one per call "
          f"{report['train_speedup_vs_torch_one_step_per_call']}x), "
          f"batch-1 latency {report['latency_speedup_vs_torch']}x faster ({report['headline_malloc']} malloc"
          + (f"; with malloc reuse on both sides: train {report['train_speedup_vs_torch_malloc_reuse']}x, batch-1 "
             f"{report['latency_speedup_vs_torch_malloc_reuse']}x" if "train_speedup_vs_torch_malloc_reuse" in report
             else "") + f"); load average "
          f"{report['loadavg_start'][0]} -> {report['loadavg_end'][0]}; {report['wall_s']} s; wrote {a.out}")
    if max(report["loadavg_start"][0], report["loadavg_end"][0]) > 0.5 * len(a.cores.split(",")):
        print("warning: other jobs were running on this machine; rerun on a quiet machine for clean numbers",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
