"""facetrain.data"""
