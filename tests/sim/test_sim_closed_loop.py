"""Closed-loop evaluation: the scripted expert succeeds, a zero-action policy never does.

Truth used: Meta-World's own success signal (`info['success']`) on held-out configurations.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from vla_jax.sim.closed_loop import ExpertPolicy, evaluate, run_evaluation
from vla_jax.sim.worker import SimWorkers

pytestmark = pytest.mark.slow  # Meta-World closed-loop episodes

TASKS = ["reach", "drawer-close"]
MAX_STEPS = 100  # the expert needs ~50 (reach) and ~80 (drawer-close) steps
SIZE = 64


class ZeroPolicy:
    """Batched zero actions (gripper 0 = closed, no motion); records what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, images, instructions):
        self.calls.append((images.shape, images.dtype, float(images.std()), tuple(instructions)))
        return np.zeros((len(instructions), 7), np.float32)


@pytest.fixture(scope="module")
def sim():
    with SimWorkers(2, image_size=SIZE, max_steps=MAX_STEPS) as workers:
        yield workers


@pytest.fixture(scope="module")
def evaluation(sim, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sim_eval"))
    policy = ZeroPolicy()
    report = run_evaluation(policy, TASKS, 1, out, name="zero", videos_per_task=0,
                            references=("expert", "random"), sim=sim, say=lambda m: None)
    return out, report, policy


def test_zero_policy_never_succeeds(evaluation):
    out, report, policy = evaluation
    zero = report["results"]["zero"]
    for task in ("reach-v3", "drawer-close-v3"):
        assert zero["tasks"][task]["success_rate"] == 0.0, zero["tasks"][task]
        assert zero["tasks"][task]["lengths"] == [MAX_STEPS]  # failures run to the limit
        assert report["results"]["expert"]["tasks"][task]["success_rate"] == 1.0
        assert report["results"]["random"]["tasks"][task]["episodes"] == 1
    assert zero["mean_success_rate"] == 0.0 and zero["env_steps"] == len(TASKS) * MAX_STEPS
    # The policy saw full batches of rendered images and the tasks' instructions.
    assert zero["batch_size"] == len(TASKS) and len(policy.calls) == MAX_STEPS
    assert {c[0] for c in policy.calls} == {(len(TASKS), SIZE, SIZE, 3)}
    assert all(c[1] == np.uint8 for c in policy.calls) and min(c[2] for c in policy.calls) > 10
    assert set(policy.calls[0][3]) == {"move the gripper to the red marker", "close the drawer"}
    with open(os.path.join(out, "report.json")) as f:
        on_disk = json.load(f)
    assert set(on_disk["results"]) == {"zero", "expert", "random"}
    assert on_disk["settings"]["config_indices"] == [0, 1] and on_disk["settings"]["image_size"] == SIZE


def test_expert_succeeds_with_videos(sim, tmp_path):
    report = evaluate(ExpertPolicy(), TASKS, 3, sim, videos_per_task=1, video_dir=str(tmp_path), say=lambda m: None)
    for task in ("reach-v3", "drawer-close-v3"):
        r = report["tasks"][task]
        assert r["success_rate"] == 1.0, r
        assert all(0 < n < MAX_STEPS for n in r["lengths"]) and r["mean_success_length"] == np.mean(r["lengths"])
    assert report["mean_success_rate"] == 1.0
    assert len(report["videos"]) == len(TASKS)  # videos_per_task=1
    for path in report["videos"]:
        assert path.endswith("_00_success.gif") and os.path.dirname(path) == str(tmp_path / "expert")
        task = os.path.basename(path).split("_")[0]
        with Image.open(path) as gif:
            assert min(gif.size) >= 128
            total_ms = 0
            for k in range(gif.n_frames):  # PIL merges identical consecutive frames, adding durations
                gif.seek(k)
                total_ms += gif.info["duration"]
        # the first frame plus one per step of held-out episode 0, 50 ms each (20 fps)
        assert total_ms == 50 * (report["tasks"][task]["lengths"][0] + 1)


def test_bad_policy_output_is_named(sim):
    with pytest.raises(ValueError, match=r"policy 'bad' returned actions of shape \(2, 4\), expected \[2, 7\]"):
        evaluate(lambda images, instructions: np.zeros((len(instructions), 4)), TASKS, 1, sim, name="bad",
                 say=lambda m: None)
    with pytest.raises(ValueError, match="50 held-out configurations"):
        evaluate(ExpertPolicy(), TASKS, 51, sim, say=lambda m: None)


def test_reference_lines_are_cached(sim, tmp_path):
    """The expert/random lines do not depend on the evaluated policy: the second evaluation takes them
    from the cache (same numbers, GIFs copied into its own folder) and still evaluates the policy."""
    cache = str(tmp_path / "refs")
    kw = dict(videos_per_task=1, references=("expert", "random"), sim=sim, reference_cache=cache, say=lambda m: None)
    first = run_evaluation(ZeroPolicy(), ["reach"], 1, str(tmp_path / "a"), name="zero", **kw)
    assert sorted(d.split("-")[0] for d in os.listdir(cache)) == ["expert", "random"]
    policy = ZeroPolicy()
    second = run_evaluation(policy, ["reach"], 1, str(tmp_path / "b"), name="zero", **kw)
    assert len(policy.calls) == MAX_STEPS  # the policy itself ran again
    for ref in ("expert", "random"):
        a, b = first["results"][ref], second["results"][ref]
        assert "cached_from" not in a and b["cached_from"].startswith(cache)
        assert a["tasks"] == b["tasks"] and a["mean_success_rate"] == b["mean_success_rate"]
        assert len(b["videos"]) == 1 and b["videos"][0].startswith(str(tmp_path / "b" / "videos" / ref))
        assert os.path.isfile(b["videos"][0])
    # Other settings (more episodes) are a different key: evaluated, not taken from the cache.
    third = run_evaluation(None, ["reach"], 2, str(tmp_path / "c"), **kw)
    assert "cached_from" not in third["results"]["expert"] and third["results"]["expert"]["tasks"]["reach-v3"]["episodes"] == 2
