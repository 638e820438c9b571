"""facetrain.clean: data-quality tools.

- :mod:`.subcenter`: Sub-center ArcFace drop of noisy images (``facetrain clean subcenter``).
- :mod:`.graph`: quality-aware k-NN graph clustering / per-identity filtering vs DBSCAN (``facetrain clean graph``).
- :mod:`.quality`: face-quality scores from BatchNorm statistics (``facetrain quality fit|score``).
- :mod:`.bn_finetune`: BatchNorm statistics fine-tuning (``facetrain finetune-bn``).
- :mod:`.distill_data`: teacher embeddings for distillation (``facetrain distill-dataset``).

Submodules are imported on use (torch, scikit-learn and scipy are loaded lazily).
"""
