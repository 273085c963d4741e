"""Roofline step time and what it means for OpenVLA's pretraining run, as estimates.

A step cannot be faster than its compute at the chip's peak nor than its memory traffic at the chip's
HBM bandwidth (vla_jax.plan.chips, vendor numbers): roofline = max(flops / peak, bytes / bandwidth),
both per chip from the compiled program (vla_jax.plan.hlo_cost). Real steps are slower (collectives
not fully overlapped, imperfect MXU use, input pipeline), so the plan also reports the time at an
assumed model-FLOPs utilisation (MFU: analytic model FLOPs / (time x peak)); 40% is what OpenVLA's own
run implies (below), and what large dense transformers commonly reach.

OpenVLA's pretraining (OPENVLA_REFERENCE.md §9-10): the released checkpoint is step 295,000 at global
batch 2048, i.e. 604M samples, which the paper calls 27 epochs over its OXE mix; it took 64 A100s for
14 days (21,500 A100-hours). At our analytic FLOPs per sample that run averaged
`OPENVLA_A100_IMPLIED_MFU` of the A100's 312 TFLOP/s bf16 peak (computed in `openvla_implied_mfu`).
"""

from __future__ import annotations

from typing import Dict

OPENVLA_STEPS = 295_000          # released checkpoint: step-295000-epoch-40 (paper: 27 epochs)
OPENVLA_GLOBAL_BATCH = 2048
OPENVLA_SAMPLES = OPENVLA_STEPS * OPENVLA_GLOBAL_BATCH
OPENVLA_GPUS, OPENVLA_DAYS = 64, 14.0
A100_PEAK_BF16 = 312e12          # NVIDIA A100 datasheet, dense bf16 Tensor Core
DEFAULT_MFU = 0.40


def openvla_implied_mfu(flops_per_sample: float) -> float:
    """MFU that OpenVLA's 64 x A100 x 14 days must have averaged for OPENVLA_SAMPLES at `flops_per_sample`."""
    return OPENVLA_SAMPLES * flops_per_sample / (OPENVLA_GPUS * A100_PEAK_BF16 * OPENVLA_DAYS * 86400)


def step_estimates(chip, compiled_flops: float, compiled_bytes: float, model_flops: float,
                   mfu: float = DEFAULT_MFU) -> Dict[str, float]:
    """Per-chip times of one step: roofline (from the compiled program) and at `mfu` (from model FLOPs)."""
    t_compute = compiled_flops / chip.peak_flops
    t_memory = compiled_bytes / chip.hbm_bandwidth
    roof = max(t_compute, t_memory)
    return {"roofline_s": roof, "compute_s": t_compute, "memory_s": t_memory,
            "bound": "compute" if t_compute >= t_memory else "memory",
            "roofline_mfu": model_flops / (roof * chip.peak_flops) if roof > 0 else 0.0,
            "at_mfu_s": model_flops / (mfu * chip.peak_flops), "mfu": mfu}


def pretraining_days(step_seconds: float, global_batch: int) -> float:
    """Days for OpenVLA's 604M samples at `step_seconds` per step of `global_batch` samples."""
    return OPENVLA_SAMPLES / global_batch * step_seconds / 86400.0
