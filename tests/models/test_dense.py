"""`vla_jax.models.dense`: the hand-written backward (`execution.dense_vjp`, the default) and the plain
path's derived one both equal torch autograd of the same contraction."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vla_jax.models.dense import Linear, dense

# (x shape, kernel shape, n_in): Llama q/k/v ([B,T,D] x [D,H,hd]), o_proj ([B,T,H,hd] x [H,hd,D]),
# an MLP, and the ViT patch embedding ([B,g,g,p,p,3] x [p,p,3,D]).
CASES = [((2, 5, 8), (8, 2, 4), 1), ((2, 5, 2, 4), (2, 4, 8), 2), ((3, 7, 16), (16, 24), 1),
         ((2, 2, 2, 4, 4, 3), (4, 4, 3, 8), 3)]


def _torch_grads(x, k, n_in, g):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    kt = torch.tensor(k, dtype=torch.float64, requires_grad=True)
    y = torch.tensordot(xt, kt, dims=n_in)
    y.backward(torch.tensor(g, dtype=torch.float64))
    return y.detach().numpy(), xt.grad.numpy(), kt.grad.numpy()


@pytest.mark.parametrize("custom_vjp", [True, False], ids=["hand_written_vjp", "derived_vjp"])
@pytest.mark.parametrize("xs,ks,n_in", CASES)
def test_value_and_grads_match_torch_fp32(xs, ks, n_in, custom_vjp):
    rng = np.random.default_rng(0)
    x, k = rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ks).astype(np.float32)
    g = rng.standard_normal(xs[:len(xs) - n_in] + ks[n_in:]).astype(np.float32)
    y_want, dx_want, dk_want = _torch_grads(x, k, n_in, g)
    y, vjp = jax.vjp(lambda a, b: dense(a, b, n_in, False, custom_vjp), jnp.asarray(x), jnp.asarray(k))
    dx, dk = jax.jit(vjp)(jnp.asarray(g))
    for name, got, want in (("y", y, y_want), ("dx", dx, dx_want), ("dkernel", dk, dk_want)):
        assert got.shape == want.shape, name
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_bf16_with_fp32_accumulation():
    """Logits path: bf16 operands, fp32 output; gradients come back in the operands' dtype."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 32)).astype(np.float32)
    k = rng.standard_normal((32, 48)).astype(np.float32)
    xb, kb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16)
    y, vjp = jax.vjp(lambda a, b: dense(a, b, 1, True), xb, kb)
    assert y.dtype == jnp.float32
    g = rng.standard_normal(y.shape).astype(np.float32)
    dx, dk = vjp(jnp.asarray(g))
    assert dx.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16
    # Truth from the bf16-rounded operands and cotangent in float64; bf16 results carry ~2^-8 relative error.
    x64, k64 = np.asarray(xb, np.float64), np.asarray(kb, np.float64)
    g64 = np.asarray(jnp.asarray(g, jnp.bfloat16), np.float64)
    _, dx_want, dk_want = _torch_grads(x64, k64, 1, g64)
    np.testing.assert_allclose(np.asarray(y), np.tensordot(x64, k64, 1), rtol=1e-5, atol=1e-4)
    for got, want in ((dx, dx_want), (dk, dk_want)):
        scale = np.abs(want).max()
        assert np.abs(np.asarray(got, np.float64) - want).max() <= 2 ** -7 * scale


def test_linear_module_params_and_grad_match_torch_linear():
    """Linear with bias == torch.nn.Linear (weight = kernel.T), forward and parameter gradients."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 12)).astype(np.float32)
    mod = Linear((7,), ("embed", "mlp"), ("mlp",))
    params = mod.init(jax.random.PRNGKey(0), jnp.asarray(x))["params"]
    assert params["kernel"].unbox().shape == (12, 7) and params["bias"].unbox().shape == (7,)
    p = jax.tree.map(lambda a: a + 0.1, jax.tree.map(lambda b: b.unbox(), params, is_leaf=lambda b: hasattr(b, "unbox")))
    loss = lambda p: jnp.sum(jnp.sin(mod.apply({"params": p}, jnp.asarray(x))))  # noqa: E731
    grads = jax.jit(jax.grad(loss))(p)
    lin = torch.nn.Linear(12, 7).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(np.asarray(p["kernel"]).T))
        lin.bias.copy_(torch.tensor(np.asarray(p["bias"])))
    torch.sin(lin(torch.tensor(x, dtype=torch.float64))).sum().backward()
    np.testing.assert_allclose(np.asarray(grads["kernel"]), lin.weight.grad.numpy().T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["bias"]), lin.bias.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_bad_shapes_name_the_axes():
    with pytest.raises(ValueError, match=r"input axes \(5,\).*leading 1 axes \(4,\)"):
        dense(jnp.zeros((2, 5)), jnp.zeros((4, 3)), 1)
    with pytest.raises(ValueError, match="kernel_axes"):
        Linear((3,), ("embed",)).init(jax.random.PRNGKey(0), jnp.zeros((2, 4)))


def test_gradient_under_sharded_jit_matches_single_device():
    """The 2-D views in the backward merge a sharded batch axis; the result must not change. Truth: the
    float64 gradient written out by hand; the single-device and the sharded result must each match it
    within fp32 tolerances. (Comparing the two float32 results with each other at atol 1e-6 failed on an
    AMD EPYC host by 1.2e-6: both are within the tolerance of the truth, their rounding differs.)"""
    from jax.sharding import NamedSharding, PartitionSpec

    devs = np.array(jax.devices()[:4])
    mesh = jax.sharding.Mesh(devs, ("data",))
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((8, 6, 16)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((16, 2, 4)).astype(np.float32))
    f = jax.grad(lambda a, b: jnp.sum(jnp.tanh(dense(a, b, 1))), argnums=(0, 1))
    x64, k64 = np.asarray(x, np.float64), np.asarray(k, np.float64).reshape(16, 8)
    dy = 1.0 - np.tanh(x64 @ k64) ** 2  # d sum(tanh(y)) / dy, y = x @ k  [8, 6, 8]
    truth = (dy @ k64.T, np.einsum("bti,bto->io", x64, dy).reshape(16, 2, 4))
    single = f(x, k)
    xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    ks = jax.device_put(k, NamedSharding(mesh, PartitionSpec()))
    got = jax.jit(f)(xs, ks)
    for result in (single, got):
        for a, t in zip(result, truth):
            np.testing.assert_allclose(np.asarray(a, np.float64), t, rtol=1e-5, atol=1e-6)
    assert math.prod(got[1].shape) == 16 * 8
