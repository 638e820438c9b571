"""facetrain.align"""
