"""The contract every stage reads: what goes into the model and what comes out.

`BatchSpec` (batch.py): cameras, image size, proprio, text length and every batch key with dtype and
shape. `ActionCodec` (actions.py): action dim, bins, chunk length, decoding, head, supervised positions,
ids <-> normalized <-> raw. `gripper.py`: the gripper convention at the output. Both classes are stored
as checkpoint assets (`ASSETS`) and read back by the policy. Pure numpy; nothing here imports
TensorFlow, the model or the training code (the bottom layer, with `models/`).
"""

from vla_jax.spec.actions import DECODINGS, HEADS, ActionCodec
from vla_jax.spec.batch import IGNORE_INDEX, BatchSpec, camera_names

# Checkpoint asset names of the contract (JSON written with each checkpoint).
BATCH_SPEC_ASSET = "batch_spec"

__all__ = ["ActionCodec", "BatchSpec", "DECODINGS", "HEADS", "IGNORE_INDEX", "BATCH_SPEC_ASSET", "camera_names"]
