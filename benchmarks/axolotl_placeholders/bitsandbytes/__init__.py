"""Placeholder for `bitsandbytes` in the GPU suite's `axolotl train` step only (see ../README.md): no
quantisation, no 8-bit optimisers."""
from . import nn
