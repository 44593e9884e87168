"""Drop-in modules built on genfast's fused ops, and the converter for existing models."""

from genfast.nn.convert import convert, revert
from genfast.nn.linear import FusedLinear

__all__ = ["FusedLinear", "convert", "revert"]
