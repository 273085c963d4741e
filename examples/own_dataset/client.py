"""Query a running `python -m vla_jax.serve` as an OpenVLA `deploy.py` robot client does.

    python examples/own_dataset/client.py --url=http://127.0.0.1:8000 --recording=RAW/val/episode_0000.npz [--gripper=dataset]

OpenVLA's client is `requests.post(url + "/act", json={"image": image, "instruction": ...})` after
`json_numpy.patch()`; the same wire format is used here (the `json_numpy` package when installed,
else vla_jax's implementation of it). Prints the action for the first frame of the recording.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import requests

try:
    import json_numpy
except ImportError:  # the same format: {"__numpy__": base64, "dtype": ..., "shape": [...]}
    from vla_jax.policy import json_numpy


def act(url: str, image: np.ndarray, instruction: str, gripper: str | None = None) -> np.ndarray:
    payload = {"image": image, "instruction": instruction}
    if gripper:
        payload["gripper"] = gripper  # vla_jax extension: "openvla" (default) or "dataset"
    resp = requests.post(f"{url}/act", data=json_numpy.dumps(payload), headers={"Content-Type": "application/json"},
                         timeout=120)
    if resp.status_code != 200:
        raise SystemExit(f"HTTP {resp.status_code}: {resp.text}")
    return np.asarray(json_numpy.loads(resp.text))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--recording", required=True, help="an episode .npz of make_recordings.py")
    p.add_argument("--gripper", default=None, choices=("openvla", "dataset"))
    args = p.parse_args(argv)
    ep = np.load(args.recording)
    action = act(args.url, ep["image"][0], str(ep["instruction"]), args.gripper)
    print(json.dumps({"instruction": str(ep["instruction"]), "gripper": args.gripper or "openvla",
                      "action": [round(float(a), 5) for a in action]}))


if __name__ == "__main__":
    main()
