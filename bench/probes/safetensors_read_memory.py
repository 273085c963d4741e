"""Host memory of reading one large safetensors shard tensor by tensor, three ways (one process each):

  plain   read() of each tensor's bytes into a fresh array (vla_jax's hand-written reader until the
          safetensors library replaced it)
  held    one `safe_open` kept open for the whole file (the library's usual pattern)
  reopen  one short-lived `safe_open` per tensor (vla_jax.hf.safetensors_io.iter_tensors now)

    python bench/probes/safetensors_read_memory.py [--gib=2] [--workdir=/tmp]

The shard holds the first openvla-7b tensors (released names and shapes, random bf16) up to --gib.
Each reader drops every array after touching it, so the peak RSS above the RSS before reading is
what the reading itself costs; an import adds this on top of the parameters it keeps. Prints one
line per reader.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _gen(path: str, gib: float) -> None:
    import ml_dtypes
    import numpy as np
    import safetensors.numpy

    from tests.fixtures.released_openvla_7b import released_keys

    rng, tensors, size = np.random.default_rng(0), {}, 0
    for key, shape in released_keys():
        n = math.prod(shape) * 2
        if size + n > gib * 2 ** 30:
            break
        tensors[key] = rng.integers(0, 2 ** 16, size=shape, dtype=np.uint16).view(ml_dtypes.bfloat16)
        size += n
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def _read(mode: str, path: str) -> dict:
    import numpy as np
    import safetensors

    from vla_jax.hf import safetensors_io as sio

    infos = sio.read_order(sio.read_header(path)[0].values())
    _reset_peak()
    base, t, checksum = _status_mib("VmRSS"), time.perf_counter(), 0
    if mode == "plain":
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
            header = json.loads(open(path, "rb").read(start)[8:])
            for info in infos:
                b, e = header[info.key]["data_offsets"]
                arr = np.empty(info.shape, sio.DTYPES[info.dtype])
                f.seek(start + b)
                f.readinto(arr.reshape(-1).view(np.uint8))
                checksum += int(arr.reshape(-1).view(np.uint16)[0])
                del arr
    elif mode == "held":
        with safetensors.safe_open(path, framework="numpy") as f:
            for info in infos:
                arr = f.get_tensor(info.key)
                checksum += int(arr.reshape(-1).view(np.uint16)[0])
                del arr
    else:
        for _, arr in sio.iter_tensors(infos):
            checksum += int(arr.reshape(-1).view(np.uint16)[0])
            del arr
    largest = max(i.nbytes for i in infos) / 2 ** 20
    return {"mode": mode, "seconds": round(time.perf_counter() - t, 2), "peak_above_base_mib": round(_status_mib("VmHWM") - base),
            "largest_tensor_mib": round(largest), "file_mib": round(os.path.getsize(path) / 2 ** 20),
            "checksum": checksum}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(_read(*a.child)))
        return 0
    with tempfile.TemporaryDirectory(dir=a.workdir) as d:
        path = os.path.join(d, "shard.safetensors")
        _gen(path, a.gib)
        for mode in ("plain", "held", "reopen"):
            subprocess.run(["sync"])
            out = subprocess.run([sys.executable, __file__, "--child", mode, path], capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=REPO), check=True).stdout
            print(out.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
