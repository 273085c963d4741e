"""REST serving of a `vla_jax.policy.Policy` (run with `python -m vla_jax.serve`).

json_numpy.py   OpenVLA's wire format for arrays (the json-numpy package, behind size/shape checks)
batcher.py      bounded queue + batching window: concurrent requests share one model call
server.py       POST /act (OpenVLA deploy.py payloads), GET /health; the error contract
connections.py  the stdlib threaded server hardened: backlog, per-connection deadlines, connection cap
warmup.py       start-up warm-up of every batch x prompt-length bucket and of the request path
loadtest.py     bounded loopback load test (keep-alive, new connection per request, half-open clients)
"""
