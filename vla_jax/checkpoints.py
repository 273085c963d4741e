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
  batch_spec/batch_spec.json   the run's vla_jax.spec.BatchSpec with its ActionCodec: batch keys and shapes,
                            cameras, test-time crop, action bins/chunk/decoding (absent in older checkpoints)

  vla_jax_checksums.json    size and SHA-256 of every file above, and whether the state was finite
                            (vla_jax.checkpoint_integrity; written once the save has completed)

This module is the format's one home: the item names and files (JSON_ITEMS), which assets every
checkpoint carries (ASSET_ITEMS) and which may be absent (OPTIONAL_ASSET_ITEMS), the orbax handler
registry (`registry`), the items of one save (`save_items`) and the assets (`build_assets`); a training
run (`Checkpointer`) and an HF import (vla_jax.hf.checkpoint_io) both write through them.

Saves are asynchronous (orbax copies the arrays off the devices before `save` returns, then writes in
the background). A save's checksums are written when it is known complete: at the next save, `wait`,
`close` or `latest_step`. `latest_step` returns the newest checkpoint that verifies, moving newer
ones that do not aside (`<step>.corrupt`) with a warning naming the file and what is wrong, so a
resume never reads changed bytes. keep-N counts only checksummed checkpoints and deletes the oldest
only once N newer ones are checksummed, so it never deletes the last verified one.
`Checkpointer.check_compatible` compares a checkpoint's stored shapes with the current run before
anything is restored or written.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vla_jax import checkpoint_integrity as integrity
from vla_jax.checkpoint_integrity import CheckpointError
from vla_jax.spec import BATCH_SPEC_ASSET, BatchSpec

log = logging.getLogger(__name__)

JSON_ITEMS = {
    "data": "data.json",
    "meta": "meta.json",
    "config": "config.json",
    "dataset_statistics": "dataset_statistics.json",
    "tokenizer": "tokenizer.json",
    "training_data": "training_data.json",
    BATCH_SPEC_ASSET: "batch_spec.json",  # vla_jax.spec.BatchSpec (with its ActionCodec)
}
ASSET_ITEMS = ("config", "dataset_statistics", "tokenizer")
# Saved when given, read when present (checkpoints written before they existed lack them).
OPTIONAL_ASSET_ITEMS = ("training_data", BATCH_SPEC_ASSET)


def registry(save_concurrent_gb: Optional[int] = None) -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    """Orbax handlers of every item: `state` (arrays) and the JSON items. save_concurrent_gb: orbax's
    budget for copying arrays off the devices at once (None: orbax's default)."""
    reg = ocp.handlers.DefaultCheckpointHandlerRegistry()
    kw = {} if save_concurrent_gb is None else {"save_concurrent_gb": int(save_concurrent_gb)}
    state_handler = ocp.StandardCheckpointHandler(**kw)
    reg.add("state", ocp.args.StandardSave, state_handler)
    reg.add("state", ocp.args.StandardRestore, state_handler)
    for name, filename in JSON_ITEMS.items():
        h = ocp.JsonCheckpointHandler(filename=filename)
        reg.add(name, ocp.args.JsonSave, h)
        reg.add(name, ocp.args.JsonRestore, h)
    return reg


def build_assets(config: Dict[str, Any], dataset_statistics: Dict[str, Any], tokenizer: Dict[str, Any],
                 batch_spec: BatchSpec, training_data: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The assets written with every checkpoint: the run config, the normalization statistics, the
    tokenizer (`tokenizer_asset`), the batch layout with its action codec, and what the run trained on
    (None for synthetic data and imports)."""
    if not isinstance(batch_spec, BatchSpec):
        raise ValueError(f"checkpoint asset {BATCH_SPEC_ASSET!r} must be a vla_jax.spec.BatchSpec, "
                         f"got {type(batch_spec).__name__}")
    out = {"config": config, "dataset_statistics": dataset_statistics, "tokenizer": tokenizer,
           BATCH_SPEC_ASSET: batch_spec.to_json()}
    if training_data is not None:
        out["training_data"] = training_data
    return out


def save_items(state: Any, data: Dict[str, Any], meta: Dict[str, Any], assets: Dict[str, Any]) -> Dict[str, Any]:
    """The orbax Composite items of one save; ValueError when a required asset is missing."""
    missing = [k for k in ASSET_ITEMS if k not in assets]
    if missing:
        raise ValueError(f"checkpoint assets {missing} are missing; every checkpoint carries {ASSET_ITEMS}")
    items = {"state": ocp.args.StandardSave(state), "data": ocp.args.JsonSave(data), "meta": ocp.args.JsonSave(meta)}
    items.update({k: ocp.args.JsonSave(assets[k]) for k in ASSET_ITEMS})
    items.update({k: ocp.args.JsonSave(assets[k]) for k in OPTIONAL_ASSET_ITEMS if assets.get(k) is not None})
    return items


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


@jax.jit
def _finite_flag(tree: Any) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def all_finite(tree: Any) -> bool:
    """Whether every floating-point value of `tree` (arrays, possibly sharded over processes) is finite."""
    return bool(_finite_flag(tree))


class Checkpointer:
    """Orbax CheckpointManager for `directory` (normally WORKDIR/checkpoints), with content checksums.

    max_to_keep: keep the newest N checksummed checkpoints (None: all). Orbax's own keep-N is off:
    it would count a save still in flight, or one that no longer verifies.
    In a multi-process run process 0 alone reads and writes checksums and decides which step to
    resume from; the others follow its decision (`latest_step`).
    """

    def __init__(self, directory: str, max_to_keep: Optional[int] = 3, async_save: bool = True,
                 create: bool = True):
        self.directory = epath.Path(directory)
        self.max_to_keep = max_to_keep
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                               create=create, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry())
        self._pending: Dict[int, bool] = {}  # saved, not yet checksummed: step -> state finite
        self._verified: set = set()  # steps known to match their checksums, with a finite state
        self._primary = jax.process_index() == 0

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(int(step))

    def _finish_pending(self) -> None:
        """Waits for the save in flight, writes its checksums, then applies keep-N."""
        if not self._pending:
            return
        self.manager.wait_until_finished()
        for step, finite in sorted(self._pending.items()):
            if self._primary:
                integrity.write_checksums(os.fspath(self.step_dir(step)), finite)
            if finite:
                self._verified.add(step)
        self._pending.clear()
        self._prune()

    def _prune(self) -> None:
        """Deletes every checkpoint older than the N-th newest verified one (never a verified one among
        the newest N, never anything while fewer than N have verified)."""
        if not self.max_to_keep:
            return
        steps = sorted(self.manager.all_steps())
        verified = [s for s in steps if s in self._verified]
        if len(verified) < self.max_to_keep:
            return
        oldest_kept = verified[-self.max_to_keep]
        for s in steps:
            if s < oldest_kept:
                self.manager.delete(s)
                self._verified.discard(s)

    def _set_aside(self, step: int) -> epath.Path:
        src = self.step_dir(step)
        dst, n = self.directory / f"{step}.corrupt", 1
        while dst.exists():
            dst, n = self.directory / f"{step}.corrupt-{n}", n + 1
        os.rename(os.fspath(src), os.fspath(dst))
        return dst

    def _choose(self) -> Optional[int]:
        """(process 0) The newest step that verifies; newer ones are set aside with a warning."""
        problems, chosen = [], None
        for step in sorted(self.manager.all_steps(), reverse=True):
            reason = None if step in self._verified else integrity.verify(os.fspath(self.step_dir(step)))
            if reason is None:
                self._verified.add(step)
                chosen = step
                break
            problems.append((step, reason))
        if problems and chosen is None:
            raise CheckpointError(
                f"no checkpoint in {self.directory} verifies: " +
                "; ".join(f"checkpoint {s}: {r}" for s, r in problems) +
                ". Move them away (or use a fresh --workdir) to start over.")
        for step, reason in problems:
            dst = self._set_aside(step)
            log.warning("checkpoint %d (%s) skipped: %s. Moved aside to %s; using checkpoint %d.",
                        step, self.step_dir(step), reason, dst, chosen)
        if problems:
            self.manager.reload()
        return chosen

    def latest_step(self) -> Optional[int]:
        """The newest checkpoint that verifies and holds a finite state (None when there is none), after
        the save in flight has completed. Newer checkpoints that fail verification are moved aside to
        `<step>.corrupt`, each with a warning saying why; CheckpointError when checkpoints exist but
        none verifies. Verifying reads each candidate once; steps saved by this Checkpointer are
        verified by construction."""
        self._finish_pending()
        if jax.process_count() == 1:
            return self._choose()
        from jax.experimental import multihost_utils

        chosen, failed = None, None
        if self._primary:
            try:
                chosen = self._choose()
            except CheckpointError as e:
                failed = e
        code = int(multihost_utils.broadcast_one_to_all(
            np.int64(-2 if failed else (-1 if chosen is None else chosen))))
        if failed is not None:
            raise failed
        if code == -2:
            raise CheckpointError(f"no checkpoint in {self.directory} verifies (see process 0's log)")
        self.manager.reload()
        if code >= 0:
            self._verified.add(code)
        return None if code < 0 else code

    def all_steps(self) -> List[int]:
        return list(self.manager.all_steps())

    def read_json(self, step: int, name: str) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]
        except (ValueError, OSError) as e:
            raise CheckpointError(f"checkpoint {self.step_dir(step)}: {name}/{JSON_ITEMS[name]} cannot be read "
                                  f"({_first_line(e)})") from None

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
        """Starts an async save of everything at `step` (after completing the previous one and writing
        its checksums); returns False when the manager skipped it. A state with NaN/inf values is
        saved but recorded as not finite, so it is never resumed from or called good."""
        meta = {"step": int(step), "model": model_geometry, "state_shapes": leaf_shapes(state)}
        items = save_items(state, data, meta, assets)
        self._finish_pending()
        finite = all_finite(state)
        if not finite:
            log.warning("checkpoint %d holds NaN/inf values: saved, but it will not be resumed from", step)
        saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)
        if saved:
            self._pending[int(step)] = finite
        return saved

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Dict[str, Any]]:
        """-> (state placed on the shardings carried by `abstract_state`'s ShapeDtypeStructs, data json).
        Verifies the checkpoint first unless `latest_step` just did; CheckpointError names the file."""
        where = self.step_dir(step)
        if step not in self._verified:
            reason = integrity.verify(os.fspath(where))
            if reason is not None:
                raise CheckpointError(f"checkpoint {step} ({where}): {reason}")
            self._verified.add(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except (ValueError, OSError, KeyError) as e:
            raise CheckpointError(f"checkpoint {step} ({where}) cannot be restored: {_first_line(e)}") from None
        return out["state"], out["data"]

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        self._finish_pending()
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


_VERIFIED_DIRS: set = set()  # step folders verified by this process (load_assets then load_params)


def verify_step_dir(step_dir: epath.Path) -> None:
    """CheckpointError naming the file when `step_dir` has checksums that its files no longer match
    (once per folder and process). A folder without checksums (an import, an older vla_jax) is read
    unverified; its read errors are still named by `load_assets` / `load_params`."""
    key = os.path.abspath(os.fspath(step_dir))
    if key in _VERIFIED_DIRS or not (step_dir / integrity.CHECKSUM_FILE).exists():
        return
    reason = integrity.verify(key)
    if reason is not None:
        raise CheckpointError(f"checkpoint {step_dir}: {reason}")
    _VERIFIED_DIRS.add(key)


def _read_asset(step_dir: epath.Path, name: str) -> Any:
    path = step_dir / name / JSON_ITEMS[name]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: {name}/{JSON_ITEMS[name]} cannot be read "
                              f"({_first_line(e)})") from None


def load_assets(path: str) -> Dict[str, Any]:
    """{'config', 'dataset_statistics', 'tokenizer', 'meta'} of the checkpoint at `path` (verified),
    plus the optional assets it has (e.g. 'training_data')."""
    step_dir = resolve_step_dir(path)
    verify_step_dir(step_dir)
    out = {name: _read_asset(step_dir, name) for name in ASSET_ITEMS + ("meta",)}
    out.update({name: _read_asset(step_dir, name) for name in OPTIONAL_ASSET_ITEMS
                if (step_dir / name / JSON_ITEMS[name]).exists()})
    return out


def load_params(path: str, abstract_params: Any) -> Any:
    """Restores only the parameters of a vla_jax checkpoint onto `abstract_params`'s shardings
    (ShapeDtypeStructs with `.sharding`); each process reads only its shards. The folder is
    verified first when it has checksums; CheckpointError names the folder and the file."""
    step_dir = resolve_step_dir(path)
    verify_step_dir(step_dir)
    meta = _read_asset(step_dir, "meta")
    want = leaf_shapes({"params": abstract_params})
    have = {k: v for k, v in meta["state_shapes"].items() if k.startswith("params/")}
    bad = [f"{k}: {have.get(k)} in {step_dir} vs {v} in this model" for k, v in want.items() if have.get(k) != v]
    if bad:
        raise ValueError(f"init_from checkpoint {step_dir} has other parameter shapes: " + "; ".join(bad[:4]))
    restore_args = ocp.checkpoint_utils.construct_restore_args({"params": abstract_params})
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            out = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
                item={"params": abstract_params}, restore_args=restore_args, partial_restore=True))
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: its parameters cannot be read from state/ "
                              f"({_first_line(e)})") from None
    return out["params"]


def tokenizer_asset(vla_tokenizer, action_dim: int) -> Dict[str, Any]:
    """Settings needed to tokenize prompts and decode actions, with the SentencePiece model embedded."""
    tok, act = vla_tokenizer.tokenizer, vla_tokenizer.codec
    with open(tok.model_file, "rb") as f:
        model_bytes = f.read()
    return {"kind": "llama-sentencepiece", "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "space_id": tok.space_id, "max_seq_len": vla_tokenizer.max_len,
            "action_tokenizer": {"vocab_size": act.base_vocab_size, "n_bins": act.n_bins, "min_action": -1.0,
                                 "max_action": 1.0, "first_id": act.first_id, "last_id": act.last_id},
            "action_dim": int(action_dim), "prompt": "In: What action should the robot take to {instruction}?\nOut:",
            "sentencepiece_model_file": os.path.basename(tok.model_file),
            "sentencepiece_model_b64": base64.b64encode(model_bytes).decode()}
