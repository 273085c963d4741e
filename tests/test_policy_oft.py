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

from tests.test_policy_helpers import (model_config, openvla_unnormalize, random_images, random_params, stats_entry,
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


@pytest.mark.parametrize("head", ["tokens", "l1"])
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
