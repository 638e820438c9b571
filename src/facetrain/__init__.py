"""facetrain: train, evaluate, clean and deploy face-recognition embedding models on PyTorch."""

__version__ = "0.1.0"
