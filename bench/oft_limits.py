"""OpenVLA-OFT's parallel pass counted from the geometry: FLOPs, weight bytes read, the hardware bound.

Used by `bench/gpu_suite.py` (the oft_inference part's limit) and `bench/oft_inference.py` (the CPU
analysis). FLOPs count matmuls only, with the conventions of `vla_jax.training.metrics` (2 * m * n * k,
attention scores and values over the full square as computed); A = chunk_size * action_dim action
slots, P image patches, K = chunk_size, D = action_dim, H the Llama width.
"""

from __future__ import annotations

import math

import numpy as np


def llama_flops(lc, seq_len: int, last_rows: int) -> float:
    """The Llama's layers over `seq_len` tokens, the last layer's queries, attention output and MLP at
    `last_rows` rows only (its keys and values at all of them), as the OFT pass (the A readout rows)
    and the autoregressive prefill (1 row) run it; no lm_head."""
    from vla_jax.training import metrics as mlib

    s, r, d, hd = seq_len, last_rows, lc.hidden_size, lc.head_dim
    full = mlib.llm_forward_flops(lc, s, 0) / lc.num_layers  # one layer over every row
    last = (2.0 * d * hd * (2 * r * lc.num_heads + 2 * s * lc.kv_heads) + 2.0 * 2 * r * s * lc.num_heads * hd
            + 2.0 * 3 * r * d * lc.intermediate_size)
    return (lc.num_layers - 1) * full + last


def oft_pass_flops(cfg, prompt_len: int) -> dict:
    """Matmul FLOPs of one OFT parallel pass for one row, by part: the towers and projector, the Llama
    over S = P + prompt_len + A + 1 tokens with the last layer at the A readout rows (`llama_flops`),
    and the L1 head (width H, as upstream) on K rows of D * H inputs. prompt_len: real prompt tokens,
    BOS to SPACE (bucket padding is overhead, not counted)."""
    from vla_jax.training import metrics as mlib

    lc, a, d = cfg.llama, cfg.num_action_slots, cfg.llama.hidden_size
    head = 2.0 * cfg.chunk_size * (cfg.action_dim * d * d + 2 * d * d + d * cfg.action_dim)
    return {"vision": mlib.vit_forward_flops(cfg.dino) + mlib.vit_forward_flops(cfg.siglip),
            "projector": mlib.projector_forward_flops(cfg),
            "llm": llama_flops(lc, prompt_len + cfg.num_inserted_tokens + a + 1, a), "action_head": head}


def prefill_flops(cfg, prompt_len: int) -> dict:
    """The autoregressive prefill (`decode.greedy_decode`) by part: towers, projector, the Llama over
    P + prompt_len tokens with the last layer at the one row that feeds the first token, its lm_head."""
    from vla_jax.training import metrics as mlib

    lc = cfg.llama
    return {"vision": mlib.vit_forward_flops(cfg.dino) + mlib.vit_forward_flops(cfg.siglip),
            "projector": mlib.projector_forward_flops(cfg),
            "llm": llama_flops(lc, prompt_len + cfg.num_inserted_tokens, 1), "lm_head": 2.0 * lc.hidden_size * lc.vocab_size}


# Parameters an OFT pass never reads: the embedding table (a few looked-up rows aside), the lm_head (the
# L1 head replaces it), and what the towers hold for checkpoint round trips only (vit.py: the block
# after the read-out one, the final norm, SigLIP's pooling head).
_OFT_UNREAD = (("llm", "embed_tokens"), ("llm", "lm_head"), ("dino", "last_block"), ("dino", "norm"),
               ("siglip", "last_block"), ("siglip", "norm"), ("siglip", "attn_pool"))


def oft_weight_bytes(model, cfg) -> int:
    """Bytes of the parameters one OFT pass reads (all but `_OFT_UNREAD`), from the model's own tree."""
    import flax.linen as nn
    import jax

    s = cfg.image_size
    shapes = nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, s, s, 3), np.uint8),
                                                             np.ones((1, 4), np.int32)))["params"])
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(str(k.key) for k in path)
        if keys[:2] not in _OFT_UNREAD:
            total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return total


def oft_hardware_limit(flops_per_row: float, weight_bytes: int, batch: int, chunk: int, peak_flops: float,
                       bandwidth: float) -> dict:
    """One pass for `batch` rows cannot take less than its FLOPs at the peak nor its weight reads at
    the bandwidth: the bound is the larger of the two times; K actions per row."""
    compute_ms, memory_ms = 1e3 * batch * flops_per_row / peak_flops, 1e3 * weight_bytes / bandwidth
    ms = max(compute_ms, memory_ms)
    return {"tflop": round(batch * flops_per_row / 1e12, 6), "weight_gb": round(weight_bytes / 1e9, 6),
            "compute_ms": round(compute_ms, 4), "memory_ms": round(memory_ms, 4), "limit_ms_per_pass": round(ms, 4),
            "limit_actions_per_s": round(1e3 * batch * chunk / ms, 1)}
