"""LoRA (vla_jax.models.lora) against PEFT 0.11.1 semantics reproduced independently in torch.

Truth used here: the reference parameter count 110,828,288 for openvla-7b (OPENVLA_REFERENCE.md §9);
a torch copy of the reference model (tests/torch_reference.py) whose LoRA targets are discovered the
way PEFT's "all-linear" does (base names of every nn.Linear, any module whose name ends in one) and
whose adapters run unmerged, `base(x) + scale * B(A(x))`, as PEFT's Linear/Conv2d LoRA layers do;
float64 numpy for the merge algebra.
"""

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import traverse_util

from tests.torch_reference import TorchOpenVLA
from vla_jax.hf import keys_openvla
from vla_jax.models import lora
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA

CFG = with_dtypes(get_preset("tiny"), "float32")
# scale alpha/r = 2 (not finetune.py's 0.5) so that a wrong scale cannot pass by accident.
LCFG = lora.LoraConfig(rank=8, alpha=16)
# fp32 on both sides; differences come only from summation order. Fixed, never loosened.
LOGITS_RTOL = 1e-5  # max |diff| <= LOGITS_RTOL * max(1, max |reference logit|)
PROMPT = [1, 512, 29901, 1724, 3158, 881, 278, 29871]
TARGET_IDS = np.array([[31800, 31900, 32000, 31850]], np.int32)  # CE targets at the last 4 positions


# ------------------------------------------------------------------------------------------------
# Torch side: PEFT 0.11.1 "all-linear" discovery and unmerged LoRA layers.


class _TorchLora(torch.nn.Module):
    """PEFT's LoRA layer: y = base(x) + scale * lora_B(lora_A(x)); conv A has the base kernel/stride."""

    def __init__(self, base: torch.nn.Module, rank: int, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        if isinstance(base, torch.nn.Linear):
            self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, torch.nn.Conv2d):
            self.lora_A = torch.nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                          bias=False)
            self.lora_B = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"PEFT would reject target of type {type(base)}")

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scale


def _peft_all_linear_targets(model: torch.nn.Module) -> list:
    """PEFT 0.11.1: base names of all nn.Linear, minus the full name of the output embedding
    ('language_model.lm_head', never a base name, so nothing is removed); a module is a target
    when its name equals or ends with '.' + one of them."""
    base_names = {name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    base_names -= {"language_model.lm_head"}
    return [name for name, _ in model.named_modules()
            if any(name == b or name.endswith("." + b) for b in base_names)]


def _our_adapter(name: str):
    """torch module name -> (our LoRA tree path, stacked-layer index or None)."""
    parts = name.split(".")
    towers = {"featurizer": ("dino", CFG.dino), "fused_featurizer": ("siglip", CFG.siglip)}
    if parts[0] in towers:
        tower, vcfg = towers[parts[0]]
        if parts[1] == "patch_embed":
            return (tower, "patch_embed"), None
        if parts[1] == "attn_pool":
            return (tower,) + tuple(parts[1:]), None
        i = int(parts[2])
        sub = {"attn.qkv": ("attn", "qkv"), "attn.proj": ("attn", "out"), "mlp.fc1": ("mlp", "fc1"),
               "mlp.fc2": ("mlp", "fc2")}[".".join(parts[3:])]
        return ((tower, "last_block") + sub, None) if i == vcfg.depth - 1 else ((tower, "blocks") + sub, i)
    if parts[0] == "projector":
        return ("projector", parts[1]), None
    if parts[:3] == ["language_model", "model", "layers"]:
        return ("llm", "layers") + tuple(parts[4:]), int(parts[3])
    if parts == ["language_model", "lm_head"]:
        return ("llm", "lm_head"), None
    raise KeyError(name)


def _install_torch_lora(model: torch.nn.Module, lora_tree: dict, rank: int, scale: float) -> set:
    """Wraps every PEFT target of `model` and copies our adapters into PEFT's torch layouts.
    Returns the set of our LoRA paths used."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nn.meta.unbox(lora_tree)).items()}
    used = set()
    for name in _peft_all_linear_targets(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = _TorchLora(getattr(parent, child), rank, scale)
        path, idx = _our_adapter(name)
        used.add(path)
        a, b = flat[path + ("lora_A",)], flat[path + ("lora_B",)]
        if idx is not None:
            a, b = a[idx], b[idx]
        if isinstance(wrapped.base, torch.nn.Conv2d):  # our A [p, p, 3, r] -> torch [r, 3, p, p]
            wa, wb = a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
        else:  # flatten in/out axes in our (= torch's) order: A [in, r] -> [r, in], B [r, out] -> [out, r]
            wa, wb = a.reshape(-1, rank).T, b.reshape(rank, -1).T
        with torch.no_grad():
            wrapped.lora_A.weight.copy_(torch.from_numpy(np.ascontiguousarray(wa)))
            wrapped.lora_B.weight.copy_(torch.from_numpy(np.ascontiguousarray(wb)))
        setattr(parent, child, wrapped)
    return used


# ------------------------------------------------------------------------------------------------
# Shared fixtures: one reference model, one compiled loss/grad function.


def _images(seed):
    return np.random.default_rng(seed).integers(0, 256, size=(1, CFG.image_size, CFG.image_size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ref = TorchOpenVLA(CFG).randomize(seed=1)
    base = jax.tree.map(jnp.asarray, keys_openvla.hf_to_params(ref.hf_state_dict(), CFG))
    model = OpenVLA(CFG)

    @jax.jit
    def loss_and_grad(combined, images, ids, targets):
        def loss(p):
            logits = model.apply({"params": lora.effective_params(p, LCFG)}, images, ids)
            logp = jax.nn.log_softmax(logits[:, -targets.shape[1]:], axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), logits
        return jax.value_and_grad(loss, has_aux=True)(combined)

    # One jitted init for the whole module (eager JAX would compile one program per op and shape).
    params0 = nn.meta.unbox(jax.jit(lambda p, r: lora.add_lora(p, r, LCFG))(base, jax.random.PRNGKey(0)))
    return ref, base, loss_and_grad, params0


def _random_lora(adapters, seed):
    """Adapters shaped like `adapters` with A ~ N(0, 1/r^2) and B ~ N(0, 0.1^2): deltas comparable
    to the weights. Drawn with numpy (jax.random would cost seconds of compile per call)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.standard_normal(x.shape, np.float32)
                                 * (0.1 if p[-1].key == "lora_B" else 1.0 / LCFG.rank)), nn.meta.unbox(adapters))


# ------------------------------------------------------------------------------------------------


def test_openvla_7b_count_is_peft_all_linear():
    cfg = get_preset("openvla-7b")
    images, ids = np.zeros((1, cfg.image_size, cfg.image_size, 3), np.uint8), np.ones((1, 4), np.int32)
    shapes = jax.eval_shape(lambda r: OpenVLA(cfg).init(r, images, ids)["params"], jax.random.PRNGKey(0))
    adapters = jax.eval_shape(lambda r: lora.init_lora(shapes, lora.LoraConfig(), r), jax.random.PRNGKey(0))
    assert lora.count_params(adapters) == 110_828_288  # OPENVLA_REFERENCE.md §9 (PEFT 0.11.1, r=32)
    names = {t.peft_name for t in lora.targets(shapes, lora.LoraConfig())}
    assert names == {"qkv", "proj", "fc1", "fc2", "fc3", "q", "kv", "q_proj", "k_proj", "v_proj", "o_proj",
                     "gate_proj", "up_proj", "down_proj", "lm_head"}
    # Logical names are carried for sharding: e.g. the Llama q_proj adapter.
    q = adapters["llm"]["layers"]["self_attn"]["q_proj"]
    assert q["lora_A"].names == ("layers", "embed", None) and q["lora_A"].value.shape == (32, 4096, 32)
    assert q["lora_B"].names == ("layers", None, "heads", "kv") and q["lora_B"].value.shape == (32, 32, 32, 128)


def test_tiny_targets_and_count_match_peft_discovery_in_torch():
    torch.manual_seed(0)
    ref = TorchOpenVLA(CFG)
    found = _peft_all_linear_targets(ref)
    torch_count = 0
    for name in found:
        m = ref.get_submodule(name)
        if isinstance(m, torch.nn.Conv2d):  # PEFT: A conv [r, in, kh, kw], B conv [out, r, 1, 1]
            torch_count += LCFG.rank * (m.in_channels * math.prod(m.kernel_size) + m.out_channels)
        else:
            torch_count += LCFG.rank * (m.in_features + m.out_features)
    shapes = jax.eval_shape(lambda r: OpenVLA(CFG).init(r, _images(0), np.array([PROMPT], np.int32))["params"],
                            jax.random.PRNGKey(0))
    adapters = jax.eval_shape(lambda r: lora.init_lora(shapes, LCFG, r), jax.random.PRNGKey(0))
    assert lora.count_params(adapters) == torch_count
    ours = {t.path for t in lora.targets(shapes, LCFG)}
    assert {_our_adapter(n)[0] for n in found} == ours
    assert any(isinstance(ref.get_submodule(n), torch.nn.Conv2d) for n in found)  # patch_embed.proj
    assert "language_model.lm_head" in found


def test_init_is_peft_gaussian_and_zero_b_is_exactly_the_base(setup):
    _, base, _, params0 = setup
    adapters = params0["lora"]
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(adapters))[0]
    a_all = np.concatenate([np.ravel(x) for p, x in flat if p[-1].key == "lora_A"])
    assert all(not np.any(np.asarray(x)) for p, x in flat if p[-1].key == "lora_B")
    assert abs(a_all.std() * LCFG.rank - 1.0) < 0.02 and abs(a_all.mean()) < 0.02 / LCFG.rank, a_all.size
    merged = jax.jit(lambda p, a: lora.merge(p, a, LCFG))(base, adapters)
    for (path, w), m in zip(jax.tree_util.tree_flatten_with_path(base)[0], jax.tree.leaves(merged)):
        assert np.array_equal(np.asarray(w), np.asarray(m)), jax.tree_util.keystr(path)
    # Boxed params stay boxed with the same names.
    boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (None,) * x.ndim), base)
    out = jax.eval_shape(lambda p, a: lora.apply_lora(p, a, LCFG), boxed, adapters)
    assert isinstance(out["llm"]["lm_head"]["kernel"], nn.LogicallyPartitioned)


def test_merge_algebra_in_float64(setup):
    _, base, _, params0 = setup
    adapters = _random_lora(params0["lora"], seed=5)
    merged = jax.jit(lambda p, a: lora.merge(p, a, LCFG))(base, adapters)
    flat_base = {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in
                 jax.tree_util.tree_flatten_with_path(base)[0]}
    flat_merged = {jax.tree_util.keystr(p): np.asarray(x, np.float64) for p, x in
                   jax.tree_util.tree_flatten_with_path(merged)[0]}
    touched = set()
    for t in lora.targets(base, LCFG):
        node = adapters
        for k in t.path:
            node = node[k]
        a, b = np.asarray(node["lora_A"], np.float64), np.asarray(node["lora_B"], np.float64)
        nb, r = len(t.batch_shape), LCFG.rank
        d = np.einsum("...ir,...ro->...io", a.reshape(t.batch_shape + (-1, r)), b.reshape(t.batch_shape + (r, -1)))
        d = LCFG.scale * d.reshape(t.batch_shape + t.in_shape + t.out_shape)
        for i, kpath in enumerate(t.kernels):
            key = "".join(f"['{k}']" for k in kpath)
            want = flat_base[key] + (np.take(d, i, axis=nb + len(t.in_shape)) if len(t.kernels) > 1 else d)
            np.testing.assert_allclose(flat_merged[key], want, rtol=1e-6, atol=1e-7, err_msg=key)
            touched.add(key)
    for key in set(flat_base) - touched:  # biases, norms, embeddings, tokens: untouched bit for bit
        assert np.array_equal(flat_base[key], flat_merged[key]), key
    assert "['llm']['embed_tokens']['embedding']" not in touched


def test_logits_match_unmerged_peft_lora_in_torch(setup):
    ref, base, loss_and_grad, params0 = setup
    images, ids = _images(1), np.array([PROMPT], np.int32)
    adapters = _random_lora(params0["lora"], seed=7)
    (_, got), _ = loss_and_grad({**base, "lora": adapters}, images, ids, TARGET_IDS)
    ref = copy.deepcopy(ref)  # the module-scoped reference stays LoRA-free
    with torch.no_grad():
        base_logits = ref(images, torch.from_numpy(ids).long()).numpy()
        used = _install_torch_lora(ref, adapters, LCFG.rank, LCFG.scale)
        expected = ref(images, torch.from_numpy(ids).long()).numpy()
    assert used == {t.path for t in lora.targets(base, LCFG)}
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(np.asarray(got) - expected).max())
    assert err <= LOGITS_RTOL * scale, f"max abs diff {err} vs logit scale {scale}"
    # The adapters matter far beyond the tolerance.
    assert float(np.abs(expected - base_logits).max()) > 1000 * LOGITS_RTOL * scale


def test_masked_optimizer_trains_only_the_adapters(setup):
    _, base, loss_and_grad, params = setup
    images, ids = _images(2), np.array([PROMPT], np.int32)
    mask = lora.trainable_mask(params)
    labels = jax.tree.map(lambda m: "train" if m else "frozen", mask)
    tx = optax.multi_transform({"train": optax.adamw(1e-2, weight_decay=0.01), "frozen": optax.set_to_zero()},
                               labels)
    opt_state = tx.init(params)

    @jax.jit
    def step(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def per_adapter(tree, kind):
        """{(path..., layer): |grad| summed} for one matrix kind, per stacked layer."""
        out = {}
        for p, x in jax.tree_util.tree_flatten_with_path(tree["lora"])[0]:
            keys = tuple(k.key for k in p)
            if keys[-1] != kind:
                continue
            x = np.abs(np.asarray(x))
            stacked = x.reshape((x.shape[0], -1)) if ("blocks" in keys or "layers" in keys) else x.reshape(1, -1)
            for i, row in enumerate(stacked):
                out[keys[:-1] + (i,)] = float(row.sum())
        return out

    def unused(key):
        return "last_block" in key or "attn_pool" in key

    (_, _), g0 = loss_and_grad(params, images, ids, TARGET_IDS)
    # B = 0 at init: dL/dA = 0 exactly; dL/dB != 0 in every used adapter and layer.
    assert all(v == 0.0 for v in per_adapter(g0, "lora_A").values())
    gb = per_adapter(g0, "lora_B")
    assert all((v == 0.0) == unused(k) for k, v in gb.items()), {k: v for k, v in gb.items()}

    new, opt_state = step(g0, opt_state, params)
    for (p, x), y, m in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new),
                            jax.tree.leaves(mask)):
        key = jax.tree_util.keystr(p)
        if not m:  # frozen: the base model and the never-run adapters stay bit for bit
            assert np.array_equal(np.asarray(x), np.asarray(y)), key
        elif key.endswith("['lora_B']"):
            assert not np.array_equal(np.asarray(x), np.asarray(y)), key
    assert any(m for m in jax.tree.leaves(mask)) and not any(jax.tree.leaves(lora.trainable_mask(base)))

    (_, _), g1 = loss_and_grad(new, images, ids, TARGET_IDS)
    ga = per_adapter(g1, "lora_A")
    assert all((v == 0.0) == unused(k) for k, v in ga.items()), {k: v for k, v in ga.items()}


def test_bad_inputs_raise(setup):
    _, base, _, _ = setup
    adapters = jax.eval_shape(lambda r: lora.init_lora(base, LCFG, r), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        lora.LoraConfig(dropout=0.1)
    with pytest.raises(ValueError, match="unknown base names"):
        lora.LoraConfig(targets=("qkv", "attn"))
    with pytest.raises(ValueError, match="shape"):
        lora.apply_lora(base, adapters, lora.LoraConfig(rank=4, alpha=16))
    with pytest.raises(ValueError, match="missing"):
        lora.apply_lora(base, {"llm": adapters["llm"]}, LCFG)
    with pytest.raises(ValueError, match="not in the LoRA base-name table"):
        lora.targets({**base, "extra": {"gate": {"kernel": jnp.zeros((2, 2))}}}, LCFG)
    # A subset of base names adapts only those modules.
    only_q = lora.targets(base, lora.LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")))
    assert {t.path[-1] for t in only_q} == {"q_proj", "v_proj"}
