"""The vla_jax side of import/export: params in the orbax layout of `vla_jax/checkpoints.py`.

Writing (import): `WORKDIR/checkpoints/0/` with the same items as a training checkpoint —
`state` = {"params": params} (no optimizer state), `data` (no data position), `meta`, and the
assets of `checkpoints.build_assets` (`config`, `dataset_statistics`, `tokenizer`, `batch_spec`),
written through `checkpoints.registry` / `checkpoints.save_items` — so that `checkpoints.load_params` (training
`init_from`), `checkpoints.load_assets` and `checkpoints.resolve_step_dir` read it as they read a
training run. The only difference from `Checkpointer.save` is the state handler's
`save_concurrent_gb` (1, or the largest array shard if bigger): orbax then copies at most that
much off the devices at a time instead of a second copy of every parameter (7B in bf16 would
need 30 GB). The import splits the params over 8 host CPU devices so that shards stay small.

Reading (export): leaf groups are restored one at a time as numpy arrays (`partial_restore`), so
exporting never holds more than the few leaves being converted, whatever the parameter dtype.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from vla_jax import checkpoints as ckpt_lib

SAVE_CONCURRENT_GB = 1


def write_params_checkpoint(workdir: str, params: Any, assets: Dict[str, Any], geometry: Dict[str, Any],
                            step: int = 0) -> str:
    """Writes `params` (unboxed tree of jax arrays) and `assets` (`checkpoints.build_assets`) as step
    `step` under `workdir/checkpoints`. Returns the step folder."""
    state = {"params": params}
    meta = {"step": int(step), "model": geometry, "state_shapes": ckpt_lib.leaf_shapes(state)}
    items = ckpt_lib.save_items(state, ckpt_lib.encode_data_states([]), meta, assets)
    directory = os.path.join(workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=True)
    # orbax cannot write an array shard larger than its write budget.
    largest = max((sh.data.nbytes for x in jax.tree.leaves(params) for sh in x.addressable_shards), default=0)
    budget = max(SAVE_CONCURRENT_GB, math.ceil(largest / 1e9))
    with ocp.CheckpointManager(directory, options=options, handler_registry=ckpt_lib.registry(budget)) as manager:
        manager.save(int(step), args=ocp.args.Composite(**items), force=True)
        manager.wait_until_finished()
    return os.path.join(directory, str(step))


class ParamsReader:
    """Reads a vla_jax checkpoint's params leaf by leaf (numpy, stored dtype) plus its assets."""

    def __init__(self, path: str):
        # orbax restores only from absolute paths ("Checkpoint path should be absolute").
        self.step_dir = ckpt_lib.resolve_step_dir(os.path.abspath(os.fspath(path)))
        self.state_dir = self.step_dir / "state"
        self.assets = ckpt_lib.load_assets(str(self.step_dir))
        self._ckptr = ocp.PyTreeCheckpointer()
        # The handler's metadata (not the Checkpointer's): a state item has no step-level metadata file.
        tree = ocp.PyTreeCheckpointHandler().metadata(self.state_dir).tree
        if "params" not in tree:
            raise ValueError(f"{self.state_dir} holds no 'params' (top-level keys {sorted(tree)})")
        flat = traverse_util.flatten_dict(_plain(tree["params"]))
        self.shapes: Dict[Tuple[str, ...], jax.ShapeDtypeStruct] = {
            path: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype)) for path, m in flat.items()}

    def abstract(self, prefix: Tuple[str, ...] = ()) -> dict:
        """The params (or the subtree at `prefix`) as ShapeDtypeStructs."""
        sub = {p[len(prefix):]: s for p, s in self.shapes.items() if p[:len(prefix)] == prefix}
        if not sub:
            raise ValueError(f"{self.state_dir}: no params under {'/'.join(prefix)}")
        return traverse_util.unflatten_dict(sub)

    def read(self, paths: Sequence[Tuple[str, ...]]) -> Tuple[np.ndarray, ...]:
        """Restores only the leaves at `paths` (params-relative), as numpy arrays in their stored dtype."""
        unknown = [p for p in paths if p not in self.shapes]
        if unknown:
            raise ValueError(f"{self.state_dir}: no parameter {'/'.join(unknown[0])}")
        item = traverse_util.unflatten_dict({("params",) + p: self.shapes[p] for p in paths})
        args = traverse_util.unflatten_dict({("params",) + p: ocp.RestoreArgs(restore_type=np.ndarray)
                                             for p in paths})
        out = self._ckptr.restore(self.state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=args, partial_restore=True))
        flat = traverse_util.flatten_dict(out["params"])
        return tuple(np.asarray(flat[p]) for p in paths)

    def read_tree(self, prefix: Tuple[str, ...]) -> dict:
        """Every leaf under `prefix` as a nested dict of numpy arrays."""
        paths = [p for p in self.shapes if p[:len(prefix)] == prefix]
        return traverse_util.unflatten_dict({p[len(prefix):]: a for p, a in zip(paths, self.read(paths))})


def _plain(tree: Any) -> Any:
    """Orbax metadata mappings -> plain nested dicts."""
    if hasattr(tree, "items") and not hasattr(tree, "shape"):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def config_asset(source: Dict[str, Any], preset: Optional[str], cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The `config` asset of an imported checkpoint (a training run stores its run config here)."""
    return json.loads(json.dumps({
        "source": source,
        "model": {"preset": preset or "", "dtype": cfg_dict["dtype"], "param_dtype": cfg_dict["param_dtype"],
                  "remat": False, "image_size": 0},
        "model_config": cfg_dict,
        "lora": {"enabled": False},
    }))
