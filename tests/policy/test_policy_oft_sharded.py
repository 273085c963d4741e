"""Sharded OpenVLA-OFT inference and LoRA checkpoints over a mesh, on the 8 simulated CPU devices.

Truth: the same checkpoint loaded on one device (tests/policy/test_policy_oft.py checks that policy
against `parallel_decode` and OFT's post-processing written out in numpy; test_policy.py checks the
autoregressive decoder against full forwards). The discrete head must give identical tokens, the L1
head the same chunk to fp32 tolerance (tensor parallelism changes the order of the sums in
o_proj / down_proj). LoRA: the merged kernels against W + alpha / r * A @ B in numpy float64.
The geometry is the debug preset with 8 heads everywhere and an MLP width of 256, so that tensor axes
of 4 and 8 divide heads, MLP widths and the L1 head's width (the LLM width, 128).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests.policy.test_policy_helpers import random_images, random_params, stats_entry, write_checkpoint
from vla_jax import sharding as shd
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.policy import Policy
from vla_jax.policy import mesh as policy_mesh

K = 3
INSTRUCTIONS = ["put carrot on plate", "open the drawer", "move the red block to the left of the blue bowl",
                "stack the cups", "Wipe the table with the sponge!"]
LORA = {"enabled": True, "rank": 4, "alpha": 8.0}  # a LoRA run's config section (all-linear targets)


def _config(head=None, heads: int = 8):
    cfg = with_dtypes(get_preset("debug"), "float32")
    tower = dict(image_size=56, num_heads=heads)
    cfg = dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, **tower),
                              siglip=dataclasses.replace(cfg.siglip, **tower),
                              llama=dataclasses.replace(cfg.llama, num_heads=heads, intermediate_size=256))
    if head is None:
        return cfg
    return dataclasses.replace(cfg, parallel_decoding=True, chunk_size=K, action_head=head)


@functools.lru_cache(maxsize=None)
def _oft_checkpoint(tokenizer_path: str, head: str) -> str:
    from vla_jax.spec import BatchSpec

    cfg = _config(head)
    return write_checkpoint(tempfile.mkdtemp(prefix=f"vla_oft_sharded_{head}_"), cfg, random_params(cfg, seed=5),
                            {"bridge_dataset": stats_entry(0.02)}, tokenizer_path,
                            batch_spec=BatchSpec.for_model(cfg, text_len=40))


def _oft_load(tokenizer_path, head, **kw):
    return Policy.load(_oft_checkpoint(str(tokenizer_path), head), batch_buckets=(1, 8), compilation_cache=False, **kw)


def _predict_both(policy):
    """(batch of 5 -> bucket 8, batch of 1 -> bucket 1) predictions on fixed images."""
    images = random_images(5, seed=13)
    return policy.predict(images, INSTRUCTIONS), policy.predict(images[:1], INSTRUCTIONS[:1])


@functools.lru_cache(maxsize=None)
def _oft_single(tokenizer_path: str, head: str):
    return _predict_both(_oft_load(tokenizer_path, head))


# slow: each case compiles the pass for two buckets on the mesh (plus, once per head, on one device):
# ~2 min per case on the shared 2-core machine.
@pytest.mark.slow
@pytest.mark.parametrize("head", ["tokens", "l1"])
@pytest.mark.parametrize("mesh", [(1, 1, 8), (2, 1, 4)], ids=["tensor8", "data2xtensor4"])
def test_sharded_oft_chunks_equal_single_device(llama_tokenizer_path, head, mesh):
    refs = _oft_single(str(llama_tokenizer_path), head)
    policy = _oft_load(llama_tokenizer_path, head, mesh=mesh)
    data, fsdp, tensor = mesh
    assert policy.describe()["mesh"] == {"data": data, "fsdp": fsdp, "tensor": tensor}
    # The stacked params (OFT's layout) are split as training's rules say.
    p = policy.decode_params
    q = p["llm"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, embed, heads, head_dim]
    assert q.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    assert q.sharding.shard_shape(q.shape) == (2, 128 // fsdp, 8 // tensor, 16)
    if head == "l1":  # the head is sharded too: fc1 [D * H, W] over (fsdp, tensor)
        fc1 = p["action_head"]["fc1"]["kernel"]
        assert fc1.shape == (7 * 128, 128)
        assert fc1.sharding.shard_shape(fc1.shape) == (7 * 128 // fsdp, 128 // tensor)
    if head == "tokens":  # on the batch of 5 (a single row may repeat one id)
        assert len(np.unique(refs[0].tokens)) > 3, "degenerate reference tokens: the comparison would be weak"
    else:
        assert np.abs(refs[0].normalized).max() > 1e-2, "near-zero reference chunks: the comparison would be weak"
    for got, ref in zip(_predict_both(policy), refs):
        assert got.actions.shape == ref.actions.shape and got.actions.shape[1:] == (K, 7)
        if head == "tokens":
            np.testing.assert_array_equal(got.tokens, ref.tokens)
            np.testing.assert_array_equal(got.actions, ref.actions)
        else:
            # measured: up to 2.7e-6 apart on values up to ~2 (sums in another order); the same tolerance as
            # test_policy_oft's batched-vs-single comparison
            np.testing.assert_allclose(got.normalized, ref.normalized, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.actions, ref.actions, rtol=1e-5, atol=1e-5)
    # Both buckets ran the mesh's compiled pass (batch 1 replicated, batch 8 split over `data` when it is > 1).
    assert sorted(k[1] for k in policy.compile_seconds) == [1, 8]
    assert all(k[0] == K * 7 + 1 for k in policy.compile_seconds)


def test_oft_mesh_errors_name_the_dimension(llama_tokenizer_path, monkeypatch):
    from vla_jax import checkpoints

    def no_read(*a, **k):
        raise AssertionError("weights were read although the mesh was refused")

    monkeypatch.setattr(checkpoints, "load_params", no_read)
    mesh3 = shd.make_mesh((1, 1, 3), jax.devices()[:3])
    # The L1 head is sharded by the same rules and checked with everything else, before any weight is read
    # (parameters are checked in sorted order, so the head's fc1 comes first here; its width W = 128 is the
    # LLM width, heads x head_dim, so the LLM's heads would fail on this mesh as well).
    with pytest.raises(ValueError, match=r"cannot shard parameter action_head/fc1/(bias \(128,\)|kernel \(896, 128\)): "
                                         r"its 'action_hidden' dimension \(axis \d\) has size 128, which the mesh's "
                                         r"tensor axis of size 3 does not divide; choose a tensor size that divides "
                                         r"128"):
        Policy.load(_oft_checkpoint(str(llama_tokenizer_path), "l1"), mesh=mesh3, compilation_cache=False)
    with pytest.raises(ValueError, match=r"'heads' dimension \(axis \d\) has size 8, which the mesh's tensor axis of "
                                         r"size 3 does not divide"):
        Policy.load(_oft_checkpoint(str(llama_tokenizer_path), "tokens"), mesh=mesh3, compilation_cache=False)
    # Over fsdp the head's input side (D x H = 7 x 128) is split.
    info = policy_mesh.logical_specs(_config("l1"))
    head = ({"action_head": info["shapes"]["action_head"]}, {"action_head": info["specs"]["action_head"]})
    with pytest.raises(ValueError, match=r"parameter action_head/\S+ \(896.*'action_in' dimension \(axis 0\) has size "
                                         r"896, which the mesh's fsdp axis of size 3 does not divide"):
        policy_mesh.check_divisible(*head, shd.make_mesh((1, 3, 1), jax.devices()[:3]))


# ----------------------------------------------------------------------------------------------
# LoRA checkpoints


@functools.lru_cache(maxsize=None)
def _lora_checkpoint(tokenizer_path: str):
    """An autoregressive checkpoint as a LoRA run saves it: base params + params['lora'] (every linear layer,
    r=4, alpha 8), B moved away from its zero init as training would. Returns (folder, base, adapters)."""
    import flax.linen as nn

    from vla_jax.models import lora

    cfg = _config()
    base = random_params(cfg, seed=3)
    lcfg = lora.LoraConfig(rank=LORA["rank"], alpha=LORA["alpha"])
    adapters = jax.jit(lambda p: nn.meta.unbox(lora.init_lora(p, lcfg, jax.random.PRNGKey(2))))(base)
    rng = np.random.default_rng(7)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) + (0.05 * rng.standard_normal(x.shape).astype(np.float32)
                                         if path[-1].key == "lora_B" else 0.0), adapters)
    folder = write_checkpoint(tempfile.mkdtemp(prefix="vla_lora_ckpt_"), cfg, {**base, "lora": adapters},
                              {"bridge_dataset": stats_entry(0.01)}, tokenizer_path, lora=LORA)
    return folder, base, adapters


def _merged_f64(base, adapters, kernel_path, lora_path, member=None):
    """W + alpha / r * A @ B in numpy float64 for one kernel (a fused qkv member: its slice of B)."""
    w = np.asarray(functools.reduce(lambda t, k: t[k], kernel_path, base), np.float64)
    ad = functools.reduce(lambda t, k: t[k], lora_path, adapters)
    a, b = np.asarray(ad["lora_A"], np.float64), np.asarray(ad["lora_B"], np.float64)
    if member is not None:
        b = b[:, :, member]
    layers, rank = w.shape[0], a.shape[-1]
    delta = a.reshape(layers, -1, rank) @ b.reshape(layers, rank, -1)
    return w + LORA["alpha"] / LORA["rank"] * delta.reshape(w.shape)


@pytest.mark.slow  # three loads, each merging every adapter and compiling a decoder: minutes on 2 shared cores
def test_lora_checkpoint_on_a_mesh_acts_as_without(llama_tokenizer_path):
    folder, base, adapters = _lora_checkpoint(str(llama_tokenizer_path))
    single = Policy.load(folder, batch_buckets=(8,), compilation_cache=False)
    # The adapters were folded in (numpy float64 truth), and they change the weights noticeably.
    params = single.params
    checks = ((("llm", "layers", "self_attn", "q_proj", "kernel"), ("llm", "layers", "self_attn", "q_proj"), None),
              (("dino", "blocks", "attn", "key", "kernel"), ("dino", "blocks", "attn", "qkv"), 1))  # fused qkv
    for kernel, lora_path, member in checks:
        want = _merged_f64(base, adapters, kernel, lora_path, member)
        got = np.asarray(functools.reduce(lambda t, k: t[k], kernel, params), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert np.abs(want - functools.reduce(lambda t, k: t[k], kernel, base)).max() > 1e-2
    images = random_images(5, seed=17)
    ref = single.predict(images, INSTRUCTIONS)
    assert len(np.unique(ref.tokens)) > 3, "degenerate reference tokens: the comparison would be weak"
    for mesh in ((1, 1, 8), (1, 2, 4)):
        policy = Policy.load(folder, batch_buckets=(8,), compilation_cache=False, mesh=mesh)
        got = policy.predict(images, INSTRUCTIONS)
        np.testing.assert_array_equal(got.tokens, ref.tokens)
        np.testing.assert_array_equal(got.actions, ref.actions)
        _, fsdp, tensor = mesh
        q = policy.decode_params["layers"][0]["self_attn"]["q_proj"]["kernel"]  # merged, then split per layer
        assert q.sharding.shard_shape(q.shape) == (128 // fsdp, 8 // tensor, 16)
        np.testing.assert_allclose(np.asarray(q), np.asarray(single.decode_params["layers"][0]["self_attn"]["q_proj"]
                                                             ["kernel"]), rtol=1e-6, atol=1e-7)


def test_lora_adapters_are_placed_beside_their_kernel_shards():
    """Each device folds W's shard from its own shards of A (kernel's input axes) and B (output axes)."""
    from vla_jax.models import lora

    mesh = shd.make_mesh((1, 2, 4))
    shardings = policy_mesh.lora_shardings(_config(), lora.LoraConfig(rank=4, alpha=8.0), mesh)
    q = shardings["llm"]["layers"]["self_attn"]["q_proj"]
    assert q["lora_A"].shard_shape((2, 128, 4)) == (2, 64, 4)            # [L, embed / fsdp, r]
    assert q["lora_B"].shard_shape((2, 4, 8, 16)) == (2, 4, 2, 16)       # [L, r, heads / tensor, head_dim]
    gate = shardings["llm"]["layers"]["mlp"]["gate_proj"]
    assert gate["lora_B"].shard_shape((2, 4, 256)) == (2, 4, 64)         # [L, r, mlp / tensor]
    down = shardings["llm"]["layers"]["mlp"]["down_proj"]
    assert down["lora_A"].shard_shape((2, 256, 4)) == (2, 64, 4)         # [L, mlp / tensor, r]
