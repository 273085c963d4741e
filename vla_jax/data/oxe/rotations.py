"""Quaternion -> Euler angles in TF, with the convention of tensorflow_graphics' `euler.from_quaternion`.

Convention: quaternions are [x, y, z, w] (scalar last); angles are (roll, pitch, yaw) =
(theta_x, theta_y, theta_z) with R = Rz(theta_z) @ Ry(theta_y) @ Rx(theta_x), i.e. extrinsic
rotations about x, then y, then z (scipy's `as_euler("xyz")`). We avoid the tensorflow_graphics
dependency (it is unmaintained and pins old packages); only the formula is reproduced.
"""

import tensorflow as tf

# |R[2,0]| this close to 1 means pitch is +-90 degrees (gimbal lock), where roll and yaw are coupled.
_GIMBAL_TOLERANCE = 1e-6


def quaternion_to_euler(quaternions: tf.Tensor) -> tf.Tensor:
    """quaternions: [..., 4] as [x, y, z, w], assumed unit norm (not renormalized, as in
    tensorflow_graphics). Returns [..., 3] (roll, pitch, yaw) in radians, same float dtype.

    In gimbal lock, yaw is set to 0 and roll absorbs the coupled rotation (scipy does the same).
    """
    q = tf.convert_to_tensor(quaternions)
    if q.shape.rank is not None and q.shape[-1] is not None and q.shape[-1] != 4:
        raise ValueError(f"quaternion_to_euler expects [..., 4] ([x, y, z, w]), got shape {q.shape}")
    x, y, z, w = tf.unstack(q, axis=-1)

    def clip(v):  # rounding can push a rotation-matrix entry slightly outside [-1, 1]
        return tf.clip_by_value(v, -1.0, 1.0)

    # Entries of the rotation matrix of a unit quaternion.
    r00 = clip(1.0 - 2.0 * (y * y + z * z))
    r01 = clip(2.0 * (x * y - z * w))
    r02 = clip(2.0 * (x * z + y * w))
    r10 = clip(2.0 * (x * y + z * w))
    r20 = clip(2.0 * (x * z - y * w))
    r21 = clip(2.0 * (y * z + x * w))
    r22 = clip(1.0 - 2.0 * (x * x + y * y))

    pitch = -tf.asin(r20)
    # cos(pitch) >= 0 on asin's range, so roll and yaw need no sign correction.
    roll = tf.atan2(r21, r22)
    yaw = tf.atan2(r10, r00)
    general = tf.stack([roll, pitch, yaw], axis=-1)

    # Gimbal lock: pitch is exactly -+90 degrees (sign opposite to R[2,0]); yaw is set to 0.
    s = tf.cast(tf.where(r20 < 0.0, -1.0, 1.0), q.dtype)
    half_pi = tf.constant(1.5707963267948966, q.dtype)
    locked = tf.stack([tf.atan2(-s * r01, -s * r02), -s * half_pi, tf.zeros_like(pitch)], axis=-1)

    is_locked = tf.abs(tf.abs(r20) - 1.0) < _GIMBAL_TOLERANCE
    return tf.where(is_locked[..., None], locked, general)
