"""Training with two cameras and a proprio token (tiny model, 56 px): the step runs on the layout's
zero batch, the loss falls over a few steps on a fixed batch, the proprio projector trains, the step
reads the proprio; run set-up (configs/demo.py cameras=2,proprio=1, the data/model flag checks);
starting from an OpenVLA checkpoint without a proprio projector."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from vla_jax import sharding as shd
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.openvla import OpenVLA
from vla_jax.spec import BatchSpec
from vla_jax.training import run
from vla_jax.training import state as st
from vla_jax.training import step as sp
from vla_jax.training.synthetic import SyntheticBatches

B, L, P = 4, 32, 3
_tiny = with_dtypes(get_preset("tiny"), "float32")
BASE = dataclasses.replace(_tiny, dino=dataclasses.replace(_tiny.dino, image_size=56),
                           siglip=dataclasses.replace(_tiny.siglip, image_size=56))
CONFIGS = {
    "autoregressive": dataclasses.replace(BASE, num_images=2, proprio_dim=P),
    "oft_l1": dataclasses.replace(BASE, num_images=2, proprio_dim=P, parallel_decoding=True, chunk_size=2,
                                  action_head="l1"),
}


def _setup(cfg, lr=1e-3):
    model = OpenVLA(cfg)
    spec = BatchSpec.for_model(cfg, L)
    example = run.example_inputs(spec)
    mask = st.trainable_mask(st.abstract_params(model, example))
    opt = st.OptimConfig(learning_rate=lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=0.0)
    tx, schedule = st.make_optimizer(opt, 100)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    state, shardings, _ = st.create_train_state(model, tx, mesh, shd.LOGICAL_RULES, 0, example, mask)
    fn = sp.make_train_step(model, tx, schedule, sp.LossConfig.for_model(cfg, spec), mask, mesh=mesh,
                            return_grads=True)
    step = sp.jit_train_step(fn, mesh, shardings, {k: (B,) + s for k, (s, _) in spec.layout().items()})
    return dict(model=model, spec=spec, mesh=mesh, state=state, step=step)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def trained(request):
    cfg = CONFIGS[request.param]
    s = _setup(cfg)
    spec, mesh = s["spec"], s["mesh"]
    assert spec.cameras == ("primary", "wrist") and spec.proprio_dim == P
    zeros = spec.zeros(B)
    assert zeros["pixel_values"].shape == (B, 2, 56, 56, 3) and zeros["proprio"].shape == (B, P)
    state, zero_metrics = s["step"](s["state"], shd.host_batch_to_global(zeros, mesh))
    batch = spec.select(next(SyntheticBatches(B, spec, seed=3)))
    spec.check(batch)
    losses, first_grads = [], None
    for _ in range(6):
        state, metrics = s["step"](state, shd.host_batch_to_global(batch, mesh))
        metrics = jax.device_get(metrics)
        losses.append(float(metrics["loss"]))
        first_grads = metrics["grads"] if first_grads is None else first_grads
    return dict(cfg=cfg, model=s["model"], zero_metrics=jax.device_get(zero_metrics), losses=losses,
                grads=first_grads, params=jax.device_get(state.params), batch=batch)


def test_step_runs_on_the_zero_batch(trained):
    m = trained["zero_metrics"]
    assert np.isfinite(m["grad_norm"]) and m["params_finite"] == 1.0


def test_loss_decreases_on_a_fixed_batch(trained):
    losses = trained["losses"]
    assert all(np.isfinite(losses)), losses
    # Adam on one fixed batch: every step lowers the loss, by 5% or more over the six steps.
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses


def test_proprio_projector_gets_gradient_and_is_read(trained):
    grads = jax.tree.leaves(trained["grads"]["proprio_projector"])
    assert len(grads) == 4 and all(float(np.abs(g).max()) > 0 for g in grads)
    # The loss depends on the proprio value (the step passes batch['proprio'] to the model).
    cfg, model, params, batch = trained["cfg"], trained["model"], trained["params"], trained["batch"]
    if cfg.parallel_decoding:
        slots = (batch["labels"] >= 31744) & (batch["labels"] < 32000)
        fn = lambda pr: model.apply({"params": params}, batch["pixel_values"], batch["input_ids"],
                                    batch["attention_mask"], slots, proprio=pr, method=OpenVLA.parallel_actions)
    else:
        fn = lambda pr: model.apply({"params": params}, batch["pixel_values"], batch["input_ids"], proprio=pr)
    a, b = np.asarray(fn(batch["proprio"])), np.asarray(fn(-batch["proprio"]))
    assert float(np.abs(a - b).max()) > 1e-4


def test_layout_and_model_must_agree():
    cams = CONFIGS["autoregressive"]
    with pytest.raises(ValueError, match=r"batch layout has 1 camera\(s\) \['primary'\] but the model takes num_images=2"):
        sp.LossConfig.for_model(cams, BatchSpec(image_size=56, text_len=L, proprio_dim=P))
    with pytest.raises(ValueError, match=r"batch layout has proprio_dim=None but the model has proprio_dim=3"):
        sp.LossConfig.for_model(cams, BatchSpec(image_size=56, text_len=L, cameras=("primary", "wrist")))
    with pytest.raises(ValueError, match=r"cameras=\['primary'\] \(1\) but the model takes num_images=2"):
        BatchSpec.for_model(cams, L, cameras=("primary",))
    with pytest.raises(ValueError, match=r"proprio_dim=4 but the model has proprio_dim=3"):
        BatchSpec.for_model(cams, L, proprio_dim=4)


def _demo(arg):
    from configs.demo import get_config

    cfg = get_config(arg)
    return cfg, run.model_config(cfg.model)


def test_demo_config_two_cameras_and_proprio():
    cfg, model_cfg = _demo("cameras=2,proprio=1,recipe=oft")
    assert (model_cfg.num_images, model_cfg.proprio_dim) == (2, 4)
    assert (cfg.data.cameras, cfg.data.use_proprio) == (2, True)
    spec = run.batch_spec(cfg, model_cfg)
    assert spec.cameras == ("primary", "wrist") and spec.proprio_dim == 4
    assert spec.shapes(2)["pixel_values"] == (2, 2, 64, 64, 3) and spec.shapes(2)["proprio"] == (2, 4)
    assert model_cfg.num_inserted_tokens == 2 * 16 + 1
    cfg, model_cfg = _demo("")  # the defaults: OpenVLA's one camera, no proprio
    assert (model_cfg.num_images, model_cfg.proprio_dim) == (1, None)
    assert run.batch_spec(cfg, model_cfg).cameras == ("primary",)


def test_data_and_model_flags_must_agree():
    cfg, model_cfg = _demo("cameras=2,proprio=1")
    cfg.data.cameras = 1
    with pytest.raises(ValueError, match=r"config.data.cameras=1 but config.model.num_images=2"):
        run.batch_spec(cfg, model_cfg)
    cfg, model_cfg = _demo("cameras=2,proprio=1")
    cfg.data.use_proprio = False
    with pytest.raises(ValueError, match=r"config.data.use_proprio=False but config.model.proprio_dim=4"):
        run.batch_spec(cfg, model_cfg)
    cfg, _ = _demo("cameras=2")
    cfg.model.num_images = 0
    with pytest.raises(ValueError, match=r"config.model \(.*num_images=0.*\): .*num_images must be an integer >= 1"):
        run.model_config(cfg.model)
    with pytest.raises(ValueError, match=r"cameras=3; the demo data has 1 \(primary\) or 2"):
        _demo("cameras=3")


def test_proprio_statistics_must_have_the_model_size():
    _, model_cfg = _demo("cameras=2,proprio=1")
    run.check_proprio_statistics({"metaworld_demo": {"proprio": {"q01": [0.0] * 4}}}, model_cfg)
    with pytest.raises(ValueError, match=r"proprio_dim=4 but the data's proprio has \{'other': 5\} dimensions"):
        run.check_proprio_statistics({"metaworld_demo": {"proprio": {"q01": [0.0] * 4}},
                                      "other": {"proprio": {"q01": [0.0] * 5}}}, model_cfg)


@pytest.mark.slow  # initialises and places a second model (~25 s alone)
def test_starting_from_openvla_params_initialises_the_proprio_projector():
    """init_from an OpenVLA checkpoint (no params['proprio_projector']): the state gets a fresh one,
    and it is trained (in the mask) while the given weights are kept."""
    cfg = CONFIGS["autoregressive"]
    model = OpenVLA(cfg)
    spec = BatchSpec.for_model(cfg, L)
    example = run.example_inputs(spec)
    mask = st.trainable_mask(st.abstract_params(model, example))
    assert all(jax.tree.leaves(mask["proprio_projector"]))
    tx, _ = st.make_optimizer(st.OptimConfig(learning_rate=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                             grad_clip=0.0), 10)
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    full = model.init(jax.random.PRNGKey(7), *example)["params"]
    pretrained = {k: v for k, v in jax.device_get(nn.meta.unbox(full)).items() if k != "proprio_projector"}
    state, _, _ = st.create_train_state(model, tx, mesh, shd.LOGICAL_RULES, 0, example, mask,
                                        params=jax.tree.map(np.asarray, pretrained))
    got = jax.device_get(state.params)
    assert set(got) == {"dino", "siglip", "projector", "llm", "proprio_projector"}
    for want, have in zip(jax.tree.leaves(pretrained), jax.tree.leaves({k: got[k] for k in pretrained})):
        np.testing.assert_array_equal(have, want)
    assert float(np.abs(got["proprio_projector"]["fc1"]["kernel"]).max()) > 0
