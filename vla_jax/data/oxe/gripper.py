"""Gripper-action conversions to the OpenVLA convention: absolute, 1 = open, 0 = closed.

All functions take and return float32 tensors of shape [T] (one gripper value per step) and use
only TF ops, so they run inside `tf.data` maps (graph mode).
"""

import tensorflow as tf

# Bridge's gripper command is continuous; values outside (0.05, 0.95) are taken as decided.
_OPEN_ABOVE = 0.95
_CLOSED_BELOW = 0.05
# Relative commands within this dead band mean "no change".
_REL_DEAD_BAND = 0.1


def binarize_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """Snap a continuous absolute gripper command to {0, 1}.

    actions: [T] float. Values > 0.95 become 1, values < 0.05 become 0. A value in between takes
    the value of the next decided step (the gripper is moving towards it). Scanning runs backwards
    from the end; its initial carry is the raw last action, so trailing undecided values keep that
    raw value (OpenVLA behaviour, kept for statistics parity).
    Returns [T] float32.
    """
    actions = tf.cast(actions, tf.float32)
    is_open = tf.cast(actions > _OPEN_ABOVE, tf.float32)
    undecided = tf.logical_and(actions <= _OPEN_ABOVE, actions >= _CLOSED_BELOW)

    def step(carry, elems):
        value, pending = elems
        return tf.where(pending, carry, value)

    # actions[-1:] summed is the last value, and 0 for an empty trajectory (no indexing error).
    last = tf.reduce_sum(actions[-1:])
    return tf.scan(step, (is_open, undecided), initializer=last, reverse=True)


def invert_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """Map a gripper in [0, 1] with 1 = closed to 1 = open: returns 1 - actions (float32)."""
    return 1.0 - tf.cast(actions, tf.float32)


def rel2abs_gripper_actions(actions: tf.Tensor) -> tf.Tensor:
    """Turn relative gripper commands (+1 close, -1 open, ~0 keep) into absolute 1 = open / 0 = closed.

    actions: [T] float. Commands beyond +-0.1 change the state; the rest keep the previous one.
    The state before the first command is the opposite of that command (a trajectory whose first
    command is "close" starts open); with no command at all the gripper is open throughout.
    Returns [T] float32.
    """
    actions = tf.cast(actions, tf.float32)
    # +1 = open, -1 = closed, 0 = keep.
    command = tf.where(actions < -_REL_DEAD_BAND, 1.0, tf.where(actions > _REL_DEAD_BAND, -1.0, 0.0))
    first_command = tf.reduce_sum(tf.boolean_mask(command, command != 0.0)[:1])  # 0 if none
    start = tf.where(first_command == 0.0, 1.0, -first_command)

    def step(carry, cmd):
        return tf.where(cmd == 0.0, carry, cmd)

    state = tf.scan(step, command, initializer=start)
    return state * 0.5 + 0.5
