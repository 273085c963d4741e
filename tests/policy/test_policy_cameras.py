"""A checkpoint with two cameras and proprio (random weights, debug geometry at 56 px): `Policy` with an
observation dict equals the model called directly, the server carries both images and the state, and
every bad field is an error (a 400 from the server) naming it.

Independent truth: the training pipeline's resize (`vla_jax.data.transforms.resize_image`) for each
camera, the proprio normalized with upstream's inference formula written out in float64 here
(OFT_REFERENCE.md §7: q01/q99, clip, no zeroing of constant dims), and a plain greedy loop over the
model's full forward pass (`OpenVLA.__call__`, no KV cache) one row at a time; the un-normalization is
OpenVLA's formula from the test helpers. The json_numpy wire format is built here (test_serve.encode).
"""

import json

import numpy as np
import pytest

from tests.policy.test_policy_helpers import (IMAGE_SIZE, camera_policy, camera_stats_entry, openvla_unnormalize,
                                              random_images)
from tests.policy.test_serve import decode, encode, request

INSTRUCTIONS = ["put carrot on plate", "open the drawer"]


def observations():
    rng = np.random.default_rng(21)
    prim = random_images(2, seed=22, size=64)
    wrist = [rng.integers(0, 120, (48, 40, 3), dtype=np.uint8) for _ in range(2)]  # another size and look
    # dims 0-2 inside and outside [q01, q99] (clipped); dim 3 at and above the training-constant value
    state = np.array([[0.1, -0.7, 0.25, 0.3], [-0.45, 0.35, 1.7, 0.31]])
    return prim, wrist, state


def reference_actions(policy, prim, wrist, state, instructions):
    """Greedy decoding with the model's full forward pass, one row at a time, on independently built inputs."""
    from vla_jax.data.transforms import resize_image

    entry = camera_stats_entry()
    q01, q99 = np.array(entry["proprio"]["q01"]), np.array(entry["proprio"]["q99"])
    proprio = np.clip(2.0 * (state - q01) / (q99 - q01 + 1e-8) - 1.0, -1.0, 1.0).astype(np.float32)
    import jax

    params = policy.params
    inserted = policy.config.num_inserted_tokens  # 2 x 16 patches + the proprio token
    assert inserted == 2 * 16 + 1
    prompts = [list(policy.tokenizer.inference_ids(text)) for text in instructions]
    length = max(len(p) for p in prompts) + 7
    # One compiled forward: ids right-padded to a fixed length (causal: the padding after position t
    # changes nothing at t), the lm_head read at the last real position of the fused sequence.
    forward = jax.jit(lambda x, ids, pos, pr: policy.model.apply({"params": params}, x, ids, pos, proprio=pr))
    tokens = []
    for i, ids in enumerate(prompts):
        pixels = np.stack([np.asarray(resize_image(prim[i], IMAGE_SIZE)),
                           np.asarray(resize_image(wrist[i], IMAGE_SIZE))])[None]  # [1, 2, S, S, 3]
        out = []
        for _ in range(7):
            seq = ids + out
            padded = np.zeros((1, length), np.int32)
            padded[0, :len(seq)] = seq
            logits = forward(pixels, padded, np.array([[inserted + len(seq) - 1]], np.int32), proprio[i:i + 1])
            out.append(int(np.argmax(np.asarray(logits[0, 0], np.float32))))
        tokens.append(out)
    tokens = np.array(tokens)
    return tokens, np.stack([openvla_unnormalize(t, entry) for t in tokens]), proprio


@pytest.fixture(scope="module")
def policy(llama_tokenizer_path):
    return camera_policy(str(llama_tokenizer_path))


@pytest.mark.slow  # the reference: 14 full forward passes, ~2 min on a 2-core CPU shared with other jobs
def test_observation_dict_equals_the_model_called_directly(policy):
    assert policy.cameras == ("primary", "wrist") and policy.spec.proprio_dim == 4
    prim, wrist, state = observations()
    want_tokens, want_actions, proprio = reference_actions(policy, prim, wrist, state, INSTRUCTIONS)
    # The training-time rule would feed 0 to the constant dim 3; the inference rule -1 (at) and +1 (above).
    np.testing.assert_array_equal(proprio[:, 3], [-1.0, 1.0])
    rows = [{"full_image": prim[i], "wrist_image": wrist[i], "state": state[i]} for i in range(2)]
    pred = policy.predict(rows, INSTRUCTIONS)
    np.testing.assert_array_equal(pred.tokens, want_tokens)
    np.testing.assert_allclose(pred.actions, want_actions, rtol=1e-12, atol=1e-12)
    # The same through the other spellings: camera names, a batched dict, one observation.
    batched = {"primary": np.stack(prim), "wrist": wrist, "proprio": state}
    np.testing.assert_array_equal(policy.predict(batched, INSTRUCTIONS).tokens, want_tokens)
    one = policy.predict_action({"image": prim[1], "wrist": wrist[1], "state": list(state[1])}, INSTRUCTIONS[1])
    np.testing.assert_allclose(one, want_actions[1], rtol=1e-12, atol=1e-12)


def test_bad_observations_are_named(policy):
    prim, wrist, state = observations()
    good = {"full_image": prim[0], "wrist_image": wrist[0], "state": state[0]}
    cases = [
        ({"full_image": prim[0], "state": state[0]}, r"missing camera\(s\) \['wrist'\]"),
        (dict(good, left_wrist_image=wrist[0]), r"unknown key\(s\) \['left_wrist_image'\]"),
        (dict(good, wrist_image=wrist[0][..., :2]), r"camera 'wrist' image 0: expected an RGB image of shape "
                                                    r"\[H, W, 3\], got shape \(48, 40, 2\)"),
        ({"full_image": prim[0], "wrist_image": wrist[0]}, r"missing 'state': .* raw 4-D proprio state"),
        (dict(good, state=state[0][:3]), r"'state'\] \(the proprio state\) must have shape \[4\]"),
    ]
    for obs, match in cases:
        with pytest.raises(ValueError, match=match):
            policy.predict_action(obs, "open the drawer")
    with pytest.raises(ValueError, match=r"takes an observation dict per row"):
        policy.predict_action(prim[0], "open the drawer")


@pytest.fixture(scope="module")
def served(policy):
    from vla_jax.policy.server import PolicyService, Server

    server = Server(PolicyService(policy, max_batch=4, window_ms=5.0), "127.0.0.1", 0).start()
    yield server
    server.shutdown()


def test_server_carries_cameras_and_state(policy, served):
    prim, wrist, state = observations()
    status, body = request(served, "GET", "/health")
    assert status == 200 and json.loads(body)["model"]["cameras"] == ["primary", "wrist"]
    assert json.loads(body)["model"]["proprio_dim"] == 4
    for i, text in enumerate(INSTRUCTIONS):
        want = policy.predict_action({"full_image": prim[i], "wrist_image": wrist[i], "state": state[i]}, text)
        # OpenVLA-OFT's deploy.py names, the state as json_numpy
        oft = {"full_image": encode(prim[i]), "wrist_image": encode(wrist[i]), "state": encode(state[i]),
               "instruction": text}
        status, body = request(served, "POST", "/act", oft)
        assert status == 200, body
        got = decode(json.loads(body))
        assert got.dtype == np.float64 and got.shape == (7,)
        np.testing.assert_array_equal(got, want)
        # the checkpoint's camera names, the state as a plain list, the "encoded" form
        named = {"primary": encode(prim[i]), "wrist": encode(wrist[i]), "state": state[i].tolist(), "instruction": text}
        status, body = request(served, "POST", "/act", {"encoded": json.dumps(named)})
        assert status == 200, body
        np.testing.assert_array_equal(decode(json.loads(json.loads(body))), want)


def test_server_errors_name_the_field(served):
    prim, wrist, state = observations()
    good = {"full_image": encode(prim[0]), "wrist_image": encode(wrist[0]), "state": encode(state[0]),
            "instruction": "open the drawer"}
    drop = lambda k: {f: v for f, v in good.items() if f != k}  # noqa: E731
    cases = [
        (drop("wrist_image"), r"missing camera\(s\) \['wrist'\]"),
        (drop("state"), r"missing 'state'"),
        (drop("full_image"), r"missing camera\(s\) \['primary'\]"),
        ({"state": good["state"], "instruction": "x"}, r"payload is missing field\(s\) \['image'\]"),
        (dict(good, left_wrist_image=good["wrist_image"]), r"unknown field\(s\) \['left_wrist_image'\].*camera "
                                                           r"'wrist' as 'wrist' / 'wrist_image'"),
        (dict(good, state=encode(state[0][:3])), r"'state'\] \(the proprio state\) must have shape \[4\]"),
        (dict(good, state=[[0.1, 0.2], [0.3, 0.4]]), r"field 'state' must be a 1-D array of numbers"),
        (dict(good, state="high"), r"field 'state' must be a 1-D array of numbers"),
        (dict(good, state=[0.1, float("nan"), 0.0, 0.3]), r"non-finite"),
        (dict(good, wrist_image=encode(wrist[0].astype(np.float32))), r"field 'wrist_image' must have dtype uint8"),
        (dict(good, wrist_image=encode(np.zeros((8, 8, 5), np.uint8))), r"field 'wrist_image' must have shape"),
        (dict(good, image=good["full_image"]), r"camera\(s\) given twice: 'primary' as \['full_image', 'image'\]"),
    ]
    for payload, pattern in cases:
        status, body = request(served, "POST", "/act", payload)
        msg = json.loads(body)
        assert status == 400 and msg["status"] == 400, (pattern, status, body[:300])
        import re

        assert re.search(pattern, msg["error"]), (pattern, msg["error"])
    assert request(served, "POST", "/act", good)[0] == 200  # still serving
