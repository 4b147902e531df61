"""Architectures of the bundled models: small 3D CNNs in the spirit of Eitel et al. (2022).

3x3x3 convolution blocks (conv, batch norm, ReLU; the first may be strided), max pooling between them, a global pooling and a small fully
connected head. Each block is one named module (``conv1`` ... ``conv4``) whose output is a post-ReLU activation:
these are the layers feature visualization and Grad-CAM target.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm3d(c_out), nn.ReLU())


class ScanCNN(nn.Module):
    """Four conv blocks, three 2x poolings, global max or average pooling, a linear head.

    Args:
        channels: output channels of ``conv1`` ... ``conv4``.
        n_classes: number of output logits.
        hidden: width of the hidden linear layer; 0 for none (the bundled models).
        pool: ``max`` (finds small focal findings such as lesions) or ``avg`` (diffuse findings such as atrophy).
        dropout: dropout before the last linear layer (training only).
        stem_stride: stride of ``conv1``. 2 looks at every 2 mm voxel but computes its 8 channels at 4 mm, which
            makes training on 2 CPU cores feasible (the bundled models use 2).
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (8, 16, 32, 64),
        n_classes: int = 2,
        hidden: int = 32,
        pool: str = "max",
        dropout: float = 0.3,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', not {pool!r}")
        c1, c2, c3, c4 = channels
        self.conv1 = _block(1, c1, stem_stride)
        self.pool1 = nn.MaxPool3d(2)
        self.conv2 = _block(c1, c2)
        self.pool2 = nn.MaxPool3d(2)
        self.conv3 = _block(c2, c3)
        self.pool3 = nn.MaxPool3d(2)
        self.conv4 = _block(c3, c4)
        self.global_pool = nn.AdaptiveMaxPool3d(1) if pool == "max" else nn.AdaptiveAvgPool3d(1)
        # hidden=0 gives a linear head straight on the pooled features. A ReLU hidden layer without normalisation
        # can die during training (every unit negative for every scan), which collapsed the output to a constant.
        self.fc1 = nn.Linear(c4, hidden) if hidden else None
        self.act_fc = nn.ReLU() if hidden else None
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden or c4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W) -> (B, n_classes)
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.pool3(self.conv3(x))
        x = self.global_pool(self.conv4(x))
        x = torch.flatten(x, 1)  # torch.flatten, not nn.Flatten: captum's LRP rejects the module
        if self.fc1 is not None and self.act_fc is not None:
            x = self.act_fc(self.fc1(x))
        return self.fc2(self.dropout(x))
