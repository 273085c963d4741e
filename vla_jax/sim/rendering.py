"""Offscreen MuJoCo rendering: OpenGL backend selection, fast settings, and errors that say what to do.

MuJoCo reads `MUJOCO_GL` once, when it is first imported: `import_mujoco` sets it to 'egl' unless the
user chose a backend. EGL renders headless; on a machine without a GPU, Mesa's llvmpipe provides it.

Never render in a process that has imported TensorFlow: with Mesa's llvmpipe, TensorFlow's bundled
LLVM and Mesa's libLLVM clash and the process segfaults (in either import order). vla_jax therefore
runs the simulators in worker processes of their own (`vla_jax.sim.worker`).

Speed: MuJoCo's default offscreen settings (multisampling, shadows, reflections) make software
rendering (llvmpipe) many times slower per frame; `SceneRenderer` turns them off (BENCHMARKS.md,
"Design choices measured").
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Mapping, Optional

import numpy as np

# Backends MuJoCo knows, and what each needs (for the error message).
GL_BACKENDS = {
    "egl": "headless; a GPU driver's EGL, or Mesa's libEGL (llvmpipe) on a CPU-only machine",
    "osmesa": "headless pure-software rendering; needs libOSMesa (e.g. the libosmesa6 package)",
    "glfw": "needs a display (an X11/Wayland session or xvfb-run)",
}
# Cameras of the Meta-World scene that are mounted upside down.
UPSIDE_DOWN_CAMERAS = frozenset({"corner"})


class RenderContextError(ValueError):
    """MuJoCo could not load its OpenGL backend or create a rendering context."""


def _backend_in_use() -> Optional[str]:
    """The backend MuJoCo picked when it was imported (None if not imported); '' means its default, glfw."""
    value = getattr(sys.modules.get("mujoco.gl_context"), "_MUJOCO_GL", None)
    return None if value is None else (value or "glfw")


def gl_advice(error: BaseException) -> str:
    """Message naming the MUJOCO_GL in use, the error, and which MUJOCO_GL values to try."""
    current = os.environ.get("MUJOCO_GL", "")
    used = _backend_in_use()
    late = ""
    if used is not None and used != current.lower().strip():
        late = (f" MuJoCo was imported before MUJOCO_GL={current!r} was set and uses {used!r}: call "
                "vla_jax.sim.rendering.import_mujoco() before anything imports mujoco.")
        current = used
    others = [f"MUJOCO_GL={k} ({v})" for k, v in GL_BACKENDS.items() if k != current]
    return (f"MuJoCo could not create an OpenGL rendering context with MUJOCO_GL={current!r} "
            f"({type(error).__name__}: {error}).{late} Try " + "; or ".join(others) + ". Set MUJOCO_GL in the "
            "environment before the process starts (MuJoCo reads it once, when it is imported).")


def import_mujoco():
    """`import mujoco` with MUJOCO_GL defaulting to 'egl'; RenderContextError if its backend cannot load."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import mujoco
    except Exception as e:  # noqa: BLE001 - any backend failure (ImportError, AttributeError, RuntimeError)
        raise RenderContextError(gl_advice(e)) from e
    return mujoco


class SceneRenderer:
    """Renders one camera of a MuJoCo model to uint8 [size, size, 3] images.

    The renderer holds its own copy of the model (visual changes such as enlarged sites do not touch
    the physics) and can draw any MjData of the same model: several environments of one task share
    one renderer (creating an OpenGL context costs ~1 s on llvmpipe).

    model: mujoco.MjModel; size: image side in pixels; camera: camera name.
    rotate180: turn the image by 180 degrees (default: for UPSIDE_DOWN_CAMERAS).
    site_scale: {site name: factor} enlarging sites (e.g. a goal marker that is 1-3 px at 128x128);
      names the model lacks are ignored (not every task has a goal site).
    """

    def __init__(self, model, size: int, camera: str, *, rotate180: Optional[bool] = None,
                 site_scale: Optional[Mapping[str, float]] = None):
        mujoco = import_mujoco()
        size = int(size)
        if size <= 0:
            raise ValueError(f"image size must be > 0, got {size}")
        self._model = copy.deepcopy(model)
        if mujoco.mj_name2id(self._model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
            cams = [mujoco.mj_id2name(self._model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(self._model.ncam)]
            raise ValueError(f"camera {camera!r} is not in the model; its cameras are {cams}")
        for name, factor in (site_scale or {}).items():
            sid = mujoco.mj_name2id(self._model, mujoco.mjtObj.mjOBJ_SITE, name)
            if sid >= 0:
                self._model.site_size[sid] *= float(factor)
        # Multisampling must be off before the context is made; shadows and reflections per scene.
        self._model.vis.quality.offsamples = 0
        # The offscreen buffer must hold the image (MuJoCo's default is 640x480).
        self._model.vis.global_.offwidth = max(int(self._model.vis.global_.offwidth), size)
        self._model.vis.global_.offheight = max(int(self._model.vis.global_.offheight), size)
        try:
            self._renderer = mujoco.Renderer(self._model, size, size)
        except Exception as e:  # noqa: BLE001 - mujoco.FatalError, EGL/GLFW errors
            raise RenderContextError(gl_advice(e)) from e
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self.size, self.camera = size, camera
        self.rotate180 = camera in UPSIDE_DOWN_CAMERAS if rotate180 is None else bool(rotate180)

    def render(self, data) -> np.ndarray:
        """MjData of the same model -> uint8 [size, size, 3] (a new array)."""
        self._renderer.update_scene(data, camera=self.camera)
        img = self._renderer.render()
        return np.ascontiguousarray(img[::-1, ::-1]) if self.rotate180 else img.copy()

    def close(self) -> None:
        """Frees the OpenGL context (do it before the interpreter exits: EGL teardown at exit is noisy)."""
        if getattr(self, "_renderer", None) is not None:
            self._renderer.close()
            self._renderer = None
