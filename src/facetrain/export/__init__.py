"""facetrain.export"""
