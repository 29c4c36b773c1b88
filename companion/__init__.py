"""Companion package of the book *Low-Precision Numerics for Deep Learning*."""
__version__ = "0.1.0"
