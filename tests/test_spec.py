"""The contract (vla_jax.spec): ActionCodec against OpenVLA's ActionTokenizer formulas written out here in
float64 numpy, BatchSpec layout and checks, and both through their JSON asset form."""

import json

import numpy as np
import pytest

from vla_jax.spec import ActionCodec, BatchSpec

# OpenVLA's ActionTokenizer (prismatic/vla/action_tokenizer.py), written out independently:
# bins = linspace(-1, 1, 256); ids = 32000 - digitize(clip(a)); centers = (bins[:-1] + bins[1:]) / 2;
# decode: centers[clip(32000 - id - 1, 0, 254)].
BINS = np.linspace(-1.0, 1.0, 256)
CENTERS = (BINS[:-1] + BINS[1:]) / 2.0


def test_codec_encode_decode_match_openvla_formulas():
    codec = ActionCodec()
    a = np.random.default_rng(0).uniform(-1.2, 1.2, size=(64, 7))
    ids = codec.encode(a)
    np.testing.assert_array_equal(ids, 32000 - np.digitize(np.clip(a, -1, 1), BINS))
    assert ids.min() >= 31744 and ids.max() <= 31999 and ids.dtype == np.int32
    all_ids = np.arange(31000, 32064)  # action ids, text ids and padded-vocabulary rows
    np.testing.assert_array_equal(codec.decode(all_ids), CENTERS[np.clip(32000 - all_ids - 1, 0, 254)])
    assert codec.decode(all_ids).dtype == np.float64
    assert (codec.first_id, codec.last_id, codec.num_supervised) == (31744, 31999, 8)


def test_codec_decode_traced_equals_numpy():
    import jax
    import jax.numpy as jnp

    codec = ActionCodec()
    ids = np.arange(31500, 32064, dtype=np.int32)
    got = jax.jit(lambda x: codec.decode(x, xp=jnp))(ids)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), codec.decode(ids).astype(np.float32), rtol=0, atol=0)


def test_unnormalize_bounds_q99_with_mask():
    q01, q99 = np.array([-0.5, 0.0, -2.0]), np.array([0.5, 4.0, 2.0])
    entry = {"action": {"q01": q01.tolist(), "q99": q99.tolist(), "mask": [True, True, False]}}
    x = np.array([[-1.0, 0.25, 0.7], [1.0, -0.5, 1.0]])
    want = x.copy()
    want[:, :2] = 0.5 * (x[:, :2] + 1) * (q99[:2] - q01[:2]) + q01[:2]
    got = ActionCodec(action_dim=3).unnormalize(x, entry)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="4 dims but the statistics have 3"):
        ActionCodec(action_dim=3).unnormalize(np.zeros((1, 4)), entry)


def test_chunk_layout_timestep_major():
    codec = ActionCodec(chunk_size=8, decoding="parallel", head="l1")
    assert codec.num_action_tokens == 56 and codec.num_supervised == 57
    flat = np.arange(2 * 56).reshape(2, 56)
    np.testing.assert_array_equal(codec.as_chunk(flat)[1, 3], flat[1, 21:28])
    with pytest.raises(ValueError, match="56 = chunk_size 8 x action_dim 7"):
        codec.as_chunk(np.zeros((2, 7)))


@pytest.mark.parametrize("kw, match", [
    (dict(head="l2"), "head='l2'"), (dict(decoding="beam"), "decoding='beam'"),
    (dict(chunk_size=8), "chunk_size=8 needs decoding='parallel'"), (dict(head="l1"), "needs decoding='parallel'"),
    (dict(action_dim=0), "action_dim=0"),
])
def test_codec_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        ActionCodec(**kw)


def test_codec_mismatch_names_fields():
    ckpt = ActionCodec(chunk_size=8, decoding="parallel")
    with pytest.raises(ValueError, match=r"chunk_size=4 \(the checkpoint has 8\)"):
        ckpt.check_matches(ActionCodec(chunk_size=4, decoding="parallel"), "the request")


def _batch(spec, b=2):
    batch = spec.zeros(b)
    batch["labels"][:, 10:10 + spec.codec.num_supervised] = 31900
    return batch


def test_batch_spec_layout_and_check():
    spec = BatchSpec(image_size=224, text_len=64, num_datasets=3)
    assert spec.keys == ("pixel_values", "input_ids", "labels", "dataset_index")
    assert spec.shapes(4) == {"pixel_values": (4, 224, 224, 3), "input_ids": (4, 64), "labels": (4, 64),
                              "dataset_index": (4,)}
    spec.check(_batch(spec))
    bad = _batch(spec)
    bad["pixel_values"] = bad["pixel_values"].astype(np.float32)
    with pytest.raises(ValueError, match=r"batch\['pixel_values'\] must be uint8 \[2, 224, 224, 3\], got float32"):
        spec.check(bad)
    bad = _batch(spec)
    bad["labels"][0, 40:45] = 31900
    with pytest.raises(ValueError, match="row 0 has 13 supervised labels; the loss expects at most 8"):
        spec.check(bad)
    bad = _batch(spec)
    bad["dataset_index"][1] = 3
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        spec.check(bad)
    bad = _batch(spec)
    del bad["labels"]
    with pytest.raises(ValueError, match=r"missing keys \['labels'\]"):
        spec.check(bad)


def test_batch_spec_chunked_l1_and_proprio_keys():
    spec = BatchSpec(image_size=64, text_len=96, codec=ActionCodec(chunk_size=8, decoding="parallel", head="l1"),
                     cameras=("primary", "wrist"), proprio_dim=8)
    shapes = spec.shapes(2)
    assert shapes["pixel_values"] == (2, 2, 64, 64, 3)
    assert shapes["actions"] == (2, 8, 7) and shapes["proprio"] == (2, 8)
    spec.check(_batch(spec))


def test_assets_round_trip_through_json():
    spec = BatchSpec(image_size=64, text_len=96, codec=ActionCodec(chunk_size=4, decoding="parallel"),
                     num_datasets=2, test_center_crop=True)
    back = BatchSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert back == spec
    with pytest.raises(ValueError, match=r"unknown BatchSpec fields \['imagesize'\]"):
        BatchSpec.from_json(dict(spec.to_json(), imagesize=3))
