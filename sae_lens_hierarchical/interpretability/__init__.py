"""Interpretability at every budget k: latent dashboards, sparse probing, feature absorption and the coarse-to-fine
view of a HierarchicalTopK SAE's ranks, each for any TopK-family SAE (truncated to k) so baselines score alike.

SAEBench's and sae_dashboard's published definitions, implemented here: neither package installs beside
sae-lens 6.54 (they pin older transformer-lens / datasets / numpy).
"""

from sae_lens_hierarchical.interpretability.absorption import AbsorptionConfig, absorption_over_k
from sae_lens_hierarchical.interpretability.absorption_report import format_absorption_table, plot_absorption
from sae_lens_hierarchical.interpretability.absorption_results import AbsorptionResults
from sae_lens_hierarchical.interpretability.coarse_to_fine import (
    CoarseToFine,
    coarse_to_fine,
    format_coarse_to_fine_table,
    plot_coarse_to_fine,
)
from sae_lens_hierarchical.interpretability.dashboard import (
    LatentDashboard,
    collect_latent_statistics,
    latent_dashboard,
)
from sae_lens_hierarchical.interpretability.document_selection import DocumentSpec
from sae_lens_hierarchical.interpretability.documents import LabelledDocuments, labelled_documents
from sae_lens_hierarchical.interpretability.first_letter import FirstLetterProbe, FirstLetterTask, first_letter_probe
from sae_lens_hierarchical.interpretability.probing import residual_probing, sparse_probing
from sae_lens_hierarchical.interpretability.probing_report import format_probing_table, plot_sparse_probing
from sae_lens_hierarchical.interpretability.probing_results import SparseProbingResults

__all__ = [
    "AbsorptionConfig",
    "AbsorptionResults",
    "CoarseToFine",
    "DocumentSpec",
    "FirstLetterProbe",
    "FirstLetterTask",
    "LabelledDocuments",
    "LatentDashboard",
    "SparseProbingResults",
    "absorption_over_k",
    "coarse_to_fine",
    "collect_latent_statistics",
    "first_letter_probe",
    "format_absorption_table",
    "format_coarse_to_fine_table",
    "format_probing_table",
    "labelled_documents",
    "latent_dashboard",
    "plot_absorption",
    "plot_coarse_to_fine",
    "plot_sparse_probing",
    "residual_probing",
    "sparse_probing",
]
