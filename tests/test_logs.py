"""What entry points print (vla_jax.logs) and the permissions of what they write (vla_jax.permissions).

The noise is produced by its real sources in a fresh process: orbax restoring a vla_jax checkpoint
(absl INFO lines and the missing `_CHECKPOINT_METADATA` warning), AutoGraph meeting the for/else of
`get_path`, TensorFlow's C++ start-up lines; then by the real `python -m vla_jax.hf export`."""

import os
import stat
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.policy.test_policy_helpers import random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = {"orbax INFO": "orbax-checkpoint version", "orbax metadata warning": "_CHECKPOINT_METADATA",
         "AutoGraph for/else": "AutoGraph could not transform", "TF C++ start-up": "cpu_feature_guard"}

SCRIPT = textwrap.dedent("""
    import logging, sys
    from vla_jax import logs
    logs.setup(verbose=sys.argv[2] == "verbose")
    logging.getLogger("vla_jax.test").info("our progress line")
    import tensorflow as tf
    from vla_jax.data.oxe.transforms import get_path
    from vla_jax.policy import Policy
    Policy.load(sys.argv[1], compilation_cache=False)
    traj = {"observation": {"image": tf.zeros([2, 3])}}
    print("shape", tuple(tf.function(lambda t: get_path(t, "observation/image"))(traj).shape))
""")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _env():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    for k in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL"):  # conftest quiets TF for this process; not for theirs
        env.pop(k, None)
    return env


@pytest.fixture(scope="module")
def checkpoint(llama_tokenizer_path):
    return random_checkpoint(str(llama_tokenizer_path))


@pytest.mark.parametrize("mode", ["default", "verbose"])
def test_third_party_noise_is_hidden_by_default_and_shown_with_verbose(checkpoint, tmp_path, mode):
    script = tmp_path / "entry.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), checkpoint, mode], capture_output=True, text=True,
                          env=_env(), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shape (2, 3)" in proc.stdout
    assert "INFO vla_jax.test: our progress line" in proc.stderr  # our own lines stay, in one format
    for what, line in NOISE.items():
        assert (line in proc.stderr) == (mode == "verbose"), f"{what} ({mode}):\n{proc.stderr[-3000:]}"


def test_hf_export_cli_creates_parents_with_normal_permissions_and_is_quiet(checkpoint, tmp_path):
    out = tmp_path / "new" / "nested" / "hf"
    proc = subprocess.run([sys.executable, "-m", "vla_jax.hf", "export", checkpoint, str(out)], capture_output=True,
                          text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out}:" in proc.stdout
    assert "absl" not in proc.stderr and "orbax" not in proc.stderr, proc.stderr[-3000:]
    mask = _umask()
    for d in (tmp_path / "new", tmp_path / "new" / "nested", out):
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask, d
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "tokenizer.model" in names and "config.json" in names
    for p in out.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, p
    verbose = subprocess.run([sys.executable, "-m", "vla_jax.hf", "export", "--verbose", checkpoint,
                              str(tmp_path / "v")], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "INFO absl: orbax-checkpoint version" in verbose.stderr


def test_failed_write_removes_the_parents_it_created(tmp_path):
    from vla_jax.hf.outdir import atomic_dir

    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(str(tmp_path / "a" / "b" / "out")) as tmp:
            open(os.path.join(tmp, "f"), "w").close()
            raise RuntimeError("boom")
    assert not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file is a file, not a folder"):
        with atomic_dir(str(tmp_path / "file" / "out")):
            pass


def test_temporary_files_get_the_permissions_of_a_plain_write(tmp_path):
    from vla_jax import permissions
    from vla_jax.data.normalization import _write_json

    mask = _umask()
    fd, path = permissions.mkstemp(dir=str(tmp_path), prefix="x")
    os.close(fd)
    plain = tmp_path / "plain"
    plain.write_text("")
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask
    d = permissions.mkdtemp(dir=str(tmp_path), prefix="d")
    os.mkdir(tmp_path / "plain_dir")
    assert stat.S_IMODE(os.stat(d).st_mode) == stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode)
    assert permissions.current_umask() == mask
    # The statistics file written next to a user's dataset (atomically, through a temporary file).
    _write_json(str(tmp_path / "stats" / "dataset_statistics_x.json"), {"a": 1})
    assert stat.S_IMODE((tmp_path / "stats" / "dataset_statistics_x.json").stat().st_mode) == 0o666 & ~mask


def test_compile_on_first_call_reports_and_runs_the_same_program():
    from vla_jax.logs import compile_on_first_call

    said = []
    f = jax.jit(lambda x, y: (x * y).sum(axis=0))
    step = compile_on_first_call(f, "the toy step", said.append)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(step(x, x), (x * x).sum(0))
    np.testing.assert_array_equal(step(x + 1, x), ((x + 1) * x).sum(0))
    assert said[0] == "compiling the toy step ..." and said[1].startswith("compiled the toy step in ")
    assert len(said) == 2 and said[1].endswith(" s") and step.seconds >= 0
    z = np.ones((2, 5), np.float32)  # another shape: falls back to jit, still right
    np.testing.assert_array_equal(step(z, z), np.full(5, 2.0, np.float32))
    assert len(said) == 2
