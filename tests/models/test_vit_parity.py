"""Parity of `vla_jax.models.vit` against timm's VisionTransformer (the reference OpenVLA uses).

Small towers of the two real kinds (DINOv2-reg: CLS + 4 registers, LayerScale, no_embed_class;
SigLIP: no CLS, MAP head) with every parameter randomized, converted with `timm_to_flax`.
Tolerance (fp32): max |flax - timm| <= 1e-5 * max(1, max |timm|).
"""

import dataclasses

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from vla_jax.models.config import ViTConfig, get_preset
from vla_jax.models.execution import ExecutionConfig
from vla_jax.hf.keys_vit import flax_to_timm, timm_to_flax
from vla_jax.models.vit import Block, LayerNorm, MAPHead, VisionTower

RTOL_SCALE = 1e-5
IMG = 56  # 4 x 4 patches of 14
BATCH = 2

# Same options as the real towers (timm ids vit_large_patch14_reg4_dinov2 / vit_so400m_patch14_siglip_224),
# small widths. SigLIP's odd mlp_ratio gives an odd hidden size (int(72 * 3.7362) = 269) like the real 4304.
TIMM_KW = {
    "dino": dict(embed_dim=64, depth=3, num_heads=4, mlp_ratio=4.0, reg_tokens=4, no_embed_class=True,
                 init_values=1e-5, class_token=True, global_pool="token"),
    "siglip": dict(embed_dim=72, depth=3, num_heads=4, mlp_ratio=3.7362, class_token=False, global_pool="map"),
}
REAL_TIMM = {"dino": ("vit_large_patch14_reg4_dinov2", 303_230_976),
             "siglip": ("vit_so400m_patch14_siglip_224", 427_680_704)}
ALLOWED_AXES = {"embed", "mlp", "heads", "kv", "layers", None}


def _flax_cfg(kind: str, **kw) -> ViTConfig:
    t = TIMM_KW[kind]
    d = t["embed_dim"]
    dino = kind == "dino"
    return ViTConfig(width=d, depth=t["depth"], num_heads=t["num_heads"], mlp_dim=int(d * t["mlp_ratio"]),
                     image_size=IMG, patch_size=14, class_token=dino, num_registers=4 if dino else 0,
                     layer_scale=dino, no_embed_class=dino, map_head=not dino, dtype="float32", **kw)


def _random_timm(kind: str, seed: int = 0, img: int = IMG, **overrides) -> VisionTransformer:
    """A timm tower with EVERY parameter random (timm leaves LayerScale at 1e-5 and tokens near zero)."""
    torch.manual_seed(seed)
    m = VisionTransformer(img_size=img, patch_size=14, num_classes=0, **dict(TIMM_KW[kind], **overrides)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim >= 2 and name.endswith("weight"):  # Linear / Conv: ~unit-variance outputs
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            else:  # biases, LayerScale gammas, cls/reg/pos/latent tokens
                p.copy_(0.5 * torch.randn_like(p))
    return m


def _state_dict(m: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().numpy() for k, v in m.state_dict().items()}


def _timm_features(m: VisionTransformer, x: torch.Tensor):
    """OpenVLA's features by hand: patch_embed -> _pos_embed -> norm_pre -> blocks[:depth-1], prefix dropped.

    Returns (features [B, N, D], full token sequence after block depth-2 [B, prefix + N, D]).
    """
    with torch.no_grad():
        h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks[:-1]:
            h = blk(h)
    return h[:, m.num_prefix_tokens:], h


def _check_close(name: str, got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    diff = float(np.abs(got - ref).max())
    tol = RTOL_SCALE * max(1.0, float(np.abs(ref).max()))
    print(f"{name}: max abs diff {diff:.3e} (tol {tol:.3e}, ref scale {np.abs(ref).max():.3f})")
    assert diff <= tol, f"{name}: max abs diff {diff} > {tol}"
    return diff


def _init_shapes(cfg: ViTConfig, size: int):
    """Boxed (logical axis names) param shapes of VisionTower(cfg), the tree under 'params'."""
    return jax.eval_shape(lambda: VisionTower(cfg).init(jax.random.key(0), jnp.zeros((1, size, size, 3))))["params"]


@pytest.mark.parametrize("kind", ["dino", "siglip"])
def test_features_match_timm(kind):
    m = _random_timm(kind)
    cfg = _flax_cfg(kind)
    assert m.num_prefix_tokens == cfg.num_prefix_tokens
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((BATCH, 3, IMG, IMG)).astype(np.float32))
    ref, ref_full = _timm_features(m, x)
    # The hand-written reference is what OpenVLA's patched forward returns.
    with torch.no_grad():
        (via_api,) = m.get_intermediate_layers(x, n={cfg.depth - 2})
    assert torch.equal(ref, via_api)

    params = timm_to_flax(_state_dict(m), cfg)
    pixels = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    for unroll in (False, True):  # the stacked blocks as one scan, and unrolled (layer_stack)
        got = jax.jit(VisionTower(cfg, ExecutionConfig(unroll_layers=unroll)).apply)({"params": params}, pixels)
        _check_close(f"{kind} features (unroll_layers={unroll})", got, ref.numpy())
    # remat changes nothing; and a normal apply never touches the unused parameters (runs without them).
    used = {k: v for k, v in params.items() if k not in ("last_block", "norm", "attn_pool")}
    got_remat = jax.jit(VisionTower(dataclasses.replace(cfg, remat=True)).apply)({"params": used}, pixels)
    _check_close(f"{kind} features (remat, unused params removed)", got_remat, ref.numpy())

    # The unused parameters are still mapped correctly: last block + final norm (+ MAP head) match timm.
    with torch.no_grad():
        ref_last = m.norm(m.blocks[-1](ref_full))
    last, _ = jax.jit(Block(cfg).apply)({"params": params["last_block"]}, jnp.asarray(ref_full.numpy()))
    last = jax.jit(LayerNorm(cfg.ln_eps).apply)({"params": params["norm"]}, last)
    _check_close(f"{kind} last block + norm", last, ref_last.numpy())
    if cfg.map_head:
        with torch.no_grad():
            ref_pool = m.attn_pool(ref_last)
        pool = jax.jit(MAPHead(cfg).apply)({"params": params["attn_pool"]}, jnp.asarray(ref_last.numpy()))
        _check_close(f"{kind} attn_pool", pool, ref_pool.numpy())


@pytest.mark.parametrize("remat", [False, True], ids=["no_remat", "remat"])
@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
@pytest.mark.parametrize("kind", ["dino", "siglip"])
def test_gradients_match_timm(kind, unroll, remat):
    """The towers' backward (blocks scanned, or unrolled with layer_stack's stacking backward) equals
    torch autograd through timm's blocks, for every parameter OpenVLA's features depend on."""
    m = _random_timm(kind)
    cfg = dataclasses.replace(_flax_cfg(kind), remat=remat)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((BATCH, 3, IMG, IMG)).astype(np.float32))
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
    for blk in m.blocks[:-1]:
        h = blk(h)
    feats = h[:, m.num_prefix_tokens:]
    weights = rng.standard_normal(tuple(feats.shape)).astype(np.float32)
    m.zero_grad()
    (feats * torch.from_numpy(weights)).sum().backward()
    ref = {k: p.grad.numpy() for k, p in m.named_parameters() if p.grad is not None}

    params = timm_to_flax(_state_dict(m), cfg)
    pixels = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    loss = lambda p: jnp.sum(VisionTower(cfg, ExecutionConfig(unroll_layers=unroll)).apply({"params": p}, pixels) * weights)  # noqa: E731
    grads = flax_to_timm(jax.jit(jax.grad(loss))(params), cfg)
    assert any(k.startswith("blocks.0.") for k in ref) and len(ref) > 10
    worst = 0.0
    for k, g in ref.items():
        rel = float(np.max(np.abs(grads[k] - g))) / max(float(np.max(np.abs(g))), 1e-12)
        worst = max(worst, rel)
        assert rel <= 1e-4, (k, rel)
    print(f"{kind} gradients (unroll {unroll}, remat {remat}): worst relative max abs diff {worst:.2e}")


@pytest.mark.parametrize("kind", ["dino", "siglip"])
def test_rename_table_round_trips_and_matches_init_tree(kind):
    m = _random_timm(kind, seed=2)
    cfg = _flax_cfg(kind)
    sd = _state_dict(m)
    back = flax_to_timm(timm_to_flax(sd, cfg), cfg)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k

    # The HF OpenVLA export names LayerScale `.scale_factor`; both spellings convert the same.
    if cfg.layer_scale:
        hf = {k.replace(".gamma", ".scale_factor"): v for k, v in sd.items()}
        assert sorted(flax_to_timm(timm_to_flax(hf, cfg), cfg, layer_scale_key="scale_factor")) == sorted(hf)

    # Flax init creates exactly the converted tree (names, shapes), every leaf with allowed logical axes.
    # (eval_shape: XLA:CPU takes seconds to compile RNG ops, and only shapes and names matter here.)
    init = _init_shapes(cfg, IMG)
    conv = timm_to_flax(sd, cfg)
    assert jax.tree.structure(nn.meta.unbox(init)) == jax.tree.structure(conv)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), nn.meta.unbox(init), conv)
    boxed = jax.tree.leaves(init, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert all(isinstance(v, nn.Partitioned) and set(v.names) <= ALLOWED_AXES for v in boxed)
    assert all(v.names[0] == "layers" for v in jax.tree.leaves(
        init["blocks"], is_leaf=lambda v: isinstance(v, nn.Partitioned)))
    assert sum(v.size for v in jax.tree.leaves(conv)) == sum(p.numel() for p in m.parameters())

    # Wrong inputs name the offending key.
    with pytest.raises(ValueError, match="pos_embed"):
        timm_to_flax({k: v for k, v in sd.items() if k != "pos_embed"}, cfg)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        timm_to_flax(dict(sd, **{"blocks.0.attn.qkv.weight": sd["blocks.0.attn.qkv.weight"][:-1]}), cfg)
    with pytest.raises(ValueError, match="unexpected_key"):
        timm_to_flax(dict(sd, unexpected_key=np.zeros(1)), cfg)


@pytest.mark.parametrize("kind", ["dino", "siglip"])
def test_openvla_7b_towers_match_real_timm_geometry(kind):
    """Real tower geometry via jax.eval_shape (no memory) against timm's real model built on the meta device."""
    cfg = getattr(get_preset("openvla-7b"), kind)
    shapes = nn.meta.unbox(_init_shapes(cfg, 224))
    name, documented = REAL_TIMM[kind]
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == documented

    with torch.device("meta"):
        real = timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
    ref_shapes = {k: tuple(v.shape) for k, v in real.state_dict().items()}
    assert sum(int(np.prod(s)) for s in ref_shapes.values()) == documented
    # Per-key shapes through the rename table, with zero-stride stand-ins (no memory).
    stand_in = jax.tree.map(lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape), shapes)
    ours = {k: v.shape for k, v in flax_to_timm(stand_in, cfg).items()}
    assert ours == ref_shapes


def test_bf16_tiny_preset_against_timm():
    """The `tiny` preset's DINO tower in its default bf16 compute vs timm fp32 at 224 px.

    Tolerance: max abs diff <= 5e-2 * max(1, max |ref|) (bf16 keeps 8 mantissa bits).
    """
    cfg = get_preset("tiny").dino
    assert cfg.dtype == "bfloat16"
    m = _random_timm("dino", seed=3, img=224, embed_dim=cfg.width, num_heads=cfg.num_heads,
                     mlp_ratio=cfg.mlp_dim / cfg.width, depth=cfg.depth)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((BATCH, 3, 224, 224)).astype(np.float32))
    ref, _ = _timm_features(m, x)
    tower = VisionTower(cfg)
    params = timm_to_flax(_state_dict(m), cfg)
    out = jax.jit(tower.apply)({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    assert out.shape == (BATCH, cfg.num_patches, cfg.width) and out.dtype == jnp.bfloat16
    ref = ref.numpy()
    err = float(np.abs(np.asarray(out, np.float32) - ref).max())
    tol = 5e-2 * max(1.0, float(np.abs(ref).max()))
    print(f"tiny dino bf16: max abs diff {err:.3e} (tol {tol:.3e})")
    assert err <= tol
    with pytest.raises(ValueError, match="pixels"):
        tower.apply({"params": params}, jnp.zeros((2, 3, 224, 224)))
