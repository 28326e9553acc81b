"""NT-Xent (normalised temperature-scaled cross-entropy), the SimCLR loss.

For ``N`` images with embeddings ``a_i``, ``b_i`` of their two views (l2-normalised), each of
the ``2N`` anchors has one positive (its other view) and ``2N - 2`` negatives (every other
embedding except itself)::

    loss_i = -log( exp(sim(i, pos(i)) / T) / sum_{k != i} exp(sim(i, k) / T) )
    loss = mean over the 2N anchors

Under ``torch.distributed`` the candidates are gathered from all ranks with a
gradient-preserving ``all_gather`` (``2 N_global - 2`` negatives) while the anchors are the
local ones, as lightly's ``NTXentLoss(gather_distributed=True)``: with DDP the gradients are
those of one process on the concatenated batch.

Example:
    >>> import torch
    >>> from pathflow.train.losses import NTXentLoss
    >>> a = torch.randn(4, 16)
    >>> bool(NTXentLoss(0.1)(a, a) < NTXentLoss(0.1)(a, torch.randn(4, 16)))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.train.distributed import gather_with_grad, get_rank


class NTXentLoss(nn.Module):
    """SimCLR's contrastive loss on two batches of embeddings (rows pair up)."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        n = z_a.shape[0]
        z_a = F.normalize(z_a.float(), dim=1)
        z_b = F.normalize(z_b.float(), dim=1)
        if self.gather_distributed:
            all_a, all_b = gather_with_grad(z_a), gather_with_grad(z_b)
        else:
            all_a, all_b = z_a, z_b
        offset = get_rank() * n if all_a.shape[0] != n else 0
        candidates = torch.cat([all_a, all_b], dim=0)  # [2M, d]; a-views then b-views
        m = all_a.shape[0]
        anchors = torch.cat([z_a, z_b], dim=0)  # [2n, d]
        logits = anchors @ candidates.T / self.temperature  # [2n, 2M]
        local = torch.arange(n, device=z_a.device) + offset
        self_idx = torch.cat([local, local + m])  # each anchor's own column
        pos_idx = torch.cat([local + m, local])  # its other view
        rows = torch.arange(2 * n, device=z_a.device)
        logits[rows, self_idx] = float("-inf")
        return F.cross_entropy(logits, pos_idx)
