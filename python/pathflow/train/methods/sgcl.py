"""SGCL (Lin et al., Medical Image Analysis 2023, "SGCL: Spatial guided contrastive learning on
whole-slide pathological images"; built on SSLP, Li, Lin & Xu, MICCAI 2021; reference code
HHHedo/SGCL ``SpatialCL``): instance discrimination against a memory bank of every training
sample, with spatial positives (patches of the same slide within 3 grid steps) and semantic
positives (bank neighbours in the anchor's cluster in all of 3 k-means runs), and hard
negatives mined from the most similar rest.

Model: the backbone + a linear neck to 128 (``spatialcl.py``'s ``LinearNeck``) + L2
normalisation (``encoder``). Every view of the batch of the first view's size is an anchor:
with the default ``simclr`` views two per image; the reference's ``SpatialCL`` sees one view
per image, ``--views sgcl`` (its ``spatialcl.py`` augmentation: RandomResizedCrop 224 of scale
0.2-1, grayscale 0.2, colour jitter 0.4, horizontal flip). The loss and the bank search run
in float32 outside autocast (a bf16 similarity would blur the ranking at temperature 0.07).
The loss and its terms are those of :mod:`pathflow.train.losses.sgcl_loss` (formulas and
every difference from ``SpatialCL`` there): ``instance + w(t) * (spatial + semantic)`` at
temperature 0.07, the semantic fractions summed inside the log, ``w`` the ``exp(-5 (1 -
t)^2)`` ramp-up over 10 epochs, 4096 negatives drawn with a Beta(5, 15) profile over the
ranks of the 20 % most similar non-positive bank entries, 1 auxiliary anchor and its top
4096 neighbours for the semantic positives (``spatialcl.py``'s ``aux_num``, ``nei_k``).
Runs saved before these defaults (aux 3, top 2048, loss x 1/3, semantic mean) resume with
``--sgcl.aux-anchors 3 --sgcl.semantic-topk 2048 --sgcl.loss-weight 0.3333333333333333
--sgcl.semantic-reduction mean`` (the resume check names each option that differs).

Multi-crop (``--views sgcl-mcrop``, the published ``npidsslpmcrop.py`` of class
``SpatialCLMcrop``: 1 x 224 + 4 x 96 px, each local crop cut from one corner crop of half
the patch size, FiveCrop(128) of a 256 px patch, at scale 0.2-0.56): the views of another
size than the first are local crops. With ``local_weight`` > 0 (1) each local crop position
``l`` has a bank of its own (buffer ``local_bank``, ``[L, N, 128]``, random unit rows moved
with momentum 0.5 as the main bank) and the loss adds ``local_weight * local``, ``local``
being ``SpatialCLMcrop``'s ``loss_contra_mcrop``
(:func:`~pathflow.train.losses.sgcl_loss.local_instance_loss`): crop ``l`` of sample ``i``
against ``local_bank[l, i]``, with ``local_negatives`` (65536) uniformly drawn rows, an
equal share from each local bank, at ``local_temperature`` 0.2 (that config's head
temperature); one draw per step serves every crop (the reference draws each crop's own), so
DDP stays exact. The SGCL terms and the main bank use the global view(s) only, as
``SpatialCLMcrop``. Not reproduced from ``SpatialCLMcrop`` (the SGCL terms stay
``SpatialCL``'s): its single spatial term over the spatial and semantic positives together
(no separate semantic term), its negatives ranked by a second bank of pooled 512-d backbone
features, its instance term with 65536 uniformly drawn negatives at temperature 0.2, and its
two-layer neck (``SwAVNeck``). ``local_weight 0``: local crops are not encoded (before this
option, SGCL ignored them).

Memory bank (:class:`~pathflow.train.losses.sgcl_loss.SpatialMemoryBank`, buffers
``bank.*``, saved in the checkpoint): one row per sample of the training shards, addressed
by the loader's global sample index (``meta["index"]``; the trainer passes the batch's
``meta`` to methods with ``uses_meta``). After each optimiser step the normalised mean of
each image's view embeddings, gathered from all ranks, moves its row: ``v <- normalize(0.5 v
+ 0.5 f)`` (momentum 0.5), identically on every rank (DDP does not re-broadcast the bank).
The positions (slide, level-0 ``x``, ``y`` and the slide's grid step, the tiling step at
level 0) come from :func:`pathflow.data.neighbours.sample_coords` when the method is built
(the sample keys plus one ``.json`` per slide), as for the loader's neighbour pairs.

k-means: at the start of each epoch, 3 runs of ``min(1000, N // 4)`` clusters (at least 1;
a tiny bank keeps several entries per cluster) on the bank rows, seeds ``seed + 1234 + r``,
20 Lloyd iterations: faiss-cpu when installed (``kmeans_backend: auto``), else
scikit-learn's ``KMeans`` (``n_init=1``). Rank 0 fits and broadcasts; the labels and the
epoch of the fit are buffers, so a run resumed mid-epoch keeps the labels of the epoch's
start and one resumed at an epoch boundary refits the same bank: resume is exact.

Scale: the bank is kept on the training device: 1M samples x 128 float32 = 512 MB, plus the
positions and labels (7 numbers per sample, 56 MB), plus with local crops ``L`` local banks
(2 GB for 4 x 1M). Each step holds, for ``B`` anchors per rank (2 views x the batch), three
``[B, N]`` float32 similarity tensors, three ``[B, N]`` boolean masks, the top 20 % ranking
(``[B, 0.2 N]`` values + indices) and ``[256, N]`` chunks for the semantic search: about 3.5
GB at B = 128 (batch 64 per GPU), N = 1M; the reference trains with 32 images per GPU. The
k-means refit copies the bank to the CPU (faiss: about a minute per run at 1M x 1000 on 16
cores).

Recipe (the reference's ``spatialcl.py``): SGD with momentum 0.9, lr 0.015 x batch / 256
(cosine, no warmup), weight decay 1e-4, 100 epochs.

Example:
    >>> from pathflow.train import TrainConfig
    >>> cfg = TrainConfig(method="sgcl", steps=10).resolve()
    >>> o = cfg.options
    >>> o.temperature, o.bank_momentum, o.num_clusters, o.kmeans_runs, o.spatial_radius
    (0.07, 0.5, 1000, 3, 3.0)
    >>> o.aux_anchors, o.semantic_topk, o.loss_weight, o.semantic_reduction
    (1, 4096, 1.0, 'sum')
    >>> cfg.optimizer, cfg.lr
    ('sgd', 0.015)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.distributed import get_rank, is_dist
from pathflow.train.losses.sgcl_loss import (
    SEMANTIC_REDUCTIONS,
    SpatialMemoryBank,
    local_instance_loss,
    mine_negatives,
    rampup_weight,
    semantic_positive_mask,
    sgcl_terms,
    spatial_positive_mask,
)
from pathflow.train.methods.base import (
    MethodConfig,
    MultiCropEncoder,
    SSLMethod,
    default_channels_last,
)
from pathflow.train.methods.mocov2 import concat_all_gather
from pathflow.train.methods.registry import register_method
from pathflow.train.monitors import embedding_std
from pathflow.train.plan import RunPlan
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.data.shardset import ShardSet
    from pathflow.train.plan import StepClock

KMEANS_BACKENDS = ("auto", "faiss", "sklearn")
#: Offset of the k-means seeds (the reference's ``DEFAULT_KMEANS_SEED``).
KMEANS_SEED = 1234


@dataclass
class SGCLConfig(MethodConfig):
    """SGCL's options (YAML section ``sgcl:``, flags ``--sgcl.NAME``)."""

    recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd",
        "lr": 0.015,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
        "warmup_epochs": 0.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
    }

    proj_dim: int = field(default=128, metadata=_h("linear neck output dimension (bank rows)"))
    temperature: float = field(default=0.07, metadata=_h("temperature of every term"))
    bank_momentum: float = field(
        default=0.5, metadata=_h("weight of the new embedding in the bank update")
    )
    spatial_radius: float = field(
        default=3.0, metadata=_h("spatial positives: same slide, 0 < distance < this (grid steps)")
    )
    num_clusters: int = field(
        default=1000, metadata=_h("k-means clusters (at most a quarter of the bank)")
    )
    kmeans_runs: int = field(default=3, metadata=_h("k-means runs a semantic positive must agree"))
    kmeans_iters: int = field(default=20, metadata=_h("Lloyd iterations per k-means run"))
    kmeans_backend: str = field(
        default="auto", metadata=_h("auto (faiss-cpu if installed), faiss or sklearn")
    )
    semantic_topk: int = field(
        default=4096, metadata=_h("bank neighbours of each (auxiliary) anchor checked (nei_k)")
    )
    aux_anchors: int = field(
        default=1, metadata=_h("most similar spatial positives used as auxiliary anchors")
    )
    semantic_reduction: str = field(
        default="sum",
        metadata=_h("semantic term: sum (the reference) or mean of the fractions in the log"),
    )
    num_negatives: int = field(default=4096, metadata=_h("mined negatives per anchor"))
    hard_fraction: float = field(
        default=0.2, metadata=_h("negatives are mined among this top fraction of the bank")
    )
    beta_a: float = field(default=5.0, metadata=_h("Beta(a, b) profile over the ranks: a"))
    beta_b: float = field(default=15.0, metadata=_h("Beta(a, b) profile over the ranks: b"))
    rampup_epochs: float = field(
        default=10.0, metadata=_h("epochs of the exp(-5 (1 - t)^2) ramp-up of positive terms")
    )
    rampup_steps: int | None = field(
        default=None, metadata=_h("ramp-up in steps (overrides rampup_epochs)")
    )
    loss_weight: float = field(
        default=1.0, metadata=_h("factor of the whole loss (the reference sums its terms: 1)")
    )
    local_weight: float = field(
        default=1.0,
        metadata=_h("weight of the local-crop instance term (views with local crops, e.g. "
                    "sgcl-mcrop); 0: local crops unused"),
    )  # fmt: skip
    local_temperature: float = field(
        default=0.2, metadata=_h("temperature of the local-crop instance term")
    )
    local_negatives: int = field(
        default=65536,
        metadata=_h("uniformly drawn negatives of each local crop, split evenly over the "
                    "local banks"),
    )  # fmt: skip

    #: Options added later: the values that reproduce runs saved before them (local crops
    #: were not used then; ``mean`` was the semantic term's reduction).
    older_behaviour: ClassVar[dict[str, Any]] = {
        "semantic_reduction": "mean",
        "local_weight": 1.0,
        "local_temperature": 0.2,
        "local_negatives": 65536,
    }

    def validate(self) -> None:
        if self.temperature <= 0 or self.local_temperature <= 0:
            raise ConfigError("sgcl temperature and local_temperature must be > 0")
        if self.local_weight < 0:
            raise ConfigError(f"sgcl local_weight must be >= 0, got {self.local_weight}")
        if self.semantic_reduction not in SEMANTIC_REDUCTIONS:
            raise ConfigError(
                f"sgcl semantic_reduction must be one of {', '.join(SEMANTIC_REDUCTIONS)}, "
                f"got {self.semantic_reduction!r}"
            )
        if not 0 <= self.bank_momentum <= 1:
            raise ConfigError(f"sgcl bank_momentum must be in [0, 1], got {self.bank_momentum}")
        if not 0 < self.hard_fraction <= 1:
            raise ConfigError(f"sgcl hard_fraction must be in (0, 1], got {self.hard_fraction}")
        for name in (
            "proj_dim", "num_clusters", "kmeans_runs", "kmeans_iters", "num_negatives",
            "local_negatives",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"sgcl {name} must be >= 1, got {getattr(self, name)}")
        if self.semantic_topk < 0 or self.aux_anchors < 0 or self.spatial_radius < 0:
            raise ConfigError("sgcl semantic_topk, aux_anchors and spatial_radius must be >= 0")
        if self.beta_a <= 0 or self.beta_b <= 0:
            raise ConfigError("sgcl beta_a and beta_b must be > 0")
        if self.kmeans_backend not in KMEANS_BACKENDS:
            raise ConfigError(
                f"sgcl kmeans_backend must be one of {', '.join(KMEANS_BACKENDS)}, "
                f"got {self.kmeans_backend!r}"
            )

    def schedule_lengths(self, clock: StepClock) -> dict[str, int]:
        return {"positive_rampup": clock.steps_or_epochs(self.rampup_steps, self.rampup_epochs)}


# ------------------------------------------------------------------------ sample positions
@dataclass
class SamplePositions:
    """Every sample's slide code (index into ``slides``), level-0 ``x``, ``y`` and grid step
    (level-0 pixels), in the :class:`~pathflow.data.ShardSet` order."""

    slides: list[str]
    slide: Tensor
    x: Tensor
    y: Tensor
    grid: Tensor


def read_positions(shardset: ShardSet) -> SamplePositions:
    """The positions of every sample of ``shardset``
    (:func:`pathflow.data.neighbours.sample_coords`: from the ``<slide>_<x>_<y>`` keys and
    one ``.json`` per slide, the grid step being the slide's tiling step), as tensors; a
    one-line :class:`~pathflow.exceptions.ConfigError` for shards without positions."""
    from pathflow.data.neighbours import sample_coords

    try:
        c = sample_coords(shardset)
    except ValueError as exc:
        raise ConfigError(f"sgcl needs each sample's slide and position: {exc}") from None
    return SamplePositions(
        slides=list(c.slides),
        slide=torch.from_numpy(np.asarray(c.slide, dtype=np.int64)),
        x=torch.from_numpy(np.asarray(c.x, dtype=np.int64)),
        y=torch.from_numpy(np.asarray(c.y, dtype=np.int64)),
        grid=torch.from_numpy(np.asarray(c.step, dtype=np.float64)),
    )


def positions_of_data(data: str) -> SamplePositions:
    """:func:`read_positions` of ``--data`` (resolved as the trainer does)."""
    from pathflow.data.shardset import ShardSet
    from pathflow.data.sources import resolve_data

    shardset = ShardSet(resolve_data(data))
    try:
        return read_positions(shardset)
    finally:
        shardset.close()


def count_local_views(plan: RunPlan) -> int:
    """The local crops per sample of the run's views: the views of another size than the
    first (:func:`pathflow.data.create_views` of ``--views`` and its size options)."""
    from pathflow.data.views import create_views

    try:
        spec = create_views(
            plan.views or SGCL.views_preset,
            global_size=plan.global_size,
            local_size=plan.local_size,
            num_local=plan.num_local,
        )
    except ValueError as exc:
        raise ConfigError(f"sgcl views: {exc}") from None
    sizes = [v.size for v in spec.expand()]
    return sum(1 for size in sizes if size != sizes[0])


# -------------------------------------------------------------------------------- k-means
def fit_kmeans(x: np.ndarray, k: int, seed: int, iters: int, backend: str = "auto") -> np.ndarray:
    """Cluster labels (int64) of the rows of ``x`` by Lloyd's k-means with ``k`` clusters,
    ``iters`` iterations and seed ``seed``: faiss-cpu (``faiss.Kmeans``) or scikit-learn
    (``KMeans(n_init=1, tol=0)``). ``auto``: faiss when importable."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(k, x.shape[0]))
    if backend in ("auto", "faiss"):
        try:
            import faiss
        except ImportError:
            if backend == "faiss":
                raise ConfigError(
                    "sgcl kmeans_backend faiss: faiss is not installed (pip install faiss-cpu)"
                ) from None
        else:
            km = faiss.Kmeans(
                x.shape[1], k, niter=iters, seed=seed, max_points_per_centroid=10**7,
                min_points_per_centroid=1, verbose=False,
            )  # fmt: skip
            km.train(x)
            _, assign = km.index.search(x, 1)
            return np.asarray(assign[:, 0], dtype=np.int64)
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=1, max_iter=iters, tol=0.0, random_state=seed)
    return np.asarray(km.fit_predict(x), dtype=np.int64)


@register_method("sgcl")
class SGCL(SSLMethod):
    """Backbone + linear neck (``encoder``), the memory bank (``bank``) and SGCL's loss."""

    views_preset = "simclr"
    export_prefix = "encoder.backbone."
    config_class = SGCLConfig
    #: The trainer passes the batch's ``meta`` (sample indices) to :meth:`forward`.
    uses_meta: ClassVar[bool] = True
    ddp_local_buffers = (
        "bank.features", "bank.slide", "bank.x", "bank.y", "bank.grid", "bank.labels",
        "bank.kmeans_epoch", "local_bank",
    )  # fmt: skip

    local_bank: Tensor  # only with local crops
    num_local: int

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: SGCLConfig,
        plan: RunPlan | None = None,
        channels_last: bool | None = None,
        positions: SamplePositions | None = None,
    ) -> None:
        super().__init__()
        if plan is None:  # SGCL(backbone, embed_dim, a resolved TrainConfig, ...)
            plan = RunPlan.from_config(opts)
            opts = opts.options  # type: ignore[attr-defined]
        if channels_last is None:
            channels_last = default_channels_last(backbone, plan.channels_last)
        if plan.positives == "neighbour":
            raise ConfigError(
                "sgcl takes its spatial positives from its bank: --positives neighbour would "
                "file a neighbour's view under the anchor's sample (use augment or scale)"
            )
        if positions is None:
            if not plan.data:
                raise ConfigError("sgcl needs the training data (--data) to size its bank")
            positions = positions_of_data(plan.data)
        self.encoder = MultiCropEncoder(
            backbone, nn.Linear(embed_dim, opts.proj_dim), channels_last
        )
        p = positions
        self.bank = SpatialMemoryBank(p.slide, p.x, p.y, p.grid, opts.proj_dim, opts.kmeans_runs)
        #: One bank per local crop (``[L, N, d]``, NPID's random unit rows), when the views
        #: have local crops and ``local_weight`` > 0; else local crops are not used.
        self.num_local = count_local_views(plan) if opts.local_weight > 0 else 0
        if self.num_local:
            n, d = len(self.bank), opts.proj_dim
            rows = F.normalize(torch.randn(self.num_local, n, d), dim=2)
            self.register_buffer("local_bank", rows)
        self.opts = opts
        self.seed = plan.seed
        self.rampup = opts.schedule_lengths(plan)["positive_rampup"]
        self._pending: tuple[Tensor, Tensor] | None = None
        self._pending_local: Tensor | None = None

    # ---------------------------------------------------------------------- helpers
    def sample_index(self, meta: dict[str, Any] | None, n: int, device: torch.device) -> Tensor:
        """Global sample indices of the batch (the loader's ``meta["index"]``)."""
        if meta is None or meta.get("index") is None:
            raise ValueError("sgcl needs the batch's sample indices: forward(views, step, meta)")
        out = torch.as_tensor(meta["index"], dtype=torch.long).to(device)
        if out.shape[0] != n:
            raise ValueError(f"sgcl: {out.shape[0]} sample indices for a batch of {n}")
        if out.numel() and (int(out.min()) < 0 or int(out.max()) >= len(self.bank)):
            raise ValueError(f"sgcl: sample index out of the bank's {len(self.bank)} rows")
        return out

    def negatives_generator(self, step: int) -> torch.Generator:
        """CPU generator of step ``step``'s negative ranks: the same on every rank and after
        a resume."""
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(step) + 1)

    # ---------------------------------------------------------------------- training
    def forward(
        self, views: list[Tensor], step: int, meta: dict[str, Any] | None = None
    ) -> dict[str, Tensor]:
        b = views[0].shape[0]
        index = self.sample_index(meta, b, views[0].device)
        anchors = [v for v in views if v.shape[-2:] == views[0].shape[-2:]]
        local = [v for v in views if v.shape[-2:] != views[0].shape[-2:]] if self.num_local else []
        if len(local) != self.num_local:
            raise ValueError(
                f"sgcl was built for {self.num_local} local crops per sample, got {len(local)}"
            )
        z = self.encoder(anchors + local).float()  # rows: view by view, anchors first
        q = F.normalize(z[: len(anchors) * b], dim=1)  # [V * B, d]
        idx = index.repeat(len(anchors))
        with torch.autocast(q.device.type, enabled=False):
            out = self._loss(q, index, idx, len(anchors), step)
            if local:
                ql = F.normalize(z[len(anchors) * b :], dim=1)  # [L * B, d]
                local_loss = self._local_loss(ql, index, step)
                out["loss"] = out["loss"] + self.opts.loss_weight * self.opts.local_weight * (
                    local_loss
                )
                out["local_loss"] = local_loss.detach()
            return out

    def _local_loss(self, ql: Tensor, index: Tensor, step: int) -> Tensor:
        """:func:`~pathflow.train.losses.sgcl_loss.local_instance_loss` of the local crops
        ``ql`` ``[L * B, d]``: crop ``l`` of sample ``i`` against ``local_bank[l, i]``, with
        ``local_negatives // L`` uniformly drawn rows of each local bank (the step's own draw,
        for every crop, the same on every rank and after a resume)."""
        banks = self.local_bank
        n_local, n = banks.shape[0], banks.shape[1]
        b = index.shape[0]
        k = max(1, self.opts.local_negatives // n_local)
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(step) + 2**40)
        neg = torch.randint(0, n, (n_local, k), generator=gen).to(ql.device)
        own = torch.arange(n_local, device=ql.device).repeat_interleave(b)
        loss = local_instance_loss(
            ql, banks, own, index.repeat(n_local), neg, self.opts.local_temperature
        )
        self._pending_local = ql.detach().view(n_local, b, -1)
        return loss

    def _loss(
        self, q: Tensor, index: Tensor, idx: Tensor, n_views: int, step: int
    ) -> dict[str, Tensor]:
        """Masks, mined negatives, terms and outputs of :meth:`forward` (float32)."""
        o, bank = self.opts, self.bank
        b = index.shape[0]
        with torch.no_grad():
            spatial = spatial_positive_mask(
                idx, bank.slide, bank.x, bank.y, bank.grid, o.spatial_radius
            )
            semantic = semantic_positive_mask(
                q.detach(), idx, bank.features, bank.labels, spatial, o.semantic_topk, o.aux_anchors
            )
            positives = spatial | semantic
            positives[torch.arange(idx.shape[0], device=idx.device), idx] = True
            logits = q.detach() @ bank.features.float().T
            negatives, ok = mine_negatives(
                logits, positives, o.num_negatives, o.hard_fraction,
                self.negatives_generator(step), (o.beta_a, o.beta_b),
            )  # fmt: skip
        terms = sgcl_terms(
            q, idx, bank.features, spatial, semantic, negatives, ok, o.temperature,
            o.semantic_reduction,
        )  # fmt: skip
        w = rampup_weight(step, self.rampup)
        loss = o.loss_weight * (terms.instance + w * (terms.spatial + terms.semantic))
        self._pending = (index, q.detach().view(n_views, b, -1).mean(dim=0))
        return {
            "loss": loss,
            "instance_loss": terms.instance.detach(),
            "spatial_loss": terms.spatial.detach(),
            "semantic_loss": terms.semantic.detach(),
            "rampup": torch.tensor(w, dtype=torch.float64),
            "spatial_positives": terms.spatial_positives,
            "semantic_positives": terms.semantic_positives,
            "embed_std": embedding_std(q),
        }

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The batch's embeddings, gathered from all ranks, into the bank."""
        if self._pending is not None:
            index, feats = self._pending
            self._pending = None
            index = concat_all_gather(index)
            self.bank.update(index, concat_all_gather(feats.contiguous()), self.opts.bank_momentum)
            if self._pending_local is not None:
                local, self._pending_local = self._pending_local, None
                n_local, b, d = local.shape
                rows = concat_all_gather(local.permute(1, 0, 2).reshape(b, n_local * d))
                m = self.opts.bank_momentum
                for g, f in enumerate(rows.view(-1, n_local, d).unbind(dim=1)):
                    old = self.local_bank[g, index]
                    new = (1.0 - m) * old + m * F.normalize(f.float(), dim=1)
                    self.local_bank[g, index] = F.normalize(new, dim=1)

    @torch.no_grad()
    def start_epoch(self, epoch: int) -> None:
        """Refit the k-means labels on the bank, unless they were fitted at this epoch's
        start already (a run resumed mid-epoch). Rank 0 fits and broadcasts."""
        bank = self.bank
        if int(bank.kmeans_epoch[0]) == epoch:
            return
        if get_rank() == 0:
            x = bank.features.float().cpu().numpy()
            k = max(1, min(self.opts.num_clusters, len(bank) // 4))
            labels = [
                fit_kmeans(
                    x,
                    k,
                    self.seed + KMEANS_SEED + r,
                    self.opts.kmeans_iters,
                    self.opts.kmeans_backend,
                )
                for r in range(self.opts.kmeans_runs)
            ]
            bank.labels.copy_(torch.from_numpy(np.stack(labels)).to(bank.labels.device))
        if is_dist():
            dist.broadcast(bank.labels, src=0)
        bank.kmeans_epoch.fill_(epoch)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """As ``nn.Module``'s; a one-line :class:`~pathflow.exceptions.ConfigError` when the
        local-crop banks are expected but missing (a run that did not use its local crops:
        saved before SGCL used them, or with ``local_weight`` 0)."""
        if self.num_local and "local_bank" not in state_dict:
            raise ConfigError(
                "sgcl: the checkpoint has no local-crop banks (its run did not use local "
                "crops); resume it with --sgcl.local-weight 0 --allow-changed sgcl.local_weight"
            )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def backbone_for_export(self) -> nn.Module:
        return self.encoder.backbone


__all__ = [
    "SGCL", "SGCLConfig", "SamplePositions", "count_local_views", "fit_kmeans", "read_positions",
]  # fmt: skip
