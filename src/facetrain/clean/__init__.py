"""facetrain.clean"""
