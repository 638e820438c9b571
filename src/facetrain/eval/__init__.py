"""facetrain.eval"""
