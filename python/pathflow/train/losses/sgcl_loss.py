"""SGCL's loss over a memory bank of every training sample (Lin et al., "SGCL: Spatial guided
contrastive learning on whole-slide pathological images", Medical Image Analysis 2023; its
MICCAI 2021 precursor SSLP, Li, Lin & Xu; reference code HHHedo/SGCL: the ``SpatialCL`` class
of ``openselfsup/models/spatialcl.py`` with its config ``configs/selfsup/sslp/spatialcl.py``).

Notation: ``q_i`` the L2-normalised embedding of anchor ``i`` (one augmented view of sample
``n_i``), ``v_j`` row ``j`` of the bank (L2-normalised, no gradient), ``N`` the bank size,
``tau`` the temperature (0.07) and ``s_ij = exp(q_i . v_j / tau)``.

Positives of anchor ``i``:

* instance: ``v_{n_i}``, the bank entry of its own sample (self-invariance);
* spatial ``P_i`` (intra-invariance): entries of the same slide at a level-0 distance
  ``0 < d < radius`` grid steps (3; a grid step is the anchor's level-0 patch size);
* semantic ``C_i`` (inter-invariance): the anchor and its ``aux`` (1) most similar spatial
  positives each take their ``topk`` (4096) most similar bank entries (themselves left out);
  the entries whose cluster label equals the anchor's (the auxiliary anchor's) in *all* of
  the k-means runs are kept; ``C_i`` is their union, ``n_i`` left out.

Mined negatives ``K_i`` (:func:`mine_negatives`): the entries that are no positive, ranked
by similarity to ``q_i``; of the top ``fraction`` (20 %) of the bank, ``M = floor(0.2 N)``
ranks, ``k`` (4096) are drawn without replacement with probability ``∝ Beta(5, 15)`` density
at ``(r + 0.5) / M`` for rank ``r`` (so mostly around the 25th percentile of the hardest
20 %), the same ranks for every anchor of a step. ``S_i = sum_{j in K_i} s_ij``.

Terms, each a mean over the ``B`` anchors::

    instance = 1/B sum_i  -log( s_{i n_i} / (s_{i n_i} + S_i) )
    spatial  = 1/B sum_{i: P_i not empty}  -log( sum_{p in P_i} s_ip / (sum_{p in P_i} s_ip + S_i) )
    semantic = 1/B sum_{i: C_i not empty}  -log( sum_{c in C_i} s_ic / (s_ic + S_i) )
    loss     = weight * (instance + w(t) * (spatial + semantic))     weight = 1
    w(t)     = exp(-5 (1 - t)^2),  t = min(step / ramp-up steps, 1)   (10 epochs)

What ``SpatialCL.forward_train`` computes, term by term: the spatial term sums its positives
inside the log (``s_pos_spatial``); the semantic term sums the per-positive fractions ``s_ic
/ (s_ic + S_i)`` inside the log (``torch.sum(similar_fraction, dim=1)``), so it can be
negative when several positives are close; ``semantic_reduction="mean"`` averages them
instead (``-log(1/|C_i| sum ...)``, ``log |C_i|`` more per anchor: what pathflow computed
before it was checked against the reference, kept as an option). The instance term is its
``ContrastiveHead`` (cross-entropy over the positive and the mined negatives). The total is
OpenSelfSup's sum of the loss entries, ``loss_contra_single + w * loss_contra_spatial + w *
loss_contra_sementic``: weight 1 (the class's ``loss_lambda``, 1/2 in the config, is stored
but never used). ``tau`` is ``head.temperature``, 0.07 in ``spatialcl.py``, for all three
terms. The defaults ``aux`` 1 and ``topk`` 4096 are ``aux_num`` and ``nei_k`` of
``spatialcl.py`` (and of the multi-crop ``npidsslpmcrop.py``); 3 and 2048 are those of the
ablation ``ablation/no_spatial_aux3.py``.

Differences from the reference, on purpose: anchors without spatial (semantic) positives add
0 (the reference adds the constant ``-log(1e-7)``, which has no gradient), so every term is a
plain mean over anchors and DDP's average of the ranks' losses is the loss of the global
batch; the logs are exact (the reference adds 1e-7 inside the spatial and semantic logs);
auxiliary anchors are spatial positives only (the reference's ``topk`` may pick
non-neighbours when an anchor has fewer than ``aux`` of them), a neighbour search leaves its
own entry out (the reference sets its similarity to 0, which can still rank it) and ``C_i``
never holds ``n_i`` (the reference keeps it when an auxiliary anchor's search finds it); mined
negatives exclude the positives (the reference zeroes their similarities, which can still
rank them in the top 20 %); one draw of ranks serves all three terms (the reference draws
the ranks three times, one set per term, from the same ranking); the rank profile is the
Beta density (the reference interpolates a histogram of 10^6 samples); the ramp-up is
evaluated per step, not per epoch.

Multi-crop (the published ``npidsslpmcrop.py``, class ``SpatialCLMcrop``: 1 x 224 + 4 x 96
crops, one local crop from each quadrant of the patch): :func:`local_instance_loss` is its
``loss_contra_mcrop``, instance discrimination of each local crop against a bank of its own
(one per local crop position), with uniformly drawn negatives (65536, a quarter from each
local bank) at temperature 0.2 (``head.temperature`` of that config). One draw serves every
local crop of a step (the reference draws each crop's own), so that, as for the mined
negatives, DDP's average of the ranks' losses is the loss of the global batch; see
:mod:`pathflow.train.methods.sgcl` for what of ``SpatialCLMcrop`` is and is not reproduced.

Example:
    >>> import torch
    >>> from pathflow.train.losses.sgcl_loss import beta_rank_profile, rampup_weight
    >>> round(rampup_weight(0, 10), 4), round(rampup_weight(5, 10), 4), rampup_weight(10, 10)
    (0.0067, 0.2865, 1.0)
    >>> p = beta_rank_profile(100)
    >>> round(float(p.sum()), 6), int(p.argmax())  # mode of Beta(5, 15) at 4/18 of the ranks
    (1.0, 22)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rampup_weight(step: int, length: int) -> float:
    """``exp(-5 (1 - t)^2)`` with ``t = min(step / length, 1)`` (Laine & Aila's sigmoid
    ramp-up, as SSLP's ``semnetic_weight``); 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0) / length, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def beta_rank_profile(m: int, a: float = 5.0, b: float = 15.0) -> Tensor:
    """Probabilities of ranks ``0..m-1``: the Beta(``a``, ``b``) density at ``(r + 0.5) / m``,
    normalised to sum 1 (float64). The reference draws a 100-bin histogram of 10^6 Beta
    samples and interpolates it to ``m`` ranks; the density itself is used here."""
    if m < 1:
        raise ValueError(f"need at least one rank, got {m}")
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    log_pdf = (a - 1) * torch.log(u) + (b - 1) * torch.log1p(-u)
    p = torch.exp(log_pdf - log_pdf.max())
    return p / p.sum()


@torch.no_grad()
def spatial_positive_mask(
    anchor: Tensor, slide: Tensor, x: Tensor, y: Tensor, grid: Tensor, radius: float
) -> Tensor:
    """``[B, N]`` bool: entry ``j`` is on anchor ``i``'s slide at ``0 < d < radius`` grid
    steps, ``d = ||(x_j - x_i, y_j - y_i)|| / grid_i`` (level-0 pixels). Entries with slide
    code ``-1`` (position unknown) are nobody's neighbours. Only the entries of the anchors'
    slides are compared (``[B, L]``, ``L`` the largest of those slides), not the whole bank."""
    b, n = anchor.shape[0], slide.shape[0]
    out = torch.zeros(b, n, dtype=torch.bool, device=slide.device)
    order = torch.argsort(slide, stable=True)
    ordered = slide[order].contiguous()
    s = slide[anchor].contiguous()
    start = torch.searchsorted(ordered, s)
    length = torch.searchsorted(ordered, s, right=True) - start
    length = torch.where(s >= 0, length, torch.zeros_like(length))
    width = int(length.max()) if b else 0
    if width == 0:
        return out
    offs = torch.arange(width, device=slide.device)
    valid = offs[None, :] < length[:, None]
    cand = order[(start[:, None] + offs[None, :]).clamp_max(n - 1)]  # [B, L]
    step = grid[anchor].clamp_min(1).double()[:, None]
    dx = (x[cand] - x[anchor][:, None]).double() / step
    dy = (y[cand] - y[anchor][:, None]).double() / step
    d2 = dx * dx + dy * dy
    hit = valid & (d2 > 0) & (d2 < radius * radius)
    rows = torch.arange(b, device=slide.device)[:, None].expand_as(cand)
    out[rows[hit], cand[hit]] = True
    return out


@torch.no_grad()
def semantic_positive_mask(
    q: Tensor,
    anchor: Tensor,
    bank: Tensor,
    labels: Tensor,
    spatial: Tensor,
    topk: int,
    aux: int,
    chunk: int = 256,
) -> Tensor:
    """``[B, N]`` bool: the semantic positives ``C_i`` (module docstring). ``labels``
    ``[R, N]`` are the cluster labels of the ``R`` k-means runs; the (auxiliary) anchors'
    neighbours are searched ``chunk`` anchors at a time."""
    b, n = q.shape[0], bank.shape[0]
    sims = q.float() @ bank.float().T  # [B, N]
    feats, owners, own = [q.float()], [torch.arange(b, device=q.device)], [anchor]
    if aux > 0 and spatial.any():
        k = min(aux, n)
        masked = sims.masked_fill(~spatial, float("-inf"))
        val, idx = masked.topk(k, dim=1)  # the most similar spatial neighbours
        ok = torch.isfinite(val)
        rows = torch.arange(b, device=q.device)[:, None].expand(b, k)[ok]
        feats.append(bank[idx[ok]].float())
        owners.append(rows)
        own.append(idx[ok])
    f, owner, idx_self = torch.cat(feats), torch.cat(owners), torch.cat(own)
    t = min(topk, n - 1)
    out = torch.zeros(b, n, dtype=torch.bool, device=q.device)
    if t < 1:
        return out
    for c in range(0, f.shape[0], chunk):  # [chunk, N] similarities at a time
        fc, oc, ic = f[c : c + chunk], owner[c : c + chunk], idx_self[c : c + chunk]
        s = fc @ bank.float().T
        s[torch.arange(fc.shape[0], device=q.device), ic] = float("-inf")  # not itself
        near = s.topk(t, dim=1).indices  # [chunk, t]
        same = (labels[:, near] == labels[:, ic][:, :, None]).all(dim=0)
        rows = oc[:, None].expand_as(near)
        out[rows[same], near[same]] = True
    out[torch.arange(b, device=q.device), anchor] = False
    return out


@torch.no_grad()
def mine_negatives(
    logits: Tensor,
    positives: Tensor,
    num: int,
    fraction: float,
    generator: torch.Generator,
    beta: tuple[float, float] = (5.0, 15.0),
) -> tuple[Tensor, Tensor]:
    """``[B, k]`` bank indices of the mined negatives (module docstring) and a ``[B, k]``
    mask of the ones that are real negatives (False where fewer than ``M`` entries are no
    positive, so a drawn rank holds a positive). ``generator`` (CPU) draws the ranks."""
    n = logits.shape[1]
    m = max(1, min(n, int(fraction * n)))
    k = min(num, m)
    ranked = logits.float().masked_fill(positives, float("-inf")).topk(m, dim=1)
    ranks = torch.multinomial(beta_rank_profile(m, *beta), k, generator=generator)
    ranks = ranks.to(logits.device)
    return ranked.indices[:, ranks], torch.isfinite(ranked.values[:, ranks])


#: How the semantic term combines its per-positive fractions inside the log.
SEMANTIC_REDUCTIONS = ("sum", "mean")


@dataclass
class SGCLTerms:
    """The loss terms of one batch (0-d tensors) and positive counts per anchor (means)."""

    instance: Tensor
    spatial: Tensor
    semantic: Tensor
    spatial_positives: Tensor
    semantic_positives: Tensor


def _row_logsumexp(values: Tensor, rows: Tensor, b: int) -> Tensor:
    """``log sum_{k: rows_k = i} exp(values_k)`` for ``i < b`` (``-inf`` for rows without
    entries), differentiable in ``values``."""
    shift = torch.full((b,), float("-inf"), device=values.device, dtype=values.dtype)
    shift = shift.scatter_reduce(0, rows, values.detach(), "amax", include_self=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = torch.zeros(b, device=values.device, dtype=values.dtype)
    total = total.index_add(0, rows, torch.exp(values - shift[rows]))
    return torch.log(total) + shift


def sgcl_terms(
    q: Tensor,
    anchor: Tensor,
    bank: Tensor,
    spatial: Tensor,
    semantic: Tensor,
    negatives: Tensor,
    negative_ok: Tensor,
    temperature: float,
    semantic_reduction: str = "sum",
) -> SGCLTerms:
    """The three terms (module docstring) of queries ``q`` ``[B, d]`` (normalised here)
    against ``bank`` ``[N, d]`` (detached), with the positive masks ``[B, N]`` and the mined
    negatives ``[B, k]``; ``semantic_reduction`` ``sum`` (the reference) or ``mean`` of the
    semantic fractions inside the log. Computed in float32, in log space; apart from the
    ``[B, N]`` similarities, only the positives' and negatives' entries are materialised."""
    if semantic_reduction not in SEMANTIC_REDUCTIONS:
        raise ValueError(
            f"semantic_reduction must be one of {', '.join(SEMANTIC_REDUCTIONS)}, "
            f"got {semantic_reduction!r}"
        )
    q = F.normalize(q.float(), dim=1)
    v = bank.detach().float()
    logits = q @ v.T / temperature  # log s_ij, [B, N]
    b = q.shape[0]
    rows = torch.arange(b, device=q.device)
    neg = logits.gather(1, negatives).masked_fill(~negative_ok, float("-inf"))
    log_s_neg = torch.logsumexp(neg, dim=1)  # log S_i
    pos = logits[rows, anchor]
    instance = (torch.logaddexp(pos, log_s_neg) - pos).mean()

    zero = torch.zeros((), device=q.device)
    r, c = spatial.nonzero(as_tuple=True)
    spatial_term = zero
    if r.numel():
        lsp = _row_logsumexp(logits[r, c], r, b)  # log sum_{p in P_i} s_ip
        has = spatial.any(dim=1)
        sp = torch.logaddexp(lsp, log_s_neg) - lsp
        spatial_term = torch.where(has, sp, torch.zeros_like(sp)).sum() / b

    r, c = semantic.nonzero(as_tuple=True)
    semantic_term = zero
    if r.numel():
        lc = logits[r, c]
        log_frac = lc - torch.logaddexp(lc, log_s_neg[r])  # log( s_ic / (s_ic + S_i) )
        se = -_row_logsumexp(log_frac, r, b)  # -log sum_{c in C_i} s_ic / (s_ic + S_i)
        if semantic_reduction == "mean":
            se = se + torch.log(semantic.sum(dim=1).clamp_min(1).float())
        has = semantic.any(dim=1)
        semantic_term = torch.where(has, se, torch.zeros_like(se)).sum() / b
    return SGCLTerms(
        instance=instance,
        spatial=spatial_term,
        semantic=semantic_term,
        spatial_positives=spatial.sum(dim=1).float().mean().detach(),
        semantic_positives=semantic.sum(dim=1).float().mean().detach(),
    )


def local_instance_loss(
    q: Tensor,
    banks: Tensor,
    own_bank: Tensor,
    index: Tensor,
    negatives: Tensor,
    temperature: float,
) -> Tensor:
    """``SpatialCLMcrop``'s ``loss_contra_mcrop``: with ``p_r = banks[own_bank_r, index_r]``
    and ``n_gk = banks[g, negatives[g, k]]``, ``1/R sum_r -log( exp(q_r . p_r / tau) /
    (exp(q_r . p_r / tau) + sum_{g, k} exp(q_r . n_gk / tau)) )`` for local-crop queries
    ``q`` ``[R, d]`` (normalised here), the ``[G, N, d]`` local banks (detached) and the
    negatives' bank indices ``[G, k]``, the same for every row. Float32."""
    q = F.normalize(q.float(), dim=1)
    v = banks.detach()
    pos = (q * v[own_bank, index].float()).sum(dim=1, keepdim=True)
    neg = q @ torch.cat([v[g, negatives[g]] for g in range(negatives.shape[0])]).float().T
    logits = torch.cat([pos, neg], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


class SpatialMemoryBank(nn.Module):
    """One L2-normalised ``dim``-d row per training sample (``features``, initialised with
    random unit vectors as NPID's), the samples' positions (``slide`` code, level-0 ``x``,
    ``y``, ``grid`` step in level-0 pixels, float64; slide ``-1``: unknown) and the cluster
    ``labels`` ``[runs, N]`` of the last k-means fit (``kmeans_epoch``: the epoch it was
    fitted at, -1: never; before the first fit every entry is its own cluster). All are buffers: the
    method's ``state_dict`` (the checkpoint) holds them.

    :meth:`update` moves the rows of a batch towards its embeddings:
    ``v <- normalize((1 - m) v + m f)``, ``m = 0.5``.
    """

    features: Tensor
    slide: Tensor
    x: Tensor
    y: Tensor
    grid: Tensor
    labels: Tensor
    kmeans_epoch: Tensor

    def __init__(
        self, slide: Tensor, x: Tensor, y: Tensor, grid: Tensor, dim: int, runs: int
    ) -> None:
        super().__init__()
        n = int(slide.shape[0])
        if n < 1:
            raise ValueError("the memory bank needs at least one sample")
        self.register_buffer("features", F.normalize(torch.randn(n, dim), dim=1))
        self.register_buffer("slide", slide.long().clone())
        self.register_buffer("x", x.long().clone())
        self.register_buffer("y", y.long().clone())
        self.register_buffer("grid", grid.double().clone())
        own = -1 - torch.arange(n, dtype=torch.long)
        self.register_buffer("labels", own[None, :].repeat(runs, 1))
        self.register_buffer("kmeans_epoch", torch.full((1,), -1, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @torch.no_grad()
    def update(self, index: Tensor, feats: Tensor, momentum: float) -> None:
        """``v[index] <- normalize((1 - momentum) v[index] + momentum normalize(feats))``
        (indices distinct)."""
        f = F.normalize(feats.float(), dim=1).to(self.features.dtype)
        old = self.features[index]
        self.features[index] = F.normalize((1.0 - momentum) * old + momentum * f, dim=1)


__all__ = [
    "SEMANTIC_REDUCTIONS",
    "SGCLTerms",
    "SpatialMemoryBank",
    "beta_rank_profile",
    "local_instance_loss",
    "mine_negatives",
    "rampup_weight",
    "semantic_positive_mask",
    "sgcl_terms",
    "spatial_positive_mask",
]
