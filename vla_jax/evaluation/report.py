"""report.json and a Markdown summary of an offline evaluation."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

DIM_NAMES_7D = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")


def write_json(report: Mapping[str, Any], out_dir: str) -> str:
    path = os.path.join(out_dir, "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path


def _dims(n: int) -> List[str]:
    return list(DIM_NAMES_7D) if n == 7 else [f"d{i}" for i in range(n)]


def _row(name: str, values: Sequence[Optional[float]], fmt: str = "{:.4g}") -> str:
    cells = ["–" if v is None else fmt.format(v) for v in values]
    return f"| {name} | " + " | ".join(cells) + " |"


def _metrics_block(title: str, m: Mapping[str, Any]) -> List[str]:
    d = len(m["l1_normalized_per_dim"])
    tok = m["action_token_accuracy"]
    names = _dims(d)
    grip = m["gripper_accuracy"]
    lines = [f"### {title}", "",
             f"- episodes: {m['episodes']}, frames: {m['frames']}",
             "- action-token accuracy: " + ("n/a (the L1 head predicts no tokens)" if tok is None else f"**{tok:.3f}**"),
             f"- L1 (normalized, mean over dims): **{m['l1_normalized']:.4f}** "
             f"(mean-action baseline {m['baseline_mean_action']['l1_normalized']:.4f}); "
             f"MSE (normalized): {m['mse_normalized']:.4f}",
             f"- gripper open/close accuracy: " + ("n/a (no un-normalized dims)" if grip is None else f"**{grip:.3f}**"),
             "", "| per dim | " + " | ".join(names) + " |", "|---|" + "---|" * d,
             _row("token accuracy", m["token_accuracy_per_dim"] or [None] * d, "{:.3f}"),
             _row("L1 normalized", m["l1_normalized_per_dim"]),
             _row("MSE normalized", m["mse_normalized_per_dim"]),
             _row("L1 raw", m["l1_raw_per_dim"]),
             _row("MSE raw", m["mse_raw_per_dim"]),
             _row("L1 raw, mean-action baseline", m["baseline_mean_action"]["l1_raw_per_dim"]), ""]
    if m.get("chunk_size"):
        k = m["chunk_size"]
        lines += [f"Chunks of {k} actions per frame ({m['actions']} actions compared); L1 (mean over dims) per chunk "
                  f"position:", "", "| chunk position | " + " | ".join(str(i) for i in range(k)) + " |",
                  "|---|" + "---|" * k, _row("L1 normalized", m["l1_normalized_per_step"]),
                  _row("L1 raw", m["l1_raw_per_step"]), ""]
    return lines


def write_markdown(report: Mapping[str, Any], out_dir: str) -> str:
    """report.md: run settings, overall and per-dataset tables, links to the plots."""
    lines = ["# Offline evaluation", "",
             f"- checkpoint: `{report['checkpoint']}`",
             f"- data: `{report['dataset']}` split `{report['split']}` "
             f"({report['episodes_per_dataset'] or 'all'} episodes per dataset)",
             f"- decoding: greedy, {'action tokens only' if report['action_tokens_only'] else 'full vocabulary'}; "
             f"center crop: {report['center_crop']}",
             f"- raw units: the dataset's action units; gripper "
             + ("in the dataset's registered convention" if report.get("gripper_convention") == "dataset"
                else "in OpenVLA's convention (1 = open, 0 = closed)"),
             f"- time: {report['timing']['seconds']} s ({report['timing']['frames_per_second']} frames/s)", ""]
    if report.get("overall"):
        lines += _metrics_block("All datasets", report["overall"])
    for name, m in report["per_dataset"].items():
        lines += _metrics_block(f"Dataset `{name}` (unnorm_key `{report['unnorm_keys'][name]}`)", m)
    if report.get("plots"):
        lines += ["## Trajectories (recorded vs predicted, raw units)", ""]
        lines += [f"![{p}]({p})" for p in report["plots"]] + [""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def build_report(summary: Mapping[str, Any], *, checkpoint: str, dataset: str, split: str, data_dir: str,
                 episodes: Optional[int], policy, unnorm_keys: Dict[str, str], plots: Sequence[str],
                 gripper: str = "openvla") -> Dict[str, Any]:
    return {"checkpoint": checkpoint, "dataset": dataset, "split": split, "data_dir": data_dir,
            "gripper_convention": gripper,
            "episodes_per_dataset": episodes or None, "center_crop": policy.center_crop,
            "action_tokens_only": policy.action_tokens_only, "image_size": policy.config.image_size,
            "unnorm_keys": unnorm_keys, **summary, "plots": list(plots)}
