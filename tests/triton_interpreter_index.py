"""Triton's CPU interpreter under NumPy >= 2.4: a scalar kernel argument usable as a loop bound again.

The interpreter (TRITON_INTERPRET=1) holds every scalar kernel argument as a one-element 1-D NumPy array
and gives it an `__index__` of `int(array)`, which Python calls for `range(0, V, BLOCK_V)` in the row
loops. NumPy 2.4 made `int()` of an array with ndim > 0 a TypeError, so under Triton 3.6 (and older) with
a current NumPy every kernel with a runtime loop bound fails on CPU with "only 0-dimensional arrays can be
converted to Python scalars" (triton-lang/triton#9171; Triton 3.7 reads `int(array.squeeze())`).

`patch()` re-defines that `__index__` with `.item()` each time the interpreter patches `tl.tensor` for a
launch, through the same scope, so the interpreter restores the class afterwards. It acts only where the
bug can occur (the interpreter is on and this NumPy rejects the conversion); compiled kernels on a GPU
never reach this code, so it lives with the tests (`conftest.py` applies it), not in the package.
"""
from __future__ import annotations

import os


def _numpy_rejects_1d_int() -> bool:
    import warnings

    import numpy as np  # here, not at the top: compiled Triton on a GPU does not need NumPy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 1.25 - 2.3 warn and convert
        try:
            int(np.ones(1, dtype=np.int32))
        except TypeError:
            return True
    return False


def _index(tensor) -> int:
    return int(tensor.handle.data.item())


def patch() -> bool:
    """Make the interpreter's scalar `__index__` NumPy-proof; True when the patch is (already) in place."""
    if os.environ.get("TRITON_INTERPRET") != "1" or not _numpy_rejects_1d_int():
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None:  # a Triton whose interpreter is laid out differently: leave it alone
        return False
    if getattr(original, "scalar_index_patched", False):
        return True

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patch_lang_tensor.scalar_index_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
