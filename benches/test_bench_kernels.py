"""Augmentation kernels against what users run today, same run, same real H&E patches.

* ``augment``: ``_core.augment_views`` (the fused Rust colour stages) against the torch
  reference (``augment_torch.apply_color_stages`` + ``finish``) on the same uint8 crops and
  the same view parameters, per 224 px view, both on 1 thread.
* ``dali-cpu`` / ``dali-gpu``: the DALI pipeline (``DaliViews``) for SimCLR two-view 224 against
  PIL decode + torchvision's SimCLR transforms (``simclr_transform`` of
  ``test_bench_loader.py``) in a ``torch.utils.data.DataLoader`` with as many workers as DALI
  has threads, on the same encoded patches and batch size. Images/s count source patches
  (each yields 2 views). The GPU case (skipped without CUDA) moves the baseline's batches to
  the GPU as a training loop would.

The patches are the 43 256-px JPEGs that ``pathflow tile --shards`` writes from the
``cmu-small`` sample slide (cached under ``~/.cache/pathflow/bench``;
``PATHFLOW_TEST_SHARDS=<dir with the .tar>`` uses shards written before, for a GPU box
without network access).

Run: ``python -m pytest benches/test_bench_kernels.py --benchmark-only -s``.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# Helpers shared with the correctness tests (tests/ is on sys.path, see conftest.py).
from data import test_augment_kernel as kernel_tests  # noqa: E402
from data.test_augment_kernel import BASE, draw, reference, rust  # noqa: E402
from pathflow import _core  # noqa: E402
from pathflow.data.views import StainStats, create_views  # noqa: E402
from PIL import Image  # noqa: E402
from test_bench_loader import simclr_transform  # noqa: E402

# The test module's fixtures, over this module's ``sample_shards``.
jpegs = kernel_tests.jpegs
stain_stats = kernel_tests.stain_stats

ROUNDS = 5  # timed calls per implementation (after one warm-up), best one kept
AUGMENT_CASES = {
    "colour+blur": replace(BASE, jitter=1.0, blur=1.0),
    "simclr": create_views("simclr").groups[0],
    "stain+hed+colour+blur": replace(BASE, randstain=1.0, hed=1.0, jitter=1.0, blur=1.0),
}


@pytest.fixture(scope="module")
def sample_shards() -> Path:
    """``pathflow tile --sample cmu-small --shards``: 43 real 256-px H&E JPEG patches.

    The slide backend is pinned to openslide: with torch already imported, importing cucim
    (which ``--backend auto`` probes) hangs in this environment.
    """
    if os.environ.get("PATHFLOW_TEST_SHARDS"):
        return Path(os.environ["PATHFLOW_TEST_SHARDS"])
    from pathflow.cli import main
    from pathflow.data import sample_cache_dir, sample_slide

    out = sample_cache_dir().parent / "bench" / "cmu_small_shards"
    if not (out / "shards" / "shards.json").is_file():
        slide = sample_slide("cmu-small")
        args = ["tile", str(slide), "--out", str(out), "--shards", "--backend", "openslide", "-q"]
        assert main(args) == 0
    return out / "shards"


def best_s(f: Callable[[], object], rounds: int = ROUNDS) -> float:
    """Best of ``rounds`` timed calls, after one warm-up call, in seconds."""
    f()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


# ------------------------------------------------------------ fused Rust colour stages


@pytest.mark.parametrize("case", list(AUGMENT_CASES))
def test_augment_kernel_vs_torch(
    benchmark: Any, jpegs: list[bytes], stain_stats: StainStats, case: str
) -> None:
    """ms per 224 px view on one thread: ``_core.augment_views`` against the torch reference."""
    crops, p = draw(jpegs[:16], AUGMENT_CASES[case], seed=11, stats=stain_stats)
    crops = np.ascontiguousarray(crops)
    n = len(crops)
    threads, torch_threads = _core.num_threads(), torch.get_num_threads()
    _core.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        t_torch = best_s(lambda: reference(crops, p, "float"))
        benchmark.pedantic(lambda: rust(crops, p, "float"), rounds=ROUNDS, warmup_rounds=1)
    finally:
        _core.set_num_threads(threads)
        torch.set_num_threads(torch_threads)
    t_rust = benchmark.stats.stats.min
    ms_rust, ms_torch = t_rust / n * 1e3, t_torch / n * 1e3
    benchmark.extra_info.update(
        {"rust_ms_per_view": ms_rust, "torch_ms_per_view": ms_torch, "speedup": t_torch / t_rust}
    )
    print(
        f"\n[{case}] rust {ms_rust:.3f} ms/view, torch reference {ms_torch:.3f} ms/view "
        f"({t_torch / t_rust:.1f}x the torch reference), 1 thread, 224 px"
    )


# ------------------------------------------------------------------- DALI SimCLR 2x224


class _PilViews(torch.utils.data.Dataset):  # type: ignore[misc]
    """The baseline's dataset: PIL decode of the encoded patch + torchvision SimCLR views."""

    def __init__(self, patches: list[np.ndarray], length: int) -> None:
        self.patches, self.length = patches, length
        self.transform = simclr_transform()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> list[Any]:
        data = self.patches[i % len(self.patches)].tobytes()
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB"))


def baseline_rate(
    patches: list[np.ndarray], batch: int, batches: int, workers: int, cuda: bool = False
) -> float:
    """images/s of PIL + torchvision in a DataLoader: median of 3 epochs after a warm-up one."""
    pytest.importorskip("torchvision")
    loader = torch.utils.data.DataLoader(
        _PilViews(patches, batch * batches),
        batch_size=batch,
        num_workers=workers,
        persistent_workers=True,
        pin_memory=cuda,
    )

    def epoch() -> int:
        n = 0
        for views in loader:
            if cuda:
                views = [v.to("cuda", non_blocking=True) for v in views]
            n += int(views[0].shape[0])
        if cuda:
            torch.cuda.synchronize()
        return n

    epoch()  # start the workers, warm up
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        n = epoch()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def dali_bench(
    benchmark: Any,
    patches: list[np.ndarray],
    *,
    device: str,
    batch: int,
    batches: int,
    threads: int,
    output: str,
) -> float:
    """images/s of ``DaliViews`` over ``batches`` pre-sampled batches, median of 3 epochs."""
    pytest.importorskip("nvidia.dali")
    from data.test_dali_backend import make_batches
    from pathflow.data.dali_backend import DaliViews

    spec = create_views("simclr")
    pool = [patches[i % len(patches)] for i in range(batch)]  # batch may exceed the 43 patches
    raw = make_batches(spec, pool, None, [batch] * batches, seed=7)
    dv = DaliViews(
        spec,
        batch,
        device=device,
        output=output,
        num_threads=threads,
        device_id=0 if device == "gpu" else None,
    )

    def epoch(src: Iterable[Any]) -> int:
        n = sum(len(r) for _, r in dv.iterate(src))
        if device == "gpu":
            torch.cuda.synchronize()
        return n

    epoch(raw[:2])  # build + warm up
    n = batch * batches
    benchmark.pedantic(lambda: epoch(raw), rounds=3, warmup_rounds=0)
    dv.close()
    return n / benchmark.stats.stats.median


def test_dali_cpu_two_view_224(benchmark: Any, jpegs: list[bytes]) -> None:
    """DALI CPU (2 threads) against PIL + torchvision (2 workers), batch 32, float output."""
    patches = [np.frombuffer(j, dtype=np.uint8) for j in jpegs]
    batch, batches, threads = 32, 8, 2
    base = baseline_rate(patches, batch, batches, workers=threads)
    rate = dali_bench(
        benchmark, patches, device="cpu", batch=batch, batches=batches, threads=threads,
        output="float",
    )  # fmt: skip
    benchmark.extra_info.update(
        {"dali_images_per_s": rate, "baseline_images_per_s": base, "speedup": rate / base}
    )
    print(
        f"\n[simclr 2x224, batch {batch}, {threads} threads] PIL+torchvision {base:.0f} images/s, "
        f"DALI CPU {rate:.0f} images/s ({rate / base:.2f}x the PIL+torchvision baseline)"
    )


def test_dali_gpu_two_view_224(benchmark: Any, jpegs: list[bytes]) -> None:
    """DALI GPU (bf16 out) against PIL + torchvision + ``.cuda()``, batch 256, 8 CPU threads."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    patches = [np.frombuffer(j, dtype=np.uint8) for j in jpegs]
    batch, batches, threads = 256, 40, min(8, os.cpu_count() or 1)
    base = baseline_rate(patches, batch, batches, workers=threads, cuda=True)
    rate = dali_bench(
        benchmark, patches, device="gpu", batch=batch, batches=batches, threads=threads,
        output="bfloat16",
    )  # fmt: skip
    benchmark.extra_info.update(
        {"dali_images_per_s": rate, "baseline_images_per_s": base, "speedup": rate / base}
    )
    print(
        f"\n[simclr 2x224, batch {batch}, {threads} CPU threads, {torch.cuda.get_device_name()}] "
        f"PIL+torchvision {base:.0f} images/s, DALI GPU {rate:.0f} images/s "
        f"({rate / base:.2f}x the PIL+torchvision baseline)"
    )
