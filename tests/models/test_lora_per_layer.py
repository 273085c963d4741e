"""Per-layer LoRA (lora.attach_lora + models.dense.Linear's adapter term), the training default, against
PEFT 0.11.1's unmerged LoRA layers in torch: logits AND adapter gradients (torch autograd), with the
layers scanned (nn.scan + nn.remat) and unrolled (layer_stack + jax.checkpoint).

Truth: the torch copy of the reference model with PEFT's "all-linear" targets wrapped as
`base(x) + scale * B(A(x))` (tests/models/test_lora.py builds it; its own tests of the merged path are
unchanged), and torch autograd for the gradients.
"""

import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from tests.models.test_lora import (CFG, LCFG, LOGITS_RTOL, PROMPT, TARGET_IDS, _images, _install_torch_lora, _our_adapter,
                             _peft_all_linear_targets, _random_lora)
from tests.torch_reference import TorchOpenVLA
from vla_jax.hf import keys_openvla
from vla_jax.models import lora
from vla_jax.models.execution import ExecutionConfig
from vla_jax.models.openvla import OpenVLA
from vla_jax.training.state import ParamHooks

GRAD_RTOL = 1e-4  # max |diff| <= GRAD_RTOL * max |torch grad| over each adapter matrix; fp32 both sides


def _config(unroll: bool):
    kw = dict(remat=True)
    return dataclasses.replace(CFG, dino=dataclasses.replace(CFG.dino, **kw), siglip=dataclasses.replace(CFG.siglip, **kw),
                               llama=dataclasses.replace(CFG.llama, **kw), execution=ExecutionConfig(unroll_layers=unroll))


@pytest.fixture(scope="module")
def torch_truth():
    """(base params, adapters, images, ids, torch logits, {our lora path + kind: stacked torch grad})."""
    torch.manual_seed(0)
    ref = TorchOpenVLA(CFG).randomize(seed=1)
    base = jax.tree.map(jnp.asarray, keys_openvla.hf_to_params(ref.hf_state_dict(), CFG))
    shapes = jax.eval_shape(lambda r: lora.init_lora(base, LCFG, r), jax.random.PRNGKey(0))
    adapters = _random_lora(shapes, seed=11)
    images, ids = _images(3), np.array([PROMPT], np.int32)
    ref = copy.deepcopy(ref)
    names = _peft_all_linear_targets(ref)  # before wrapping (the wrappers hold Linears of their own)
    _install_torch_lora(ref, adapters, LCFG.rank, LCFG.scale)
    logits = ref(images, torch.from_numpy(ids).long())
    logp = torch.log_softmax(logits[:, -TARGET_IDS.shape[1]:].double(), dim=-1)
    loss = -logp.gather(-1, torch.from_numpy(TARGET_IDS).long()[..., None]).mean()
    loss.backward()
    flat = {k: np.zeros(v.shape, np.float32) for k, v in traverse_util.flatten_dict(nn.meta.unbox(shapes)).items()}
    for name in names:
        m = ref.get_submodule(name)
        path, idx = _our_adapter(name)
        for kind in ("lora_A", "lora_B"):
            g = getattr(m, kind).weight.grad
            g = np.zeros(tuple(getattr(m, kind).weight.shape), np.float32) if g is None else g.numpy()
            target = flat[path + (kind,)]
            one = target[idx] if idx is not None else target
            if isinstance(m.base, torch.nn.Conv2d):  # torch A [r, 3, p, p] -> ours [p, p, 3, r]; B [D, r, 1, 1]
                g = g.transpose(2, 3, 1, 0) if kind == "lora_A" else g[:, :, 0, 0].T
            else:  # torch A [r, in] / B [out, r] -> ours [*in, r] / [r, *out]
                g = g.T.reshape(one.shape)
            one[...] = g
    return base, adapters, images, ids, logits.detach().numpy(), flat


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_per_layer_logits_and_grads_match_peft_in_torch(torch_truth, unroll):
    base, adapters, images, ids, expected, torch_grads = torch_truth
    model = OpenVLA(_config(unroll))
    hooks = ParamHooks(**lora.hook_functions(LCFG))  # the training default: per layer

    @jax.jit
    def loss_and_grad(adapters):
        def loss(a):
            logits = model.apply({"params": hooks.apply_params({**base, "lora": a})}, images, ids)
            logp = jax.nn.log_softmax(logits[:, -TARGET_IDS.shape[1]:], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, TARGET_IDS[..., None], axis=-1)), logits
        return jax.value_and_grad(loss, has_aux=True)(adapters)

    (_, logits), grads = loss_and_grad(adapters)
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(np.asarray(logits) - expected).max())
    assert err <= LOGITS_RTOL * scale, f"logits: max abs diff {err} vs logit scale {scale}"
    flat = traverse_util.flatten_dict(grads)
    assert set(flat) == set(torch_grads)
    nonzero = 0
    for key, want in torch_grads.items():
        got = np.asarray(flat[key])
        peak = float(np.abs(want).max())
        if peak == 0.0:  # never-run modules (last_block, attn_pool): exactly zero here too
            assert not np.any(got), key
            continue
        nonzero += 1
        diff = float(np.abs(got - want).max())
        assert diff <= GRAD_RTOL * peak, f"{'/'.join(key)}: max abs diff {diff} vs max |grad| {peak}"
    assert nonzero >= len(torch_grads) // 2


def test_hooks_attach_adapters_beside_untouched_kernels():
    """The per-layer hook adds no full-size kernel: every kernel is the very array it was given, its
    adapters sit beside it (a fused qkv's members share A), and bf16 bases keep fp32 adapters."""
    images, ids = _images(0), np.array([PROMPT], np.int32)
    cfg = _config(False)
    base = jax.eval_shape(lambda r: nn.meta.unbox(OpenVLA(cfg).init(r, images, ids)["params"]), jax.random.PRNGKey(0))
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), base)
    hooks = ParamHooks(**lora.hook_functions(LCFG))
    combined = jax.eval_shape(lambda p, r: hooks.extend_params(p, r), base, jax.random.PRNGKey(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.meta.unbox(combined["lora"])))
    real = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nn.meta.unbox(combined))
    applied = hooks.apply_params(real)
    flat_in, flat_out = traverse_util.flatten_dict(real), traverse_util.flatten_dict(applied)
    for path, x in flat_in.items():
        if path[0] != "lora":
            assert flat_out[path] is x, path
    gate = applied["llm"]["layers"]["mlp"]["gate_proj"]
    assert gate["lora_A"].shape == (2, 64, 8) and gate["lora_B"].shape == (2, 8, 128)
    attn = applied["dino"]["blocks"]["attn"]
    assert attn["query"]["lora_A"] is attn["value"]["lora_A"]
    assert attn["key"]["lora_B"].shape == (2, 8, 2, 16)
    merged = lora.hook_functions(LCFG, per_layer=False)["apply_params"](real)
    assert "lora_A" not in merged["llm"]["layers"]["mlp"]["gate_proj"]
    with pytest.raises(ValueError, match="merged kernels only"):
        lora.hook_functions(LCFG, dtype="bfloat16")
