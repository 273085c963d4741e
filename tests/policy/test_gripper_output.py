"""The gripper at the output: `gripper="dataset"` on Policy and the server returns a dataset's own
convention. Round trip: gripper values recorded in the dataset's convention go through the real
standardize transform (TF), the action tokenizer and the policy's decoding arithmetic, and come back
as the same values (up to the 256-bin quantization: half a bin, 1/255)."""

import dataclasses
import json

import numpy as np
import pytest

from tests.policy.test_policy_helpers import cached_policy, random_images, stats_entry
from tests.policy.test_serve import decode, encode, request

HALF_BIN = 1.0 / 255 + 1e-12  # bins of width 2/255 over [-1, 1]: a value is within half a bin of its center


def _policy_with(llama_tokenizer_path, configs: dict):
    """A Policy sharing cached_policy's weights with statistics and recorded configs for `configs`."""
    from vla_jax.policy import Policy

    p = cached_policy(str(llama_tokenizer_path))
    stats = {name: stats_entry(0.02) for name in configs}
    return Policy(p.config, p.decode_params, p.tokenizer, stats, batch_buckets=(1, 8),
                  dataset_configs={n: dataclasses.asdict(c) for n, c in configs.items()})


# (DatasetConfig kwargs, gripper values recorded in that dataset's convention: open, open, close, close, open)
CONVENTIONS = {
    "absolute": (dict(gripper="absolute"), [1.0, 1.0, 0.0, 0.0, 1.0]),
    "binarize": (dict(gripper="binarize"), [1.0, 1.0, 0.0, 0.0, 1.0]),
    "absolute_inverted": (dict(gripper="absolute_inverted"), [0.0, 0.0, 1.0, 1.0, 0.0]),
    "relative": (dict(gripper="relative"), [-1.0, -1.0, 1.0, 1.0, -1.0]),
    "libero": (dict(standardize="libero"), [-1.0, -1.0, 1.0, 1.0, -1.0]),
}


@pytest.mark.parametrize("convention", sorted(CONVENTIONS))
def test_dataset_convention_in_same_convention_out(llama_tokenizer_path, convention):
    import tensorflow as tf

    from vla_jax.data import oxe
    from vla_jax.data.normalization import normalize_actions

    kw, recorded = CONVENTIONS[convention]
    cfg = oxe.DatasetConfig(name=f"rt_{convention}", image_key="image", **kw)
    rng = np.random.default_rng(0)
    raw = np.concatenate([rng.uniform(-0.02, 0.02, (5, 6)), np.array(recorded)[:, None]], 1).astype(np.float32)
    traj = {"action": tf.constant(raw), "language_instruction": tf.constant(["pick"] * 5),
            "observation": {"image": tf.constant([b""] * 5)}}
    standardized = oxe.get_standardize(cfg.standardize)(traj, cfg)["action"].numpy().astype(np.float64)
    # OpenVLA's convention after the transform: open = 1, closed = 0.
    np.testing.assert_array_equal(standardized[:, -1], [1, 1, 0, 0, 1])

    policy = _policy_with(llama_tokenizer_path, {cfg.name: cfg})
    entry = policy.norm_stats[cfg.name]
    tokens = policy.tokenizer.codec.encode(normalize_actions(standardized, entry))
    openvla = policy.unnormalize(policy.tokens_to_normalized(tokens), cfg.name)
    dataset = policy.convert_gripper(openvla, cfg.name, "dataset")
    assert np.all(np.abs(openvla[:, -1] - standardized[:, -1]) <= HALF_BIN)
    scale = 2.0 if convention == "libero" else 1.0  # 1 - 2g doubles the quantization error
    assert np.all(np.abs(dataset[:, -1] - np.array(recorded)) <= scale * HALF_BIN), (dataset[:, -1], recorded)
    np.testing.assert_array_equal(dataset[:, :-1], openvla[:, :-1])  # only the gripper changes
    assert policy.convert_gripper(openvla, cfg.name, "openvla") is openvla


def test_predict_action_gripper_option(llama_tokenizer_path):
    from vla_jax.data import oxe

    cfg = oxe.DatasetConfig(name="inverted_robot", image_key="image", gripper="absolute_inverted")
    policy = _policy_with(llama_tokenizer_path, {cfg.name: cfg})
    images = random_images(3, seed=5)
    default = policy.predict_actions(images, "put carrot on plate")
    assert np.array_equal(default, policy.predict_actions(images, "put carrot on plate", gripper="openvla"))
    own = policy.predict_actions(images, "put carrot on plate", gripper="dataset")
    np.testing.assert_array_equal(own[:, :-1], default[:, :-1])
    np.testing.assert_allclose(own[:, -1], 1.0 - default[:, -1], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(policy.predict_action(images[0], "put carrot on plate", gripper="dataset"), own[0])
    with pytest.raises(ValueError, match=r"gripper='robot'; expected one of \('openvla', 'dataset'\)"):
        policy.predict_action(images[0], "put carrot on plate", gripper="robot")


def test_gripper_dataset_errors_name_the_transform_or_the_flag(llama_tokenizer_path):
    from vla_jax.data import oxe

    rt1 = oxe.get_dataset_config("fractal20220817_data")  # standardize 'rt1': its own gripper reading
    policy = _policy_with(llama_tokenizer_path, {rt1.name: rt1})
    img = random_images(1, seed=6)[0]
    with pytest.raises(ValueError, match=r"standardize function 'rt1'.*not invertible.*gripper='openvla'"):
        policy.predict_action(img, "pick", gripper="dataset")
    policy.predict_action(img, "pick")  # the default convention still works

    # A checkpoint without the record (older runs) and a dataset this process does not know either.
    p = cached_policy(str(llama_tokenizer_path))
    from vla_jax.policy import Policy

    old = Policy(p.config, p.decode_params, p.tokenizer, {"mystery_robot": stats_entry(0.01)}, batch_buckets=(1, 8))
    with pytest.raises(ValueError, match=r"does not record how dataset 'mystery_robot'.*--dataset_configs=FILE.json"):
        old.predict_action(img, "pick", gripper="dataset")
    # Built-in datasets are known without the record: Bridge's binarized gripper is already 1 = open.
    builtin = Policy(p.config, p.decode_params, p.tokenizer, {"bridge_dataset": stats_entry(0.01)},
                     batch_buckets=(1, 8))
    np.testing.assert_array_equal(builtin.predict_action(img, "pick", gripper="dataset"),
                                  builtin.predict_action(img, "pick"))


def test_server_gripper_payload_key(llama_tokenizer_path):
    from vla_jax.data import oxe
    from vla_jax.policy.server import PolicyService, Server

    cfg = oxe.DatasetConfig(name="inverted_robot", image_key="image", gripper="absolute_inverted")
    policy = _policy_with(llama_tokenizer_path, {cfg.name: cfg})
    server = Server(PolicyService(policy, max_batch=8, window_ms=5.0), "127.0.0.1", 0).start()
    try:
        img = random_images(1, seed=7)[0]
        base = {"image": encode(img), "instruction": "open the drawer"}
        for gripper in ("openvla", "dataset"):
            status, body = request(server, "POST", "/act", dict(base, gripper=gripper))
            assert status == 200, body
            np.testing.assert_array_equal(decode(json.loads(body)),
                                          policy.predict_action(img, "open the drawer", gripper=gripper))
        status, body = request(server, "POST", "/act", base)  # no key: OpenVLA's convention
        np.testing.assert_array_equal(decode(json.loads(body)), policy.predict_action(img, "open the drawer"))
        status, body = request(server, "POST", "/act", dict(base, gripper="robot"))
        assert status == 400 and "'gripper' must be 'openvla' or 'dataset'" in json.loads(body)["error"]
    finally:
        server.shutdown()


def test_offline_eval_reports_raw_units_in_the_chosen_convention(llama_tokenizer_path):
    from vla_jax.data import oxe
    from vla_jax.evaluation import offline
    from vla_jax.evaluation.episodes import Episode

    cfg = oxe.DatasetConfig(name="inverted_robot", image_key="image", gripper="absolute_inverted")
    policy = _policy_with(llama_tokenizer_path, {cfg.name: cfg})
    rng = np.random.default_rng(8)
    actions = np.concatenate([rng.uniform(-0.02, 0.02, (3, 6)), [[1.0], [0.0], [1.0]]], 1).astype(np.float32)
    ep = Episode(cfg.name, 0, np.stack(random_images(3, seed=9)), actions, ["pick up the block"] * 3)
    base = offline.evaluate(policy, [ep], batch_size=8, progress=False)
    own = offline.evaluate(policy, [ep], batch_size=8, progress=False, gripper="dataset")
    b, o = base.episodes[0], own.episodes[0]
    np.testing.assert_array_equal(o.true_raw[:, -1], [0.0, 1.0, 0.0])  # recorded open/closed/open, 1 = closed
    np.testing.assert_allclose(o.pred_raw[:, -1], 1.0 - b.pred_raw[:, -1], atol=1e-15)
    np.testing.assert_array_equal(o.pred_raw[:, :-1], b.pred_raw[:, :-1])
    s_base, s_own = base.per_dataset[cfg.name].summary(), own.per_dataset[cfg.name].summary()
    assert s_own["action_token_accuracy"] == s_base["action_token_accuracy"]
    assert s_own["gripper_accuracy"] == s_base["gripper_accuracy"]  # 1 - x flips both sides alike
