"""Hot ops of the RAT family: each has a plain-PyTorch reference and a dispatcher.

``ops`` imports only torch (and Triton where a kernel exists); it knows nothing about
nn.Modules. Every public op takes ``backend="auto" | "reference" | "triton"``.
"""

from rat_lightning.ops.chunk_attention import chunk_attention
from rat_lightning.ops.recurrence import gated_recurrence
from rat_lightning.ops.rope import apply_rope

__all__ = ["apply_rope", "chunk_attention", "gated_recurrence"]
