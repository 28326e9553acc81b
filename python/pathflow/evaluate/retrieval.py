"""Augmentation retrieval: a label-free check that a backbone learnt augmentation invariance.

Each image gets two augmented views drawn with a fixed seed by the training views machinery
(:mod:`pathflow.data.views` parameters, Rust decode/crop and the fused CPU colour kernel of
the torch backend). Every view is embedded; for image ``i`` the first view's embedding is
compared by cosine similarity with the *second* views of all ``N`` images, and it is a top-k
hit if its own second view ranks among the ``k`` most similar. Chance is ``k / N``.

Ties are credited fractionally (the expected hit under a random order of tied candidates):
with ``g`` candidates strictly more similar than the true match and ``t`` others exactly as
similar, the true match is equally likely at ranks ``g + 1 .. g + t + 1``, so the top-k credit
is ``clip((k - g) / (t + 1), 0, 1)``. A constant embedding therefore scores exactly ``k / N``.

Example:
    >>> import numpy as np
    >>> z = np.eye(3, dtype=np.float32)
    >>> retrieval_metrics(z, z)["top1"]
    1.0
    >>> retrieval_metrics(np.ones((4, 2)), np.ones((4, 2)), ks=(1, 2))["top2"]
    0.5
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.evaluate.config import RetrievalConfig

log = logging.getLogger("pathflow.eval")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def retrieval_ranks(z1: npt.ArrayLike, z2: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Rank of ``z2[i]`` among all rows of ``z2`` by cosine similarity to ``z1[i]``, per
    image (1 = found first; candidates exactly as similar share their mean position)."""
    greater, ties = _greater_ties(z1, z2)
    return greater + 1.0 + ties / 2.0


def _greater_ties(
    z1: npt.ArrayLike, z2: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    a = np.asarray(z1, np.float64)
    b = np.asarray(z2, np.float64)
    if a.ndim != 2 or a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two (N, D) embeddings of one shape, got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    sim = a @ b.T
    own = np.diag(sim)[:, None]
    greater = (sim > own).sum(1).astype(np.float64)
    ties = (sim == own).sum(1).astype(np.float64) - 1.0  # other candidates as similar
    return greater, ties


def retrieval_metrics(
    z1: npt.ArrayLike, z2: npt.ArrayLike, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k retrieval of ``z2[i]`` from ``z1[i]`` among all rows of ``z2`` (cosine).

    Returns ``top{k}`` for each k (ties credited fractionally, see the module docstring),
    ``mean_rank`` and ``median_rank`` (1 = best, ties at their mean position), ``n`` and
    ``chance_top{k}``."""
    greater, ties = _greater_ties(z1, z2)
    n = len(greater)
    out: dict[str, float] = {"n": float(n)}
    for k in ks:
        credit = np.clip((k - greater) / (ties + 1.0), 0.0, 1.0)
        out[f"top{k}"] = float(credit.mean())
        out[f"chance_top{k}"] = min(k, n) / n
    ranks = greater + 1.0 + ties / 2.0
    out["mean_rank"] = float(ranks.mean())
    out["median_rank"] = float(np.median(ranks))
    return out


def sign_test(before: npt.ArrayLike, after: npt.ArrayLike) -> dict[str, float]:
    """Paired comparison of per-image ranks (lower is better): how many images rank better
    ``after`` than ``before``, how many worse, and the two-sided exact sign-test p-value of
    that split (ties left out), ``2 * P[Binomial(n, 1/2) <= min(better, worse)]``."""
    b = np.asarray(before, np.float64)
    a = np.asarray(after, np.float64)
    if b.shape != a.shape:
        raise ValueError(f"need paired ranks of one shape, got {b.shape} and {a.shape}")
    better, worse = int((a < b).sum()), int((a > b).sum())
    n, k = better + worse, min(better, worse)
    p = min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n) if n else 1.0
    return {"better": float(better), "worse": float(worse), "tied": float(len(a) - n), "p": p}


def pair_spec(preset: str, size: int, mean: Sequence[float], std: Sequence[float]) -> Any:
    """The first two views of a :mod:`views` preset at ``size`` px, normalised with
    ``mean``/``std`` (RandStainNA, which needs fitted statistics, is switched off)."""
    from pathflow.data.views import ViewsSpec, create_views

    spec = create_views(preset, global_size=size)
    views = spec.expand()[:2]
    if len(views) < 2 or views[0].size != views[1].size:
        raise ValueError(f"views preset {preset!r} has no two views of one size")
    views = [replace(v, count=1, randstain=0.0) for v in views]
    return ViewsSpec(tuple(views), mean=tuple(mean), std=tuple(std), name=spec.name)  # type: ignore[arg-type]


def view_pairs(images: Sequence[bytes], spec: Any, seed: int = 0) -> tuple[Any, Any]:
    """Two augmented views ``(N, 3, S, S)`` float32 tensors of encoded images, deterministic
    for ``seed`` (the training loader's CPU path: Rust decode + crop, fused colour kernel)."""
    from pathflow import _core
    from pathflow.data.batch import RawBatch
    from pathflow.data.torch_backend import augment_cpu, decode_crops
    from pathflow.data.views import sample_batch_params

    sizes, errors = _core.image_info(list(images))
    bad = [i for i, e in enumerate(errors) if e is not None]
    if bad:
        raise ValueError(f"image {bad[0]} cannot be read: {errors[bad[0]]}")
    rng = np.random.default_rng([seed, 0x2E7])
    params = sample_batch_params(spec, sizes[:, 0], sizes[:, 1], rng)
    raw = RawBatch(
        data=[np.frombuffer(b, dtype=np.uint8) for b in images],
        params=params,
        meta={"key": [str(i) for i in range(len(images))]},
        index=0,
        epoch=0,
    )
    v1, v2 = augment_cpu(decode_crops(raw), raw, spec, "float32")
    return v1, v2


def embed_views(
    v1: Any, v2: Any, embed: Callable[[Any], Any], batch_size: int = 64
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Embed both view tensors in batches with ``embed`` ((B, 3, S, S) -> (B, D))."""

    def run(v: Any) -> npt.NDArray[np.float32]:
        parts = [np.asarray(embed(v[i : i + batch_size]).detach().cpu().float().numpy())
                 for i in range(0, len(v), batch_size)]  # fmt: skip
        return np.concatenate(parts).astype(np.float32)

    return run(v1), run(v2)


def find_images(root: str | Path, max_images: int | None = None) -> list[Path]:
    """Image files under ``root`` (recursive, sorted), or ``root`` itself if a file."""
    r = Path(root)
    if r.is_file():
        return [r]
    if not r.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    paths = sorted(p for p in r.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths[:max_images] if max_images else paths


def run_retrieval(cfg: RetrievalConfig) -> dict[str, Any]:
    """Embed two views of every image of ``cfg.data``, score retrieval, write
    ``cfg.out/metrics.json`` and return its content."""
    import torch

    from pathflow.extract.model import load_extractor

    t0 = time.perf_counter()
    paths = find_images(cfg.data, cfg.max_images)
    if len(paths) < 2:
        raise ValueError(f"{cfg.data}: need at least 2 images, found {len(paths)}")
    bb = load_extractor(cfg.arch, cfg.weights, cfg.pretrained, cfg.image_size, cfg.norm,
                        cfg.device, seed=cfg.seed, precision="fp32", compile=False)  # fmt: skip
    spec = pair_spec(cfg.views, bb.image_size, bb.mean, bb.std)
    with torch.random.fork_rng(devices=[]):
        v1, v2 = view_pairs([p.read_bytes() for p in paths], spec, cfg.seed)

    def embed(x: Any) -> Any:
        return bb.forward(x.to(bb.device))

    z1, z2 = embed_views(v1, v2, embed, cfg.batch_size)
    metrics = retrieval_metrics(z1, z2)
    ranks = retrieval_ranks(z1, z2)
    report = {
        "method": "retrieval",
        "arch": cfg.arch,
        "weights": cfg.weights,
        "weights_sha256": bb.weights_sha256,
        "pretrained": cfg.pretrained,
        "views": cfg.views,
        "image_size": bb.image_size,
        "n_images": len(paths),
        "config": asdict(cfg),
        "metrics": metrics,
        "seconds": time.perf_counter() - t0,
    }
    from pathflow.outputs import atomic_path

    out = Path(cfg.out)
    lines = ["image,rank"] + [f"{_csv(str(q))},{r:g}" for q, r in zip(paths, ranks, strict=True)]
    for name, text in (("ranks.csv", "\n".join(lines) + "\n"),
                       ("metrics.json", json.dumps(report, indent=1) + "\n")):  # fmt: skip
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
    log.info("retrieval top-1 %.3f on %d images -> %s", metrics["top1"], len(paths), out)
    return report


def _csv(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def read_ranks(path: str | Path) -> dict[str, float]:
    """``ranks.csv`` of a retrieval run: image path -> rank."""
    import csv

    with open(path, newline="") as f:
        return {row["image"]: float(row["rank"]) for row in csv.DictReader(f)}


def summary(report: dict[str, Any]) -> str:
    """One line: top-1 / top-5 against chance."""
    m = report["metrics"]
    return (
        f"retrieval on {report['arch']} ({report['weights'] or 'random init'}), "
        f"{report['n_images']} images, {report['views']} views: top-1 {m['top1']:.3f}, "
        f"top-5 {m['top5']:.3f} (chance {m['chance_top1']:.4f} / {m['chance_top5']:.4f}), "
        f"mean rank {m['mean_rank']:.1f}"
    )


__all__ = [
    "RetrievalConfig",
    "embed_views",
    "find_images",
    "pair_spec",
    "retrieval_metrics",
    "run_retrieval",
    "summary",
    "view_pairs",
]
