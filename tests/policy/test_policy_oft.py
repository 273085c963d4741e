"""Policy on OpenVLA-OFT checkpoints (parallel decoding, chunk K=3, tokens and L1 heads).

The checkpoints hold random debug-geometry weights written as training writes them, with a
`batch_spec` asset carrying the OFT codec. Truth: `parallel_decode` run directly on the same params
and prompts (unpadded, unjitted batch), then OFT's post-processing written out here in float64 numpy
(256-bin centres, q01/q99 un-normalization with the gripper left raw).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile

import numpy as np
import pytest

from tests.policy.test_policy_helpers import (model_config, openvla_unnormalize, random_images, random_params, stats_entry,
                                       write_checkpoint)

K = 3
INSTRUCTIONS = ["pick up the red block", "put the carrot on the plate next to the small green bowl on the left",
                "open the drawer", "wipe the table with the blue sponge"]


def oft_config(head: str, chunk: int = K):
    return dataclasses.replace(model_config(), parallel_decoding=True, chunk_size=chunk, action_head=head)


@functools.lru_cache(maxsize=None)
def oft_checkpoint(tokenizer_path: str, head: str) -> str:
    from vla_jax.spec import BatchSpec

    cfg = oft_config(head)
    spec = BatchSpec.for_model(cfg, text_len=40)
    return write_checkpoint(tempfile.mkdtemp(prefix=f"vla_oft_{head}_"), cfg, random_params(cfg, seed=3),
                            {"bridge_dataset": stats_entry(0.02)}, tokenizer_path, batch_spec=spec)


@functools.lru_cache(maxsize=None)
def oft_policy(tokenizer_path: str, head: str):
    from vla_jax.policy import Policy

    return Policy.load(oft_checkpoint(str(tokenizer_path), head), batch_buckets=(1, 4), compilation_cache=False)


def reference_chunks(policy, images, instructions):
    """parallel_decode on the policy's own params, prompts right-padded to the longest only, then the
    codec's formulas in float64 -> (raw output [B, K, D], raw actions float64 [B, K, D])."""
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.models.parallel_decode import parallel_decode

    prompts = [policy.tokenizer.inference_ids(s) for s in instructions]
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), policy.tokenizer.pad_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    out = np.asarray(parallel_decode(OpenVLA(policy.config), policy.params, policy.preprocess(images), ids, lengths))
    entry = stats_entry(0.02)
    if policy.codec.head == "tokens":
        return out, openvla_unnormalize(out, entry)
    a = entry["action"]
    q01, q99, mask = np.array(a["q01"]), np.array(a["q99"]), np.array(a["mask"])
    x = out.astype(np.float64)
    return out, np.where(mask, 0.5 * (x + 1.0) * (q99 - q01) + q01, x)


# The tokens head's policy path also runs fast in test_offline_eval_compares_chunks[tokens] below; this check
# against parallel_decode compiles the pass once more (~30 s alone) and runs with the slow tests.
@pytest.mark.parametrize("head", [pytest.param("tokens", marks=pytest.mark.slow), "l1"])
def test_predict_matches_parallel_decode(llama_tokenizer_path, head):
    policy = oft_policy(str(llama_tokenizer_path), head)
    images = random_images(4, seed=11)
    pred = policy.predict(images, INSTRUCTIONS)
    out, want = reference_chunks(policy, images, INSTRUCTIONS)
    assert pred.actions.shape == (4, K, 7) and pred.actions.dtype == np.float64
    if head == "tokens":
        np.testing.assert_array_equal(pred.tokens, out)
        np.testing.assert_array_equal(pred.actions, want)  # same ids -> the same float64 formula
        assert len(np.unique(out)) > 3  # the random head does not collapse to one id
    else:
        assert pred.tokens is None
        np.testing.assert_allclose(pred.actions, want, rtol=0, atol=1e-5)
        assert np.abs(out).max() > 1e-3
    # the gripper (mask False) stays raw: the normalized value itself
    np.testing.assert_array_equal(pred.actions[..., 6], pred.normalized[..., 6])
    # batched == one by one (the different prompt lengths share one padded batch above)
    assert len({len(policy.prompt_ids(s)) for s in INSTRUCTIONS}) > 1
    for i in range(4):
        one = policy.predict_action(images[i], INSTRUCTIONS[i])
        assert one.shape == (K, 7)
        if head == "tokens":
            np.testing.assert_array_equal(one, pred.actions[i])
        else:
            np.testing.assert_allclose(one, pred.actions[i], rtol=0, atol=1e-5)
    # one compiled executable per (slots, batch, prompt length) bucket, counted like the AR decoders
    assert all(k[0] == K * 7 + 1 for k in policy.compile_seconds)


def test_autoregressive_options_refused(llama_tokenizer_path):
    policy = oft_policy(str(llama_tokenizer_path), "tokens")
    image = random_images(1, seed=2)[0]
    with pytest.raises(ValueError, match=r"stop_at_eos=True needs an autoregressive checkpoint.*decoding='parallel'"):
        policy.predict_action(image, "open the drawer", stop_at_eos=True)
    with pytest.raises(ValueError, match=r"num_tokens=7 needs an autoregressive.*chunk_size=3"):
        policy.predict_tokens([image], ["open the drawer"], num_tokens=7)


def test_action_tokens_only_refused(llama_tokenizer_path):
    from vla_jax.policy import Policy

    with pytest.raises(ValueError, match=r"action_tokens_only=True restricts an autoregressive argmax.*'parallel'"):
        Policy.load(oft_checkpoint(str(llama_tokenizer_path), "tokens"), action_tokens_only=True,
                    compilation_cache=False)


def test_codec_model_mismatch_is_a_clear_error(llama_tokenizer_path):
    from vla_jax.policy import Policy
    from vla_jax.spec import BatchSpec

    cfg = oft_config("l1")
    stats = {"bridge_dataset": stats_entry(0.02)}
    # the batch_spec says chunk 2, the model config chunk 3
    wrong = BatchSpec.for_model(oft_config("l1", chunk=2), text_len=40)
    d = write_checkpoint(tempfile.mkdtemp(prefix="vla_oft_bad_"), cfg, random_params(cfg), stats,
                         str(llama_tokenizer_path), batch_spec=wrong)
    with pytest.raises(ValueError, match=r"chunk_size=2.*model config has parallel_decoding=True, chunk_size=3"):
        Policy.load(d, compilation_cache=False)
    # an L1 model whose params lack the head
    tokens_cfg = oft_config("tokens")
    d = write_checkpoint(tempfile.mkdtemp(prefix="vla_oft_nohead_"), cfg, random_params(tokens_cfg), stats,
                         str(llama_tokenizer_path), batch_spec=BatchSpec.for_model(cfg, text_len=40))
    with pytest.raises(ValueError, match=r"parameter action_head/.* absent in the checkpoint"):
        Policy.load(d, compilation_cache=False)


def test_server_returns_the_chunk_and_refuses_autoregressive_options(llama_tokenizer_path):
    import json

    from tests.policy.test_serve import decode, encode, request
    from vla_jax.policy.server import PolicyService, Server
    from vla_jax.policy.warmup import warm_up

    policy = oft_policy(str(llama_tokenizer_path), "l1")
    service = PolicyService(policy, max_batch=4, window_ms=5.0)
    warm = warm_up(service, prompt_len=16)  # the serve start-up path: compiles the OFT pass, not 7-token decoders
    assert warm["action_tokens"] == [K * 7 + 1] and warm["batch_buckets"] == [1, 4]
    server = Server(service, "127.0.0.1", 0).start()
    try:
        images = random_images(2, seed=21)
        for img, instr in zip(images, INSTRUCTIONS):
            status, body = request(server, "POST", "/act", {"image": encode(img), "instruction": instr})
            assert status == 200, body
            got = decode(json.loads(body))
            assert got.dtype == np.float64 and got.shape == (K, 7)
            np.testing.assert_array_equal(got, policy.predict_action(img, instr))
        for field, value in (("stop_at_eos", True), ("num_tokens", 7)):
            status, body = request(server, "POST", "/act",
                                   {"image": encode(images[0]), "instruction": "open the drawer", field: value})
            err = json.loads(body)["error"]
            assert status == 400 and field in err and "decoding='parallel'" in err and "chunk_size=3" in err, err
        status, body = request(server, "GET", "/health")
        model = json.loads(body)["model"]
        assert (model["decoding"], model["head"], model["chunk_size"]) == ("parallel", "l1", K)
    finally:
        server.shutdown()


@pytest.mark.parametrize("head", ["tokens", "l1"])
def test_offline_eval_compares_chunks(llama_tokenizer_path, head):
    """evaluation.offline on a chunked policy: frame t against the recorded actions[t:t+K]; frames
    without a full chunk are counted, not acted on; L1 per chunk position == numpy on the predictions."""
    from vla_jax.evaluation.episodes import Episode
    from vla_jax.evaluation.offline import evaluate, summarize

    policy = oft_policy(str(llama_tokenizer_path), head)
    rng = np.random.default_rng(5)
    t = 6
    images = np.stack(random_images(t, seed=31))
    actions = rng.uniform(-0.1, 0.1, (t, 7)).astype(np.float32)
    actions[:, 6] = rng.integers(0, 2, t)
    instr = ["open the drawer"] * t
    res = evaluate(policy, [Episode("bridge_dataset", 0, images, actions, instr)], batch_size=4, progress=False)
    summary = summarize(res)
    m = summary["per_dataset"]["bridge_dataset"]
    n = t - K + 1
    assert (m["frames"], m["actions"], m["chunk_size"]) == (n, n * K, K)
    assert summary["skipped_frames_without_full_chunk"] == K - 1
    pred = policy.predict(images[:n], instr[:n])
    true = np.stack([actions[i:i + K] for i in range(n)]).astype(np.float64)
    a = stats_entry(0.02)["action"]
    q01, q99, mask = (np.array(a[k], np.float64) for k in ("q01", "q99", "mask"))
    true32 = true.astype(np.float32)
    true_norm = np.where(mask, np.clip(2 * (true32 - q01.astype(np.float32)) /
                                       (q99 - q01 + 1e-8).astype(np.float32) - 1, -1, 1), true32)
    want_step = np.abs(pred.normalized - true_norm).mean(-1).mean(0)
    np.testing.assert_allclose(m["l1_normalized_per_step"], want_step, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m["l1_raw_per_step"], np.abs(pred.actions - true).mean(-1).mean(0), rtol=1e-9)
    np.testing.assert_allclose(m["l1_normalized"], want_step.mean(), rtol=1e-6)
    if head == "tokens":
        bins = np.linspace(-1, 1, 256)
        true_tok = 32000 - np.digitize(np.clip(true_norm, -1, 1), bins)
        assert m["action_token_accuracy"] == pytest.approx(float((pred.tokens == true_tok).mean()))
    else:
        assert m["action_token_accuracy"] is None and m["token_accuracy_per_dim"] is None


def test_dataset_gripper_convention_applies_to_every_chunk_row(llama_tokenizer_path):
    import copy

    policy = oft_policy(str(llama_tokenizer_path), "l1")
    inverted = copy.copy(policy)  # shares the compiled pass
    inverted.dataset_configs = {"bridge_dataset": {"name": "bridge_dataset", "standardize": "generic_eef_pos",
                                                   "gripper": "absolute_inverted"}}
    images = random_images(2, seed=41)
    base = policy.predict(images, INSTRUCTIONS[:2])
    got = inverted.predict(images, INSTRUCTIONS[:2], gripper=["dataset", "openvla"])
    want0 = base.actions[0].copy()
    want0[:, 6] = 1.0 - want0[:, 6]  # absolute_inverted: 1 = closed, for all K rows
    np.testing.assert_array_equal(got.rows[0], want0)
    np.testing.assert_array_equal(got.rows[1], base.actions[1])
