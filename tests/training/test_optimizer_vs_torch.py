"""The optimizer (training/state.py: global-norm clipping + AdamW + schedule, applied to the trainable
subtree the way the train step applies it) against torch.optim.AdamW + torch.nn.utils.clip_grad_norm_
+ torch.optim.lr_scheduler.LambdaLR on the same parameters and gradients.

Gradients are scaled so their global norm is well above the clip threshold on most steps (clipping
active) and below it on some (clipping a no-op), so a chain without the clip, with the clip after
Adam, or with a different norm fails. Parameters and both Adam moments are compared after every step.
The learning-rate schedules are written out here from their definitions (linear warmup from 0, then
constant or cosine to end_lr_fraction * lr at num_steps), not taken from optax.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import torch

from vla_jax.models import lora
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.training import state as st

# OpenVLA's pretraining / full fine-tuning run (OPENVLA_REFERENCE.md §7) and OpenVLA-OFT's fine-tuning
# (OFT_REFERENCE.md: lr 5e-4, torch's default wd 0.01; OFT itself does not clip, the clip here is to
# check the chain with both decay and clipping on). torch.optim.AdamW defaults: betas (0.9, 0.999), eps 1e-8.
OPENVLA = st.OptimConfig(learning_rate=2e-5, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)
OFT = st.OptimConfig(learning_rate=5e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0)


def lr_at(cfg: st.OptimConfig, t: int, num_steps: int) -> float:
    """The learning rate of update t (0-based), from the schedules' definitions."""
    lr, warm = cfg.learning_rate, cfg.warmup_steps
    if cfg.schedule == "constant":
        return lr
    if t < warm:
        return lr * t / warm
    if cfg.schedule == "warmup_constant":
        return lr
    end = lr * cfg.end_lr_fraction
    frac = min(t - warm, num_steps - warm) / (num_steps - warm)
    return end + (lr - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


class TorchAdamW:
    """torch's AdamW over a flat list of numpy arrays, clip_grad_norm_ before each step, in float64:
    the reference is then exact to fp32 precision (torch's float32 global norm over the tiny model's
    2M-element embedding gradient is 3e-5 off the exact value; optax's 5e-8)."""

    def __init__(self, cfg: st.OptimConfig, params, num_steps: int):
        self.cfg = cfg
        self.params = [torch.nn.Parameter(torch.tensor(np.array(p, np.float64))) for p in params]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda t: lr_at(cfg, t, num_steps) / cfg.learning_rate)

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = torch.tensor(np.array(g, np.float64))
        norm = None
        if self.cfg.grad_clip > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip))
        self.opt.step()
        self.sched.step()
        return norm

    def values(self):
        return [p.detach().numpy().copy() for p in self.params]

    def moments(self):
        st_ = [self.opt.state[p] for p in self.params]
        return [s["exp_avg"].numpy().copy() for s in st_], [s["exp_avg_sq"].numpy().copy() for s in st_]


def adam_state(opt_state):
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    (adam,) = [x for x in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    return adam


def grad_sequence(shapes, n_steps, clip, seed):
    """n_steps gradient lists; global norms cycle through 20x, 5x, 0.5x and 3x the clip threshold
    (OpenVLA's/OFT's threshold is 1.0), each leaf with its own scale so the clip's single global factor
    matters."""
    rng = np.random.default_rng(seed)
    factors = (20.0, 5.0, 0.5, 3.0)
    out = []
    for t in range(n_steps):
        gs = [rng.normal(0, 1, s) * rng.uniform(0.1, 3.0) for s in shapes]
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in gs))
        target = factors[t % len(factors)] * (clip if clip > 0 else 1.0)
        out.append([(g * target / norm).astype(np.float32) for g in gs])
    return out


def run_both(cfg, params, mask, grads_per_step, num_steps):
    """Our chain on the trainable subtree (select / tx.update / apply_updates / merge, as the train
    step does it) and torch on the trainable leaves. Yields per step (ours, torch) after checking the
    frozen leaves stayed bit-identical."""
    tx, schedule = st.make_optimizer(cfg, num_steps)
    trainable = st.select(params, mask, True)
    frozen = st.select(params, mask, False)
    opt_state = tx.init(trainable)
    flat_mask = jax.tree.leaves(mask)
    flat_params = jax.tree.leaves(params)
    torch_side = TorchAdamW(cfg, [p for p, m in zip(flat_params, flat_mask) if m], num_steps)

    @jax.jit
    def update(trainable, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    for t, grads in enumerate(grads_per_step):
        grad_tree = st.select(jax.tree.unflatten(jax.tree.structure(params), grads), mask, True)
        trainable, opt_state = update(trainable, opt_state, grad_tree)
        torch_norm = torch_side.step([g for g, m in zip(grads, flat_mask) if m])
        full = st.merge(mask, trainable, frozen)
        for p, p0, m in zip(jax.tree.leaves(full), flat_params, flat_mask):
            if not m:
                np.testing.assert_array_equal(p, p0)
        np.testing.assert_allclose(float(schedule(t)), lr_at(cfg, t, num_steps), rtol=1e-6, atol=1e-12)
        yield t, jax.tree.leaves(trainable), adam_state(opt_state), torch_side, torch_norm


def check_step(cfg, t, ours, adam, torch_side, params0):
    """Parameters, their change, and both moments within fp32 tolerances.

    optax computes Adam's bias corrections 1 - b**t in float32 (1 - float32(0.999) is 1.3e-5 off
    0.001), torch in float64, so each update differs by up to ~7e-6 of its size: the change is
    compared to 5e-5 relative (plus 2e-5 lr per step absolute for elements whose change is ~0,
    plus an ulp of the float32 parameter per step for its own rounding)."""
    lr = cfg.learning_rate
    assert len(params0) == len(ours)
    theirs = torch_side.values()
    mu, nu = torch_side.moments()
    assert len(ours) == len(theirs) == len(jax.tree.leaves(adam.mu)) > 0
    for i, (a, b, p0, m_ours, m_torch, v_ours, v_torch) in enumerate(
            zip(ours, theirs, params0, jax.tree.leaves(adam.mu), mu, jax.tree.leaves(adam.nu), nu)):
        a = np.asarray(a)
        msg = f"step {t}, trainable leaf {i}"
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-4 * lr, err_msg=msg)
        # The change itself (lr-sized): a wrong scale anywhere shows here.
        # (plus our float32 parameters' own rounding: an ulp per step)
        da, db = a.astype(np.float64) - p0, b.astype(np.float64) - p0
        bound = 5e-5 * np.abs(db) + 2e-5 * lr * (t + 1) + (t + 2) * np.spacing(np.abs(b).astype(np.float32))
        worst = np.argmax(np.abs(da - db) - bound)
        assert (np.abs(da - db) <= bound).all(), (msg, da.flat[worst], db.flat[worst])
        # Moments: sums of rounded terms; near-cancelling entries get an absolute tolerance on the leaf's scale.
        np.testing.assert_allclose(np.asarray(m_ours), m_torch, rtol=2e-5, atol=2e-6 * np.abs(m_torch).max(),
                                   err_msg=msg)
        np.testing.assert_allclose(np.asarray(v_ours), v_torch, rtol=2e-5, atol=2e-6 * np.abs(v_torch).max(),
                                   err_msg=msg)


def random_params(abstract, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (rng.normal(0, 0.02, a.shape)).astype(np.float32), abstract)


@pytest.fixture(scope="module")
def tiny_trees():
    """Abstract (shape-only) parameter trees of the tiny OpenVLA, plain and with LoRA adapters."""
    cfg = with_dtypes(get_preset("tiny"), "float32")
    cfg = dataclasses.replace(cfg, dino=dataclasses.replace(cfg.dino, image_size=28),
                              siglip=dataclasses.replace(cfg.siglip, image_size=28))
    model = OpenVLA(cfg)
    example = (np.zeros((1, 28, 28, 3), np.uint8), np.ones((1, 8), np.int32))
    plain = nn.meta.unbox(st.abstract_params(model, example))
    lcfg = lora.LoraConfig(rank=4, alpha=8)
    with_lora = nn.meta.unbox(st.abstract_params(model, example, st.ParamHooks(**lora.hook_functions(lcfg))))
    return plain, with_lora


def _small_tree():
    shapes = {"a": (5, 7), "b": (7,), "c": (3, 4, 5), "d": (11,)}
    return {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("cfg", [OPENVLA, OFT], ids=["openvla", "oft"])
def test_one_step_with_active_clipping_matches_torch(cfg):
    params = random_params(_small_tree())
    mask = jax.tree.map(lambda _: True, params)
    grads = grad_sequence([p.shape for p in jax.tree.leaves(params)], 1, cfg.grad_clip, seed=1)
    params0 = jax.tree.leaves(params)
    for t, ours, adam, torch_side, norm in run_both(cfg, params, mask, grads, 10):
        assert norm > 10 * cfg.grad_clip  # the clip really scaled the gradients
        check_step(cfg, t, ours, adam, torch_side, params0)


@pytest.mark.parametrize("cfg", [
    OPENVLA,
    dataclasses.replace(OFT, schedule="warmup_constant", warmup_steps=3),
    dataclasses.replace(OFT, schedule="warmup_cosine", warmup_steps=2, end_lr_fraction=0.05),
    dataclasses.replace(OFT, grad_clip=0.0),  # OFT's own setting: no clipping
    dataclasses.replace(OFT, grad_clip=0.25, weight_decay=0.1),
], ids=["openvla-constant", "oft-warmup-constant", "oft-warmup-cosine", "oft-no-clip", "clip0.25-wd0.1"])
def test_several_steps_match_torch(cfg):
    n = 9
    params = random_params(_small_tree(), seed=2)
    mask = jax.tree.map(lambda _: True, params)
    grads = grad_sequence([p.shape for p in jax.tree.leaves(params)], n, cfg.grad_clip, seed=3)
    params0 = jax.tree.leaves(params)
    for t, ours, adam, torch_side, _ in run_both(cfg, params, mask, grads, n):
        check_step(cfg, t, ours, adam, torch_side, params0)
    assert t == n - 1


def test_vision_frozen_mask_matches_torch_on_the_trained_parameters(tiny_trees):
    """trainable_mask(vision=False) on the tiny model: torch gets only the projector and LLM leaves
    (the clip norm is over those alone); the towers do not move and have no moments."""
    plain, _ = tiny_trees
    mask = st.trainable_mask(plain, vision=False)
    keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(plain)[0]]
    trained = [k for k, m in zip(keys, jax.tree.leaves(mask)) if m]
    assert trained and all(k.startswith(("['projector']", "['llm']")) for k in trained)
    assert len(trained) == sum(k.startswith(("['projector']", "['llm']")) for k in keys)
    params = random_params(plain, seed=4)
    grads = grad_sequence([p.shape for p in jax.tree.leaves(params)], 2, OFT.grad_clip, seed=5)
    params0 = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
    for t, ours, adam, torch_side, _ in run_both(OFT, params, mask, grads, 2):
        check_step(OFT, t, ours, adam, torch_side, params0)


def test_default_mask_leaves_out_the_unused_tower_parameters(tiny_trees):
    """Full fine-tuning: every parameter except the towers' last block, final norm and SigLIP's MAP
    head (never run, so torch's AdamW never sees a gradient for them) is trained like torch trains it."""
    plain, _ = tiny_trees
    mask = st.trainable_mask(plain)
    keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(plain)[0]]
    unused = ("['last_block']", "['norm']", "['attn_pool']")
    expect = [not (k.startswith(("['dino']", "['siglip']")) and k.split("]", 1)[1].startswith(unused)) for k in keys]
    assert jax.tree.leaves(mask) == expect and not all(expect)
    params = random_params(plain, seed=6)
    grads = grad_sequence([p.shape for p in jax.tree.leaves(params)], 2, OPENVLA.grad_clip, seed=7)
    params0 = [p for p, m in zip(jax.tree.leaves(params), expect) if m]
    for t, ours, adam, torch_side, _ in run_both(OPENVLA, params, mask, grads, 2):
        check_step(OPENVLA, t, ours, adam, torch_side, params0)


def test_lora_mask_trains_only_the_used_adapters_like_torch(tiny_trees):
    """LoRA (OpenVLA's fine-tuning recipe: lr 5e-4, wd 0.01): only lora_A/lora_B of modules the model
    runs are trained; base weights and the adapters of last_block / attn_pool stay put."""
    _, combined = tiny_trees
    mask = lora.trainable_mask(combined)
    keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(combined)[0]]
    expect = [k.startswith("['lora']") and k.endswith(("['lora_A']", "['lora_B']"))
              and "['last_block']" not in k and "['attn_pool']" not in k for k in keys]
    assert jax.tree.leaves(mask) == expect and sum(expect) > 10
    assert any(k.startswith("['lora']") and "['last_block']" in k for k in keys)
    params = random_params(combined, seed=8)
    grads = grad_sequence([p.shape for p in jax.tree.leaves(params)], 3, OFT.grad_clip, seed=9)
    params0 = [p for p, m in zip(jax.tree.leaves(params), expect) if m]
    for t, ours, adam, torch_side, _ in run_both(OFT, params, mask, grads, 2):
        check_step(OFT, t, ours, adam, torch_side, params0)
