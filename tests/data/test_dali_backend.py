"""DALI backend (CPU, ``device_id=None``) against the torch reference on real H&E patches.

The reference for every view is: PIL decode -> PIL resize of the box (BILINEAR, antialiased)
-> ``views.apply_d4`` -> float / 255 -> ``augment_torch.apply_color_stages`` ->
``augment_torch.finish``. Both sides get the same ``ViewParams``.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nvidia.dali")

from pathflow.data import augment_torch  # noqa: E402
from pathflow.data.batch import RawBatch  # noqa: E402
from pathflow.data.dali_backend import DaliPipelineError, DaliViews  # noqa: E402
from pathflow.data.views import (  # noqa: E402
    StainStats,
    ViewSpec,
    ViewsSpec,
    apply_d4,
    create_views,
    sample_batch_params,
    sample_view_params,
)
from pathflow.exceptions import InvalidArgumentError  # noqa: E402
from PIL import Image  # noqa: E402

# A view with every stage off: crop + resize only.
PLAIN = ViewSpec(size=224, hflip=0.0)


@pytest.fixture(scope="session")
def dali_shards(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """``pathflow tile --sample cmu-small --shards``: 43 real 256-px H&E JPEG patches.

    ``PATHFLOW_TEST_SHARDS=<dir with the .tar>`` uses shards written before (for a GPU box
    without network access to fetch the sample slide). The slide backend is pinned to
    openslide: with torch already imported, importing cucim (which ``--backend auto`` probes)
    hangs in this environment.
    """
    if os.environ.get("PATHFLOW_TEST_SHARDS"):
        return Path(os.environ["PATHFLOW_TEST_SHARDS"])
    from pathflow.cli import main

    cmu_path = request.getfixturevalue("cmu_path")
    out = tmp_path_factory.mktemp("dali_shards")
    args = ["tile", str(cmu_path), "--out", str(out), "--shards", "--backend", "openslide", "-q"]
    assert main(args) == 0
    return out / "shards"


@pytest.fixture(scope="session")
def patches(dali_shards: Path) -> list[np.ndarray]:
    """The 43 encoded 256-px JPEG patches of cmu-small, as uint8 arrays."""
    out = []
    for tar in sorted(dali_shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    f = tf.extractfile(m)
                    assert f is not None
                    out.append(np.frombuffer(f.read(), dtype=np.uint8))
    assert len(out) == 43
    return out


@pytest.fixture(scope="session")
def decoded(patches: list[np.ndarray]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(p.tobytes())).convert("RGB") for p in patches]


@pytest.fixture(scope="session")
def stain_stats(decoded: list[Image.Image]) -> StainStats:
    """RandStainNA's distribution fitted on the patches (per-image LAB mean/std)."""
    x = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in decoded])
    lab = augment_torch.rgb_to_lab(x.double() / 255)
    mu = lab.mean(dim=(2, 3)).numpy()
    sd = lab.std(dim=(2, 3), correction=0).numpy()

    def t(a: np.ndarray) -> tuple[float, float, float]:
        return (float(a[0]), float(a[1]), float(a[2]))

    return StainStats(t(mu.mean(0)), t(mu.std(0)), t(sd.mean(0)), t(sd.std(0)))


def make_batches(
    spec: ViewsSpec,
    patches: list[np.ndarray],
    stats: StainStats | None,
    sizes: list[int],
    seed: int = 0,
) -> list[RawBatch]:
    rng = np.random.default_rng(seed)
    out = []
    for b, n in enumerate(sizes):
        idx = rng.choice(len(patches), size=n, replace=False)
        wh = np.full(n, 256)
        params = sample_batch_params(spec, wh, wh, rng, stats)
        meta = {"key": [f"p{i}" for i in idx]}
        out.append(RawBatch([patches[i] for i in idx], params, meta, index=b, epoch=0))
    return out


def run_dali(
    spec: ViewsSpec,
    batches: list[RawBatch],
    output: str = "float",
    batch_size: int = 16,
    dv: DaliViews | None = None,
) -> list[tuple[list[Any], RawBatch]]:
    if dv is None:
        dv = DaliViews(spec, batch_size, device="cpu", output=output, num_threads=2, device_id=None)
    return [([v.clone() for v in views], raw) for views, raw in dv.iterate(iter(batches))]


def crops_u8(raw: RawBatch, decoded: dict[str, Image.Image], view: int) -> np.ndarray:
    """PIL reference crops (N, S, S, 3) uint8, D4 applied."""
    p = raw.params[view]
    out = []
    for i, key in enumerate(raw.meta["key"]):
        x0, y0, w, h = (float(v) for v in p.box[i])
        im = decoded[key].resize((p.size, p.size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
        out.append(np.ascontiguousarray(apply_d4(np.asarray(im), int(p.d4[i]))))
    return np.stack(out)


def reference(
    raw: RawBatch, decoded: dict[str, Image.Image], spec: ViewsSpec, output: str = "float"
) -> list[Any]:
    views = []
    mean, std = torch.tensor(spec.mean), torch.tensor(spec.std)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: intra-op threads only contend with DALI's
    try:
        for v in range(len(raw.params)):
            x = torch.from_numpy(crops_u8(raw, decoded, v)).permute(0, 3, 1, 2).float() / 255
            x = augment_torch.apply_color_stages(x.contiguous(), raw.params[v])
            views.append(augment_torch.finish(x, mean, std, output))
    finally:
        torch.set_num_threads(threads)
    return views


def to_unit(x: Any, spec: ViewsSpec) -> Any:
    """Normalised float output back to [0, 1] RGB."""
    std = torch.tensor(spec.std)[:, None, None]
    mean = torch.tensor(spec.mean)[:, None, None]
    return x.float() * std + mean


@pytest.fixture(scope="session")
def by_key(patches: list[np.ndarray], decoded: list[Image.Image]) -> dict[str, Image.Image]:
    return {f"p{i}": im for i, im in enumerate(decoded)}


def compare(
    spec: ViewsSpec,
    patches: list[np.ndarray],
    by_key: dict[str, Image.Image],
    stats: StainStats | None,
    sizes: list[int],
    seed: int = 0,
) -> list[tuple[float, float]]:
    """(mean, max) abs difference per view in [0, 1] units, DALI float vs the reference."""
    batches = make_batches(spec, patches, stats, sizes, seed)
    got = run_dali(spec, batches)
    assert [raw.index for _, raw in got] == list(range(len(sizes)))
    diffs: list[list[Any]] = [[] for _ in range(spec.num_views)]
    for views, raw in got:
        ref = reference(raw, by_key, spec)
        for v, (a, b) in enumerate(zip(views, ref, strict=True)):
            assert a.shape == b.shape == (len(raw), 3, raw.params[v].size, raw.params[v].size)
            diffs[v].append((to_unit(a, spec) - to_unit(b, spec)).abs().flatten())
    out = []
    for d in diffs:
        cat = torch.cat(d)
        out.append((float(cat.mean()), float(cat.max())))
    return out


# --------------------------------------------------------------------------- crop and D4


def test_resize_matches_pil(patches: list[np.ndarray], by_key: dict[str, Image.Image]) -> None:
    # 224 px views mostly upsample, 96 px views downsample: both filters of the resize.
    spec = ViewsSpec((PLAIN, replace(PLAIN, size=96, scale=(0.3, 1.0))))
    batches = make_batches(spec, patches, None, [16, 16])
    got = run_dali(spec, batches, output="uint8")
    for v in range(2):
        diffs, inner = [], []
        for views, raw in got:
            a = views[v].permute(0, 2, 3, 1).numpy().astype(np.int16)
            b = crops_u8(raw, by_key, v).astype(np.int16)
            d = np.abs(a - b)
            diffs.append(d)
            box = raw.params[v].box
            away = (box[:, 0] > 2) & (box[:, 1] > 2) & (box[:, 0] + box[:, 2] < 254)
            away &= box[:, 1] + box[:, 3] < 254
            inner.append(d[away])
        d = np.concatenate([x.ravel() for x in diffs])
        print(f"view {v}: resize vs PIL mean abs {d.mean():.3f}, max {d.max()} (0..255)")
        assert d.mean() < 1.0
        # Away from the image border DALI's filter equals PIL's up to rounding.
        assert max(int(x.max()) for x in inner if x.size) <= 1


def test_d4_is_exact(patches: list[np.ndarray]) -> None:
    spec = ViewsSpec((replace(PLAIN, size=64, hflip=0.5, vflip=0.5, rot90=0.75),))
    batches = make_batches(spec, patches, None, [16])
    batches[0].params[0].d4[:] = np.arange(16) % 8  # every code, twice
    plain = [replace(b, params=[replace(b.params[0], d4=np.zeros(16, np.uint8))]) for b in batches]
    ((views, raw),) = run_dali(spec, batches, output="uint8")
    ((base, _),) = run_dali(spec, plain, output="uint8")
    a = views[0].permute(0, 2, 3, 1).numpy()
    b = base[0].permute(0, 2, 3, 1).numpy()
    for i, code in enumerate(raw.params[0].d4):
        assert np.array_equal(a[i], apply_d4(b[i], int(code))), f"D4 code {code}"


# ------------------------------------------------------------------------- colour stages

STAGES = {
    "randstain": dict(randstain=1.0),
    "hed": dict(hed=1.0, hed_sigma=0.1),
    "jitter": dict(jitter=1.0, brightness=0.6, contrast=0.6, saturation=0.6, hue=0.2),
    "grayscale": dict(grayscale=1.0),
    "blur": dict(blur=1.0, blur_sigma=(0.1, 3.0)),
    "solarize": dict(solarize=1.0),
    "half-each": dict(randstain=0.5, hed=0.5, jitter=0.5, grayscale=0.3, blur=0.5, solarize=0.5),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_color_stage_matches_torch(
    stage: str,
    patches: list[np.ndarray],
    by_key: dict[str, Image.Image],
    stain_stats: StainStats,
) -> None:
    view = replace(PLAIN, size=128, scale=(0.2, 1.0), **STAGES[stage])  # type: ignore[arg-type]
    spec = ViewsSpec((view,))
    ((mad, mx),) = compare(spec, patches, by_key, stain_stats, [12, 9], seed=1)
    print(f"{stage}: mean abs {mad * 255:.3f}/255, max {mx * 255:.1f}/255")
    assert mad < 1.5 / 255


def test_stage_math_matches_torch_on_identical_input(stain_stats: StainStats) -> None:
    """The float stages alone (same uint8 input, no decode/resize): float32 rounding only."""
    from nvidia.dali import fn, pipeline_def
    from pathflow.data import dali_backend as D

    rng = np.random.default_rng(10)
    n = 6
    u8 = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(n)]
    u8[0][:] = 255  # flat image: LAB std clamped to 1e-3, rounding noise amplified
    u8[1][:] = 0
    view = replace(PLAIN, randstain=1.0, hed=1.0, hed_sigma=0.2, jitter=1.0, grayscale=0.3)
    p = sample_view_params(view, np.full(n, 24), np.full(n, 24), rng, stain_stats)

    def feed(a: np.ndarray) -> Any:
        return lambda: np.ascontiguousarray(a, dtype=np.float32)

    @pipeline_def(batch_size=n, num_threads=1, device_id=None)  # type: ignore[untyped-decorator]
    def pipe() -> Any:
        x = fn.external_source(source=lambda: u8, batch=True, layout="HWC")
        tm = fn.external_source(source=feed(p.stain_mean.reshape(n, 1, 1, 3)), batch=True)
        ts = fn.external_source(source=feed(p.stain_std.reshape(n, 1, 1, 3)), batch=True)
        hm = fn.external_source(source=feed(p.hed_matrix), batch=True)
        ho = fn.external_source(source=feed(p.hed_offset), batch=True)
        cm = fn.external_source(source=feed(p.color_matrix), batch=True)
        ck = fn.external_source(source=feed(p.color_k.reshape(n, 1, 1, 1)), batch=True)
        f = x / 255.0
        stain = D._randstain(D._rgb_to_lab_u8(x), tm, ts)
        return stain, D._hed(f, hm, ho), D._color(f, cm, ck), D._solarize(f)

    pp = pipe()
    pp.build()
    outs = pp.run()
    x = torch.from_numpy(np.stack(u8)).permute(0, 3, 1, 2).float() / 255
    t = torch.from_numpy
    refs = [
        augment_torch.randstain(x.clone(), t(p.stain_mean), t(p.stain_std)),
        augment_torch.hed_jitter(x.clone(), t(p.hed_matrix), t(p.hed_offset)),
        augment_torch.color_jitter(x.clone(), t(p.color_matrix), t(p.color_k)),
        torch.where(x >= 0.5, 1.0 - x, x),
    ]
    errs = []
    for o, r in zip(outs, refs, strict=True):
        d = np.stack([np.asarray(o.at(i)) for i in range(n)]) - r.permute(0, 2, 3, 1).numpy()
        errs.append(np.abs(d).reshape(n, -1).max(axis=1))
    stain, hed, color, solar = errs
    assert stain[0] < 2e-3 and stain[1:].max() < 2e-6, stain
    assert hed.max() < 1e-6 and color.max() < 1e-6, (hed, color)
    assert solar.max() == 0.0


@pytest.mark.parametrize("preset", ["simclr", "dino", "pathology-dino"])
def test_presets_match_torch(
    preset: str,
    patches: list[np.ndarray],
    by_key: dict[str, Image.Image],
    stain_stats: StainStats,
) -> None:
    spec = create_views(preset)
    batches = make_batches(spec, patches, stain_stats, [10], seed=2)
    ((views, raw),) = run_dali(spec, batches)
    ref = reference(raw, by_key, spec)
    for v, (a, b) in enumerate(zip(views, ref, strict=True)):
        ua, ub = to_unit(a, spec), to_unit(b, spec)
        mad = float((ua - ub).abs().mean())
        # per-image channel means and spreads agree: same augmentations were applied
        dm = float((ua.mean(dim=(2, 3)) - ub.mean(dim=(2, 3))).abs().max())
        ds = float((ua.std(dim=(2, 3)) - ub.std(dim=(2, 3))).abs().max())
        assert mad < 1.5 / 255, (preset, v, mad * 255)
        assert dm < 1.0 / 255 and ds < 1.0 / 255, (preset, v, dm * 255, ds * 255)


# ------------------------------------------------------------------- outputs and plumbing


def test_outputs_dtypes_and_short_batches(
    patches: list[np.ndarray], by_key: dict[str, Image.Image], stain_stats: StainStats
) -> None:
    spec = create_views("pathology", global_size=96)
    batches = make_batches(spec, patches, stain_stats, [8, 8, 3], seed=3)
    f32 = run_dali(spec, batches, "float", batch_size=8)
    bf16 = run_dali(spec, batches, "bfloat16", batch_size=8)
    u8 = run_dali(spec, batches, "uint8", batch_size=8)
    assert [len(raw) for _, raw in u8] == [8, 8, 3]
    for (a, ra), (b, _), (c, _) in zip(f32, bf16, u8, strict=True):
        assert [raw.meta for raw in (ra,)] == [batches[ra.index].meta]
        for x, y, z in zip(a, b, c, strict=True):
            assert x.dtype == torch.float32 and y.dtype == torch.bfloat16 and z.dtype == torch.uint8
            assert x.shape == y.shape == z.shape == (len(ra), 3, 96, 96)
            assert torch.allclose(x.to(torch.bfloat16).float(), y.float())
        ref = reference(ra, by_key, spec, "uint8")
        for z, r in zip(c, ref, strict=True):
            assert (z.int() - r.int()).abs().float().mean() < 1.5


def test_unconditional_stages_are_identical(
    patches: list[np.ndarray], stain_stats: StainStats
) -> None:
    """The GPU default (colour, blur, solarise on every sample with identity parameters for the
    others) gives bit-identical output to the CPU default (DALI conditionals)."""
    spec = create_views("byol", global_size=64)
    spec = replace(spec, groups=(*spec.groups, replace(spec.groups[1], randstain=0.5, hed=0.5)))
    batches = make_batches(spec, patches, stain_stats, [8, 5], seed=9)
    runs = []
    for cond in (True, False):
        dv = DaliViews(spec, 8, device="cpu", output="float", num_threads=2, conditionals=cond)
        runs.append([[v.clone() for v in views] for views, _ in dv.iterate(batches)])
    for va, vb in zip(*runs, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))


def test_outputs_are_not_recycled(patches: list[np.ndarray]) -> None:
    """Zero-copy outputs stay valid while DALI keeps running (dynamic executor, no reuse)."""
    spec = ViewsSpec((replace(PLAIN, size=48, rot90=0.5),))
    batches = make_batches(spec, patches, None, [4] * 6, seed=8)
    dv = DaliViews(spec, 4, device="cpu", output="uint8", num_threads=2, prefetch=2)
    kept, copies = [], []
    for views, _ in dv.iterate(batches):
        kept.append(views[0])
        copies.append(views[0].clone())
    list(dv.iterate(batches))  # another epoch through the same pipeline
    assert all(torch.equal(a, b) for a, b in zip(kept, copies, strict=True))
    assert not torch.equal(kept[0], kept[1])


def test_same_seed_same_output(patches: list[np.ndarray], stain_stats: StainStats) -> None:
    spec = create_views("pathology-dino", num_local=2)
    dv = DaliViews(spec, 8, device="cpu", output="float", num_threads=2)
    a = run_dali(spec, make_batches(spec, patches, stain_stats, [8, 5], seed=4), dv=dv)
    b = run_dali(spec, make_batches(spec, patches, stain_stats, [8, 5], seed=4), dv=dv)
    c = run_dali(spec, make_batches(spec, patches, stain_stats, [8, 5], seed=5), dv=dv)
    fresh = run_dali(spec, make_batches(spec, patches, stain_stats, [8, 5], seed=4), batch_size=8)
    for (va, _), (vb, _), (vf, _) in zip(a, b, fresh, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(va, vb, strict=True))
        assert all(torch.equal(x, y) for x, y in zip(va, vf, strict=True))
    assert not torch.equal(a[0][0][0], c[0][0][0])


def test_reuse_after_abandoned_iteration(
    patches: list[np.ndarray], by_key: dict[str, Image.Image]
) -> None:
    spec = ViewsSpec((replace(PLAIN, size=64, rot90=0.5),))
    batches = make_batches(spec, patches, None, [4, 4, 4, 4], seed=6)
    dv = DaliViews(spec, 4, device="cpu", output="uint8", num_threads=2)
    for _views, raw in dv.iterate(iter(batches)):
        assert raw.index == 0
        break  # batches 1-2 are in flight (prefetch) and must not leak into the next epoch
    for _ in range(2):  # a fresh pipeline, then a reset one
        got = list(dv.iterate(batches[1:]))
        assert [raw.index for _, raw in got] == [1, 2, 3]
        for views, raw in got:
            ref = crops_u8(raw, by_key, 0).astype(np.int16)
            d = np.abs(views[0].permute(0, 2, 3, 1).numpy().astype(np.int16) - ref)
            assert d.mean() < 1.0
    dv.close()


def test_errors_are_clear(patches: list[np.ndarray]) -> None:
    spec = ViewsSpec((replace(PLAIN, size=32),))
    batches = make_batches(spec, patches, None, [4])
    broken = replace(batches[0], data=[np.frombuffer(b"\xff\xd8 not a jpeg", np.uint8)] * 4)
    with pytest.raises(DaliPipelineError, match="batch 0"):
        run_dali(spec, [broken], batch_size=4)
    with pytest.raises(InvalidArgumentError, match="samples"):
        run_dali(spec, batches, batch_size=2)
    # an error in the caller's batch source surfaces unchanged, not as a DALI failure

    def failing() -> Any:
        yield batches[0]
        raise OSError("shard went away")

    with pytest.raises(OSError, match="shard went away"):
        run_dali(spec, failing(), batch_size=4)  # type: ignore[arg-type]
    # parameters drawn from another spec (with a rotation the graph does not contain)
    other = ViewsSpec((replace(PLAIN, size=32, rot90=1.0),))
    with pytest.raises(InvalidArgumentError, match="rot90"):
        run_dali(spec, make_batches(other, patches, None, [4]), batch_size=4)


# ------------------------------------------------------------ GPU (skipped without CUDA)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_gpu(
    spec: ViewsSpec, batches: list[RawBatch], output: str = "float", batch_size: int = 16
) -> list[tuple[list[Any], RawBatch]]:
    dv = DaliViews(spec, batch_size, device="gpu", output=output, num_threads=4, device_id=0)
    out = []
    for views, raw in dv.iterate(iter(batches)):
        assert all(v.device == torch.device("cuda", 0) for v in views)
        out.append(([v.cpu() for v in views], raw))
    return out


@needs_cuda
@pytest.mark.parametrize("preset", ["simclr", "pathology-dino"])
def test_gpu_matches_cpu_and_torch(
    preset: str,
    patches: list[np.ndarray],
    by_key: dict[str, Image.Image],
    stain_stats: StainStats,
) -> None:
    spec = create_views(preset)
    batches = make_batches(spec, patches, stain_stats, [16, 11], seed=11)
    gpu = run_gpu(spec, batches)
    cpu = run_dali(spec, batches)
    assert [raw.index for _, raw in gpu] == [0, 1]
    for (vg, raw), (vc, _) in zip(gpu, cpu, strict=True):
        ref = reference(raw, by_key, spec)
        for a, b, c in zip(vg, ref, vc, strict=True):
            ua, ub, uc = to_unit(a, spec), to_unit(b, spec), to_unit(c, spec)
            # nvJPEG vs libjpeg-turbo is the only difference from the CPU graph
            assert float((ua - uc).abs().mean()) < 0.1 / 255
            assert float((ua - ub).abs().mean()) < 1.5 / 255


@needs_cuda
def test_gpu_d4_exact_zero_copy_and_dtypes(patches: list[np.ndarray]) -> None:
    spec = ViewsSpec((replace(PLAIN, size=64, hflip=0.5, vflip=0.5, rot90=0.75),))
    batches = make_batches(spec, patches, None, [16])
    batches[0].params[0].d4[:] = np.arange(16) % 8
    plain = [replace(b, params=[replace(b.params[0], d4=np.zeros(16, np.uint8))]) for b in batches]
    ((views, raw),) = run_gpu(spec, batches, "uint8")
    ((base, _),) = run_gpu(spec, plain, "uint8")
    a = views[0].permute(0, 2, 3, 1).numpy()
    b = base[0].permute(0, 2, 3, 1).numpy()
    for i, code in enumerate(raw.params[0].d4):
        assert np.array_equal(a[i], apply_d4(b[i], int(code))), f"D4 code {code}"
    # zero copy: tensors kept across iterations are never overwritten
    spec = create_views("simclr")
    many = make_batches(spec, patches, None, [16] * 6, seed=12)
    dv = DaliViews(spec, 16, device="gpu", output="bfloat16", num_threads=4, device_id=0)
    kept, copies = [], []
    for vs, _ in dv.iterate(many):
        assert vs[0].dtype == torch.bfloat16
        kept.append(vs[0])
        copies.append(vs[0].clone())
    list(dv.iterate(many))
    torch.cuda.synchronize()
    assert all(torch.equal(x, y) for x, y in zip(kept, copies, strict=True))
