"""Training throughput: full DINO ViT-S/16 steps (2 x 224 + 8 x 96 crops, 65536-d head,
forward, backward, clipping, fused/foreach AdamW, EMA teacher) on synthetic views already on
the device, eager fp32 against ``torch.compile`` (bf16 autocast where the hardware has bf16),
same run, printed as images/s and their ratio. On CPU a small batch; on a GPU a real one.

CPUs without native bf16 (no AVX512-BF16/AMX, e.g. the AVX2 development machine, where a
1024^3 bf16 matrix product is about 70x slower than fp32) emulate bf16 matrix products, so
there the compiled run stays in fp32 (``pathflow train``'s CPU default) and the bf16 one is
left out with a note.

Run: ``python -m pytest benches/test_bench_train.py --benchmark-only -s``.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

ARCH = "vit_small_patch16_224"


def cpu_has_bf16() -> bool:
    cpu = torch.cpu
    return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())


def _compare(device: str, batch_size: int, steps: int, warmup: int) -> dict[str, Any]:
    from pathflow.train.benchmark import benchmark_train_step

    common: dict[str, Any] = {
        "method": "dino", "arch": ARCH, "batch_size": batch_size, "device": device,
        "steps": steps, "warmup": warmup,
    }  # fmt: skip
    runs = {"eager fp32": benchmark_train_step(precision="fp32", compile=False, **common)}
    if device == "cpu":
        runs["compile fp32"] = benchmark_train_step(precision="fp32", compile=True, **common)
    if device != "cpu" or cpu_has_bf16():
        runs["compile bf16"] = benchmark_train_step(precision="bf16", compile=True, **common)
    return runs


def _report(benchmark: Any, runs: dict[str, Any]) -> None:
    eager = runs["eager fp32"]
    print()
    for name, r in runs.items():
        ratio = r["images_per_s"] / eager["images_per_s"]
        print(
            f"DINO {ARCH} batch {r['batch_size']} {name} on {r['device']}: "
            f"{r['images_per_s']} img/s, {r['ms_per_step']} ms/step, peak GPU memory "
            f"{r['peak_memory_gb']} GB (warm-up with compilation {r['warmup_s']} s); "
            f"{ratio:.2f}x eager fp32"
        )
        key = name.replace(" ", "_")
        benchmark.extra_info[f"{key}_images_per_s"] = r["images_per_s"]
        benchmark.extra_info[f"{key}_vs_eager_fp32"] = round(ratio, 3)
        assert r["images_per_s"] > 0
    if "compile bf16" not in runs:
        print("compile bf16: skipped, this CPU has no native bf16 (AVX512-BF16 / AMX)")


def test_dino_train_step_cpu(benchmark: Any) -> None:
    runs = benchmark.pedantic(_compare, args=("cpu", 2, 2, 2), rounds=1, iterations=1)
    _report(benchmark, runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_dino_train_step_gpu(benchmark: Any) -> None:
    runs = benchmark.pedantic(_compare, args=("cuda", 128, 20, 5), rounds=1, iterations=1)
    _report(benchmark, runs)
