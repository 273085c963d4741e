"""Parity of vla_jax.models.llama against transformers' LlamaForCausalLM (eager attention, fp32).

A small random Llama (hidden 64, 3 layers, 4 heads, vocab 320) is built in torch, its weights
(norm weights included, so a mis-mapped scale shows) are randomised with a fixed seed and
converted with `hf_to_flax`. HF's outputs are the truth for every comparison.

Fixed tolerances (fp32 on CPU):
- logits: max |ours - HF| <= 1e-5 * max(1, max |HF logits|) (HF logits here are O(1));
- gradients of a fixed linear function of the logits: max |diff| <= 1e-4 * max |HF grad| per tensor.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from vla_jax.models.config import LlamaConfig
from vla_jax.models.execution import ExecutionConfig
from vla_jax.models.llama import DecoderLayer, Llama, check_token_ids, init_cache
from vla_jax.hf.keys_llama import flax_to_hf, hf_to_flax

V, D, F, L, H = 320, 64, 128, 3, 4
MAX_LEN = 48
LOGIT_RTOL = 1e-5
GRAD_RTOL = 1e-4


def _hf_model(kv_heads: int, seed: int = 0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=MAX_LEN,
        tie_word_embeddings=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                # std 0.1 (not 0.02) so attention is far from uniform and masking errors show.
                p.normal_(0.0, 0.1)
    return model


def _cfg(kv_heads: int, **kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=H,
                       num_kv_heads=kv_heads, rms_norm_eps=1e-5, rope_theta=10000.0, max_seq_len=MAX_LEN,
                       dtype="float32", **kw)


@functools.lru_cache(maxsize=None)
def _setup(kv_heads: int):
    hf = _hf_model(kv_heads)
    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    cfg = _cfg(kv_heads)
    return hf, sd, cfg, hf_to_flax(sd, cfg)


def _hf_logits(hf, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, ids, positions, cache):
    def f(m):
        hidden, new_cache = m(m.embed(ids), positions, cache)
        return m.logits(hidden), new_cache
    return model.apply({"params": params}, method=f)


def _max_diff(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref))), LOGIT_RTOL * max(1.0, float(np.max(np.abs(ref))))


def _noise_cache(cfg, batch, slots, seed):
    """A cache full of garbage: anything the mask fails to hide corrupts the outputs."""
    c = init_cache(cfg, batch, slots)
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(0, 3.0, v.shape).astype(np.float32)) for k, v in c.items()}


# attention_query_block: 0 = one block; 7 = blocks of 7 query rows over 24 tokens (the last one 3 rows).
# unroll_layers: the stacked layers as one scan or as an unrolled loop (layer_stack), same params.
@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
@pytest.mark.parametrize("query_block", [0, 7], ids=["one_block", "blocks_of_7"])
@pytest.mark.parametrize("kv_heads", [H, 2], ids=["mha", "gqa"])
def test_full_forward_matches_hf(kv_heads, query_block, unroll):
    hf, _, cfg, params = _setup(kv_heads)
    execution = ExecutionConfig(attention_query_block=query_block, unroll_layers=unroll)
    ids = np.random.default_rng(1).integers(0, V, (2, 24))
    ref = _hf_logits(hf, ids)
    pos = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    logits, cache = _forward(Llama(cfg, execution), params, jnp.asarray(ids, jnp.int32), pos, None)
    assert cache is None and logits.dtype == jnp.float32
    diff, tol = _max_diff(logits, ref)
    print(f"full forward ({kv_heads} kv heads, query block {query_block}, unroll {unroll}): max abs diff {diff:.2e} (tol {tol:.2e})")
    assert diff <= tol


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
@pytest.mark.parametrize("remat", ["nothing_saveable", "dots_with_no_batch_dims_saveable", None],
                         ids=["remat", "remat_dots", "no_remat"])
@pytest.mark.parametrize("query_block,kv_heads", [(0, H), (5, H), (5, 2)],
                         ids=["one_block", "blocks_of_5", "blocks_of_5_gqa"])
def test_gradients_match_hf(query_block, kv_heads, remat, unroll):
    """Backward through the layers (one scan, or unrolled with `layer_stack.unstack`'s stacking
    backward), with or without remat (either LlamaConfig.remat_policy), equals torch autograd; with
    query blocks the attention backward is the hand-written one of `execution.blocked_attention`
    (key/value gradients summed over blocks and, with grouped-query heads, over the heads of a group)."""
    hf, _, cfg, params = _setup(kv_heads)
    execution = ExecutionConfig(attention_query_block=query_block, unroll_layers=unroll)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, V, (2, 16))
    weights = rng.normal(size=(2, 16, V)).astype(np.float32)
    hf.zero_grad()
    (hf(input_ids=torch.as_tensor(ids)).logits * torch.as_tensor(weights)).sum().backward()
    ref = {k: p.grad.numpy() for k, p in hf.named_parameters()}

    model = Llama(dataclasses.replace(cfg, remat=remat is not None, remat_policy=remat or "nothing_saveable"), execution)
    pos = jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (2, 16))

    def loss(p):
        def f(m):
            return m.logits(m(m.embed(jnp.asarray(ids, jnp.int32)), pos)[0])
        return jnp.sum(model.apply({"params": p}, method=f) * weights)

    grads = flax_to_hf(jax.jit(jax.grad(loss))(params), cfg)
    assert set(grads) == set(ref)
    worst = 0.0
    for k, g in ref.items():
        rel = float(np.max(np.abs(grads[k] - g))) / float(np.max(np.abs(g)))
        worst = max(worst, rel)
        assert rel <= GRAD_RTOL, k
    print(f"gradients: worst relative max abs diff {worst:.2e} (tol {GRAD_RTOL:.0e})")


@pytest.mark.parametrize("kv_heads", [H, 2], ids=["mha", "gqa"])
def test_prefill_then_decode_matches_full_forward(kv_heads):
    hf, _, cfg, params = _setup(kv_heads)
    T, k, S = 20, 7, 32
    ids = np.random.default_rng(3).integers(0, V, (1, T))
    ref = _hf_logits(hf, ids)
    model = Llama(cfg)
    cache = _noise_cache(cfg, 1, S, seed=4)
    pos = jnp.arange(k, dtype=jnp.int32)[None]
    logits, cache = _forward(model, params, jnp.asarray(ids[:, :k], jnp.int32), pos, cache)
    diffs = [_max_diff(logits, ref[:, :k])]
    for p in range(k, T):
        logits, cache = _forward(model, params, jnp.asarray(ids[:, p:p + 1], jnp.int32),
                                 jnp.full((1, 1), p, jnp.int32), cache)
        diffs.append(_max_diff(logits, ref[:, p:p + 1]))
    worst = max(d for d, _ in diffs)
    print(f"prefill {k} + decode {T - k} ({kv_heads} kv heads): max abs diff {worst:.2e}")
    assert all(d <= tol for d, tol in diffs)


def test_batched_decode_with_right_padded_prompts():
    """Rows of different prompt lengths decode together, each at its own position."""
    hf, _, cfg, params = _setup(H)
    lengths, steps, S = [5, 11, 3], 6, 24
    rng = np.random.default_rng(5)
    rows = [rng.integers(0, V, n + steps) for n in lengths]  # prompt + teacher-forced continuation
    Tp = max(lengths)
    prompt = np.full((len(rows), Tp), V - 1)  # pad id: an arbitrary valid token
    for b, n in enumerate(lengths):
        prompt[b, :n] = rows[b][:n]
    refs = [_hf_logits(hf, r[None])[0] for r in rows]

    model = Llama(cfg)
    cache = _noise_cache(cfg, len(rows), S, seed=6)
    pos = jnp.broadcast_to(jnp.arange(Tp, dtype=jnp.int32), (len(rows), Tp))
    logits, cache = _forward(model, params, jnp.asarray(prompt, jnp.int32), pos, cache)
    diffs = [_max_diff(logits[b, :n], refs[b][:n]) for b, n in enumerate(lengths)]
    for s in range(steps):
        cur = np.array([[r[n + s]] for r, n in zip(rows, lengths)])
        p = np.array([[n + s] for n in lengths], np.int32)
        logits, cache = _forward(model, params, jnp.asarray(cur, jnp.int32), jnp.asarray(p), cache)
        diffs += [_max_diff(logits[b], refs[b][n + s:n + s + 1]) for b, n in enumerate(lengths)]
    worst = max(d for d, _ in diffs)
    print(f"batched right-padded decode: max abs diff {worst:.2e}")
    assert all(d <= tol for d, tol in diffs)


@pytest.mark.parametrize("kv_heads", [H, 2], ids=["mha", "gqa"])
def test_last_layer_on_query_rows_only(kv_heads):
    """The decoder's prefill runs its last layer with `query_rows` (each row's last real token):
    those rows' logits equal HF's for each unpadded prompt, the rows equal the full layer's, and
    every position's keys/values still reach the cache, identical to the full layer's."""
    hf, _, cfg, params = _setup(kv_heads)
    lengths, S = [9, 4], 16
    rng = np.random.default_rng(7)
    rows = [rng.integers(0, V, n) for n in lengths]
    prompt = np.full((2, max(lengths)), V - 1)
    for b, n in enumerate(lengths):
        prompt[b, :n] = rows[b]
    refs = [_hf_logits(hf, r[None])[0, -1] for r in rows]
    last = jnp.asarray([[n - 1] for n in lengths], jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
    layer, model = DecoderLayer(cfg), Llama(cfg)
    x = model.apply({"params": params}, jnp.asarray(prompt, jnp.int32), method=Llama.embed)
    for i in range(cfg.num_layers):
        p = {"params": jax.tree.map(lambda a: a[i], params["layers"])}
        cache = init_cache(dataclasses.replace(cfg, num_layers=1), 2, S)
        cache = {k: v[0] for k, v in cache.items()}
        if i < cfg.num_layers - 1:
            x, _ = layer.apply(p, x, pos, cache)
    x_rows, cache_rows = layer.apply(p, x, pos, cache, last)
    x_full, cache_full = layer.apply(p, x, pos, cache)
    assert x_rows.shape == (2, 1, D)
    np.testing.assert_allclose(np.asarray(x_rows), np.take_along_axis(np.asarray(x_full), np.asarray(last)[..., None], 1),
                               rtol=0, atol=1e-5)
    for k in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(cache_rows[k]), np.asarray(cache_full[k]))
    logits = model.apply({"params": params}, x_rows, method=lambda m, h: m.logits(m.norm(h)))
    for b in range(2):
        diff, tol = _max_diff(logits[b, 0], refs[b])
        assert diff <= tol, (b, diff, tol)


@pytest.mark.parametrize("prefix", ["", "language_model."])
def test_round_trip_and_tree_matches_module(prefix):
    _, sd, cfg, _ = _setup(2)
    sd = {prefix + k: v for k, v in sd.items()}
    params = hf_to_flax(sd, cfg, prefix=prefix)
    back = flax_to_hf(params, cfg, prefix=prefix)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k

    # The converted tree is exactly the module's own parameter tree, and every parameter carries
    # logical axis names (scanned ones lead with 'layers').
    abstract = jax.eval_shape(lambda: Llama(cfg).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, D)), jnp.zeros((1, 4), jnp.int32),
        method=lambda m, x, p: (m.embed(jnp.zeros((1, 4), jnp.int32)), m.logits(m(x, p)[0]))))["params"]
    boxed = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(b, nn.Partitioned) and len(b.names) == b.value.ndim for b in boxed)
    flat = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for path, b in flat:
        assert (b.names[0] == "layers") == (jax.tree_util.keystr(path).startswith("['layers']")), path
    unboxed = nn.meta.unbox(abstract)
    assert jax.tree.structure(unboxed) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: a.shape, unboxed) == jax.tree.map(lambda a: a.shape, params)


def test_bad_inputs_raise():
    _, sd, cfg, params = _setup(H)
    model = Llama(cfg)
    ok_ids = np.zeros((1, 4), np.int32)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        check_token_ids(np.array([[1, V]]), V)
    with pytest.raises(ValueError, match="-1"):
        check_token_ids(np.array([[-1, 3]]), V)
    with pytest.raises(ValueError, match="integers"):
        check_token_ids(np.array([0.5]), V)
    check_token_ids(ok_ids, V)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.apply({"params": params}, jnp.array([[0, V + 5]], jnp.int32), method=Llama.embed)

    T = MAX_LEN + 1
    with pytest.raises(ValueError, match="max_seq_len"):
        model.apply({"params": params}, jnp.zeros((1, T, D)), jnp.zeros((1, T), jnp.int32))
    with pytest.raises(ValueError, match="cache too short"):
        model.apply({"params": params}, jnp.zeros((1, 8, D)), jnp.arange(8)[None], init_cache(cfg, 1, 4))
    with pytest.raises(ValueError, match="cache too short"):  # write at positions 5..8 of 8 slots
        model.apply({"params": params}, jnp.zeros((1, 4, D)), jnp.arange(5, 9)[None], init_cache(cfg, 1, 8))
    with pytest.raises(ValueError, match="max_seq_len"):
        init_cache(cfg, 1, MAX_LEN + 1)
    with pytest.raises(ValueError, match="attention_query_block=-2"):
        Llama(cfg, ExecutionConfig(attention_query_block=-2)).apply(
            {"params": params}, jnp.zeros((1, 4, D)), jnp.arange(4)[None])

    with pytest.raises(ValueError, match="unknown HF Llama key"):
        hf_to_flax(dict(sd, **{"model.extra.weight": np.zeros(1)}), cfg)
    with pytest.raises(ValueError, match="missing"):
        hf_to_flax({k: v for k, v in sd.items() if "layers.2.mlp.up_proj" not in k}, cfg)
    with pytest.raises(ValueError, match="lm_head.weight"):
        hf_to_flax(dict(sd, **{"lm_head.weight": np.zeros((V + 1, D), np.float32)}), cfg)
