"""Released OpenVLA-OFT checkpoints in and out (`python -m vla_jax.hf import-oft` / `export-oft`).

The input is a small synthetic folder in the released layout (tests/fixtures/released_oft.py: the tiny
model merged into HF OpenVLA files, the L1 head and the proprio projector saved by torch as upstream
saves them); the released 7B key names and shapes are checked against a committed table."""

import copy
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import flax.linen as nn
from flax import traverse_util

from tests.fixtures.released_oft import DATASET, STEP, oft_keys, released_oft_keys, write_oft_checkpoint
from vla_jax import checkpoints as ckpt_lib
from vla_jax.hf import __main__ as cli
from vla_jax.hf import importer, oft_files, oft_io, oft_layout
from vla_jax.hf import safetensors_io as sio
from vla_jax.models.action_head import L1ActionHead
from vla_jax.models.config import config_from_dict, get_preset, with_dtypes
from vla_jax.spec import ActionCodec, BatchSpec

CFG = with_dtypes(get_preset("tiny"), "float32")
H = CFG.llama.hidden_size
K, D, P = 8, 7, 8
CAMERAS = "--cameras=full_image,wrist_image"
HEAD_FILE = f"action_head--{STEP}_checkpoint"
PROPRIO_FILE = f"proprio_projector--{STEP}_checkpoint"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oft") / "libero_tiny"
    return folder, write_oft_checkpoint(folder)


@pytest.fixture(scope="module")
def imported(released, tmp_path_factory):
    folder, _ = released
    work = tmp_path_factory.mktemp("oft_work") / "work"
    assert cli.main(["import-oft", str(folder), str(work), "--allow_pickle", f"--chunk_size={K}", CAMERAS,
                     "--param_dtype=float32"]) == 0
    return work


def _copy(released, tmp_path):
    folder, _ = released
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def _all_tensors(folder):
    infos = sio.index_tensors(str(folder))
    return {info.key: arr for info, arr in sio.iter_tensors(sio.read_order(infos.values()))}


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


# ----------------------------------------------------------------------------------------------
# Key tables


def test_key_tables_are_the_released_ones():
    released = released_oft_keys()
    assert released == oft_keys(4096, 7, 8)  # the committed table is the documented structure
    counts = {c: sum(math.prod(s) for _, s in rows) for c, rows in released.items()}
    # OFT_REFERENCE.md §6b, §7: the paper's "151M" head and "17M" projector (LIBERO), "269M" head for ALOHA.
    assert round(counts["action_head"] / 1e6, 2) == 151.12 and round(counts["proprio_projector"] / 1e6, 2) == 16.82
    assert round(sum(math.prod(s) for _, s in oft_keys(4096, 14, 14)["action_head"]) / 1e6, 2) == 268.64

    g = oft_layout.Geometry(hidden=4096, action_dim=7, proprio_dim=8)
    ours = {c: [(oft_layout.DDP_PREFIX + r.key, tuple(r.shape)) for r in rules]
            for c, rules in oft_layout.component_rules(g).items()}
    assert ours == released
    # The rules' leaves are exactly the params of the L1 head at 7B (shapes only, nothing allocated).
    head = jax.eval_shape(lambda: L1ActionHead(action_dim=7, width=4096).init(
        jax.random.PRNGKey(0), jnp.zeros((1, K * 7, 4096))))["params"]
    want = {("action_head",) + k: v.shape for k, v in traverse_util.flatten_dict(nn.meta.unbox(head)).items()}
    got = {}
    for r in oft_layout.action_head_rules(g):
        conv = jax.eval_shape(lambda w, f=r.to_flax: f(w), jax.ShapeDtypeStruct(r.shape, jnp.float32))
        got.update({p: c.shape for p, c in zip(r.leaves, conv)})
    assert got == want


def test_param_tree_mapping_round_trips_and_checks_shapes():
    g = oft_layout.Geometry(hidden=H, action_dim=D, proprio_dim=P)
    rng = np.random.default_rng(0)
    for component, rows in oft_keys(H, D, P).items():
        state = {k[len("module."):]: rng.standard_normal(s).astype(np.float32) for k, s in rows}
        params = oft_layout.state_to_params(component, state, g)
        assert list(params) == [component]
        back = oft_layout.params_to_state(component, params, g)
        assert list(back) == list(state)
        for k in state:
            assert back[k].tobytes() == state[k].tobytes() and back[k].shape == state[k].shape, k
    fc1 = oft_layout.state_to_params("proprio_projector", {k[7:]: np.zeros(s, np.float32) for k, s in
                                                           oft_keys(H, D, P)["proprio_projector"]}, g)
    assert fc1["proprio_projector"]["fc1"]["kernel"].shape == (P, H)  # [in, out]
    bad = {k[7:]: np.zeros(s, np.float32) for k, s in oft_keys(H, D, P)["proprio_projector"]}
    bad["fc2.weight"] = np.zeros((H, H + 1), np.float32)
    with pytest.raises(ValueError, match=r"module\.fc2\.weight has shape \[64, 65\], expected \[64, 64\]"):
        oft_layout.state_to_params("proprio_projector", bad, g)


# ----------------------------------------------------------------------------------------------
# Import / export


def test_imported_checkpoint_records_the_oft_model_and_batch_spec(released, imported):
    folder, _ = released
    assets = ckpt_lib.load_assets(str(imported))
    cfg = config_from_dict(assets["meta"]["model"])
    assert (cfg.parallel_decoding, cfg.chunk_size, cfg.action_head, cfg.action_dim) == (True, K, "l1", D)
    assert (cfg.num_images, cfg.proprio_dim, cfg.param_dtype) == (2, P, "float32")
    spec = BatchSpec.from_json(assets["batch_spec"])
    assert spec.cameras == ("full_image", "wrist_image") and spec.proprio_dim == P
    assert spec.codec == ActionCodec(action_dim=D, chunk_size=K, decoding="parallel", head="l1")
    assert spec.text_len == 128 == assets["tokenizer"]["max_seq_len"]
    # dataset_statistics.json alone (config.json's norm_stats are the base model's, as upstream's loader).
    assert assets["dataset_statistics"] == json.loads((folder / "dataset_statistics.json").read_text())
    source = assets["config"]["source"]
    assert source["format"] == "openvla-oft" and source["step"] == STEP
    assert source["files"] == {"action_head": HEAD_FILE + ".pt", "proprio_projector": PROPRIO_FILE + ".pt"}


def test_round_trip_is_bit_identical(released, imported, tmp_path, capsys):
    folder, ref = released
    out = tmp_path / "exported"
    assert cli.main(["export-oft", str(imported), str(out)]) == 0
    assert f"OpenVLA-OFT step {STEP}" in capsys.readouterr().out
    names = set(os.listdir(out))
    assert {HEAD_FILE + ".safetensors", PROPRIO_FILE + ".safetensors", "config.json", "dataset_statistics.json",
            "model.safetensors", "tokenizer.model"} <= names
    # The merged model: every key, dtype (bf16), shape and bit.
    want, got = safetensors.numpy.load_file(str(folder / "model.safetensors")), _all_tensors(out)
    assert set(got) == set(want)
    for k in want:
        assert (got[k].dtype, got[k].shape) == (want[k].dtype, want[k].shape), k
        assert got[k].tobytes() == want[k].tobytes(), k
    # The extra modules against the .pt files as torch itself reads them (bf16 head, fp32 projector).
    for component, name in (("action_head", HEAD_FILE), ("proprio_projector", PROPRIO_FILE)):
        want_sd = torch.load(str(ref["files"][component]), weights_only=True)
        got_sd = safetensors.torch.load_file(str(out / f"{name}.safetensors"))
        assert set(got_sd) == set(want_sd)
        for k, v in want_sd.items():
            assert (got_sd[k].dtype, got_sd[k].shape) == (v.dtype, v.shape), k
            assert _bits(got_sd[k]) == _bits(v), k
    assert {v.dtype for v in torch.load(str(ref["files"]["action_head"]), weights_only=True).values()} == {
        torch.bfloat16}
    stats = json.loads((out / "dataset_statistics.json").read_text())
    assert stats == json.loads((folder / "dataset_statistics.json").read_text())
    # The exported folder imports again (the safetensors extra files need no --allow_pickle).
    again = oft_io.read_oft_dir(str(out))
    assert again.step == STEP and again.geometry == oft_layout.Geometry(hidden=H, action_dim=D, proprio_dim=P)


def test_imported_head_and_projector_match_torch(released, imported):
    """The L1 head and the proprio projector, loaded from the .pt state dicts, against the torch modules."""
    from vla_jax.hf.checkpoint_io import ParamsReader
    from vla_jax.models.proprio import ProprioProjector

    _, ref = released
    reader = ParamsReader(str(imported))  # only these two modules are restored
    params = {c: reader.read_tree((c,)) for c in ("action_head", "proprio_projector")}
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((2, K * D, H)).astype(np.float32)
    head32 = copy.deepcopy(ref["head"]).float()  # the saved bf16 weights, evaluated in fp32 like ours
    with torch.no_grad():
        want = head32(torch.from_numpy(hidden).reshape(2, K, D * H)).numpy()
    got = L1ActionHead(action_dim=D, width=H).apply({"params": params["action_head"]}, jnp.asarray(hidden))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)

    proprio = rng.uniform(-1, 1, (3, P)).astype(np.float32)
    with torch.no_grad():
        want = ref["proprio"](torch.from_numpy(proprio)).numpy()
    got = ProprioProjector(llm_dim=H).apply({"params": params["proprio_projector"]}, jnp.asarray(proprio))
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def test_checkpoint_reader_takes_a_relative_path(imported, monkeypatch):
    """A checkpoint path as a user types it (relative to the working folder): orbax restores only
    from absolute paths, so the reader must resolve it (export-oft with a relative path failed)."""
    from vla_jax.hf.checkpoint_io import ParamsReader

    want = ParamsReader(str(imported)).read_tree(("proprio_projector",))
    monkeypatch.chdir(imported.parent)
    got = ParamsReader(imported.name).read_tree(("proprio_projector",))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.slow  # compiles the whole parallel decoder for two 224 px cameras: ~25 s on 2 shared cores
def test_imported_checkpoint_decodes_like_the_torch_wiring(released, imported):
    """The whole imported model (two cameras, proprio token, L1 head) against upstream's wiring
    (`TorchOFT` of tests/oft_torch_reference.py) on the torch modules the folder was written from: one
    parallel-decoding pass, fp32 on both sides."""
    from tests.oft_torch_reference import TorchOFT, oft_rows
    from vla_jax.models.openvla import OpenVLA
    from vla_jax.models.parallel_decode import make_parallel_decoder

    _, ref = released
    cfg = config_from_dict(ckpt_lib.load_assets(str(imported))["meta"]["model"])
    cfg = with_dtypes(cfg, "float32", "float32")  # the import records bf16 compute; fp32 for the comparison
    params = ckpt_lib.load_params(str(imported), importer.targets_for(importer.abstract_params(cfg)))
    torch_oft = TorchOFT(ref["torch_model"], K, D, copy.deepcopy(ref["head"]).float(), ref["proprio"])
    rng = np.random.default_rng(2)
    s = CFG.image_size
    images = rng.integers(0, 256, size=(1, 2, s, s, 3), dtype=np.uint8)
    proprio = rng.uniform(-1, 1, size=(1, P)).astype(np.float32)
    prompt = [1, 512, 29901, 1724, 3158, 881, 278, 19964, 2125, 304, 5839, 701, 29973, 13, 3744, 29901, 29871]
    ids, mask, lengths = oft_rows([prompt], K * D, CFG.eos_token_id, CFG.pad_token_id)
    expected = torch_oft.l1_actions(images, ids, mask, lengths, proprio=proprio)
    decode = make_parallel_decoder(OpenVLA(cfg))
    got = np.asarray(decode(params, images, np.array([prompt], np.int32), np.array([len(prompt)], np.int32),
                            proprio))
    assert got.shape == expected.shape == (1, K, D)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)  # test_cams_parity.py's L1 tolerance
    assert float(np.abs(expected).max()) > 0.1  # a real signal


def test_safetensors_files_are_read_without_the_pickle_flag(released, tmp_path):
    """The same files as safetensors (same keys) need no --allow_pickle and give the same tensors; the
    import reads both formats through the same StateFile, and the round trip re-reads the exported
    safetensors."""
    folder, _ = released
    st = tmp_path / "st"
    write_oft_checkpoint(st, fmt="safetensors")  # same seed: the same tensors as the .pt fixture
    got = oft_io.read_oft_dir(str(st))
    want = oft_io.read_oft_dir(str(folder), allow_pickle=True)
    assert got.geometry == want.geometry == oft_layout.Geometry(hidden=H, action_dim=D, proprio_dim=P)
    assert got.step == want.step == STEP
    for c in ("action_head", "proprio_projector"):
        g, w = got.states[c], want.states[c]
        assert g.path.endswith(".safetensors") and w.path.endswith(".pt") and g.prefix == w.prefix == "module."
        assert g.shapes == w.shapes and g.dtypes == w.dtypes
        for k in w.shapes:
            assert g.load(k).tobytes() == w.load(k).tobytes(), k


# ----------------------------------------------------------------------------------------------
# Refusals and errors (all before any output exists)


def test_pickles_need_the_flag(released, tmp_path, capsys):
    folder, _ = released
    work = tmp_path / "work"
    assert cli.main(["import-oft", str(folder), str(work), f"--chunk_size={K}", CAMERAS]) == 2
    err = capsys.readouterr().err
    assert f"{folder / HEAD_FILE}.pt is a PyTorch pickle" in err and "--allow_pickle" in err
    assert not work.exists()


def test_plain_import_and_export_refuse_oft(released, imported, tmp_path, capsys):
    folder, _ = released
    assert cli.main(["import", str(folder), str(tmp_path / "w")]) == 2
    assert "import-oft" in capsys.readouterr().err and not (tmp_path / "w").exists()
    for load in (importer.load_hf_dir, lambda p: importer.load_hf_params(p, {})):  # Policy.load, init_from
        with pytest.raises(ValueError, match=rf"{HEAD_FILE}\.pt, {PROPRIO_FILE}\.pt\): read as a plain OpenVLA "
                                             r"folder it would lose them; import it with .*import-oft"):
            load(str(folder))
    assert cli.main(["export", str(imported), str(tmp_path / "hf")]) == 2
    assert "export-oft" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def _save_pt(path, mutate):
    sd = torch.load(str(path), weights_only=True)
    mutate(sd)
    torch.save(sd, str(path))


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.__setitem__("module.model.fc1.weight", torch.zeros(H, D * H - 1)),
     rf"{HEAD_FILE}\.pt does not match the model: 1 shape mismatches, e\.g\. module\.model\.fc1\.weight has shape "
     rf"\[{H}, {D * H - 1}\], expected \[{H}, {D * H}\]"),
    (lambda sd: sd.pop("module.model.fc2.bias"),
     rf"{HEAD_FILE}\.pt does not match the model: 1 tensors missing, e\.g\. module\.model\.fc2\.bias "
     rf"\(expected shape \[{D}\]\)"),
    (lambda sd: sd.__setitem__("module.model.extra.weight", torch.zeros(2)),
     rf"{HEAD_FILE}\.pt does not match the model: 1 unexpected tensors, e\.g\. module\.model\.extra\.weight"),
    (lambda sd: sd.__setitem__("model.fc2.bias", sd.pop("module.model.fc2.bias")),
     r"keys mix the DDP prefix 'module\.'"),
    (lambda sd: sd.__setitem__("module.model.fc2.weight", torch.zeros(D, H + 1)),
     rf"{HEAD_FILE}\.pt: tensor module\.model\.fc2\.weight has shape \[{D}, {H + 1}\]: head width {H + 1}"),
])
def test_bad_action_head_files_are_named(released, tmp_path, mutate, match):
    folder = _copy(released, tmp_path)
    _save_pt(folder / f"{HEAD_FILE}.pt", mutate)
    with pytest.raises(ValueError, match=match):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)


def test_bad_proprio_files_and_statistics_are_named(released, tmp_path):
    folder = _copy(released, tmp_path)
    _save_pt(folder / f"{PROPRIO_FILE}.pt", lambda sd: sd.__setitem__("module.fc1.weight", torch.zeros(H + 1, P)))
    with pytest.raises(ValueError, match=rf"{PROPRIO_FILE}\.pt: tensor module\.fc1\.weight has shape \[{H + 1}, {P}\]"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)
    folder = _copy(released, tmp_path / "b")
    stats = json.loads((folder / "dataset_statistics.json").read_text())
    stats[DATASET]["proprio"]["q99"] = stats[DATASET]["proprio"]["q99"][:-1]
    (folder / "dataset_statistics.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=rf"dataset_statistics\.json: \['{DATASET}'\]\['proprio'\] must hold .* of "
                                         rf"length {P}"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)
    stats[DATASET]["action"]["q01"] = stats[DATASET]["action"]["q01"][:-1]
    (folder / "dataset_statistics.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=rf"\['{DATASET}'\]\['action'\] must hold q01 and q99 of length {D}"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)
    os.remove(folder / "dataset_statistics.json")
    with pytest.raises(ValueError, match="has no dataset_statistics.json"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)


def test_steps_duplicates_film_and_missing_files(released, tmp_path):
    folder = _copy(released, tmp_path)
    shutil.copyfile(folder / f"{HEAD_FILE}.pt", folder / "action_head--100000_checkpoint.pt")
    with pytest.raises(ValueError, match=r"several steps \['100000', '150000'\] \(action_head--100000_checkpoint\.pt"
                                         r".*--step"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)
    with pytest.raises(ValueError, match=r"no OpenVLA-OFT files for step 5 \(--step\); steps there: "
                                         r"\['100000', '150000'\]"):
        oft_io.read_oft_dir(str(folder), step="5", allow_pickle=True)
    chosen = oft_io.read_oft_dir(str(folder), step=STEP, allow_pickle=True)
    assert chosen.step == STEP and chosen.states["action_head"].path == str(folder / f"{HEAD_FILE}.pt")
    assert set(chosen.states) == {"action_head", "proprio_projector"}
    # Only the proprio projector at step 100000: no action head there -> discrete tokens.
    os.remove(folder / "action_head--100000_checkpoint.pt")
    shutil.copyfile(folder / f"{PROPRIO_FILE}.pt", folder / "proprio_projector--100000_checkpoint.pt")
    assert oft_io.read_oft_dir(str(folder), step="100000", allow_pickle=True).head == "tokens"
    os.remove(folder / "proprio_projector--100000_checkpoint.pt")

    st = folder / f"{HEAD_FILE}.safetensors"
    safetensors.torch.save_file(dict(torch.load(str(folder / f"{HEAD_FILE}.pt"), weights_only=True)), str(st))
    with pytest.raises(ValueError, match=rf"holds action_head for step {STEP} twice: {HEAD_FILE}\.pt and "
                                         rf"{HEAD_FILE}\.safetensors"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)
    os.remove(st)

    film = folder / f"vision_backbone--{STEP}_checkpoint.pt"
    shutil.copyfile(folder / f"{PROPRIO_FILE}.pt", film)
    # OFT+'s FiLM backbone file is read (tests/hf/test_hf_oft_film.py); a wrong one names its missing keys.
    with pytest.raises(ValueError, match=rf"vision_backbone--{STEP}_checkpoint\.pt does not match the model: "
                                         r"\d+ tensors missing, e\.g\. vision_backbone\.featurizer\.patch_embed\.proj"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)
    os.remove(film)
    (folder / f"gripper_head--{STEP}_checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"gripper_head--150000_checkpoint\.pt: unknown OpenVLA-OFT component"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)
    os.remove(folder / f"gripper_head--{STEP}_checkpoint.pt")
    os.remove(folder / "config.json")
    with pytest.raises(ValueError, match="has no config.json"):
        oft_io.read_oft_dir(str(folder), allow_pickle=True)


def test_without_extra_files_the_head_is_tokens(tmp_path):
    folder = tmp_path / "pd"
    write_oft_checkpoint(folder, head=False, proprio_dim=None)
    got = oft_io.read_oft_dir(str(folder))
    assert got.head == "tokens" and got.step is None and got.geometry.proprio_dim is None
    cfg = oft_io.oft_model_config(CFG, chunk_size=K, action_dim=D, head=got.head, num_images=1, proprio_dim=None)
    assert (cfg.parallel_decoding, cfg.chunk_size, cfg.action_head, cfg.num_images, cfg.proprio_dim) == (
        True, K, "tokens", 1, None)
