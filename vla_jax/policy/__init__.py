"""Inference: load a checkpoint, predict actions, serve them over HTTP.

    from vla_jax.policy import Policy
    policy = Policy.load("runs/debug")                  # vla_jax workdir / step folder, or an HF OpenVLA folder
    pred = policy.predict(images, instructions)         # Prediction(tokens, normalized, actions)

predict.py      Policy: prompts, decoding, the public prediction calls
statistics.py   the checkpoint's dataset statistics: unnorm keys, action dims, un-normalization, gripper
inputs.py       image checks and the resize / test-time crop, as the training pipeline does them
observation.py  observation dicts: cameras by name (OFT's full_image/wrist_image too), the proprio state
                and its inference-time normalization
decoding.py     batch / prompt-length buckets and upstream's early-EOS ids (pure helpers of predict.py)
loading.py      checkpoint -> (config, params, statistics, tokenizer, BatchSpec); Policy.load's body;
                the persistent XLA compilation cache
mesh.py         sharded inference: parameters over a device mesh, the decoder compiled for it
serve.py        `python -m vla_jax.serve` (vla_jax/serve.py is its entry point)
server.py       POST /act (OpenVLA deploy.py payloads), GET /health; the error contract
payload.py      /act request bodies -> checked requests (images, state, control fields)
batcher.py      bounded queue + batching window: concurrent requests share one model call
connections.py  the stdlib threaded server hardened: backlog, per-connection deadlines, connection cap
json_numpy.py   OpenVLA's wire format for arrays (the json-numpy package, behind size/shape checks)
warmup.py       start-up warm-up of every batch x prompt-length bucket and of the request path
loadtest.py     bounded loopback load test (keep-alive, new connection per request, half-open clients)

The names below load lazily, so a client importing `vla_jax.policy.json_numpy` does not import JAX.
"""

import importlib

_EXPORTS = {"Policy": "predict", "Prediction": "prediction", "upstream_eos_ids": "decoding",
            "enable_compilation_cache": "loading", "is_hf_dir": "loading"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
