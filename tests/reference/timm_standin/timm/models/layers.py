"""`DropPath`, `to_2tuple`, `trunc_normal_` as timm defines them, for MobileSAM's TinyViT."""

import collections.abc
from itertools import repeat

import torch
from torch.nn.init import trunc_normal_

__all__ = ["DropPath", "to_2tuple", "trunc_normal_"]


def to_2tuple(x):
    """An iterable (not a string) passes through as a tuple; anything else is repeated twice."""
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return tuple(repeat(x, 2))


def drop_path(x, drop_prob: float = 0.0, training: bool = False, scale_by_keep: bool = True):
    """Stochastic depth per sample: identity unless training with drop_prob > 0."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        mask.div_(keep)
    return x * mask


class DropPath(torch.nn.Module):
    """Stochastic depth (timm.layers.DropPath)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)
