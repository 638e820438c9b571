"""Entry point for ``python -m facetrain`` and ``torchrun -m facetrain train ...``."""

from facetrain.cli import main

if __name__ == "__main__":
    main()
