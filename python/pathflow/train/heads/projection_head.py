"""SimCLR projection head (Chen et al. 2020, v2 / lightly ``SimCLRProjectionHead``).

``Linear(in, 2048) - BN - ReLU - Linear(2048, 2048) - BN - ReLU - Linear(2048, 128)``; the
linear layers before a BatchNorm have no bias. The BatchNorms compute their statistics over
the *global* batch when a process group is running (:class:`GlobalBatchNorm1d`), as SimCLR's
global BN does: on any device, including gloo on CPU where ``nn.SyncBatchNorm`` is not
available, so DDP gives the gradients of one process on the concatenated batch.

Example:
    >>> import torch
    >>> from pathflow.train.heads import SimCLRProjectionHead
    >>> SimCLRProjectionHead(384)(torch.randn(8, 384)).shape
    torch.Size([8, 128])
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.train.distributed import gather_with_grad, get_rank, is_dist


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics are those of the batch gathered from all
    ranks (gradient-preserving gather; every rank updates identical running statistics).
    Without a process group, or in eval mode, it is a plain ``BatchNorm1d``."""

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        n = x.shape[0]
        full = gather_with_grad(x)
        y = F.batch_norm(
            full,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=True,
            momentum=self.momentum if self.momentum is not None else 0.1,
            eps=self.eps,
        )
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        rank = get_rank()
        return y[rank * n : (rank + 1) * n]


class SimCLRProjectionHead(nn.Module):
    """``num_layers`` linear layers, BatchNorm + ReLU after all but the last."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 128,
        num_layers: int = 3,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=last or not batch_norm))
            if not last:
                if batch_norm:
                    layers.append(GlobalBatchNorm1d(dims[i + 1]))
                layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
