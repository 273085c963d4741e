"""Offline evaluation of a policy on held-out episodes (`python eval.py`, see `run_offline`).

episodes.py  standardized episodes of a dataset or mixture, in file order
metrics.py   token accuracy, L1/MSE (normalized and raw), gripper accuracy, mean-action baseline
offline.py   runs the policy over every frame, accumulates metrics, keeps a few trajectories
plots.py     PNG plots of predicted vs recorded trajectories (PIL)
report.py    report.json and report.md
inputs.py    what to evaluate on when only the checkpoint is given (its training-data record)
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional


def run_offline(policy, *, checkpoint: str, data_dir: str, dataset: str, out_dir: str, split: str = "val",
                episodes: Optional[int] = None, unnorm_key: Optional[str] = None, batch_size: int = 32,
                num_plots: int = 3, dataset_configs: Optional[str] = None, progress: bool = True,
                gripper: str = "openvla") -> Dict[str, Any]:
    """Evaluates `policy` on `episodes` per dataset of `dataset` (a dataset or mixture name) and
    writes OUT/report.json, OUT/report.md and OUT/plots/*.png. Returns the report dict."""
    from vla_jax.evaluation import offline, report
    from vla_jax.evaluation.episodes import iter_episodes, mixture_datasets

    names = mixture_datasets(dataset, dataset_configs)
    keys = {n: policy.resolve_unnorm_key(unnorm_key or n) for n in names}  # fail before reading any data
    for key in keys.values():
        policy.check_gripper(gripper, key)
    os.makedirs(out_dir, exist_ok=True)
    # the checkpoint's cameras and proprio decide what is read (its spec)
    eps = iter_episodes(data_dir, dataset, split, episodes, dataset_configs, cameras=len(policy.cameras),
                        proprio=bool(policy.spec.proprio_dim))
    result = offline.evaluate(policy, eps, unnorm_key=unnorm_key, batch_size=batch_size, keep_episodes=num_plots,
                              progress=progress, total=episodes * len(names) if episodes else None, gripper=gripper)
    plots = offline.plot_episodes(result, out_dir, gripper) if num_plots else []
    rep = report.build_report(offline.summarize(result), checkpoint=checkpoint, dataset=dataset, split=split,
                              data_dir=str(data_dir), episodes=episodes, policy=policy,
                              unnorm_keys={n: keys[n] for n in result.per_dataset}, plots=plots, gripper=gripper)
    report.write_json(rep, out_dir)
    report.write_markdown(rep, out_dir)
    return rep
