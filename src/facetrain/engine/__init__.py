"""facetrain.engine"""
