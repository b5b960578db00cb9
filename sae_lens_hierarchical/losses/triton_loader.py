"""The one entry point to the Triton loss: triton is an optional dependency, so its kernels' module is imported only
when the loss is first called, by the dispatch (``HIERARCHICAL_LOSSES["triton"]``) and by the self-check alike."""

from __future__ import annotations

from typing import Any

from sae_lens_hierarchical.accelerators import triton_available
from sae_lens_hierarchical.losses._common import HierarchicalMSE


def hierarchical_mse_triton(*args: Any, **kwargs: Any) -> HierarchicalMSE:
    """Memory-flat loss in Triton kernels, for CUDA tensors: see :mod:`sae_lens_hierarchical.losses.triton_kernels`.

    Same arguments and result as :func:`~sae_lens_hierarchical.losses.fused.hierarchical_mse_fused`. The kernels'
    module is imported on first use, so that everything else works without triton installed.
    """
    if not triton_available():
        raise ImportError("the Triton loss needs triton: pip install 'sae-lens-hierarchical[gpu]'")
    from sae_lens_hierarchical.losses.triton_kernels import hierarchical_mse_triton as triton_loss

    return triton_loss(*args, **kwargs)
