"""`make demo` wiring (vla_jax/demo.py, configs/demo.py): the config builds a demo-scale OpenVLA, the
demo tokenizer puts the action bins on ids no text maps to, and each phase's command line names an
existing entry point with flags it defines. No training or simulation runs here (< 30 s)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vla_jax import demo

REPO = demo.REPO


def test_demo_config_builds_demo_scale_model():
    from configs import demo as demo_cfg
    from vla_jax.training import run

    c = demo_cfg.get_config("steps=120")
    m = run.model_config(c.model)
    assert (m.image_size, m.dino.patch_size, m.num_patches) == (64, 16, 16)
    assert m.base_vocab_size == demo.DEMO_VOCAB == m.pad_token_id
    assert m.llama.vocab_size > m.base_vocab_size and m.llama.vocab_size % 64 == 0
    assert c.num_steps == 120 and c.optim.schedule == "warmup_cosine" and c.data.image_aug
    assert c.global_batch_size == 64 and c.data.mixture == "metaworld_demo"


def test_demo_tokenizer_reserves_action_ids(tmp_path):
    import sentencepiece as spm

    from vla_jax.sim.demos import DEMO_TASKS
    from vla_jax.sim.instructions import INSTRUCTIONS
    from vla_jax.tokenizer import VLATokenizer, build_prompt

    path = demo.build_tokenizer(demo.tokenizer_path(str(tmp_path)))
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.get_piece_size() == 512
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    # The 256 action ids are the last ids and are UNUSED pieces: text never encodes to them.
    assert all(sp.is_unused(i) for i in range(512 - 256, 512))
    from configs import demo as demo_config

    max_len = demo_config.get_config().data.max_seq_len
    tok = VLATokenizer.from_file(path, max_len=max_len)
    assert tok.codec.first_id == 512 - 256
    for text in INSTRUCTIONS.values():
        ids = sp.encode(build_prompt(text))
        assert max(ids) < 512 - 256 and sp.unk_id() not in ids, text
        assert sp.decode(ids) == build_prompt(text)
        # The template is two pieces, so a prompt is at most 2 pieces + one per instruction word.
        assert len(ids) <= 2 + len(text.split()), (text, sp.encode(build_prompt(text), out_type=str))
    for task in DEMO_TASKS:  # the demo's prompts + space, 7 actions, EOS fit config.data.max_seq_len
        assert len(tok.prompt_ids(INSTRUCTIONS[task])) + 1 + 7 + 1 <= max_len, task
    # Training sequences put the binned actions on the reserved ids (ActionTokenizer's rule).
    batch = tok.encode_batch(["open the drawer"], np.array([[-1.0, -0.5, 0.0, 0.25, 0.5, 0.99, 1.0]]))
    labels = batch["labels"][0]
    act = labels[labels >= 0][:7]
    assert np.all((act >= 512 - 256) & (act < 512)), act


def test_phase_commands_are_wired(tmp_path):
    d = str(tmp_path)
    train = demo.train_command(d, d, d + "/t.model", 100)
    assert train[1] == "train.py" and os.path.isfile(os.path.join(REPO, "train.py"))
    assert "--config=configs/demo.py:steps=100" in train
    for cmd in (demo.offline_command(d, d, d), demo.closed_loop_command(d, d, 3, 2)):
        assert cmd[1] == "eval.py"
    assert demo.export_command(d, d)[1:4] == ["-m", "vla_jax.hf", "export"]
    # An OFT model goes to upstream's OFT layout; the flags it passes are the CLI's.
    from vla_jax.hf.__main__ import _parser

    for oft in (False, True):
        cmd = demo.export_command(d, d, oft)
        args = _parser().parse_args(cmd[3:])
        assert args.dtype == "float32" and args.overwrite
    assert cmd[3] == "export-oft" and args.head_dtype == args.proprio_dtype == "float32"
    assert demo.steps_for(10, 5.0) == 2700 and demo.steps_for(1, 5.0) == 150
    with pytest.raises(ValueError, match="minutes"):
        demo.steps_for(0, 5.0)

    # eval.py defines every flag the closed-loop phase passes (absl rejects unknown flags).
    out = subprocess.run([sys.executable, "eval.py", "--helpfull"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    for flag in ("--sim_episodes", "--sim_image_size", "--sim_workers", "--sim_reference_cache", "--dataset_configs", "--split"):
        assert flag in out.stdout, flag
    with open(os.path.join(REPO, "Makefile")) as f:
        assert "-m vla_jax.demo" in f.read()


def test_time_limit_stop_is_not_a_failure(tmp_path):
    """The demo's time limit SIGTERMs training; a process that dies of that signal (it can land after
    train.py's last checkpoint, once its handler is gone) is a stop, while a real failure still raises."""
    log = str(tmp_path / "log")
    sleeper = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert demo._run(sleeper, log, tee=False, stop_after_s=0.5) is True
    assert demo._run([sys.executable, "-c", "pass"], log, tee=False, stop_after_s=30) is False
    with pytest.raises(RuntimeError, match="failed \\(exit 3\\)"):
        demo._run([sys.executable, "-c", "raise SystemExit(3)"], log, tee=False, stop_after_s=30)
    assert demo.latest_step(str(tmp_path)) is None


def test_speed_calibration_reads_the_step_times_after_compilation(tmp_path):
    """The step budget follows the measured speed: 1 / median step time of the records after step 1
    (step 1 carries the compilation), from the run's real metrics.jsonl format."""
    path = tmp_path / "metrics.jsonl"
    recs = [{"step": 1, "step_time": 30.0}, {"step": 10, "step_time": 0.25}, {"step": 20, "step_time": 0.5},
            {"step": 30, "step_time": 0.2}, {"step": 40, "step_time": 0.3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert demo.measured_steps_per_s(str(path)) == pytest.approx(1 / 0.3)
    path.write_text(json.dumps({"step": 1, "step_time": 30.0}) + "\n")
    with pytest.raises(RuntimeError, match="no step times after step 1"):
        demo.measured_steps_per_s(str(path))
    # A machine twice as fast trains twice as many steps in the same budget.
    assert demo.steps_for(16, 3.6) == 2 * demo.steps_for(16, 1.8)


def test_result_json_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "REPO", str(tmp_path))
    summary = {"times_s": {"train": 900.0}, "offline": {"action_token_accuracy": 0.5, "l1_normalized": 0.1},
               "closed_loop": {"mean_success": {"model": 0.65, "expert": 1.0},
                               "per_task": {"model": {"reach-v3": 1.0, "push-v3": 0.3},
                                            "expert": {"reach-v3": 1.0, "push-v3": 1.0}}}}
    path = demo.write_result("openvla", summary, 1660, 1234.5)
    assert path == str(tmp_path / "bench" / "results" / "demo_openvla.json")
    with open(path) as f:
        got = json.load(f)
    assert {k: got[k] for k in ("recipe", "cameras", "mean_success", "per_task", "train_steps", "wall_s_total")} == {
        "recipe": "openvla", "cameras": 1, "mean_success": 0.65, "per_task": {"reach-v3": 1.0, "push-v3": 0.3},
        "train_steps": 1660, "wall_s_total": 1234.5}
    assert "cores" in got["machine"] and got["commit"]


def test_demo_oft_recipe_builds_and_is_wired(tmp_path):
    from configs import demo as demo_cfg
    from vla_jax.training import run

    c = demo_cfg.get_config("steps=50,recipe=oft,chunk=4,head=tokens")
    m = run.model_config(c.model)
    assert (m.parallel_decoding, m.chunk_size, m.action_head) == (True, 4, "tokens")
    spec = run.batch_spec(c, m)  # checks data.action_chunk against the model's chunk
    assert spec.codec.num_supervised == 4 * 7 + 1 and c.data.max_seq_len == 20 + 7 * 3
    assert not run.model_config(demo_cfg.get_config("steps=50").model).parallel_decoding
    with pytest.raises(ValueError, match="recipe='rt2'"):
        demo_cfg.get_config("recipe=rt2")
    d = str(tmp_path)
    assert "--config=configs/demo.py:steps=100,recipe=oft,chunk=8,head=l1" in demo.train_command(
        d, d, d, 100, recipe="oft")
    assert "--config=configs/demo.py:steps=100" in demo.train_command(d, d, d, 100, recipe="openvla_bs32")
    assert demo.config_recipe("oft_k4") == "oft" and demo.config_recipe("openvla") == "openvla"
    args = demo.parse_args(["--recipe=oft", "--chunk=4", "--head=tokens"])
    assert (args.recipe, args.chunk, args.head) == ("oft", 4, "tokens")


def test_cameras_and_proprio_variant_is_wired(tmp_path, monkeypatch):
    """`--cameras=2 --proprio`: configs/demo.py's args, the make_demo_data folder of that data variant, a
    train folder and result file of its own (the one-camera run is neither resumed nor overwritten)."""
    from vla_jax.sim import make_demo_data
    from vla_jax.sim.demos import DemoSpec

    d = str(tmp_path)
    assert "--config=configs/demo.py:steps=100,cameras=2,proprio=1" in demo.train_command(
        d, d, d, 100, cameras=2, proprio=True)
    assert "--config=configs/demo.py:steps=100,recipe=oft,chunk=4,head=l1,cameras=2" in demo.train_command(
        d, d, d, 100, recipe="oft", chunk=4, cameras=2)
    assert "--config=configs/demo.py:steps=100" in demo.train_command(d, d, d, 100)  # one camera: unchanged
    args = demo.parse_args(["--cameras=2", "--proprio"])
    assert (args.cameras, args.proprio) == (2, True)
    assert (demo.parse_args([]).cameras, demo.parse_args([]).proprio) == (1, False)
    with pytest.raises(SystemExit):
        demo.parse_args(["--cameras=3"])
    assert demo.train_folder(d, "openvla") == os.path.join(d, "train")
    assert demo.train_folder(d, "oft") == os.path.join(d, "train_oft")
    assert demo.train_folder(d, "openvla", 2, True) == os.path.join(d, "train_cams2_proprio")
    assert demo.train_folder(d, "oft_k4", 2, False) == os.path.join(d, "train_oft_k4_cams2")
    # The data folder make_demo_data writes by default (the demo reads the same one).
    monkeypatch.setenv("VLA_JAX_CACHE_DIR", d)
    root = os.path.join(d, "demo_data")
    assert make_demo_data.default_data_dir(DemoSpec(image_size=64)) == os.path.join(root, "metaworld_demo_64")
    assert make_demo_data.default_data_dir(DemoSpec(image_size=64, wrist_camera="gripperPOV", proprio=True)) == \
        os.path.join(root, "metaworld_demo_64_gripperPOV_proprio")


def test_result_records_the_checkpoint_cameras_and_config_builds(tmp_path, monkeypatch, llama_tokenizer_path):
    """The result's `cameras` / `proprio_dim` come from the trained checkpoint's spec, not from the flags;
    configs/demo.py builds the 2-camera + proprio model and contract the demo's command line asks for."""
    from configs import demo as demo_cfg
    from tests.policy.test_policy_helpers import camera_checkpoint, random_checkpoint
    from vla_jax.training import run

    monkeypatch.setattr(demo, "REPO", str(tmp_path))
    summary = {"times_s": {"train": 900.0}, "offline": {"action_token_accuracy": 0.5, "l1_normalized": 0.1},
               "closed_loop": {"mean_success": {"model": 0.7}, "per_task": {"model": {"reach-v3": 0.7}}}}
    path = demo.write_result("openvla_cams2_proprio", summary, 10, 1.0, camera_checkpoint(str(llama_tokenizer_path)))
    assert path == str(tmp_path / "bench" / "results" / "demo_openvla_cams2_proprio.json")
    with open(path) as f:
        got = json.load(f)
    assert (got["recipe"], got["cameras"], got["proprio_dim"]) == ("openvla_cams2_proprio", 2, 4)
    # a checkpoint written before the batch_spec asset: one camera, no proprio
    assert demo.checkpoint_inputs(random_checkpoint(str(llama_tokenizer_path))) == (1, None)
    c = demo_cfg.get_config("steps=50,cameras=2,proprio=1")
    m = run.model_config(c.model)
    spec = run.batch_spec(c, m)
    assert (m.num_images, m.proprio_dim, spec.cameras, spec.proprio_dim) == (2, 4, ("primary", "wrist"), 4)
