"""Measurement tooling: speed, memory, quality against linear codes, recipe comparison.

Nothing in the product (training, inference, evaluation) imports this package.
"""
