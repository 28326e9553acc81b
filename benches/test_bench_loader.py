"""SSL loader throughput: pathflow's loaders against the loop users write today.

Baseline (same run, same shards, same batch size): ``webdataset`` + PIL decode +
torchvision transforms in a ``torch.utils.data.DataLoader`` with 2 workers, for
* ``two-view``: SimCLR's two 224 px views (RandomResizedCrop, flip, colour jitter p=0.8,
  grayscale p=0.2, Gaussian blur p=0.5);
* ``multi-crop``: DINO's ``DataAugmentationDINO`` (2 x 224 + 8 x 96, the official recipe).

pathflow runs the same recipes (``views="simclr"`` / ``"dino"``) with the torch backend (Rust
decode/crop in 2 workers) and the DALI CPU pipeline (2 threads). Images/s count source
patches (each yields 2 or 10 views). The patches are the 256 px JPEGs that ``pathflow tile
--shards`` writes from the generated 40x slide (``synthetic_slide.py``, real tissue).

Run: ``python -m pytest benches/test_bench_loader.py --benchmark-only -s``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

BATCH = 64
BATCHES = 24  # timed batches per configuration (after 4 warm-up batches)
WARMUP = 4
GPU_BATCH = 256  # on a GPU: real batches, more of them
GPU_BATCHES = 120
GPU_WARMUP = 10


# ------------------------------------------------------------------ baseline recipes


def simclr_transform() -> Callable[[Any], list[Any]]:
    from torchvision import transforms as T

    t = T.Compose(
        [
            T.RandomResizedCrop(224),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    return lambda img: [t(img), t(img)]


def dino_transform() -> Callable[[Any], list[Any]]:
    """facebookresearch/dino's DataAugmentationDINO (main_dino.py), verbatim in substance."""
    from PIL import ImageFilter, ImageOps
    from torchvision import transforms as T

    class GaussianBlur:
        def __init__(self, p: float, lo: float = 0.1, hi: float = 2.0) -> None:
            self.p, self.lo, self.hi = p, lo, hi

        def __call__(self, img: Any) -> Any:
            if random.random() > self.p:
                return img
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))

    class Solarization:
        def __init__(self, p: float) -> None:
            self.p = p

        def __call__(self, img: Any) -> Any:
            return ImageOps.solarize(img) if random.random() < self.p else img

    flip_and_color_jitter = T.Compose(
        [
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
    )
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    bicubic = T.InterpolationMode.BICUBIC
    g1 = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(1.0),
            normalize,
        ]
    )
    g2 = T.Compose(
        [
            T.RandomResizedCrop(224, scale=(0.4, 1.0), interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(0.1),
            Solarization(0.2),
            normalize,
        ]
    )
    loc = T.Compose(
        [
            T.RandomResizedCrop(96, scale=(0.05, 0.4), interpolation=bicubic),
            flip_and_color_jitter,
            GaussianBlur(0.5),
            normalize,
        ]
    )
    return lambda img: [g1(img), g2(img)] + [loc(img) for _ in range(8)]


def baseline_loader(shards: Path, recipe: str) -> Iterable[Any]:
    wds = pytest.importorskip("webdataset")
    pytest.importorskip("torchvision")
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    transform = simclr_transform() if recipe == "two-view" else dino_transform()
    ds = (
        wds.WebDataset(
            urls,
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            empty_check=False,
        )
        .repeat()
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg")
        .map(lambda sample: tuple(transform(sample[0])))
        .batched(BATCH, partial=False)
    )
    return torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=2, prefetch_factor=4, persistent_workers=False
    )


def pathflow_loader(
    shards: Path,
    recipe: str,
    backend: str,
    device: str = "cpu",
    batch: int = BATCH,
    threads: int = 2,
) -> Iterable[Any]:
    from pathflow.data import ShardSet, make_loader

    views = "simclr" if recipe == "two-view" else "dino"
    tars = sorted(shards.glob("*.tar"))
    # On a GPU one pass over the bench shards is only a few batches: list them several times
    # (same bytes, page-cached) so epoch boundaries do not dominate the measurement.
    repeat = 1 if device == "cpu" else 16
    loader = make_loader(
        ShardSet(tars * repeat),
        views=views,
        batch_size=batch,
        backend=backend,
        device=device,
        num_workers=threads,
        output="bfloat16" if device != "cpu" else "float",
    )

    def forever() -> Iterable[Any]:
        while True:
            yield from loader

    return forever()


def measure(
    batches: Iterable[Any], warmup: int = WARMUP, timed: int = BATCHES, cuda: bool = False
) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for _ in range(timed):
        b = next(it)
        views = b if isinstance(b, (list, tuple)) else b.views
        n += int(views[0].shape[0])
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del it
    return n / dt


@pytest.mark.parametrize("recipe", ["two-view", "multi-crop"])
def test_loader_throughput(benchmark: Any, shards: Path, recipe: str) -> None:
    """Baseline, pathflow torch backend and DALI CPU, one after the other in the same run."""
    impls = ["baseline", "torch"]
    try:
        import nvidia.dali  # noqa: F401

        impls.append("dali-cpu")
    except ImportError:
        pass

    def run() -> dict[str, float]:
        rates = {}
        for impl in impls:
            if impl == "baseline":
                rates[impl] = measure(baseline_loader(shards, recipe))
            else:
                backend = "dali" if impl == "dali-cpu" else "torch"
                rates[impl] = measure(pathflow_loader(shards, recipe, backend))
        return rates

    rates = benchmark.pedantic(run, rounds=1, iterations=1)
    base = rates["baseline"]
    for impl, rate in rates.items():
        line = f"[{recipe}] {impl}: {rate:.0f} images/s"
        if impl != "baseline":
            line += f"  ({rate / base:.2f}x the webdataset+PIL+torchvision baseline)"
        print("\n" + line, end="")
    print()
    benchmark.extra_info.update({f"{k}_images_per_s": v for k, v in rates.items()})


@pytest.mark.parametrize("recipe", ["two-view", "multi-crop"])
@pytest.mark.parametrize("impl", ["dali-gpu", "torch-gpu"])
def test_loader_throughput_gpu(benchmark: Any, shards: Path, recipe: str, impl: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl == "dali-gpu":
        pytest.importorskip("nvidia.dali")
    backend = "dali" if impl == "dali-gpu" else "torch"
    threads = min(16, os.cpu_count() or 1)

    def run() -> float:
        src = pathflow_loader(
            shards, recipe, backend, device="cuda", batch=GPU_BATCH, threads=threads
        )
        return measure(src, GPU_WARMUP, GPU_BATCHES, cuda=True)

    rate = benchmark.pedantic(run, rounds=1, iterations=1)
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"\n[{recipe}] {impl} ({torch.cuda.get_device_name()}, batch {GPU_BATCH}, "
        f"{threads} CPU threads): {rate:.0f} images/s, torch peak memory {peak:.2f} GiB"
    )
