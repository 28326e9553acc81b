"""Training-step throughput: images/s of one full step (forward, backward, clipping, AdamW,
EMA) of a method on synthetic views already on the device, so the loader is out of the
measurement. Compares settings in one run, e.g. eager fp32 against bf16 + torch.compile.

Image methods (``dino``, ``simclr``) get ``[B, 3, S, S]`` views (2 x 224 + 8 x 96 for DINO);
methods over region features (``hipt4k``) get HIPT's ViT-4K views of ``[B, D, G, G]`` feature
grids (``D`` = the backbone's ``in_dim``, 384: 2 x 14 x 14 + 8 x 6 x 6 cells), so their
"images" are regions.

Example:
    $ python -m pathflow.train.benchmark --method dino --arch vit_small_patch16_224 \\
        --batch-size 128 --device cuda --compare     # eager fp32 vs bf16 + compile
    $ python -m pathflow.train.benchmark --method hipt4k --batch-size 512 --compare
    >>> from pathflow.train.benchmark import benchmark_train_step
    >>> r = benchmark_train_step("dino", "vit_tiny_patch16_224", batch_size=2, steps=2,
    ...                          warmup=1, global_size=32, local_size=16, num_local=2,
    ...                          out_dim=256, device="cpu")  # doctest: +SKIP
    >>> r["images_per_s"] > 0  # doctest: +SKIP
    True
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from pathflow.train.config import TrainConfig
from pathflow.train.distributed import DistInfo, resolve_device
from pathflow.train.trainer import (
    build_method,
    build_optimizer,
    compile_backbones,
    peak_memory_gb,
    resolve_runtime,
    train_step,
)

#: View sizes (global, local, number of local views) when not given: the image loader's
#: ``dino`` preset for images, HIPT's ViT-4K crops (``FeatureCropSpec``) for feature grids.
IMAGE_VIEWS = (224, 96, 8)
FEATURE_VIEWS = (14, 6, 8)


def is_feature_method(method: str) -> bool:
    """True for methods trained on region-feature grids (``hipt4k``), not images."""
    from pathflow.train.methods import method_class

    return method_class(method).data_kind == "region_features"


def synthetic_views(
    method: str,
    batch_size: int,
    device: torch.device,
    global_size: int | None = None,
    local_size: int | None = None,
    num_local: int | None = None,
    dtype: torch.dtype = torch.float32,
    channels: int = 3,
) -> list[torch.Tensor]:
    """Random normalised views with the shapes of the method's loader: the ``dino`` /
    ``simclr`` image presets (``channels`` 3), or HIPT's ViT-4K crops of ``channels``-d
    feature grids for ``hipt4k``. ``None`` sizes take the method's defaults."""
    feature = is_feature_method(method)
    g, lo, n = FEATURE_VIEWS if feature else IMAGE_VIEWS
    global_size = g if global_size is None else global_size
    local_size = lo if local_size is None else local_size
    num_local = n if num_local is None else num_local
    multi_crop = feature or method == "dino"
    sizes = [global_size] * 2 + ([local_size] * num_local if multi_crop else [])
    return [torch.randn(batch_size, channels, s, s, device=device, dtype=dtype) for s in sizes]


def benchmark_train_step(
    method: str = "dino",
    arch: str | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    compile: bool | None = None,
    device: str = "auto",
    steps: int = 20,
    warmup: int = 5,
    global_size: int | None = None,
    local_size: int | None = None,
    num_local: int | None = None,
    out_dim: int = 65536,
) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` untimed ones (compilation happens
    there). Returns images/s (regions/s for ``hipt4k``), milliseconds per step and peak GPU
    memory. ``arch`` None: the method's (``vit_small_patch16_224``; ``hipt4k``: ``vit4k_xs``)."""
    from pathflow.train.methods import method_class

    dev = resolve_device(device)
    opt_fields = {f.name for f in dataclasses.fields(method_class(method).config_class)}
    options = {
        k: v
        for k, v in (("out_dim", out_dim), ("freeze_last_layer", 0))
        if k in opt_fields  # DINO and its subclasses (hipt4k)
    }
    cfg = TrainConfig(
        method=method,
        arch=arch,
        batch_size=batch_size,
        precision=precision,
        compile=compile,
        device=str(dev),
        steps=warmup + steps,
        options=options or None,
    ).resolve()
    cfg = resolve_runtime(cfg, dev)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=dev)
    m = build_method(cfg, dev)
    opt = build_optimizer(m, cfg, dev)
    if cfg.compile:
        compile_backbones(m)
    m.train()
    dtype = torch.bfloat16 if cfg.precision == "bf16" and dev.type == "cuda" else torch.float32
    channels = 3
    if is_feature_method(method):  # feature grids as wide as the backbone's input tokens
        channels = int(getattr(m.encoders()[0].backbone, "in_dim", 384))
    views = synthetic_views(
        method, batch_size, dev, global_size, local_size, num_local, dtype, channels
    )
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    for step in range(warmup):
        train_step(m, m, opt, views, step, cfg, info, lr=1e-4, wd=0.04)
    sync()
    t1 = time.perf_counter()
    for step in range(warmup, warmup + steps):
        train_step(m, m, opt, views, step, cfg, info, lr=1e-4, wd=0.04)
    sync()
    t2 = time.perf_counter()
    seconds = t2 - t1
    return {
        "method": method,
        "arch": cfg.arch,
        "batch_size": batch_size,
        "unit": "regions" if is_feature_method(method) else "img",
        "views": [tuple(v.shape[-2:]) for v in views],
        "precision": cfg.precision,
        "compile": bool(cfg.compile),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "warmup_s": round(t1 - t0, 2),
        "ms_per_step": round(1000 * seconds / steps, 2),
        "images_per_s": float(f"{batch_size * steps / seconds:.4g}"),
        "peak_memory_gb": round(peak_memory_gb(dev), 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pathflow.train.benchmark",
        description="images/s of full training steps on synthetic views (no loader)",
    )
    from pathflow.train.methods import list_methods

    p.add_argument("--method", default="dino", choices=list_methods())
    p.add_argument(
        "--arch", default=None, help="default: the method's (vit_small_patch16_224, vit4k_xs)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--global-size", type=int, default=None, help="default 224 px (hipt4k: 14 grid cells)"
    )
    p.add_argument("--local-size", type=int, default=None, help="default 96 px (hipt4k: 6 cells)")
    p.add_argument("--num-local", type=int, default=None, help="default 8")
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--compare",
        action="store_true",
        help="eager fp32 vs --precision + compile (auto: bf16 on CUDA, fp32 on CPU), and the ratio",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    a = p.parse_args(argv)
    common = {
        "method": a.method,
        "arch": a.arch,
        "batch_size": a.batch_size,
        "device": a.device,
        "steps": a.steps,
        "warmup": a.warmup,
        "global_size": a.global_size,
        "local_size": a.local_size,
        "num_local": a.num_local,
        "out_dim": a.out_dim,
    }
    if a.compare:
        runs = [
            benchmark_train_step(precision="fp32", compile=False, **common),
            benchmark_train_step(precision=a.precision, compile=True, **common),
        ]
    else:
        runs = [benchmark_train_step(precision=a.precision, compile=a.compile, **common)]
    for r in runs:
        print(
            f"{r['method']} {r['arch']} batch {r['batch_size']} {r['precision']}"
            f"{' + compile' if r['compile'] else ' eager'} on {r['device']}: "
            f"{r['images_per_s']} {r['unit']}/s ({r['ms_per_step']} ms/step, peak "
            f"{r['peak_memory_gb']} GB, warmup {r['warmup_s']} s)"
        )
    result: dict[str, Any] = {"runs": runs}
    if a.compare:
        result["speedup"] = round(runs[1]["images_per_s"] / runs[0]["images_per_s"], 3)
        print(f"{runs[1]['precision']} + compile vs eager fp32: {result['speedup']}x")
    if a.json:
        from pathflow.outputs import atomic_write_text

        atomic_write_text(a.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
