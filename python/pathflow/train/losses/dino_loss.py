"""DINO loss: cross-entropy between the centred, sharpened teacher distribution of each
global view and the student distribution of every other view (facebookresearch/dino).

For teacher global view ``q`` and student view ``v != q``::

    P_t = softmax((t_q - C) / tau_t)          tau_t: teacher temperature (warmup 0.04 -> 0.07)
    loss_qv = mean_b  sum_k  -P_t[b, k] * log_softmax(s_v / tau_s)[b, k]     tau_s = 0.1
    loss = mean over the (q, v) pairs

then the centre is updated with the teacher outputs of the whole (all-reduced) batch:
``C <- m C + (1 - m) mean(t)`` with ``m = 0.9``.

Example:
    >>> import numpy as np, torch
    >>> from pathflow.train.losses import DINOLoss
    >>> loss = DINOLoss(out_dim=8, teacher_temps=np.full(10, 0.04))
    >>> student, teacher = torch.randn(4 * 2, 8), torch.randn(2 * 2, 8)  # batch 2
    >>> loss(student, teacher, step=0).ndim
    0
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.train.distributed import all_reduce_sum, get_world_size


class DINOLoss(nn.Module):
    """Args:
    out_dim: number of prototypes (DINO head ``out_dim``).
    teacher_temps: teacher temperature for each step (see
        :func:`pathflow.train.schedules.warmup_constant_schedule`); steps past the end
        use the last value.
    student_temp: student temperature (0.1).
    center_momentum: centre EMA momentum (0.9).
    n_global: views given to the teacher (the first ``n_global`` student views).
    """

    center: Tensor

    def __init__(
        self,
        out_dim: int,
        teacher_temps: npt.ArrayLike,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        n_global: int = 2,
    ) -> None:
        super().__init__()
        self.n_global = n_global
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.teacher_temps = np.asarray(teacher_temps, dtype=np.float64)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temp(self, step: int) -> float:
        return float(self.teacher_temps[min(step, len(self.teacher_temps) - 1)])

    def forward(
        self, student_output: Tensor, teacher_output: Tensor, step: int, update_center: bool = True
    ) -> Tensor:
        """``student_output``: ``[ncrops * B, out_dim]`` (views stacked in order, the first
        ``n_global`` being the teacher's), ``teacher_output``: ``[n_global * B, out_dim]``.
        Returns the scalar loss and updates the centre (unless ``update_center`` is False:
        the trainer's DINO updates it after the step, once the loss is known to be finite)."""
        batch = teacher_output.shape[0] // self.n_global
        ncrops = student_output.shape[0] // batch
        student_out = (student_output.float() / self.student_temp).chunk(ncrops)
        temp = self.teacher_temp(step)
        teacher_float = teacher_output.detach().float()
        teacher_out = F.softmax((teacher_float - self.center) / temp, dim=-1).chunk(self.n_global)

        total = student_output.new_zeros((), dtype=torch.float32)
        n_terms = 0
        for iq, q in enumerate(teacher_out):
            for v, s in enumerate(student_out):
                if v == iq:
                    continue  # skip the teacher's own view
                total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
                n_terms += 1
        if update_center:
            self.update_center(teacher_float)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """EMA of the teacher output mean over the global batch (all ranks)."""
        batch_center = all_reduce_sum(torch.sum(teacher_output, dim=0, keepdim=True))
        batch_center = batch_center / (len(teacher_output) * get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))
