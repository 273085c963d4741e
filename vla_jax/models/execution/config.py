"""`ExecutionConfig`: one switch per execution strategy (see the package docstring)."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
    """How the model runs, not what it computes (every setting gives the same values).

    unroll_layers: a full forward (training, scoring) runs the stacked layers of the Llama and of
      both vision towers as an unrolled loop instead of one `nn.scan` (`layer_stack`; same
      parameter layout). None = the backend's default: unrolled on CPU, scanned elsewhere.
    attention_query_block: the Llama's causal attention over a whole sequence is computed in blocks
      of this many query rows (`blocked_attention`). None = the backend's default (64 rows on CPU,
      one block elsewhere), 0 = one block (the plain path), n > 0 = n rows.
    dense_custom_vjp: every `Linear` contracts through `dense_vjp.dense`, whose kernel gradient is
      written by hand, instead of JAX's derived backward.
    constrain_activations: the jitted train step is traced under the mesh and the logical-axis rules,
      so the model's activation constraints (`nn.with_logical_constraint` at block boundaries) act;
      without them XLA may keep activations replicated over the FSDP axis (the 7B plan at 64 devices
      then needs ~400 GB of temporaries per device instead of ~18 GB). False only to compare.
    """

    unroll_layers: Optional[bool] = None
    attention_query_block: Optional[int] = None
    dense_custom_vjp: bool = True
    constrain_activations: bool = True

    def __post_init__(self):
        if self.attention_query_block is not None and (
                not isinstance(self.attention_query_block, int) or self.attention_query_block < 0):
            raise ValueError(f"ExecutionConfig.attention_query_block={self.attention_query_block!r}: expected None "
                             f"(the backend's default), 0 (one block) or a positive number of query rows")
