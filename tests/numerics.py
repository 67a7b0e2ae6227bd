"""Shared tolerances of the operator tests: parallel == recurrent == reference within these."""

import torch

TOL = {torch.float64: 1e-8, torch.float32: 2e-3}
DTYPES = [torch.float64, torch.float32]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ||a - b|| / ||b||, computed in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
