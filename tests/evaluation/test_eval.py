"""Offline evaluation: metric arithmetic vs numpy, PNG plots, and `eval.py` on the real Bridge
episodes, its report checked against predictions recomputed here with predict_actions."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.policy.test_policy_helpers import cached_policy, random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_metrics_match_numpy():
    from vla_jax.evaluation.metrics import ActionMetrics

    rng = np.random.default_rng(0)
    n, d = 13, 7
    pt, tt = rng.integers(31990, 32000, (n, d)), rng.integers(31990, 32000, (n, d))
    pn, tn = rng.uniform(-1, 1, (n, d)), rng.uniform(-1, 1, (n, d))
    pr, tr = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    pr[:, 6], tr[:, 6] = rng.uniform(0, 1, n), rng.integers(0, 2, n)
    base = rng.normal(size=d)
    m = ActionMetrics(d, gripper_dims=[6])
    m.update(pt[:5], tt[:5], pn[:5], tn[:5], pr[:5], tr[:5], base_norm=base, base_raw=base)
    m2 = ActionMetrics(d, gripper_dims=[6])
    m2.update(pt[5:], tt[5:], pn[5:], tn[5:], pr[5:], tr[5:], base_norm=base, base_raw=base)
    m.merge(m2)
    s = m.summary()
    assert s["frames"] == n
    np.testing.assert_allclose(s["action_token_accuracy"], (pt == tt).mean(), rtol=1e-12)
    np.testing.assert_allclose(s["token_accuracy_per_dim"], (pt == tt).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["l1_normalized"], np.abs(pn - tn).mean(), rtol=1e-12)
    np.testing.assert_allclose(s["mse_normalized_per_dim"], ((pn - tn) ** 2).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["l1_raw_per_dim"], np.abs(pr - tr).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["mse_raw_per_dim"], ((pr - tr) ** 2).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s["gripper_accuracy"], ((pr[:, 6] > 0.5) == (tr[:, 6] > 0.5)).mean(), rtol=1e-12)
    np.testing.assert_allclose(s["baseline_mean_action"]["l1_raw_per_dim"], np.abs(base - tr).mean(0), rtol=1e-12)
    with pytest.raises(ValueError, match=r"must all be \[N, 7\]"):
        m.update(pt[:, :6], tt, pn, tn, pr, tr)


def test_trajectory_plot_is_a_png_with_both_series(tmp_path):
    from PIL import Image

    from vla_jax.evaluation.plots import PRED_COLOR, TRUE_COLOR, plot_trajectory

    t = np.linspace(0, 1, 9)[:, None]
    true = np.concatenate([np.sin(3 * t + k) for k in range(7)], 1)
    path = plot_trajectory(true, true + 0.3, str(tmp_path / "p.png"), title="episode 0")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (44 + 2 * 190, 4 * 300, 3)
    for color in (TRUE_COLOR, PRED_COLOR):
        assert (img == np.array(color, np.uint8)).all(-1).sum() > 500, color
    with pytest.raises(ValueError, match="must both be"):
        plot_trajectory(true, true[:, :3], str(tmp_path / "q.png"))


@pytest.mark.slow
def test_eval_py_on_bridge_episodes_writes_report_and_plots(llama_tokenizer_path, bridge_data_dir, tmp_path):
    from vla_jax.data.normalization import normalize_actions
    from vla_jax.evaluation.episodes import iter_episodes

    ckpt = random_checkpoint(str(llama_tokenizer_path))
    out = tmp_path / "eval"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one CPU device is enough for the subprocess
    proc = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), f"--checkpoint={ckpt}",
                           f"--data_dir={bridge_data_dir}", "--dataset=bridge_dataset", "--split=val", "--episodes=4",
                           f"--out={out}", "--plots=2", "--progress=false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert rep["plots"] == ["plots/bridge_dataset_episode0000.png", "plots/bridge_dataset_episode0001.png"]
    for p in rep["plots"]:
        assert (out / p).stat().st_size > 5000 and p in md
    m = rep["per_dataset"]["bridge_dataset"]
    assert m["episodes"] == 4 and m["frames"] == 32 and rep["overall"]["frames"] == 32
    assert "action-token accuracy" in md and "gripper open/close accuracy" in md
    # Independent recomputation with the in-process policy on the same episodes.
    policy = cached_policy(str(llama_tokenizer_path))
    entry = policy.norm_stats["bridge_dataset"]
    eps = list(iter_episodes(str(bridge_data_dir), "bridge_dataset", "val", max_episodes=4))
    images = np.concatenate([e.images for e in eps])
    instructions = [s for e in eps for s in e.instructions]
    true = np.concatenate([e.actions for e in eps]).astype(np.float64)
    pred = np.concatenate([policy.predict_actions(images[i:i + 8], instructions[i:i + 8]) for i in range(0, 32, 8)])
    np.testing.assert_allclose(m["l1_raw_per_dim"], np.abs(pred - true).mean(0), rtol=1e-9, atol=1e-12)
    tokens = np.concatenate([policy.predict_tokens(images[i:i + 8], instructions[i:i + 8]) for i in range(0, 32, 8)])
    true_tokens = 32000 - np.digitize(np.clip(normalize_actions(true, entry), -1, 1), np.linspace(-1, 1, 256))
    np.testing.assert_allclose(m["action_token_accuracy"], (tokens == true_tokens).mean(), rtol=1e-12)
    np.testing.assert_allclose(m["gripper_accuracy"], ((pred[:, 6] > 0.5) == (true[:, 6] > 0.5)).mean(), rtol=1e-12)


def test_unknown_dataset_statistics_fail_before_reading_data(llama_tokenizer_path, tmp_path):
    from vla_jax.evaluation import run_offline

    policy = copy.copy(cached_policy(str(llama_tokenizer_path)))
    policy.norm_stats = {"fractal20220817_data": policy.norm_stats["bridge_dataset"]}
    with pytest.raises(ValueError, match=r"unknown unnorm_key 'bridge_dataset'.*\['fractal20220817_data'\]"):
        run_offline(policy, checkpoint="mem", data_dir=str(tmp_path / "nothing"), dataset="bridge_dataset",
                    out_dir=str(tmp_path / "out"))
