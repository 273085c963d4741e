"""An exported HF OpenVLA folder, loaded with strict key matching into the PyTorch reference wiring
(timm towers + projector + LlamaForCausalLM, released key names, `.scale_factor` LayerScale), gives the
logits and greedy action tokens vla_jax gives from the same folder."""

import functools
import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from tests.torch_reference import TorchOpenVLA
from vla_jax import hf
from vla_jax.hf import safetensors_io as sio
from vla_jax.hf import keys_openvla
from vla_jax.models.config import get_preset, with_dtypes
from vla_jax.models.decode import greedy_decode, split_layers
from vla_jax.models.openvla import OpenVLA

# fp32 on both sides; differences come only from summation order. Same bound as the model's parity test.
LOGITS_RTOL = 1e-5  # max |diff| <= LOGITS_RTOL * max(1, max |reference logit|)

CFG = with_dtypes(get_preset("tiny"), "float32")
PROMPT = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 278, 805, 6150, 29973, 13, 3744, 29901,
          29871]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    ref = TorchOpenVLA(CFG).randomize(seed=5)
    out = tmp_path_factory.mktemp("parity") / "hf"
    hf.export_params(keys_openvla.hf_to_params(ref.hf_state_dict(), CFG), CFG, str(out), dtype="float32",
                     max_shard_size="3MB")
    # A torch model with other random values, then the exported weights with strict key matching.
    torch_model = TorchOpenVLA(CFG).randomize(seed=6)
    sd = {}
    for fn in sorted(set(json.loads((out / sio.INDEX_FILE).read_text())["weight_map"].values())):
        sd.update(safetensors.torch.load_file(str(out / fn)))
    result = torch_model.load_hf_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    cfg, params, _, _ = hf.load_hf_dir(str(out), dtype="float32")
    return out, torch_model.eval(), cfg, params


def test_exported_text_config_builds_the_reference_llama(exported):
    out, torch_model, _, _ = exported
    text = json.loads((out / "config.json").read_text())["text_config"]
    theirs = transformers.LlamaConfig(**text)
    ours = torch_model.language_model.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "bos_token_id", "eos_token_id",
                  "tie_word_embeddings", "hidden_act"):
        assert getattr(theirs, field) == getattr(ours, field), field
    assert theirs.rope_parameters["rope_theta"] == ours.rope_parameters["rope_theta"]
    assert theirs.pad_token_id == 32000 and theirs.vocab_size == 32064  # OPENVLA_REFERENCE.md §8


def test_logits_match_the_pytorch_reference(exported):
    _, torch_model, cfg, params = exported
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    ids = np.array([PROMPT, PROMPT[:1] + [3158] * (len(PROMPT) - 1)], np.int32)
    with torch.no_grad():
        expected = torch_model(images, torch.from_numpy(ids).long()).numpy()
    got = np.asarray(jax.jit(OpenVLA(cfg).apply)({"params": params}, images, ids))
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    err = float(np.abs(got - expected).max())
    assert err <= LOGITS_RTOL * scale, f"max abs diff {err} vs logit scale {scale}"


def test_greedy_action_tokens_match_the_pytorch_reference(exported):
    _, torch_model, cfg, params = exported
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    ids = np.array([PROMPT, PROMPT], np.int32)
    expected = torch_model.greedy(images, torch.from_numpy(ids).long(), 7)
    decoder = jax.jit(functools.partial(greedy_decode, OpenVLA(cfg), num_tokens=7))
    got = np.asarray(decoder(split_layers(params), images, ids, np.full((2,), len(PROMPT), np.int32)))
    np.testing.assert_array_equal(got, expected)
