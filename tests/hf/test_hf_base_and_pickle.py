"""Importing base components (timm towers + HF Llama-2, fresh projector) and the opt-in path for
Prismatic-format PyTorch pickles (refused by default, read without running pickled code)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util
from timm.layers import resample_abs_pos_embed

from tests.torch_reference import TorchOpenVLA, timm_tower
from vla_jax import checkpoints as ckpt_lib
from vla_jax.hf import __main__ as cli
from vla_jax.hf import config as hfc
from vla_jax.hf import import_checkpoint, importer
from vla_jax.hf import keys_openvla, keys_vit
from vla_jax.models.config import get_preset, with_dtypes

CFG = with_dtypes(get_preset("tiny"), "float32")
POS_ATOL = 1e-5  # fp32 bicubic weights summed in another order than torch's


def _randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _load(work, cfg):
    abstract = importer.targets_for(importer.abstract_params(cfg))
    return ckpt_lib.load_params(str(work), abstract)


def test_base_components(tmp_path, llama_tokenizer_path):
    # DINOv2 as released: trained at 518px (37x37 positions), used at 224px (16x16).
    dino518 = _randomize(timm_tower(dataclasses.replace(CFG.dino, image_size=518)), 1)
    siglip = _randomize(timm_tower(CFG.siglip), 2)
    safetensors.torch.save_file(dino518.state_dict(), str(tmp_path / "dino.safetensors"))
    safetensors.torch.save_file(siglip.state_dict(), str(tmp_path / "siglip.safetensors"))
    llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        rms_norm_eps=1e-5, tie_word_embeddings=False))
    llm.save_pretrained(str(tmp_path / "llama"))
    work = tmp_path / "work"
    assert cli.main(["import-base", str(work), "--dino", str(tmp_path / "dino.safetensors"), "--siglip",
                     str(tmp_path / "siglip.safetensors"), "--llm", str(tmp_path / "llama"),
                     "--tokenizer", str(llama_tokenizer_path)]) == 2  # released tower geometry != tiny files
    summary = import_checkpoint.import_base(str(tmp_path / "dino.safetensors"), str(tmp_path / "siglip.safetensors"),
                                            str(tmp_path / "llama"), str(work), dino=CFG.dino, siglip=CFG.siglip,
                                            tokenizer=str(llama_tokenizer_path))
    cfg = summary["config"]
    # From the Llama config.json (Llama-2-7b-hf says 1e-5), vocab grown by <PAD> and padded to 64.
    assert cfg.llama.rms_norm_eps == 1e-5 and cfg.llama.vocab_size == 32064
    assert (cfg.base_vocab_size, cfg.pad_token_id) == (32000, 32000)
    params = _load(work, cfg)

    sd = {k: v.numpy() for k, v in dino518.state_dict().items()}
    want_pos = resample_abs_pos_embed(dino518.pos_embed.detach(), new_size=(16, 16), num_prefix_tokens=0).numpy()
    assert np.abs(np.asarray(params["dino"]["pos_embed"]) - want_pos).max() <= POS_ATOL
    want_dino = keys_vit.timm_to_flax(dict(sd, pos_embed=want_pos), CFG.dino)
    got, want = traverse_util.flatten_dict(params["dino"]), traverse_util.flatten_dict(want_dino)
    assert set(got) == set(want)
    for k in want:
        if k != ("pos_embed",):
            np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=str(k))
    want_siglip = keys_vit.timm_to_flax({k: v.numpy() for k, v in siglip.state_dict().items()}, CFG.siglip)
    for k, v in traverse_util.flatten_dict(want_siglip).items():
        np.testing.assert_array_equal(np.asarray(traverse_util.flatten_dict(params["siglip"])[k]), v)

    emb = np.asarray(params["llm"]["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(emb[:32000], llm.model.embed_tokens.weight.detach().numpy())
    head = np.asarray(params["llm"]["lm_head"]["kernel"])
    np.testing.assert_array_equal(head[:, :32000], llm.lm_head.weight.detach().numpy().T)
    for new in (emb[32000:], head[:, 32000:].T):  # transformers 4.40 resize: N(0, initializer_range=0.02)
        assert new.shape == (64, 64) and 0.018 < new.std() < 0.022 and abs(new.mean()) < 0.003
    q = np.asarray(params["llm"]["layers"]["self_attn"]["q_proj"]["kernel"][1])
    np.testing.assert_array_equal(q.reshape(64, 64), llm.model.layers[1].self_attn.q_proj.weight.detach().numpy().T)
    proj = params["projector"]
    assert proj["fc1"]["kernel"].shape == (80, 320) and float(np.abs(np.asarray(proj["fc1"]["kernel"])).max()) > 0
    assert not np.asarray(proj["fc3"]["bias"]).any()


def _prismatic_checkpoint(ref: TorchOpenVLA, path):
    """The layout OpenVLA's training saves (`{"model": {vision_backbone, projector, llm_backbone}}`)."""
    sd = ref.state_dict()
    proj_names = {"fc1": "0", "fc2": "2", "fc3": "4"}
    model = {
        "vision_backbone": {**{"dino_featurizer." + k[len("featurizer."):]: v for k, v in sd.items()
                               if k.startswith("featurizer.")},
                            **{"siglip_featurizer." + k[len("fused_featurizer."):]: v for k, v in sd.items()
                               if k.startswith("fused_featurizer.")}},
        "projector": {f"projector.{proj_names[k.split('.')[1]]}.{k.split('.')[2]}": v for k, v in sd.items()
                      if k.startswith("projector.")},
        "llm_backbone": {"llm." + k[len("language_model."):]: v for k, v in sd.items()
                         if k.startswith("language_model.")},
    }
    torch.save({"model": model}, str(path))


def test_prismatic_pickle_needs_the_flag_and_then_imports(tmp_path, capsys, llama_tokenizer_path):
    ref = TorchOpenVLA(CFG).randomize(seed=7)
    pt = tmp_path / "run" / "checkpoints" / "step-000100-epoch-00-loss=0.1000.pt"
    pt.parent.mkdir(parents=True)
    _prismatic_checkpoint(ref, pt)
    cfg_json = tmp_path / "config.json"
    cfg_json.write_text(json.dumps(hfc.config_to_hf(CFG, {}, "float32")))
    work = tmp_path / "work"
    assert cli.main(["import", str(pt), str(work)]) == 2
    assert "refused by default" in capsys.readouterr().err and not work.exists()
    assert cli.main(["import", str(pt), str(work), "--allow_pickle"]) == 2
    assert "--hf_config" in capsys.readouterr().err and not work.exists()
    assert cli.main(["import", str(pt), str(work), "--allow_pickle", f"--hf_config={cfg_json}",
                     f"--tokenizer={llama_tokenizer_path}"]) == 0
    got = traverse_util.flatten_dict(_load(work, with_dtypes(CFG, "float32")))
    want = traverse_util.flatten_dict(keys_openvla.hf_to_params(ref.hf_state_dict(), CFG))
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k], err_msg=str(k))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_that_would_run_code_are_refused(tmp_path):
    from vla_jax.hf import pickle_io

    torch.save({"model": _Evil()}, str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match=r"refusing to load (posix|os)\.system"):
        pickle_io.load_pt(str(tmp_path / "evil.pt"))
