"""The released openvla-7b format: the full key/shape list (fixture transcribed from
OPENVLA_REFERENCE.md §8), config.json <-> OpenVLAConfig, and the tables config.py relies on
(timm tower geometry, transformers' LlamaConfig defaults) checked against the libraries."""

import dataclasses
import math

import pytest
import timm
import torch
import transformers

from tests.fixtures.released_openvla_7b import released_config, released_keys
from vla_jax.hf import config as hfc
from vla_jax.hf import exporter, importer
from vla_jax.models.config import get_preset, with_dtypes

CFG_7B = get_preset("openvla-7b")
NORM_STATS = {"bridge_orig": {"action": {"q01": [-0.03, -0.04, -0.03, -0.2, -0.2, -0.3, 0.0],
                                         "q99": [0.03, 0.04, 0.04, 0.2, 0.2, 0.3, 1.0],
                                         "mask": [True] * 6 + [False]}}}
RELEASED_CONFIG = released_config(NORM_STATS)


def test_exported_keys_and_shapes_are_the_released_list():
    released = released_keys()
    assert sum(math.prod(s) for _, s in released) == 7_541_237_184  # OPENVLA_REFERENCE.md §1.6
    abstract = importer.abstract_params(CFG_7B)  # jax.eval_shape: nothing allocated
    plan = exporter.export_plan(abstract, CFG_7B)
    assert len(plan) == len(released) == len(dict(plan))
    assert dict(plan) == dict(released)


def test_released_config_json_gives_the_7b_geometry():
    cfg = hfc.config_from_hf(RELEASED_CONFIG, None, param_dtype="float32")
    assert cfg == CFG_7B
    # Values not given in text_config are transformers' LlamaConfig defaults (rms_norm_eps 1e-6, ...).
    assert cfg.llama.rms_norm_eps == 1e-6 and cfg.llama.num_layers == 32 and cfg.llama.vocab_size == 32064
    assert (cfg.base_vocab_size, cfg.pad_token_id, cfg.n_action_bins, cfg.action_dim) == (32000, 32000, 256, 7)
    assert cfg.llama.max_seq_len == 2048 + 256


@pytest.mark.parametrize("field, value, check", [
    ("rms_norm_eps", 1e-5, lambda c: c.llama.rms_norm_eps == 1e-5),
    ("vocab_size", 32128, lambda c: c.llama.vocab_size == 32128 and c.base_vocab_size == 32064),
    ("rope_theta", 5e5, lambda c: c.llama.rope_theta == 5e5),
    ("num_key_value_heads", 8, lambda c: c.llama.kv_heads == 8),
])
def test_text_config_values_are_read_not_assumed(field, value, check):
    cfg_json = dict(RELEASED_CONFIG, text_config=dict(RELEASED_CONFIG["text_config"], **{field: value}))
    assert check(hfc.config_from_hf(cfg_json))


def test_top_level_values_are_read():
    cfg_json = dict(RELEASED_CONFIG, n_action_bins=128, image_sizes=[448, 448], llm_max_length=1024)
    cfg = hfc.config_from_hf(cfg_json)
    assert cfg.n_action_bins == 128 and cfg.image_size == 448 and cfg.num_patches == 32 * 32
    assert cfg.llama.max_seq_len == 1024 + 1024
    pre = {"means": [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], "stds": [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]}
    cfg = hfc.config_from_hf(RELEASED_CONFIG, pre)
    assert cfg.dino.mean == (0.1, 0.2, 0.3) and cfg.siglip.std == (2.0, 2.0, 2.0)


def test_written_config_json_has_the_released_fields():
    written = hfc.config_to_hf(CFG_7B, NORM_STATS, "bfloat16")
    for key, value in RELEASED_CONFIG.items():
        if key == "text_config":
            assert all(written["text_config"][k] == v for k, v in value.items())
        else:
            assert written[key] == value, key
    assert hfc.EXTRA_VISION_KEY not in written
    assert written["text_config"]["rms_norm_eps"] == 1e-6  # written out, not left to defaults
    assert hfc.config_from_hf(written, hfc.preprocessor_config(CFG_7B), param_dtype="float32") == CFG_7B
    tiny = with_dtypes(get_preset("tiny"), "bfloat16")
    written = hfc.config_to_hf(tiny, {}, "float32")
    assert hfc.EXTRA_VISION_KEY in written  # not a released timm geometry: stored explicitly
    assert hfc.config_from_hf(written, hfc.preprocessor_config(tiny), param_dtype="float32") == tiny


@pytest.mark.parametrize("timm_id", sorted(hfc.TIMM_TOWERS))
def test_timm_tower_table_matches_timm(timm_id):
    with torch.device("meta"):  # module structure only, no memory
        m = timm.create_model(timm_id, pretrained=False, num_classes=0, img_size=224)
    ours = hfc.TIMM_TOWERS[timm_id]
    assert m.embed_dim == ours["width"] and len(m.blocks) == ours["depth"]
    assert m.blocks[0].attn.num_heads == ours["num_heads"]
    assert m.blocks[0].mlp.fc1.out_features == ours["mlp_dim"]
    assert m.patch_embed.patch_size == (ours["patch_size"],) * 2
    assert (m.cls_token is not None) == ours["class_token"] and m.num_reg_tokens == ours["num_registers"]
    assert isinstance(m.blocks[0].ls1, timm.layers.LayerScale) == ours["layer_scale"]
    assert m.no_embed_class == ours["no_embed_class"] and (m.attn_pool is not None) == ours["map_head"]
    assert tuple(m.pretrained_cfg["mean"]) == ours["mean"] and tuple(m.pretrained_cfg["std"]) == ours["std"]


def test_llama_defaults_match_transformers():
    d = transformers.LlamaConfig().to_dict()
    for k, v in hfc.LLAMA_DEFAULTS.items():
        if k == "rope_theta":
            assert d["rope_parameters"]["rope_theta"] == v
        elif k == "rope_scaling":
            assert d["rope_parameters"]["rope_type"] == "default"
        elif k == "num_key_value_heads":  # None means "= num_attention_heads"
            assert d[k] == d["num_attention_heads"]
        else:
            assert d[k] == v, k


def test_geometry_comparison_ignores_only_dtypes():
    a = dataclasses.replace(CFG_7B, llama=dataclasses.replace(CFG_7B.llama, rms_norm_eps=1e-5))
    assert importer.config_geometry(with_dtypes(CFG_7B, "float32")) == importer.config_geometry(CFG_7B)
    assert importer.config_geometry(a) != importer.config_geometry(CFG_7B)
