"""Plans: the train step or predict_action compiled for a target (simulated CPU devices or a TPU
topology), the fit verdict against the chip's HBM, roofline times, batch search and mesh checks."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from vla_jax.plan import chips, roofline, train_program

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh(text: str) -> Optional[Tuple[int, int, int]]:
    """'1,-1,1' -> (1, -1, 1) ordered (data, fsdp, tensor); '' -> None."""
    if not text:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh={text!r}: expected 3 integers data,fsdp,tensor (one may be -1), "
                         f"e.g. 1,-1,1") from None
    if len(sizes) != 3:
        raise ValueError(f"--mesh={text!r} must give 3 sizes: data,fsdp,tensor (one may be -1)")
    return sizes


def check_mesh(sizes: Sequence[int], num_chips: int, where: str) -> Tuple[int, int, int]:
    """Resolves one -1 and checks every axis divides the chips; ValueError names the axis."""
    sizes = list(sizes)
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {tuple(sizes)}: at most one axis may be -1")
    for axis, n in zip(MESH_AXES, sizes):
        if n == 0 or n < -1:
            raise ValueError(f"mesh axis '{axis}'={n}: sizes must be positive (or -1 for the rest)")
        if n != -1 and num_chips % n:
            raise ValueError(f"mesh axis '{axis}'={n} does not divide the {num_chips} chips of {where}")
    known = math.prod(n for n in sizes if n != -1)
    if -1 in sizes:
        if num_chips % known:
            raise ValueError(f"mesh {tuple(sizes)}: the given axes ({known} chips) do not divide the {num_chips} "
                             f"chips of {where}")
        sizes[sizes.index(-1)] = num_chips // known
    if math.prod(sizes) != num_chips:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} chips, "
                         f"but {where} has {num_chips}")
    return tuple(sizes)


def fit_verdict(peak: float, hbm: float, compiler_oom: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Peak bytes per chip against the chip's HBM. A program the TPU compiler refused (`aot.compile_or_oom`)
    does not fit, whatever the published HBM says; its margin is minus the compiler's own excess."""
    if compiler_oom is not None:
        return {"hbm_bytes": hbm, "fits": False, "margin_bytes": -compiler_oom["over_bytes"],
                "compiler_capacity_bytes": compiler_oom["capacity_bytes"]}
    return {"hbm_bytes": hbm, "fits": peak <= hbm, "margin_bytes": hbm - peak}


def suggest_batch(report: Dict[str, Any], hbm: float) -> Dict[str, int]:
    """When a train step does not fit: the per-chip micro-batch that would, assuming the temporaries scale
    with it (an estimate: --find_batch compiles to confirm), and the micro-batches for the same global batch."""
    pb = report["per_device_bytes"]
    fixed = pb["peak"] - pb["xla_temp"]
    per_chip = report["per_device_batch"] // report["config"]["grad_accum_steps"]
    room = hbm - fixed
    if room <= 0 or per_chip < 1:
        return {"micro_batch_per_chip": 0, "grad_accum_steps": 0}
    micro = 2 ** int(math.floor(math.log2(max(1.0, per_chip * room / max(pb["xla_temp"], 1)))))
    micro = min(micro, per_chip)
    if micro * pb["xla_temp"] / per_chip > room:
        micro = 0
    accum = report["per_device_batch"] // micro if micro else 0
    return {"micro_batch_per_chip": micro, "grad_accum_steps": accum}


def train_plan(cfg, devices, where: str, mesh: Optional[Sequence[int]] = None, batch: int = 0, grad_accum: int = 0,
               remat_policy: str = "nothing_saveable", llama_layers: int = 0, mfu: float = roofline.DEFAULT_MFU,
               keep_compiled: bool = False) -> Dict[str, Any]:
    """Compiles the train step of `cfg` for `devices` and adds the chip verdict and time estimates."""
    num = len(devices)
    sizes = check_mesh(mesh or (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), num, where)
    run_cfg = train_program.apply_overrides(cfg, sizes, batch, grad_accum)
    prog = train_program.build(run_cfg, devices, llama_layers=llama_layers, remat_policy=remat_policy)
    report = train_program.compile_program(prog, keep_hlo=keep_compiled)
    report["target"] = where
    if keep_compiled:
        report["_program"] = prog
    chip = chips.chip_for_device_kind(report["device_kind"])
    if chip is None:  # simulated CPU devices: no HBM, no roofline
        return report
    pb = report["per_device_bytes"]
    report["chip"] = {"name": chip.name, "peak_flops": chip.peak_flops, "hbm_bytes": chip.hbm_bytes,
                      "hbm_bandwidth": chip.hbm_bandwidth, "source": chip.source}
    report["fit"] = fit_verdict(pb["peak"], chip.hbm_bytes, report.get("compiler_oom"))
    if not report["fit"]["fits"]:
        report["fit"]["suggestion"] = suggest_batch(report, chip.hbm_bytes)
    if "compiler_oom" in report:  # no compiled program: no FLOPs to put on a roofline
        return report
    est = roofline.step_estimates(chip, report["compiled_flops_per_device"], report["compiled_bytes_per_device"],
                                  report["flops_per_device_per_step"], mfu)
    b = report["config"]["global_batch_size"]
    est["days_roofline"] = roofline.pretraining_days(est["roofline_s"], b)
    est["days_at_mfu"] = roofline.pretraining_days(est["at_mfu_s"], b)
    est["openvla_implied_a100_mfu"] = roofline.openvla_implied_mfu(report["flops_per_step"] / b)
    est["chip_days_at_mfu"] = est["days_at_mfu"] * num
    est["openvla_a100_days"] = roofline.OPENVLA_GPUS * roofline.OPENVLA_DAYS
    report["estimate"] = est
    return report


def inference_verdicts(r: Dict[str, Any], budget_gb: float = 0.0, passes: int = 1) -> Dict[str, Any]:
    """Adds to an inference report (predict_action / oft_predict): the chip HBM verdict, the roofline
    latency with the actions/s it allows, the weight-streaming bound (every weight read once per forward
    pass, `passes` per call: predict_action 7, oft_predict 1, compute at peak) and the --budget_gb verdict."""
    peak = r["per_device_bytes"]["peak"]
    chip = chips.chip_for_device_kind(r["device_kind"])
    if chip is not None:
        r["chip"] = {"name": chip.name, "hbm_bytes": chip.hbm_bytes, "peak_flops": chip.peak_flops,
                     "hbm_bandwidth": chip.hbm_bandwidth, "source": chip.source}
        r["fit"] = fit_verdict(peak, chip.hbm_bytes, r.get("compiler_oom"))
        if "compiled_flops_per_device" in r:
            e = roofline.step_estimates(chip, r["compiled_flops_per_device"], r["compiled_bytes_per_device"], 0.0)
            e["actions_per_s"] = r["actions_per_call"] / e["roofline_s"]
            e["weight_stream_s"] = passes * r["per_device_bytes"]["params"] / chip.hbm_bandwidth
            e["actions_per_s_weight_stream"] = r["actions_per_call"] / max(e["weight_stream_s"], e["compute_s"])
            r["estimate"] = e
    if budget_gb:  # a refused program's peak is what the compiler needed: compare that with the budget
        r["budget"] = fit_verdict(peak, budget_gb * 1e9)
    return r


def find_batch(cfg, devices, where: str, mesh=None, remat_policy: str = "nothing_saveable", start: int = 0,
               limit: int = 256, log=print) -> Dict[str, Any]:
    """Largest per-chip batch (one micro-batch) whose step fits the chip's HBM, by compiling powers of two
    up from (or down from) `start` (default: the config's per-chip batch); then the fewest micro-batches
    that keep the config's global batch within HBM. Returns {'largest_per_chip_batch', 'tried': [...],
    'grad_accum_steps', ...}."""
    num = len(devices)
    sizes = check_mesh(mesh or (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), num, where)
    dp = sizes[0] * sizes[1]
    tried: List[Dict[str, Any]] = []

    def attempt(per_chip: int, accum: int = 1, global_batch: int = 0):
        gb = global_batch or per_chip * dp
        r = train_plan(cfg, devices, where, sizes, gb, accum, remat_policy)
        row = {"global_batch": gb, "grad_accum_steps": accum, "per_chip_micro_batch": gb // dp // accum,
               "peak_bytes": r["per_device_bytes"]["peak"], "fits": r["fit"]["fits"]}
        tried.append(row)
        log(f"  per-chip micro-batch {row['per_chip_micro_batch']:4d} x {accum} micro-batch(es): peak "
            f"{row['peak_bytes'] / 1e9:6.2f} GB of {r['chip']['hbm_bytes'] / 1e9:.1f} GB -> "
            f"{'fits' if row['fits'] else 'does not fit'}")
        return row["fits"]

    per_chip = start or max(1, cfg.global_batch_size // dp)
    best = 0
    if attempt(per_chip):
        best = per_chip
        while per_chip * 2 <= limit and attempt(per_chip * 2):
            per_chip *= 2
            best = per_chip
    else:
        while per_chip > 1:
            per_chip //= 2
            if attempt(per_chip):
                best = per_chip
                break
    out = {"largest_per_chip_batch": best, "tried": tried, "mesh": dict(zip(MESH_AXES, sizes))}
    want = cfg.global_batch_size // dp
    if best and want > best and cfg.global_batch_size % dp == 0:
        accum = -(-want // best)
        while want % accum:
            accum += 1
        while accum <= want and not attempt(0, accum, cfg.global_batch_size):
            accum += 1
            while want % accum:
                accum += 1
        out["grad_accum_steps"] = accum
    elif best:
        out["grad_accum_steps"] = 1
    return out
