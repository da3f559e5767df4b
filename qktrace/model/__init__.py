"""Models: architecture families, loading (local, GGUF, named, the shipped organism), NDIF
access, and the tiny random models of the tests.
"""
