"""Orbax checkpoints of the full train state, the data position and the run's assets.

Layout of `WORKDIR/checkpoints/<step>/`:
  state/                    TrainState (params, optimizer state, step, RNG), sharded arrays (OCDBT)
  data/data.json            each process's data-iterator position (base64 of `it.get_state()`)
  meta/meta.json            step, model geometry, the shape of every state leaf (for compatibility checks)
  config/config.json        the resolved run config
  dataset_statistics/dataset_statistics.json   OpenVLA's normalization statistics (un-normalizing actions)
  tokenizer/tokenizer.json  tokenizer and action-tokenizer settings (+ the SentencePiece model, base64)
  training_data/training_data.json   what the run trained on: data_dir, mixture, the registered configs of
                            its datasets (content, not a path), the tokenizer path (absent in older checkpoints)

Saves are asynchronous (orbax copies the arrays off the devices before `save` returns, then writes in
the background); keep-N deletes the oldest. `Checkpointer.check_compatible` compares a checkpoint's
stored shapes with the current run before anything is restored or written.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

JSON_ITEMS = {
    "data": "data.json",
    "meta": "meta.json",
    "config": "config.json",
    "dataset_statistics": "dataset_statistics.json",
    "tokenizer": "tokenizer.json",
    "training_data": "training_data.json",
}
ASSET_ITEMS = ("config", "dataset_statistics", "tokenizer")
# Saved when given, read when present (checkpoints written before they existed lack them).
OPTIONAL_ASSET_ITEMS = ("training_data",)


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = ocp.StandardCheckpointHandler()
    reg.add("state", ocp.args.StandardSave, state_handler)
    reg.add("state", ocp.args.StandardRestore, state_handler)
    for name, filename in JSON_ITEMS.items():
        h = ocp.JsonCheckpointHandler(filename=filename)
        reg.add(name, ocp.args.JsonSave, h)
        reg.add(name, ocp.args.JsonRestore, h)
    return reg


def leaf_shapes(tree: Any) -> Dict[str, List[int]]:
    """{'params/llm/embed_tokens/embedding': [32064, 4096], ...} for every array leaf of `tree`."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[key] = [int(d) for d in np.shape(leaf)]
    return out


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """{'llama': {'hidden_size': 4096}} -> {'llama.hidden_size': 4096}."""
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def encode_data_states(states: Sequence[np.ndarray]) -> Dict[str, Any]:
    return {"process_count": len(states), "states": [base64.b64encode(bytes(np.asarray(s, np.uint8))).decode()
                                                     for s in states]}


def decode_data_state(data: Dict[str, Any], process_index: int, process_count: int) -> np.ndarray:
    if int(data["process_count"]) != process_count:
        raise ValueError(f"the checkpoint's data position was saved by {data['process_count']} processes; this run "
                         f"has {process_count}: the per-host streams cannot be continued")
    return np.frombuffer(base64.b64decode(data["states"][process_index]), np.uint8).copy()


class Checkpointer:
    """Orbax CheckpointManager for `directory` (normally WORKDIR/checkpoints)."""

    def __init__(self, directory: str, max_to_keep: Optional[int] = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=create, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_registry())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> List[int]:
        return list(self.manager.all_steps())

    def read_json(self, step: int, name: str) -> Any:
        return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

    def check_compatible(self, step: int, abstract_state: Any, model_geometry: Dict[str, Any]) -> None:
        """Raises ValueError (naming the differing leaves and shapes) unless the checkpoint at `step`
        holds a state of exactly this structure. Reads only the small meta file."""
        meta = self.read_json(step, "meta")
        ours, theirs = leaf_shapes(abstract_state), meta["state_shapes"]
        where = f"checkpoint {self.directory / str(step)}"
        diff = [f"{k}: {theirs[k]} in the checkpoint vs {ours[k]} now"
                for k in ours if k in theirs and theirs[k] != ours[k]]
        missing = sorted(set(ours) - set(theirs))
        extra = sorted(set(theirs) - set(ours))
        if diff or missing or extra:
            parts = []
            theirs_geo = _flatten(meta.get("model", {}))
            ours_geo = _flatten(json.loads(json.dumps(model_geometry)))  # tuples -> lists, as stored
            changed = [f"{k}: {theirs_geo.get(k)} in the checkpoint vs {ours_geo.get(k)} now"
                       for k in sorted(set(theirs_geo) | set(ours_geo)) if theirs_geo.get(k) != ours_geo.get(k)]
            if changed:
                parts.append("model geometry differs: " + "; ".join(changed[:6]) +
                             (f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""))
            if diff:
                parts.append(f"{len(diff)} state leaves differ in shape, e.g. " + "; ".join(diff[:3]))
            if missing:
                parts.append(f"{len(missing)} leaves missing from the checkpoint, e.g. {missing[:3]}")
            if extra:
                parts.append(f"{len(extra)} leaves not in this run, e.g. {extra[:3]} (a different "
                             f"trainable set or optimizer changes the optimizer state)")
            raise ValueError(f"{where} does not match this run: " + " | ".join(parts) +
                             ". Use a fresh --workdir, or the config the checkpoint was written with.")

    def save(self, step: int, state: Any, data: Dict[str, Any], assets: Dict[str, Any],
             model_geometry: Dict[str, Any], force: bool = False) -> bool:
        """Starts an async save of everything at `step`; returns False when the manager skipped it."""
        meta = {"step": int(step), "model": model_geometry, "state_shapes": leaf_shapes(state)}
        items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data),
                 "meta": ocp.args.JsonSave(meta)}
        missing = [k for k in ASSET_ITEMS if k not in assets]
        if missing:
            raise ValueError(f"checkpoint assets {missing} are missing; every checkpoint carries {ASSET_ITEMS}")
        items.update({k: ocp.args.JsonSave(assets[k]) for k in ASSET_ITEMS})
        items.update({k: ocp.args.JsonSave(assets[k]) for k in OPTIONAL_ASSET_ITEMS if assets.get(k) is not None})
        return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
        """-> (state placed on the shardings carried by `abstract_state`'s ShapeDtypeStructs, data json)."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------------------------
# Reading a finished checkpoint (inference, export, fine-tuning from it).


def resolve_step_dir(path: str) -> epath.Path:
    """A workdir, its checkpoints/ folder, or one step folder -> the (latest) step folder."""
    p = epath.Path(path)
    if (p / "state").exists() and (p / "meta").exists():
        return p
    root = p / "checkpoints" if (p / "checkpoints").exists() else p
    steps = sorted(int(d.name) for d in root.iterdir() if d.name.isdigit()) if root.exists() else []
    if not steps:
        raise ValueError(f"{path} is not a vla_jax checkpoint: expected a step folder holding state/ and meta/, "
                         f"or a workdir / checkpoints folder with numbered steps")
    return root / str(steps[-1])


def load_assets(path: str) -> Dict[str, Any]:
    """{'config', 'dataset_statistics', 'tokenizer', 'meta'} of the checkpoint at `path`, plus the
    optional assets it has (e.g. 'training_data')."""
    step_dir = resolve_step_dir(path)
    out = {name: json.loads((step_dir / name / JSON_ITEMS[name]).read_text()) for name in ASSET_ITEMS + ("meta",)}
    for name in OPTIONAL_ASSET_ITEMS:
        f = step_dir / name / JSON_ITEMS[name]
        if f.exists():
            out[name] = json.loads(f.read_text())
    return out


def load_params(path: str, abstract_params: Any) -> Any:
    """Restores only the parameters of a vla_jax checkpoint onto `abstract_params`'s shardings
    (ShapeDtypeStructs with `.sharding`); each process reads only its shards."""
    step_dir = resolve_step_dir(path)
    meta = json.loads((step_dir / "meta" / JSON_ITEMS["meta"]).read_text())
    want = leaf_shapes({"params": abstract_params})
    have = {k: v for k, v in meta["state_shapes"].items() if k.startswith("params/")}
    bad = [f"{k}: {have.get(k)} in {step_dir} vs {v} in this model" for k, v in want.items() if have.get(k) != v]
    if bad:
        raise ValueError(f"init_from checkpoint {step_dir} has other parameter shapes: " + "; ".join(bad[:4]))
    restore_args = ocp.checkpoint_utils.construct_restore_args({"params": abstract_params})
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item={"params": abstract_params}, restore_args=restore_args, partial_restore=True))
    return out["params"]


def tokenizer_asset(vla_tokenizer, action_dim: int) -> Dict[str, Any]:
    """Settings needed to tokenize prompts and decode actions, with the SentencePiece model embedded."""
    tok, act = vla_tokenizer.tokenizer, vla_tokenizer.action_tokenizer
    with open(tok.model_file, "rb") as f:
        model_bytes = f.read()
    return {"kind": "llama-sentencepiece", "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "space_id": tok.space_id, "max_seq_len": vla_tokenizer.max_len,
            "action_tokenizer": {"vocab_size": act.vocab_size, "n_bins": act.n_bins, "min_action": act.min_action,
                                 "max_action": act.max_action, "first_id": act.first_id, "last_id": act.last_id},
            "action_dim": int(action_dim), "prompt": "In: What action should the robot take to {instruction}?\nOut:",
            "sentencepiece_model_file": os.path.basename(tok.model_file),
            "sentencepiece_model_b64": base64.b64encode(model_bytes).decode()}
