"""Drop-in modules built on genfast's fused ops, and the converter for existing models."""

from genfast.nn.convert import convert, revert
from genfast.nn.linear import FusedLinear
from genfast.nn.reparameterize import Reparameterize

__all__ = ["FusedLinear", "Reparameterize", "convert", "revert"]
