"""REST serving of a `vla_jax.policy.Policy` (run with `python -m vla_jax.serve`).

json_numpy.py  OpenVLA's wire format for arrays (encode/decode, no json_numpy dependency)
batcher.py     bounded queue + batching window: concurrent requests share one model call
server.py      stdlib ThreadingHTTPServer: POST /act (OpenVLA deploy.py payloads), GET /health
"""
