"""My own model: a small multi-layer perceptron for tabular features.

This file is what a user writes: a plain PyTorch ``nn.Module`` and a ``build(**kwargs)``
factory that returns it. SparseFleet never imports anything of yours but the factory named in
the run file (``run.model.factory: "wine_model:build"``), with the ``kwargs`` written there.
The module must be importable by the fleet manager and by every device: here it is put on
``PYTHONPATH`` (``PYTHONPATH=examples/byo``); on real devices it is an installed package.

Input: a batch ``[N, features]`` of float32 features (one CSV row each, standardised by
``prepare_wine.py``); output: ``[N, classes]`` logits (the fleet trains with cross-entropy).
"""

from __future__ import annotations

import torch
from torch import nn


class TabularMLP(nn.Module):
    """``features`` -> ``hidden`` -> ``hidden`` -> ``classes`` with ReLU and dropout.

    Only the ``nn.Linear`` weights are pruned by FedDST (the default ``run.prunable``), so the
    sparse mask covers ``fc1``, ``fc2`` and ``out``.
    """

    def __init__(self, features: int, hidden: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # [N, features]
        x = self.drop(torch.relu(self.fc1(x)))
        x = self.drop(torch.relu(self.fc2(x)))
        logits: torch.Tensor = self.out(x)  # [N, classes]
        return logits


def build(
    features: int = 13, hidden: int = 32, classes: int = 3, dropout: float = 0.1
) -> nn.Module:
    """The factory the run file names. Every keyword is a JSON value from ``run.model.kwargs``;
    the same kwargs must build the same architecture on every device (its digest is checked)."""
    return TabularMLP(features, hidden, classes, dropout)
