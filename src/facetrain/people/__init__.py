"""facetrain.people"""
