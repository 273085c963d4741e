"""Analytic FLOPs of the OpenVLA train step, device peak FLOP/s, and host-side metric records.

FLOPs count matmuls only (2 * m * n * k), like MFU conventions (PaLM appendix B): per example
the two ViT towers (blocks 0..depth-2 over patches + prefix tokens), the fused projector, the Llama
layers over T + P tokens (attention scores and values over the full square, as computed) and the
lm_head at the K supervised positions. A training step costs 3x the forward (backward = 2x) for
parts with trainable weights, 2x for frozen parts that gradients must still pass through, and 1x
for frozen parts before every trainable one. Rematerialisation is not counted (model FLOPs).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from vla_jax.models.config import LlamaConfig, OpenVLAConfig, ViTConfig

# Dense bf16 peak FLOP/s per JAX device, by substring of `device.device_kind` (first match wins).
PEAK_BF16_FLOPS = (
    ("TPU v6", 918e12),   # v6e (Trillium), one chip per device
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),   # v5p
    ("TPU v4", 275e12),   # one megacore chip per device
    ("TPU v3", 61.5e12),  # one core (half a chip) per device
    ("H200", 989e12),
    ("H100", 989e12),     # SXM; PCIe is lower (756e12)
    ("A100", 312e12),
    ("L4", 121e12),
)


def device_peak_flops(device_kind: str) -> Optional[float]:
    """bf16 dense peak of one device, or None when unknown (e.g. CPU: no MFU is reported)."""
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def vit_forward_flops(cfg: ViTConfig) -> float:
    """Forward FLOPs of one image through the blocks OpenVLA runs (patch embed + depth-1 blocks)."""
    n = cfg.num_patches + cfg.num_prefix_tokens
    d = cfg.width
    patch = 2.0 * cfg.num_patches * (cfg.patch_size ** 2 * 3) * d
    block = 2.0 * n * d * 3 * d + 2.0 * 2 * n * n * d + 2.0 * n * d * d + 2.0 * 2 * n * d * cfg.mlp_dim
    return patch + (cfg.depth - 1) * block


def projector_forward_flops(cfg: OpenVLAConfig) -> float:
    """Every camera's patches through the fused projector, plus the proprio projector if any."""
    p, v, d = cfg.num_images * cfg.num_patches, cfg.vision_dim, cfg.llama.hidden_size
    proprio = 0.0 if cfg.proprio_dim is None else 2.0 * (cfg.proprio_dim * d + d * d)
    return 2.0 * p * (v * 4 * v + 4 * v * d + d * d) + proprio


def llm_forward_flops(cfg: LlamaConfig, seq_len: int, num_logits: int) -> float:
    """Forward FLOPs of the decoder over `seq_len` tokens, lm_head at `num_logits` positions."""
    s, d, hd = seq_len, cfg.hidden_size, cfg.head_dim
    qkvo = 2.0 * s * d * hd * (2 * cfg.num_heads + 2 * cfg.kv_heads)
    attn = 2.0 * 2 * s * s * cfg.num_heads * hd
    mlp = 2.0 * 3 * s * d * cfg.intermediate_size
    return cfg.num_layers * (qkvo + attn + mlp) + 2.0 * num_logits * d * cfg.vocab_size


def forward_flops(cfg: OpenVLAConfig, text_len: int, num_logits: int) -> Dict[str, float]:
    """Per-example forward FLOPs by part: {'vision', 'projector', 'llm'}."""
    return {"vision": cfg.num_images * (vit_forward_flops(cfg.dino) + vit_forward_flops(cfg.siglip)),
            "projector": projector_forward_flops(cfg),
            "llm": llm_forward_flops(cfg.llama, text_len + cfg.num_inserted_tokens, num_logits)}


def train_flops_per_example(cfg: OpenVLAConfig, text_len: int, num_logits: int,
                            trainable: Mapping[str, bool] = None) -> float:
    """Forward + backward FLOPs of one example. trainable: {'vision', 'projector', 'llm'} -> whether
    the part has trainable weights (default: all)."""
    trainable = dict(trainable or {"vision": True, "projector": True, "llm": True})
    fwd = forward_flops(cfg, text_len, num_logits)
    total, upstream_trainable = 0.0, False
    for part in ("vision", "projector", "llm"):  # graph order
        if trainable[part]:
            factor = 3.0
        else:
            factor = 2.0 if upstream_trainable else 1.0
        upstream_trainable |= trainable[part]
        total += factor * fwd[part]
    return total


def parts_trainable(mask) -> Dict[str, bool]:
    """{'vision', 'projector', 'llm'} -> any trainable leaf, from a bool mask tree over the params."""
    import jax

    def any_true(tree):
        return any(bool(x) for x in jax.tree.leaves(tree))

    if set(mask) - {"dino", "siglip", "projector", "llm"}:  # adapters (LoRA): every part has trained weights
        return {"vision": True, "projector": True, "llm": True}
    return {"vision": any_true(mask["dino"]) or any_true(mask["siglip"]), "projector": any_true(mask["projector"]),
            "llm": any_true(mask["llm"])}


def step_record(step: int, metrics: Mapping[str, np.ndarray], dataset_names: Sequence[str], step_time: float,
                global_batch: int, flops_per_step: float, num_devices: int, peak: Optional[float],
                extra: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """Device metrics of one step (already on the host) -> flat {name: float} record for the writers.
    Per-dataset entries are `<dataset>/action_accuracy` and `<dataset>/l1_loss` (datasets seen only)."""
    rec = {"step": int(step)}
    for k in ("loss", "action_accuracy", "l1_loss", "learning_rate", "grad_norm", "param_norm", "supervised_tokens"):
        rec[k] = float(metrics[k])
    if len(dataset_names) > 1:
        for i, name in enumerate(dataset_names):
            if float(metrics["ds_actions"][i]) > 0:
                rec[f"{name}/action_accuracy"] = float(metrics["ds_action_accuracy"][i])
                rec[f"{name}/l1_loss"] = float(metrics["ds_l1_loss"][i])
    rec["step_time"] = float(step_time)
    rec["samples_per_sec"] = float(global_batch / step_time) if step_time > 0 else 0.0
    rec["tflops_per_device"] = float(flops_per_step / step_time / num_devices / 1e12) if step_time > 0 else 0.0
    if peak:
        rec["mfu"] = float(flops_per_step / step_time / num_devices / peak) if step_time > 0 else 0.0
    if extra:
        rec.update({k: float(v) for k, v in extra.items()})
    return rec
