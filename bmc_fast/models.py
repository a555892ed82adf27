"""Backbones. A model maps ``x -> (logits [N, C], features [N, D])``; the features are the
penultimate activations used by the feature-mode stability and distillation losses."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResMLP"]


class _ResBlock(nn.Module):
    """fc-BN-ReLU-fc-BN plus a Linear-BN shortcut, then ReLU and dropout."""

    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)
        self.fc2, self.bn2 = nn.Linear(d_out, d_out), nn.BatchNorm1d(d_out)
        self.short, self.bn_s = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))
        return self.drop(torch.relu(h + self.bn_s(self.short(x))))


class ResMLP(nn.Module):
    """The backbone of the BMC reference benchmark (BMC-SPEC §2): input -> Linear(128) with no
    activation -> residual blocks 128->256 and 256->256 (dropout after each) -> features (256)
    -> linear head. Xavier-normal initialisation."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 128, width: int = 256,
                 dropout: float = 0.3):
        super().__init__()
        if input_dim < 1 or num_classes < 1:
            raise ValueError(f"input_dim and num_classes must be >= 1, got {input_dim}, {num_classes}")
        self.input_dim, self.num_classes, self.feature_dim = input_dim, num_classes, width
        self.proj = nn.Linear(input_dim, hidden)
        self.block1 = _ResBlock(hidden, width, dropout)
        self.block2 = _ResBlock(width, width, dropout)
        self.head = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        h = self.block2(self.block1(self.proj(x.flatten(1))))
        return self.head(h), h
