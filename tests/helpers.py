"""Test data shared by the test modules."""

import numpy as np
import torch


def array(shape, seed, scale=1.0):
    """Float64 standard-normal data from NumPy's PCG64: identical on every platform and
    torch version, so golden values stay valid."""
    return np.random.default_rng(seed).standard_normal(shape) * scale


def tensor(shape, seed, scale=1.0, requires_grad=False):
    return torch.tensor(array(shape, seed, scale), dtype=torch.float64, requires_grad=requires_grad)
