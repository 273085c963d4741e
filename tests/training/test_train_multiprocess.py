"""A 2-process run (jax.distributed on localhost, 4 simulated CPU devices each, one 2x4 mesh over
both) trains 2 steps and agrees with the same run in one process on one device: losses, gradient
norms, metrics and the final parameters (read back from both runs' checkpoints). Synthetic
batches make the global batch identical in both runs (each process builds only its rows)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
import pytest

pytestmark = pytest.mark.slow  # two jax.distributed processes plus a reference run

REPO = pathlib.Path(__file__).resolve().parents[2]
ARGS = ["--config=configs/debug.py", "--config.data_source=synthetic", "--config.model.preset=tiny",
        "--config.model.image_size=56", "--config.data.max_seq_len=24", "--config.global_batch_size=8",
        "--config.num_steps=2", "--config.save_every=2",
        "--config.optim.schedule=constant", "--config.optim.warmup_steps=0", "--config.log.progress=False",
        "--config.log.tensorboard=False", "--config.synthetic.num_datasets=2",
        # eps well above the gradients' rounding noise keeps Adam's update a smooth function of the
        # gradient (with 1e-8, parameters whose gradient is ~0 take +-lr steps decided by noise).
        "--config.optim.eps=1e-4"]


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _records(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _params(workdir):
    """The step-2 params of a run as numpy arrays (independent of the devices that wrote them)."""
    state_dir = workdir / "checkpoints" / "2" / "state"
    tree = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree

    def plain(t):
        return {k: plain(v) for k, v in t.items()} if hasattr(t, "items") and not hasattr(t, "shape") else t

    flat = traverse_util.flatten_dict(plain(tree["params"]))
    item = traverse_util.unflatten_dict({("params",) + p: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype))
                                         for p, m in flat.items()})
    args = traverse_util.unflatten_dict({("params",) + p: ocp.RestoreArgs(restore_type=np.ndarray) for p in flat})
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    return traverse_util.flatten_dict(out["params"])


def test_two_processes_match_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    port = _free_port()
    cmds = [[sys.executable, "train.py", f"--workdir={multi}", *ARGS, "--config.mesh.data=2", "--config.mesh.fsdp=4",
             f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}"] for i in range(2)]
    ref_cmd = [sys.executable, "train.py", f"--workdir={single}", *ARGS, "--config.mesh.data=1", "--config.mesh.fsdp=1"]
    procs = [subprocess.Popen(c, cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    ref = subprocess.Popen(ref_cmd, cwd=REPO, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs + [ref]]
    finally:
        for p in procs + [ref]:
            if p.poll() is None:
                p.kill()
    ref_out, outs = outs[2], outs[:2]
    assert ref.returncode == 0, ref_out[-3000:]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "'data': 2, 'fsdp': 4" in outs[0]  # one mesh spanning both processes' devices

    got, want = _records(multi), _records(single)
    assert sorted(got) == sorted(want) == [1, 2]
    for s in (1, 2):
        for k in ("loss", "grad_norm", "param_norm", "action_accuracy", "l1_loss"):
            np.testing.assert_allclose(got[s][k], want[s][k], rtol=1e-5, err_msg=f"step {s} {k}")
    got_p, want_p = _params(multi), _params(single)
    assert sorted(got_p) == sorted(want_p) and len(got_p) > 50
    for k in want_p:
        np.testing.assert_allclose(got_p[k], want_p[k], rtol=0, atol=1e-6, err_msg="/".join(k))
