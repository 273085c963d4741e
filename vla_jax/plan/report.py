"""Plain-text reports of the plans (what `python -m vla_jax.plan` prints)."""

from __future__ import annotations

from typing import Any, Dict

GB = 1e9


def _gb(x: float, width: int = 8, digits: int = 2) -> str:
    return f"{x / GB:{width}.{digits}f} GB"


def format_train(r: Dict[str, Any]) -> str:
    m, c, pb = r["mesh"], r["config"], r["per_device_bytes"]
    unit = "chip" if "chip" in r else "device"
    lines = [
        f"{c['preset']}: {r['params']:,} params ({r['trainable_params']:,} trainable), {c['param_dtype']} master "
        f"weights, {c['dtype']} compute, remat={c['remat']} (Llama policy {c['remat_policy']})"
        + (f", {c['llama_layers']} Llama layers" if c["llama_layers"] != 32 else ""),
        f"target {r['target']}: {r['devices']} x {r['device_kind']}; mesh data={m['data']} fsdp={m['fsdp']} "
        f"tensor={m['tensor']}",
        f"global batch {c['global_batch_size']} ({r['per_device_batch']} per {unit}, {c['grad_accum_steps']} "
        f"micro-batch(es)), {c['sequence_len']} tokens ({c['text_len']} text + image patches)",
        f"per {unit}:",
        f"  parameters        {_gb(pb['params'])}",
        f"  optimizer state   {_gb(pb['optimizer_state'])}",
        f"  batch             {_gb(pb['batch'], digits=3)}",
    ]
    if "compiler_oom" in r:
        oom = r["compiler_oom"]
        lines += [f"  needed            {_gb(pb['peak'])} by the TPU compiler's buffer assignment, which refused the "
                  f"program: {oom['message']}",
                  f"  of which beyond the state and batch {_gb(pb['xla_temp'], 0)} (activations, gradients, outputs)"]
    else:
        lines += [
            f"  XLA arguments     {_gb(pb['xla_argument'])} (state + batch)",
            f"  XLA outputs       {_gb(pb['xla_output'])} ({_gb(pb['xla_alias'], 0)} of them reuse the donated "
            "arguments)",
            f"  XLA temporaries   {_gb(pb['xla_temp'])} (activations, gradients, collectives"
            + ("; CPU estimate)" if "chip" not in r else ")"),
            f"  peak{' estimate' if 'chip' not in r else '         '}     {_gb(pb['peak'])} (arguments + outputs - "
            "donated + temporaries + code)",
        ]
    if "chip" in r:
        ch, fit = r["chip"], r["fit"]
        verdict = (f"fits, {fit['margin_bytes'] / GB:.2f} GB to spare" if fit["fits"]
                   else f"DOES NOT FIT: over by {-fit['margin_bytes'] / GB:.2f} GB")
        lines.append(f"  chip HBM          {_gb(ch['hbm_bytes'])} ({ch['name']}) -> {verdict}")
        if not fit["fits"]:
            s = fit["suggestion"]
            if s["micro_batch_per_chip"]:
                lines.append(f"  suggestion: per-chip micro-batch {s['micro_batch_per_chip']} (--grad_accum="
                             f"{s['grad_accum_steps']} for the same global batch, or --batch="
                             f"{s['micro_batch_per_chip'] * m['data'] * m['fsdp']}); estimated from the "
                             f"temporaries, confirm with --find_batch")
            else:
                lines.append("  suggestion: the state alone does not fit: use more chips (a larger slice) or "
                             "shard over more of them (--mesh)")
    lines += _budget_lines(r)
    if "compiler_oom" in r:
        s = r["seconds"]
        lines.append(f"(traced+lowered in {s['trace_and_lower']:.1f} s, compile refused after {s['compile']:.1f} s)")
        return "\n".join(lines)
    a, cf = r["flops_per_device_per_step"], r["compiled_flops_per_device"]
    lines.append(f"FLOPs per {unit} per step: compiled {cf:.3e} (matmuls; {len(r['compiled_loops'])} loops counted "
                 f"by trip count), analytic model {a:.3e} (ratio {cf / a:.2f}: remat recomputation and "
                 f"attention padding)")
    if "estimate" in r:
        e, ch = r["estimate"], r["chip"]
        lines += [
            f"roofline step time {e['roofline_s']:.3f} s ({e['bound']}-bound: compute {e['compute_s']:.3f} s at "
            f"{ch['peak_flops'] / 1e12:.0f} TFLOP/s, HBM traffic {r['compiled_bytes_per_device'] / GB:.1f} GB at "
            f"{ch['hbm_bandwidth'] / GB:.0f} GB/s {e['memory_s']:.3f} s); MFU at the roofline {e['roofline_mfu']:.0%}",
            f"at {e['mfu']:.0%} MFU: {e['at_mfu_s']:.3f} s/step -> OpenVLA's pretraining (295k steps x 2048 = 604M "
            f"samples, '27 epochs') in {e['days_at_mfu']:.1f} days on this slice at this batch "
            f"({e['days_roofline']:.1f} days at the roofline)",
            f"  for comparison (an estimate): OpenVLA took 14 days on 64 A100s = {e['openvla_a100_days']:.0f} "
            f"A100-days, which at our FLOPs per sample means {e['openvla_implied_a100_mfu']:.0%} MFU on the A100; "
            f"this plan: {e['chip_days_at_mfu']:.0f} {ch['name']}-chip-days",
        ]
    s = r["seconds"]
    lines.append(f"(traced+lowered in {s['trace_and_lower']:.1f} s, compiled in {s['compile']:.1f} s)")
    if not r["activation_constraints"]:
        lines.append("WARNING: compiled without activation sharding constraints (the model does not trace under "
                     "a mesh); XLA may replicate activations, so the temporaries above can be far too high")
    return "\n".join(lines)


def _budget_lines(r: Dict[str, Any]) -> list:
    """--budget_gb: the peak against a memory budget other than the chip's (e.g. a 40 GB accelerator)."""
    if "budget" not in r:
        return []
    b = r["budget"]
    verdict = (f"within it, {b['margin_bytes'] / GB:.2f} GB to spare" if b["fits"]
               else f"OVER it by {-b['margin_bytes'] / GB:.2f} GB")
    return [f"  budget            {_gb(b['hbm_bytes'])} (--budget_gb) -> peak {verdict}"]


def format_inference(r: Dict[str, Any]) -> str:
    """predict_action (prefill + cached steps, 1 action per row) and oft_predict (one pass, K per row)."""
    pb, m = r["per_device_bytes"], r["mesh"]
    if r["program"] == "oft_predict":
        what = (f"oft_predict ({r['preset']}, {r['dtype']} weights, head {r['action_head']}, chunk K={r['chunk_size']}) "
                f"batch {r['batch']}: one pass over {r['sequence_len']} positions -> {r['actions_per_call']} actions")
    else:
        what = (f"predict_action ({r['preset']}, {r['dtype']} weights) batch {r['batch']}: prefill {r['sequence_len']} "
                f"positions + {r['new_tokens'] - 1} cached steps -> {r['actions_per_call']} action(s)")
    lines = [f"{what}; target {r['target']}: {r['devices']} x {r['device_kind']}, mesh data={m['data']} "
             f"fsdp={m['fsdp']} tensor={m['tensor']}"]
    if "compiler_oom" in r:
        lines.append(f"  per chip: weights {_gb(pb['params'], 0)}, needed {_gb(pb['peak'], 0)}: the TPU compiler "
                     f"refused the program ({r['compiler_oom']['message']})")
    else:
        lines.append(f"  per chip: weights {_gb(pb['params'], 0)}, arguments {_gb(pb['xla_argument'], 0)}, temporaries "
                     f"{_gb(pb['xla_temp'], 0)}, peak {_gb(pb['peak'], 0)}")
    if "chip" in r:
        fit = r["fit"]
        lines[-1] += (f" of {_gb(r['chip']['hbm_bytes'], 0)} -> "
                      + (f"fits ({fit['margin_bytes'] / GB:.2f} GB spare)" if fit["fits"]
                         else f"DOES NOT FIT (over by {-fit['margin_bytes'] / GB:.2f} GB)"))
    lines += _budget_lines(r)
    if "estimate" in r:
        e = r["estimate"]
        lines.append(f"  roofline latency {e['roofline_s'] * 1e3:.1f} ms ({e['bound']}-bound: compute "
                     f"{e['compute_s'] * 1e3:.1f} ms for {r['compiled_flops_per_device']:.3e} FLOPs, HBM "
                     f"{e['memory_s'] * 1e3:.1f} ms for {r['compiled_bytes_per_device'] / GB:.1f} GB) per chip; "
                     f"collectives move {r['compiled_collective_bytes_per_device'] / GB:.2f} GB per chip")
        lines.append(f"  at the roofline: {e['actions_per_s']:.1f} actions/s ({r['actions_per_call']} per call)"
                     + (f"; weights read once per pass: {e['weight_stream_s'] * 1e3:.1f} ms -> "
                        f"{e['actions_per_s_weight_stream']:.1f} actions/s (the bound if nothing else touched HBM)"
                        if "weight_stream_s" in e else ""))
    if "model_flops_per_device" in r and "compiled_flops_per_device" in r:
        lines.append(f"  FLOPs per chip: compiled {r['compiled_flops_per_device']:.3e}, analytic model "
                     f"{r['model_flops_per_device']:.3e} (ratio {r['compiled_flops_per_device'] / r['model_flops_per_device']:.3f})")
    lines.append(f"  (compiled in {r['seconds']['compile']:.1f} s)")
    return "\n".join(lines)
