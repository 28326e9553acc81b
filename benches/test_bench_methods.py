"""Training-step time of every image method on the CPU: ms/step and img/s of one full step
(forward, backward, clipping, the method's own optimizer, EMA targets, queues, prototypes;
:func:`pathflow.train.trainer.train_step`, what ``pathflow train`` runs) with each method's
recipe (its default heads, optimizer and view preset: 2 views for the SimCLR/BYOL presets,
2 global + the local crops for DINO's and SwAV's multi-crop) on synthetic views already in
memory, so the loader is out of the measurement. A small backbone: ViT-Ti/16 at 96 px
(local crops 48 px), batch 16, fp32, eager, torch's default threads.

Baseline: there is no outside implementation of these methods to run here (the reference
repositories need their own environments), so each method is put against the floor every
method pays, in plain torch: the same backbone encoding the same views with gradients
(one forward per view size, as multi-crop does), a trivial loss (mean squared feature),
backward and ``torch.optim.AdamW``. ``x floor`` is the method's step time over that floor:
what its heads, loss, optimizer and, for BYOL, CluBYOL, MoCo and DINO, the momentum
target's no-grad forward of the views cost on top of encoding the views once.

Sizes from the environment: ``PATHFLOW_BENCH_METHODS`` (comma-separated, default every
image method), ``PATHFLOW_BENCH_METHODS_BATCH`` (16), ``PATHFLOW_BENCH_METHODS_STEPS``
(timed steps, 3, after one untimed warm-up step; the fastest is reported, as ``timeit``
does: on a shared machine contention only adds time; method and floor steps alternate).

Run: ``python -m pytest benches/test_bench_methods.py --benchmark-only -s``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

ARCH = "vit_tiny_patch16_224"
GLOBAL, LOCAL = 96, 48


def _methods() -> list[str]:
    from pathflow.train.methods import list_methods, method_class

    # SGCL needs the shards (its bank is sized by and indexed into the dataset): not on
    # synthetic views
    image = [
        m
        for m in list_methods()
        if method_class(m).data_kind != "region_features"
        and not getattr(method_class(m), "uses_meta", False)
    ]
    chosen = os.environ.get("PATHFLOW_BENCH_METHODS")
    return [m for m in chosen.split(",") if m] if chosen else image


def _config(method: str, batch: int, steps: int) -> Any:
    from pathflow.train import TrainConfig

    return TrainConfig(
        method=method, arch=ARCH, img_size=GLOBAL, global_size=GLOBAL, local_size=LOCAL,
        batch_size=batch, device="cpu", precision="fp32", compile=False, steps=steps,
        tensorboard=False,
    ).resolve()  # fmt: skip


def _views(cfg: Any, batch: int) -> list[Any]:
    """Random views shaped as the method's preset (``create_views`` as the loader uses it)."""
    from pathflow.data import create_views

    spec = create_views(
        cfg.views, global_size=cfg.global_size, local_size=cfg.local_size, num_local=cfg.num_local
    )
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, 3, g.size, g.size, generator=gen)
        for g in spec.groups
        for _ in range(g.count)
    ]


def _method_step(method: str, batch: int, steps: int) -> tuple[Any, list[Any]]:
    """One ``pathflow train`` step of the method (``train_step(step)``) and its views."""
    from pathflow.train.distributed import DistInfo
    from pathflow.train.trainer import build_method, build_optimizer, resolve_runtime, train_step

    dev = torch.device("cpu")
    cfg = resolve_runtime(_config(method, batch, 1 + steps), dev)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=dev)
    m = build_method(cfg, dev)
    opt = build_optimizer(m, cfg, dev)
    m.train()
    views = _views(cfg, batch)

    def step(i: int) -> None:
        train_step(m, m, opt, views, i, cfg, info, lr=1e-4, wd=1e-6)

    return step, views


def _floor_step(views: list[Any]) -> Any:
    """Plain torch: the backbone encodes the views (one forward per size), mean squared
    feature, backward, AdamW."""
    from pathflow.train.backbones import create_backbone

    torch.manual_seed(0)
    net, _ = create_backbone(ARCH, img_size=GLOBAL)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.04)
    by_size: dict[int, list[Any]] = {}
    for v in views:
        by_size.setdefault(int(v.shape[-1]), []).append(v)
    groups = [torch.cat(vs) for vs in by_size.values()]

    def step(i: int) -> None:
        loss = sum(net(x).pow(2).mean() for x in groups)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()

    return step


def _time_pair(method_step: Any, floor_step: Any, steps: int) -> tuple[float, float]:
    """The fastest of ``steps`` steps of each, after one untimed warm-up step, method and
    floor steps interleaved: the shared CPU's bursts of contention only ever add time, and
    both sides of the ratio see the same conditions."""
    method_step(0)
    floor_step(0)
    best = [float("inf"), float("inf")]
    for i in range(1, 1 + steps):
        for k, fn in enumerate((method_step, floor_step)):
            t0 = time.perf_counter()
            fn(i)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best[0], best[1]


def _run(batch: int, steps: int) -> list[dict[str, Any]]:
    rows = []
    for method in _methods():
        method_step, views = _method_step(method, batch, steps)
        seconds, floor = _time_pair(method_step, _floor_step(views), steps)
        sizes = [int(v.shape[-1]) for v in views]
        rows.append({
            "method": method,
            "views": "+".join(f"{sizes.count(s)}x{s}" for s in sorted(set(sizes), reverse=True)),
            "ms_per_step": 1000 * seconds,
            "images_per_s": batch / seconds,
            "floor_ms": 1000 * floor,
            "x_floor": seconds / floor,
        })  # fmt: skip
    return rows


def _report(benchmark: Any, rows: list[dict[str, Any]], batch: int, steps: int) -> None:
    print(
        f"\n{ARCH} at {GLOBAL}/{LOCAL} px, batch {batch}, fp32 eager on CPU "
        f"({torch.get_num_threads()} threads), fastest of {steps} timed steps after 1 warm-up"
    )
    print(
        f"{'method':<12} {'views':<12} {'ms/step':>9} {'img/s':>8} {'floor ms':>9} {'x floor':>8}"
    )
    for r in rows:
        print(
            f"{r['method']:<12} {r['views']:<12} {r['ms_per_step']:>9.1f} "
            f"{r['images_per_s']:>8.1f} {r['floor_ms']:>9.1f} {r['x_floor']:>8.2f}"
        )
        benchmark.extra_info[f"{r['method']}_ms_per_step"] = round(r["ms_per_step"], 2)
        benchmark.extra_info[f"{r['method']}_images_per_s"] = round(r["images_per_s"], 2)
        benchmark.extra_info[f"{r['method']}_x_floor"] = round(r["x_floor"], 3)
        assert r["images_per_s"] > 0
    print("floor: plain-torch backbone encoding of the same views + AdamW (no outside baseline)")


def test_method_train_steps_cpu(benchmark: Any) -> None:
    batch = int(os.environ.get("PATHFLOW_BENCH_METHODS_BATCH", "16"))
    steps = int(os.environ.get("PATHFLOW_BENCH_METHODS_STEPS", "3"))
    rows = benchmark.pedantic(_run, args=(batch, steps), rounds=1, iterations=1)
    _report(benchmark, rows, batch, steps)
