"""Interpretability at every budget k: latent dashboards, sparse probing, feature absorption and the coarse-to-fine
view of a HierarchicalTopK SAE's ranks, each for any TopK-family SAE (truncated to k) so baselines score alike.

SAEBench's and sae_dashboard's published definitions, implemented here: neither package installs beside
sae-lens 6.54 (they pin older transformer-lens / datasets / numpy).
"""
