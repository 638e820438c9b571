"""facetrain.heads"""
