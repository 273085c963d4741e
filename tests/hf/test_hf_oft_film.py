"""OFT+'s FiLM backbone file `vision_backbone--STEP_checkpoint.{pt,safetensors}` in and out.

The input is the synthetic released folder of tests/fixtures/released_oft.py with its FiLM part: the
FiLM-wrapped towers as upstream saves them (no `module.` prefix, blocks under `.block.`, PEFT LoRA
layers with random rank-4 adapters, scale/shift per block), its names derived from the torch modules."""

import math
import os
import shutil

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from flax import traverse_util

from tests.fixtures.released_oft import STEP, write_oft_checkpoint
from tests.oft_torch_reference import film_params
from vla_jax import checkpoints as ckpt_lib
from vla_jax.hf import __main__ as cli
from vla_jax.hf import importer, oft_film, oft_io
from vla_jax.hf import keys_openvla as hf_keys
from vla_jax.models.config import config_from_dict, get_preset, with_dtypes

CFG = with_dtypes(get_preset("tiny"), "float32")
K, RANK = 2, 4
FILM_FILE = f"vision_backbone--{STEP}_checkpoint"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oft_film") / "film_tiny"
    return folder, write_oft_checkpoint(folder, proprio_dim=None, film=True, film_rank=RANK)


def _import(folder, work, *extra):
    assert cli.main(["import-oft", str(folder), str(work), "--allow_pickle", f"--chunk_size={K}",
                     "--cameras=full_image", "--param_dtype=float32", *extra]) == 0
    cfg = config_from_dict(ckpt_lib.load_assets(str(work))["meta"]["model"])
    params = ckpt_lib.load_params(str(work), importer.targets_for(importer.abstract_params(cfg)))
    return cfg, traverse_util.flatten_dict(jax_to_numpy(params))


def jax_to_numpy(tree):
    return {k: (jax_to_numpy(v) if isinstance(v, dict) else np.asarray(v)) for k, v in tree.items()}


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
    folder, _ = released
    work = tmp_path_factory.mktemp("film_work") / "work"
    return (work,) + _import(folder, work)


def test_film_file_layout_is_upstreams():
    """Our key table == the fixture's torch-derived keys (rank 4 and without LoRA); at 7B the FiLM
    linears hold the paper's 456M parameters (201.38M DINOv2 + 254.87M SigLIP, OFT_REFERENCE.md §8)."""
    from tests.oft_torch_reference import TorchFiLM
    from tests.torch_reference import TorchOpenVLA
    from tests.fixtures.released_oft import film_backbone_state

    model, film = TorchOpenVLA(CFG), TorchFiLM(CFG)
    for rank in (RANK, None):
        want = {k: tuple(v.shape) for k, v in film_backbone_state(model, film, rank, 0).items()}
        got = {k: s for k, (s, _) in oft_film.file_layout(CFG, rank).items()}
        assert got == want
    big = get_preset("openvla-7b")
    layout = oft_film.file_layout(big, 32)
    film_count = {t: sum(math.prod(s) for k, (s, _) in layout.items() if k.startswith(p) and
                         (".scale." in k or ".shift." in k)) for t, p in oft_film.TOWERS}
    assert (round(film_count["dino"] / 1e6, 2), round(film_count["siglip"] / 1e6, 2)) == (201.38, 254.87)
    assert "vision_backbone.featurizer.blocks.0.block.ls1.scale_factor" in layout
    assert layout["vision_backbone.featurizer.patch_embed.proj.lora_A.default.weight"][0] == (32, 3, 14, 14)
    assert layout["vision_backbone.fused_featurizer.blocks.26.block.attn.qkv.lora_B.default.weight"][0] == (3456, 32)


def test_import_merges_the_adapters_and_replaces_the_towers(released, imported):
    """The towers come from the FiLM file, W + (alpha / r) B @ A with alpha = min(r, 16) (here 4 / 4),
    not from the merged model's safetensors; the FiLM linears are the torch ones (transposed,
    bit-exact); config film=True."""
    folder, ref = released
    _, cfg, params = imported
    assert cfg.film and cfg.parallel_decoding and cfg.action_head == "l1"
    want = traverse_util.flatten_dict(hf_keys.hf_to_params(ref["torch_model"].hf_state_dict(), CFG))
    plain = traverse_util.flatten_dict(hf_keys.hf_to_params(
        {k: v.astype(np.float32) for k, v in _bf16_as_f32(folder / "model.safetensors").items()}, CFG))
    for path in [p for p in want if p[0] in ("dino", "siglip")]:
        np.testing.assert_allclose(params[path], want[path], rtol=1e-6, atol=1e-7, err_msg="/".join(path))
    qkv = ("dino", "blocks", "attn", "query", "kernel")
    assert float(np.abs(params[qkv] - plain[qkv]).max()) > 1e-2  # the file's weights, not model.safetensors'
    norm = ("dino", "blocks", "norm1", "scale")
    assert params[norm].tobytes() == plain[norm].tobytes()  # un-adapted tensors: the same bf16 values
    for path, arr in traverse_util.flatten_dict(film_params(ref["film"])).items():
        assert params[("film",) + path].tobytes() == np.asarray(arr, np.float32).tobytes(), path


def _bf16_as_f32(path):
    return {k: v.float().numpy() for k, v in safetensors.torch.load_file(str(path)).items()}


def test_safetensors_film_file_imports_the_same(released, imported, tmp_path):
    """The same file as safetensors (same keys) needs no --allow_pickle and gives bit-identical params."""
    st = tmp_path / "st"
    write_oft_checkpoint(st, proprio_dim=None, film=True, film_rank=RANK, fmt="safetensors")
    work = tmp_path / "work"
    assert cli.main(["import-oft", str(st), str(work), f"--chunk_size={K}", "--cameras=full_image",
                     "--param_dtype=float32"]) == 0
    cfg = config_from_dict(ckpt_lib.load_assets(str(work))["meta"]["model"])
    got = traverse_util.flatten_dict(jax_to_numpy(
        ckpt_lib.load_params(str(work), importer.targets_for(importer.abstract_params(cfg)))))
    _, _, want = imported
    assert set(got) == set(want)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes(), k


def test_film_round_trip_is_bit_identical(released, imported, tmp_path):
    """export-oft writes the FiLM file (no prefix, towers as base_layer with zero rank-4 adapters, the
    fixture's key set, i.e. what upstream's strict load_state_dict expects); importing it again gives
    every param bit-identical; the merged model's towers hold the same weights as the FiLM file's."""
    folder, _ = released
    out = tmp_path / "exported"
    work, _, want = imported
    assert cli.main(["export-oft", str(work), str(out), "--dtype=float32"]) == 0
    name = FILM_FILE + ".safetensors"
    assert name in os.listdir(out)
    sd = safetensors.numpy.load_file(str(out / name))
    src = {k: tuple(v.shape) for k, v in torch.load(str(folder / (FILM_FILE + ".pt")), weights_only=True).items()}
    assert {k: v.shape for k, v in sd.items()} == src
    adapters = [k for k in sd if ".lora_" in k]
    assert adapters and all(not sd[k].any() for k in adapters)
    merged = safetensors.numpy.load_file(str(out / "model.safetensors"))
    k = "vision_backbone.featurizer.blocks.1.attn.qkv.weight"
    assert merged[k].tobytes() == sd["vision_backbone.featurizer.blocks.1.block.attn.qkv.base_layer.weight"].tobytes()
    _, got = _import(out, tmp_path / "again")
    assert set(got) == set(want)
    for p in want:
        assert got[p].tobytes() == want[p].tobytes(), p


def _corrupt(released, tmp_path, edit):
    folder, _ = released
    dst = tmp_path / "bad"
    shutil.copytree(folder, dst)
    path = dst / (FILM_FILE + ".pt")
    sd = torch.load(str(path), weights_only=True)
    edit(sd)
    torch.save(sd, str(path))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("vision_backbone.featurizer.blocks.1.scale.weight"),
     r"1 tensors missing, e.g. vision_backbone\.featurizer\.blocks\.1\.scale\.weight \(expected shape \[32, 64\]\)"),
    (lambda sd: sd.update({"vision_backbone.fused_featurizer.blocks.0.shift.weight": torch.zeros(49, 64)}),
     r"vision_backbone\.fused_featurizer\.blocks\.0\.shift\.weight has shape \[49, 64\], expected \[48, 64\]"),
    (lambda sd: sd.update({"vision_backbone.featurizer.blocks.0.block.mlp.fc1.lora_A.default.weight":
                           torch.zeros(8, 32, dtype=torch.bfloat16)}),
     r"LoRA ranks differ between modules \(\[4, 8\]; e\.g\. vision_backbone\.featurizer\.blocks\.0\.block\.mlp"),
])
def test_bad_film_files_are_refused_naming_the_key(released, tmp_path, capsys, edit, message):
    bad = _corrupt(released, tmp_path, edit)
    work = tmp_path / "work"
    assert cli.main(["import-oft", str(bad), str(work), "--allow_pickle", f"--chunk_size={K}",
                     "--cameras=full_image"]) == 2
    err = capsys.readouterr().err
    assert FILM_FILE + ".pt" in err
    import re
    assert re.search(message, err), err
    assert not work.exists()


@pytest.mark.slow  # compiles the whole 224 px parallel decoder, like test_hf_oft.py's twin (~25 s there)
def test_imported_film_checkpoint_decodes_like_the_torch_wiring(released, imported):
    """The imported FiLM model against `TorchOFT` with `TorchFiLM` on the fixture's torch modules (whose
    towers hold the merged adapters): one L1 chunk, fp32 on both sides, within 1e-5."""
    import copy

    import jax
    from tests.oft_torch_reference import TorchOFT, oft_rows
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.models.parallel_decode import make_parallel_decoder

    _, ref = released
    _, cfg, flat = imported
    cfg = with_dtypes(cfg, "float32", "float32")
    params = jax.tree.map(np.asarray, traverse_util.unflatten_dict(flat))
    torch_oft = TorchOFT(ref["torch_model"], K, cfg.action_dim, copy.deepcopy(ref["head"]).float(), film=ref["film"])
    images = np.random.default_rng(2).integers(0, 256, size=(1, CFG.image_size, CFG.image_size, 3), dtype=np.uint8)
    prompt = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 29973, 13, 3744, 29901, 29871]
    ids, mask, lengths = oft_rows([prompt], K * cfg.action_dim, CFG.eos_token_id, CFG.pad_token_id)
    expected = torch_oft.l1_actions(images, ids, mask, lengths)
    got = np.asarray(make_parallel_decoder(OpenVLA(cfg))(params, images, np.array([prompt], np.int32),
                                                         np.array([len(prompt)], np.int32)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert float(np.abs(expected).max()) > 0.1
