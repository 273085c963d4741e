"""timm ViT state_dict <-> Flax params of `vla_jax.models.vit.VisionTower` (both OpenVLA towers).

`timm_to_flax` / `flax_to_timm` convert a whole timm `VisionTransformer` state_dict (numpy arrays,
unprefixed keys); `tensor_rules` gives the same conversion per tensor, for streaming 7B checkpoints
(`keys_openvla` builds the HF OpenVLA table from it).
"""

from __future__ import annotations

import flax.linen as nn
import numpy as np

from vla_jax.models.config import ViTConfig


# timm state_dict <-> Flax params. A rule is (timm key, timm shape, flax paths, to_flax, to_timm):
# `to_flax` maps one timm array to a tuple of arrays (one per flax path), `to_timm` inverts it.
# All maps are transposes/reshapes, so a round trip is bit-exact in any dtype.

def _same(a):
    return (a,)


def _unsame(a):
    return a[0]


def _lin(a):  # torch Linear [out, in] -> kernel [in, out]
    return (a.T,)


def _unlin(a):
    return a[0].T


def _block_rules(cfg: ViTConfig, prefix: str):
    d, f, h, hd = cfg.width, cfg.mlp_dim, cfg.num_heads, cfg.head_dim

    def split_qkv_w(w):  # [3D, D] rows ordered (3, heads, head_dim) -> 3 x [D, H, hd]
        w = w.reshape(3, h, hd, d)
        return tuple(w[i].transpose(2, 0, 1) for i in range(3))

    def join_qkv_w(ws):
        return np.stack([w.transpose(1, 2, 0) for w in ws]).reshape(3 * d, d)

    def split_qkv_b(b):
        return tuple(b.reshape(3, h, hd))

    def join_qkv_b(bs):
        return np.stack(bs).reshape(3 * d)

    qkv = tuple(("attn", n) for n in ("query", "key", "value"))
    rules = [
        ("norm1.weight", (d,), [("norm1", "scale")], _same, _unsame),
        ("norm1.bias", (d,), [("norm1", "bias")], _same, _unsame),
        ("attn.qkv.weight", (3 * d, d), [p + ("kernel",) for p in qkv], split_qkv_w, join_qkv_w),
        ("attn.qkv.bias", (3 * d,), [p + ("bias",) for p in qkv], split_qkv_b, join_qkv_b),
        ("attn.proj.weight", (d, d), [("attn", "out", "kernel")],
         lambda w: (w.T.reshape(h, hd, d),), lambda ws: ws[0].reshape(d, d).T),
        ("attn.proj.bias", (d,), [("attn", "out", "bias")], _same, _unsame),
        ("norm2.weight", (d,), [("norm2", "scale")], _same, _unsame),
        ("norm2.bias", (d,), [("norm2", "bias")], _same, _unsame),
        ("mlp.fc1.weight", (f, d), [("mlp", "fc1", "kernel")], _lin, _unlin),
        ("mlp.fc1.bias", (f,), [("mlp", "fc1", "bias")], _same, _unsame),
        ("mlp.fc2.weight", (d, f), [("mlp", "fc2", "kernel")], _lin, _unlin),
        ("mlp.fc2.bias", (d,), [("mlp", "fc2", "bias")], _same, _unsame),
    ]
    if cfg.layer_scale:
        rules += [("ls1.gamma", (d,), [("ls1", "scale")], _same, _unsame),
                  ("ls2.gamma", (d,), [("ls2", "scale")], _same, _unsame)]
    return [(prefix + k, shape, paths, fwd, inv) for k, shape, paths, fwd, inv in rules]


def _top_rules(cfg: ViTConfig):
    """Rules for everything outside the scanned blocks (paths are from the params root)."""
    d, p, f = cfg.width, cfg.patch_size, cfg.mlp_dim
    n_pos = cfg.num_patches + (0 if cfg.no_embed_class else cfg.num_prefix_tokens)
    rules = [
        ("patch_embed.proj.weight", (d, 3, p, p), [("patch_embed", "kernel")],
         lambda w: (w.transpose(2, 3, 1, 0),), lambda ws: ws[0].transpose(3, 2, 0, 1)),
        ("patch_embed.proj.bias", (d,), [("patch_embed", "bias")], _same, _unsame),
        ("pos_embed", (1, n_pos, d), [("pos_embed",)], _same, _unsame),
        ("norm.weight", (d,), [("norm", "scale")], _same, _unsame),
        ("norm.bias", (d,), [("norm", "bias")], _same, _unsame),
    ]
    if cfg.class_token:
        rules.append(("cls_token", (1, 1, d), [("cls_token",)], _same, _unsame))
    if cfg.num_registers:
        rules.append(("reg_token", (1, cfg.num_registers, d), [("reg_token",)], _same, _unsame))
    rules += [(k, s, [("last_block",) + q for q in ps], fwd, inv)
              for k, s, ps, fwd, inv in _block_rules(cfg, f"blocks.{cfg.depth - 1}.")]
    if cfg.map_head:
        ap = "attn_pool"
        for name, out in (("q", d), ("kv", 2 * d), ("proj", d), ("mlp.fc1", f), ("mlp.fc2", d)):
            path = (ap,) + tuple(name.split("."))
            rules.append((f"{ap}.{name}.weight", (out, f if name == "mlp.fc2" else d), [path + ("kernel",)],
                          _lin, _unlin))
            rules.append((f"{ap}.{name}.bias", (out,), [path + ("bias",)], _same, _unsame))
        rules += [(f"{ap}.latent", (1, 1, d), [(ap, "latent")], _same, _unsame),
                  (f"{ap}.norm.weight", (d,), [(ap, "norm", "scale")], _same, _unsame),
                  (f"{ap}.norm.bias", (d,), [(ap, "norm", "bias")], _same, _unsame)]
    return rules


def _set(tree: dict, path: tuple, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            raise ValueError(f"Flax params lack {'/'.join(path)} (missing {k!r})")
        tree = tree[k]
    return np.asarray(tree)


def _check(key: str, arr: np.ndarray, shape: tuple) -> np.ndarray:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{key}: expected shape {tuple(shape)}, got {tuple(arr.shape)}")
    return arr


def timm_to_flax(state_dict: dict, cfg: ViTConfig) -> dict:
    """timm `VisionTransformer` state_dict (numpy, unprefixed keys) -> the params under `'params'`.

    LayerScale keys may end in `.gamma` (timm) or `.scale_factor` (the HF OpenVLA export).
    Scanned blocks 0..depth-2 are stacked on a leading axis. Dtypes are kept. Missing, unexpected
    or misshapen keys raise ValueError.
    """
    sd = {(k[:-len("scale_factor")] + "gamma" if k.endswith(".scale_factor") else k): np.asarray(v)
          for k, v in state_dict.items()}
    used, out = set(), {}

    def convert(key, shape, paths, fwd):
        if key not in sd:
            raise ValueError(f"timm state_dict lacks {key!r} (expected shape {shape})")
        used.add(key)
        return fwd(_check(key, sd[key], shape))

    for key, shape, paths, fwd, _ in _top_rules(cfg):
        for path, arr in zip(paths, convert(key, shape, paths, fwd)):
            _set(out, path, arr)
    per_block = [_block_rules(cfg, f"blocks.{i}.") for i in range(cfg.depth - 1)]
    for j, (_, _, paths, _, _) in enumerate(per_block[0]):
        parts = [convert(*rules[j][:4]) for rules in per_block]
        for m, path in enumerate(paths):
            _set(out, ("blocks",) + path, np.stack([p[m] for p in parts]))
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"timm state_dict has keys this ViTConfig does not expect: {extra[:10]}"
                         f"{' ...' if len(extra) > 10 else ''}")
    return out


def flax_to_timm(params: dict, cfg: ViTConfig, layer_scale_key: str = "gamma") -> dict:
    """Inverse of `timm_to_flax`: params (the tree under `'params'`, boxed or not) -> timm state_dict.

    `layer_scale_key` names LayerScale leaves: "gamma" (timm) or "scale_factor" (HF OpenVLA).
    """
    if layer_scale_key not in ("gamma", "scale_factor"):
        raise ValueError(f"layer_scale_key must be 'gamma' or 'scale_factor', got {layer_scale_key!r}")
    params = nn.meta.unbox(params)
    sd = {}
    for key, shape, paths, _, inv in _top_rules(cfg):
        sd[key] = _check(key, inv(tuple(_get(params, p) for p in paths)), shape)
    for key, shape, paths, _, inv in _block_rules(cfg, ""):
        stacked = [_get(params, ("blocks",) + p) for p in paths]
        if stacked[0].shape[0] != cfg.depth - 1:
            raise ValueError(f"params blocks/{'/'.join(paths[0])}: expected {cfg.depth - 1} stacked layers, "
                             f"got leading axis {stacked[0].shape[0]}")
        for i in range(cfg.depth - 1):
            sd[f"blocks.{i}.{key}"] = _check(key, inv(tuple(s[i] for s in stacked)), shape)
    if layer_scale_key != "gamma":
        sd = {(k[:-len("gamma")] + layer_scale_key if k.endswith(".gamma") else k): v for k, v in sd.items()}
    return sd


def tensor_rules(cfg: ViTConfig) -> list:
    """Every timm tensor of this tower, for per-tensor (streaming) conversion.

    Returns `[(timm key, timm shape, flax paths, layer, to_flax, to_timm)]`. `layer` is None for
    unstacked leaves; otherwise the flax paths start with 'blocks' and the arrays go to index `layer`
    of the stacked leaves. `to_flax(array)` gives one array per path (per-layer slices for stacked
    leaves), `to_timm(tuple of arrays)` inverts it. LayerScale keys end in `.gamma` (timm names).
    """
    out = [(k, s, ps, None, fwd, inv) for k, s, ps, fwd, inv in _top_rules(cfg)]
    for i in range(cfg.depth - 1):
        out += [(k, s, [("blocks",) + p for p in ps], i, fwd, inv)
                for k, s, ps, fwd, inv in _block_rules(cfg, f"blocks.{i}.")]
    return out
