"""Policy: KV-cache decoding vs full forwards, batch vs single calls, compile reuse, unnorm_key rules,
float64 un-normalization (OpenVLA's formula), input errors, HF folder loading."""

import copy

import jax
import numpy as np
import pytest

from tests.policy.test_policy_helpers import cached_policy, openvla_unnormalize, random_checkpoint, random_images

INSTRUCTIONS = ["put carrot on plate", "open the drawer", "move the red block to the left of the blue bowl",
                "stack the cups", "Wipe the table with the sponge!"]


@pytest.fixture(scope="module")
def policy(llama_tokenizer_path):
    return cached_policy(str(llama_tokenizer_path))


def _images():
    imgs = random_images(4, seed=1)
    imgs.append(np.random.default_rng(2).integers(0, 256, (60, 80, 3), dtype=np.uint8))  # another size
    return imgs


def test_prompts_fit_one_bucket(policy):
    # Keeps the suite to two compiled decoders: every prompt here pads to 32 tokens.
    lengths = [len(policy.prompt_ids(s)) for s in INSTRUCTIONS]
    assert all(16 < n <= 32 for n in lengths), lengths


def test_warmup_compiles_the_buckets_once(policy):
    policy.warmup(batch_sizes=(1, 5), prompt_lengths=(20,))  # (may already be compiled by other test files)
    assert {(7, 1, 32), (7, 8, 32)} <= set(policy.compile_seconds)
    assert all(t > 0 for t in policy.compile_seconds.values())
    assert policy.warmup(batch_sizes=(1, 2, 8), prompt_lengths=(17, 32)) == {}  # same buckets: nothing to do


def test_kv_cache_decoding_equals_full_forward_argmax(policy):
    """Greedy tokens from the cached decoder == argmax of full forwards recomputed at each step."""
    images, n = _images(), policy.config.action_dim
    tokens = policy.predict_tokens(images, INSTRUCTIONS)
    pixels = policy.preprocess(images)
    prompts = [policy.prompt_ids(s) for s in INSTRUCTIONS]
    width = max(map(len, prompts)) + n
    forward = jax.jit(lambda p, x, ids: policy.model.apply({"params": p}, x, ids))
    seqs = [list(p) for p in prompts]
    patches = policy.config.num_patches
    for _ in range(n):
        ids = np.full((len(seqs), width), policy.tokenizer.pad_id, np.int32)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = s
        logits = np.asarray(forward(policy.params, pixels, ids))  # [B, width + P, V]
        for i, s in enumerate(seqs):
            s.append(int(np.argmax(logits[i, len(s) + patches - 1])))
    reference = np.array([s[-n:] for s in seqs])
    np.testing.assert_array_equal(tokens, reference)
    assert len(np.unique(reference)) > 3, "degenerate reference: the check would be weak"


def test_batch_equals_single_calls_and_buckets_are_reused(policy):
    images = _images()
    batched = policy.predict_actions(images, INSTRUCTIONS)  # B=5 -> bucket 8 (3 pad rows)
    singles = np.stack([policy.predict_action(im, s) for im, s in zip(images, INSTRUCTIONS)])
    np.testing.assert_array_equal(batched, singles)
    assert batched.dtype == np.float64 and batched.shape == (5, 7)
    assert len({tuple(r) for r in batched}) > 1, "all rows equal: inputs are not reaching the model"
    compiled = dict(policy.compile_seconds)
    assert set(compiled) == {(7, 8, 32), (7, 1, 32)}, compiled
    # Same buckets again (other batch size within the bucket, other inputs): nothing new compiles.
    policy.predict_actions(random_images(7, seed=3), INSTRUCTIONS[1:3] * 3 + INSTRUCTIONS[:1])
    policy.predict_action(random_images(1, seed=4)[0], INSTRUCTIONS[3])
    assert policy.compile_seconds == compiled


def test_chunks_larger_than_the_biggest_bucket(policy):
    images = random_images(10, seed=5)
    instr = [INSTRUCTIONS[i % 5] for i in range(10)]
    np.testing.assert_array_equal(policy.predict_actions(images, instr),
                                  np.concatenate([policy.predict_actions(images[:8], instr[:8]),
                                                  policy.predict_actions(images[8:], instr[8:])]))


def test_actions_are_openvla_unnormalized_tokens(policy):
    images = _images()[:3]
    tokens = policy.predict_tokens(images, INSTRUCTIONS[:3])
    actions = policy.predict_actions(images, INSTRUCTIONS[:3])
    expected = openvla_unnormalize(tokens, policy.norm_stats["bridge_dataset"])
    np.testing.assert_allclose(actions, expected, rtol=0, atol=1e-15)
    # The gripper (mask False) is the raw decoded bin center.
    np.testing.assert_allclose(actions[:, 6], openvla_unnormalize(tokens, {"action": {
        "q01": [0.0] * 7, "q99": [1.0] * 7, "mask": [False] * 7}})[:, 6], atol=0)


def test_unnorm_key_rules(llama_tokenizer_path, policy):
    img, instr = _images()[0], INSTRUCTIONS[0]
    single = policy.predict_action(img, instr)  # one dataset: chosen automatically
    np.testing.assert_array_equal(single, policy.predict_action(img, instr, unnorm_key="bridge_dataset"))
    with pytest.raises(ValueError, match=r"unknown unnorm_key 'bridge_orig'.*\['bridge_dataset'\]"):
        policy.predict_action(img, instr, unnorm_key="bridge_orig")
    multi = copy.copy(policy)  # shares the compiled decoders
    stats = dict(policy.norm_stats)
    stats["fractal20220817_data"] = copy.deepcopy(stats["bridge_dataset"])
    stats["fractal20220817_data"]["action"]["q99"] = [v * 3 for v in stats["bridge_dataset"]["action"]["q99"]]
    multi.norm_stats = stats
    with pytest.raises(ValueError, match=r"pass unnorm_key, one of \['bridge_dataset', 'fractal20220817_data'\]"):
        multi.predict_action(img, instr)
    with pytest.raises(ValueError, match=r"unknown unnorm_key 'nope'.*\['bridge_dataset', 'fractal20220817_data'\]"):
        multi.predict_action(img, instr, unnorm_key="nope")
    tokens = multi.predict_tokens([img], instr)
    got = multi.predict_action(img, instr, unnorm_key="fractal20220817_data")
    np.testing.assert_allclose(got, openvla_unnormalize(tokens, stats["fractal20220817_data"])[0], atol=1e-15)
    assert not np.allclose(got[:6], single[:6])


@pytest.mark.parametrize("image, message", [
    (np.zeros((64, 64, 3), np.float32), r"image 0: expected dtype uint8 .*got float32"),
    (np.zeros((64, 64), np.uint8), r"image 0: expected an RGB image of shape \[H, W, 3\], got shape \(64, 64\)"),
    (np.zeros((64, 64, 4), np.uint8), r"got shape \(64, 64, 4\)"),
    (np.zeros((3, 64, 64), np.uint8), r"got shape \(3, 64, 64\)"),
])
def test_bad_images_are_rejected(policy, image, message):
    with pytest.raises(ValueError, match=message):
        policy.predict_action(image, "open the drawer")


def test_bad_instructions_are_rejected(policy):
    img = _images()[0]
    with pytest.raises(ValueError, match="instruction is empty"):
        policy.predict_action(img, "   ")
    with pytest.raises(ValueError, match="instruction must be a string, got int"):
        policy.predict_action(img, 3)
    with pytest.raises(ValueError, match=r"instruction is \d+ tokens long .* at most \d+"):
        policy.predict_action(img, "go " * 3000)
    with pytest.raises(ValueError, match="2 images but 3 instructions"):
        policy.predict_actions(_images()[:2], INSTRUCTIONS[:3])


def test_action_tokens_only_switch(policy):
    restricted = copy.copy(policy)
    restricted._executables, restricted.compile_seconds = {}, {}
    restricted._allowed = (31744, 31999)
    restricted.action_tokens_only = True
    tokens = restricted.predict_tokens(_images(), INSTRUCTIONS)
    assert tokens.min() >= 31744 and tokens.max() <= 31999
    free = policy.predict_tokens(_images(), INSTRUCTIONS)
    is_action = (free >= 31744) & (free <= 31999)
    # Where the unrestricted argmax is already an action token, the restriction changes nothing in that row
    # up to the first non-action token.
    for r in range(free.shape[0]):
        stop = int(np.argmin(is_action[r])) if not is_action[r].all() else free.shape[1]
        np.testing.assert_array_equal(tokens[r, :stop], free[r, :stop])


def test_hf_folder_loads_to_the_same_policy(llama_tokenizer_path, policy, tmp_path):
    from vla_jax.hf import export_checkpoint
    from vla_jax.policy import Policy

    ckpt = random_checkpoint(str(llama_tokenizer_path))
    export_checkpoint(ckpt, str(tmp_path / "hf"), dtype="float32")
    hf = Policy.load(str(tmp_path / "hf"), dtype="float32", batch_buckets=(1, 8), compilation_cache=False)
    assert hf.unnorm_keys == ["bridge_dataset"] and hf.config.image_size == policy.config.image_size
    img = _images()[1]
    np.testing.assert_array_equal(hf.predict_action(img, INSTRUCTIONS[1]), policy.predict_action(img, INSTRUCTIONS[1]))
