"""facetrain.models"""
