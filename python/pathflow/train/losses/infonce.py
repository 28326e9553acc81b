"""InfoNCE against a queue of negative keys, and the queue (MoCo, He et al. 2020; v2, Chen
et al. 2020; facebookresearch/moco).

For l2-normalised queries ``q_i``, their positive keys ``k_i`` (the other view through the
momentum encoder, no gradient) and the ``K`` keys ``n_j`` of the queue::

    logits_i = [q_i . k_i, q_i . n_1, ..., q_i . n_K] / T
    loss     = mean_i  -log softmax(logits_i)[0]                  (cross-entropy, label 0)

:class:`KeyQueue` keeps the ``K`` most recent keys in a ``[K, dim]`` buffer (``keys``) with a
write pointer (``ptr``): each batch of ``n`` keys overwrites rows ``ptr, ..., ptr + n - 1``
modulo ``K`` (the oldest), then ``ptr <- (ptr + n) mod K``. Unlike facebookresearch/moco, ``K``
need not be a multiple of the batch: writes wrap around the end. Both are buffers, so the
queue is part of the method's ``state_dict`` and a resumed run continues with it.

Example:
    >>> import torch
    >>> from pathflow.train.losses import InfoNCELoss, KeyQueue
    >>> queue = KeyQueue(size=6, dim=4)
    >>> q, k = torch.randn(4, 4), torch.randn(4, 4)
    >>> InfoNCELoss(0.2)(q, k, queue.keys).ndim
    0
    >>> queue.enqueue(k); queue.enqueue(k); int(queue.ptr)  # 8 keys into 6 rows
    2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InfoNCELoss(nn.Module):
    """Cross-entropy of each query against its positive key (first logit) and the negatives,
    at temperature ``temperature``; queries and keys are l2-normalised here, the negatives
    are used as given (a :class:`KeyQueue` holds normalised keys). No gradient flows to
    the keys or the negatives. Computed in float32."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor) -> Tensor:
        q = F.normalize(query.float(), dim=1)
        k = F.normalize(key.detach().float(), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
        l_neg = q @ negatives.detach().float().T  # [N, K]
        logits = torch.cat([l_pos, l_neg], dim=1) / self.temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


class KeyQueue(nn.Module):
    """First-in first-out queue of ``size`` keys of width ``dim`` (buffers ``keys`` and
    ``ptr``), initialised with random unit vectors as facebookresearch/moco."""

    keys: Tensor
    ptr: Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def size(self) -> int:
        return int(self.keys.shape[0])

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Replace the oldest rows by ``keys`` (``[n, dim]``; in order, wrapping around);
        when ``n > size`` only the last ``size`` keys stay."""
        n, size = keys.shape[0], self.size
        ptr = int(self.ptr)
        if n > size:
            ptr, keys = (ptr + n - size) % size, keys[n - size :]
        rows = (ptr + torch.arange(keys.shape[0], device=self.keys.device)) % size
        self.keys[rows] = keys.to(self.keys.dtype)
        self.ptr[0] = (int(self.ptr) + n) % size


__all__ = ["InfoNCELoss", "KeyQueue"]
