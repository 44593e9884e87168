"""torch.library custom ops, one module per op family; the only layer that calls kernels."""

from genfast.ops.dense import fused_dense

__all__ = ["fused_dense"]
