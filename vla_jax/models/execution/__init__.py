"""Execution strategies: how a forward/backward is laid out for one backend's speed, never what it computes.

Each strategy gives the same values as the plain path it replaces (up to float summation order;
the parity tests run both against the PyTorch references) and exists because it made training
faster on one backend (XLA:CPU; BENCHMARKS.md has the measurements). One switch each, in
`ExecutionConfig` (`OpenVLAConfig.execution`):

  layer_stack.py        `unroll_layers`: stacked [L, ...] layers as an unrolled loop instead of one scan
  blocked_attention.py  `attention_query_block`: causal attention in blocks of query rows, hand-written backward
  dense_vjp.py          `dense_custom_vjp`: the Linear contraction with a hand-written kernel gradient
  config.py             the switches, and `constrain_activations` (the train step traces under the mesh rules)

A reader of the model (`llama.py`, `vit.py`, `dense.py`) sees the plain computation, with one call
into a strategy where its switch is on.
"""

from vla_jax.models.execution.config import ExecutionConfig  # noqa: F401
