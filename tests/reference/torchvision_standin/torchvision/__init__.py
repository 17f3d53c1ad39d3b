"""Test-only stand-in for torchvision (see ../README.md)."""

__version__ = "0.0.0+sam_jax_standin"
