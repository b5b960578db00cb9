"""What this machine can run beyond torch: whether triton imports.

A leaf module: the loss package (which picks its Triton kernels through it), the sparse training step (its Triton
scatter) and ``doctor`` ask it, and it asks nothing of them.
"""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once; the package itself never needs it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
