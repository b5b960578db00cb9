"""``python -m sae_lens_hierarchical`` runs the command-line interface."""

from sae_lens_hierarchical.cli import main

if __name__ == "__main__":
    main()
