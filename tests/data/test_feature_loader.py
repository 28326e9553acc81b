"""make_feature_loader: HIPT ViT-4K views over region-feature HDF5 files.

Every cell of the test files encodes where it comes from: channel 0 the file, 1 the region,
2 the grid row, 3 the grid column (small integers, exact in float16 and bfloat16), so every
view can be traced back to its sample, offset and flips exactly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pathflow.data.features import (  # noqa: E402
    FeatureCropSpec,
    RegionFeatureLoader,
    RegionFeatureSet,
    is_region_feature_folder,
    make_feature_loader,
)
from pathflow.exceptions import ConfigError  # noqa: E402


def region_grid(file_id: int, m: int, grid: int, dim: int = 4) -> np.ndarray:
    data = np.zeros((m, grid * grid, dim), dtype=np.float16)
    r, c = np.divmod(np.arange(grid * grid), grid)
    data[:, :, 0] = file_id
    data[:, :, 1] = np.arange(m)[:, None]
    data[:, :, 2] = r
    data[:, :, 3] = c
    return data


def write_h5(
    path: Path,
    file_id: int,
    m: int,
    *,
    grid: int = 16,
    dim: int = 4,
    chunked: bool = False,
    data: np.ndarray | None = None,
    attrs: bool = True,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = region_grid(file_id, m, grid, dim)
    with h5py.File(path, "w") as f:
        if chunked:
            f.create_dataset("region_features", data=data, chunks=True, compression="gzip")
        else:
            f.create_dataset("region_features", data=data)
        coords = np.stack([np.arange(m) * 4096, np.full(m, file_id * 4096)], 1)
        f.create_dataset("coords", data=coords.astype(np.int64))
        if attrs:
            f.attrs["slide"] = f"slide{file_id}"
            f.attrs["grid"] = grid
    return path


def make_folder(root: Path, sizes: Sequence[int], **kw: Any) -> Path:
    for i, m in enumerate(sizes):
        write_h5(root / f"s{i}.h5", i, m, **kw)
    return root


def crop_info(view: torch.Tensor) -> dict[str, np.ndarray]:
    """Per sample: file, region, top, left, hflip, vflip, read back from the encoded cells."""
    v = view.float()
    s = v.shape[-1]
    return {
        "file": v[:, 0, 0, 0].long().numpy(),
        "region": v[:, 1, 0, 0].long().numpy(),
        "top": v[:, 2].amin((1, 2)).long().numpy(),
        "left": v[:, 3].amin((1, 2)).long().numpy(),
        "hflip": (v[:, 3, 0, 0] > v[:, 3, 0, s - 1]).numpy(),
        "vflip": (v[:, 2, 0, 0] > v[:, 2, s - 1, 0]).numpy(),
    }


def check_views_are_crops(batch: Any, fs: RegionFeatureSet, spec: FeatureCropSpec) -> None:
    g = fs.grid
    for v, (view, size) in enumerate(zip(batch.views, spec.sizes(), strict=True)):
        info = crop_info(view)
        for i, key in enumerate(batch.meta["key"]):
            f, reg = int(info["file"][i]), int(info["region"][i])
            assert key == f"slide{f}/{reg}" and batch.meta["slide"][i] == f"slide{f}"
            src = fs.read([int(fs.starts[f]) + reg])[0].reshape(g, g, fs.dim)
            t, left = int(info["top"][i]), int(info["left"][i])
            assert 0 <= t <= g - size and 0 <= left <= g - size, (v, t, left)
            want = src[t : t + size, left : left + size]
            if info["hflip"][i]:
                want = want[:, ::-1]
            if info["vflip"][i]:
                want = want[::-1]
            want_t = torch.from_numpy(np.ascontiguousarray(want.transpose(2, 0, 1)))
            assert torch.equal(view[i].float(), want_t.float()), (v, i)


def batches_of(loader: RegionFeatureLoader) -> list[Any]:
    return list(loader)


def test_views_are_crops_shapes_and_meta(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "feat", [37, 29])
    write_h5(tmp_path / "feat" / "empty.h5", 9, 0)  # no regions: skipped
    loader = make_feature_loader(root, batch_size=16, seed=3)
    fs = loader.features
    assert len(fs) == 66 and fs.slides == ["slide0", "slide1"] and (fs.grid, fs.dim) == (16, 4)
    assert len(loader) == 4 and loader.spec == FeatureCropSpec()
    assert getattr(loader.spec, "mean", None) is None
    batches = batches_of(loader)
    assert [b.index for b in batches] == [0, 1, 2, 3] and loader.epoch == 1
    b = batches[0]
    assert [tuple(v.shape) for v in b.views] == [(16, 4, 14, 14)] * 2 + [(16, 4, 6, 6)] * 8
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in b.views)
    assert b.meta["label"].tolist() == [-1] * 16 and b.meta["x"].dtype == torch.int64
    regions = [int(k.split("/")[1]) for k in b.meta["key"]]
    files = [int(s[-1]) for s in b.meta["slide"]]
    assert b.meta["x"].tolist() == [r * 4096 for r in regions]
    assert b.meta["y"].tolist() == [f * 4096 for f in files]
    for batch in batches:
        check_views_are_crops(batch, fs, loader.spec)
    st = loader.stats
    assert st["samples"] == 64 and st["batches"] == 4
    assert 1 <= st["slides_per_batch_min"] <= st["slides_per_batch_mean"] <= 2

    bf = make_feature_loader(root, batch_size=16, seed=3, output="bfloat16")
    bb = next(iter(bf))
    assert all(v.dtype == torch.bfloat16 for v in bb.views)
    assert all(torch.equal(x.float(), y) for x, y in zip(bb.views, b.views, strict=True))


def test_offsets_uniform_and_flip_rates(tmp_path: Path) -> None:
    from scipy.stats import chisquare

    loader = make_feature_loader(make_folder(tmp_path, [400, 400]), batch_size=100, seed=11)
    spec = loader.spec
    infos: list[list[dict[str, np.ndarray]]] = [[] for _ in range(spec.num_views)]
    for batch in loader:
        for v, view in enumerate(batch.views):
            infos[v].append(crop_info(view))

    def cat(vs: range, k: str) -> np.ndarray:
        return np.concatenate([i[k] for v in vs for i in infos[v]])

    globals_, locals_ = range(spec.num_global), range(spec.num_global, spec.num_views)
    for vs, size in ((globals_, 14), (locals_, 6)):
        for k in ("top", "left"):
            counts = np.bincount(cat(vs, k), minlength=16 - size + 1)
            assert len(counts) == 16 - size + 1  # never outside 0..G-size
            assert chisquare(counts).pvalue > 1e-3, (size, k, counts)
        # offsets of different views / axes are independent: the pairs are uniform too
        pair = cat(vs, "top") * (16 - size + 1) + cat(vs, "left")
        assert chisquare(np.bincount(pair, minlength=(16 - size + 1) ** 2)).pvalue > 1e-3
    flips = cat(range(spec.num_views), "hflip")
    n = len(flips)
    assert n == 8000 and abs(flips.sum() - n * 0.5) < 4 * np.sqrt(n * 0.25)
    assert not cat(range(spec.num_views), "vflip").any()  # HIPT: horizontal flips only


def test_vflip_option(tmp_path: Path) -> None:
    spec = FeatureCropSpec(hflip=0.0, vflip=1.0, num_local=2)
    loader = make_feature_loader(make_folder(tmp_path, [20]), batch_size=10, spec=spec)
    for batch in loader:
        check_views_are_crops(batch, loader.features, spec)
        assert all(crop_info(v)["vflip"].all() for v in batch.views)
        assert not any(crop_info(v)["hflip"].any() for v in batch.views)


def test_every_sample_once_per_epoch_across_ranks(tmp_path: Path) -> None:
    root = make_folder(tmp_path, [37, 29])

    def epoch_keys(rank: int, drop_last: bool, epochs: int = 1) -> list[list[str]]:
        ld = make_feature_loader(
            root, batch_size=8, rank=rank, world_size=2, drop_last=drop_last, seed=5
        )
        return [[k for b in ld for k in b.meta["key"]] for _ in range(epochs)]

    a, b = epoch_keys(0, True, 2), epoch_keys(1, True, 2)
    for e in range(2):
        assert len(a[e]) == len(b[e]) == 32  # 33 per rank, 4 batches of 8
        assert len(set(a[e])) == 32 and not set(a[e]) & set(b[e])
    assert a[0] != a[1]  # a new permutation every epoch
    a, b = epoch_keys(0, False), epoch_keys(1, False)
    assert len(a[0]) == len(b[0]) == 33
    assert sorted(a[0] + b[0]) == sorted(f"slide{f}/{r}" for f, m in ((0, 37), (1, 29))
                                            for r in range(m))  # fmt: skip


def test_resume_gives_the_same_batches(tmp_path: Path) -> None:
    root = make_folder(tmp_path, [30, 25])
    ref = make_feature_loader(root, batch_size=8, seed=7)
    full = batches_of(ref) + batches_of(ref)  # epochs 0 and 1, 6 batches each
    part = make_feature_loader(root, batch_size=8, seed=7)
    it = iter(part)
    for _ in range(3):
        next(it)
    it.close()  # type: ignore[attr-defined]
    state = part.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 3 and state["stats"]["batches"] == 3

    resumed = make_feature_loader(root, batch_size=8, seed=7)
    resumed.set_epoch(0)
    resumed.load_state_dict(state)
    got = batches_of(resumed) + batches_of(resumed)
    assert [(b.epoch, b.index) for b in got] == [(b.epoch, b.index) for b in full[3:]]
    for x, y in zip(got, full[3:], strict=True):
        assert x.meta["key"] == y.meta["key"]
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))
    assert resumed.stats["batches"] == 12 and resumed.stats["samples"] == 96

    # a state saved after the last batch of an epoch resumes at the next epoch
    end = make_feature_loader(root, batch_size=8, seed=7)
    batches_of(end)
    end_state = dict(end.state_dict(), epoch=0, batch=len(end))
    again = make_feature_loader(root, batch_size=8, seed=7)
    again.load_state_dict(end_state)
    nxt = next(iter(again))
    assert (nxt.epoch, nxt.index) == (1, 0) and nxt.meta["key"] == full[6].meta["key"]

    other = make_feature_loader(root, batch_size=8, seed=8)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_give_each_sample_the_same_crops(tmp_path: Path, drop_last: bool) -> None:
    root = make_folder(tmp_path, [40, 27])  # 67 regions

    def crops(**kw: Any) -> dict[str, list[torch.Tensor]]:
        ld = make_feature_loader(root, seed=2, drop_last=drop_last, **kw)
        return {
            k: [v[i] for v in b.views]
            for b in ld
            for i, k in enumerate(b.meta["key"])
        }  # fmt: skip

    single = crops(batch_size=8, world_size=1, rank=0)
    r0 = crops(batch_size=4, world_size=2, rank=0)
    r1 = crops(batch_size=4, world_size=2, rank=1)
    assert not set(r0) & set(r1)
    both = {**r0, **r1}
    shared = set(both) & set(single)
    assert len(shared) >= 56 if drop_last else len(shared) == 67
    for k in shared:
        assert all(torch.equal(a, b) for a, b in zip(both[k], single[k], strict=True)), k


def test_memmap_and_h5py_fallback_agree(tmp_path: Path) -> None:
    plain = make_folder(tmp_path / "plain", [23, 31])
    packed = make_folder(tmp_path / "packed", [23, 31], chunked=True)
    a, b = RegionFeatureSet(plain), RegionFeatureSet(packed)
    assert a.memmapped == [True, True] and all(isinstance(x, np.memmap) for x in a._arrays)
    assert b.memmapped == [False, False]
    idx = np.random.default_rng(0).integers(0, len(a), 40)  # unsorted, with repeats
    ra, rb = a.read(idx), b.read(idx)
    assert ra.dtype == rb.dtype == np.float16 and ra.shape == (40, 256, 4)
    np.testing.assert_array_equal(ra, rb)
    ref = np.concatenate([region_grid(0, 23, 16), region_grid(1, 31, 16)])
    np.testing.assert_array_equal(ra, ref[idx])
    la = make_feature_loader(a, batch_size=9, seed=1)
    lb = make_feature_loader(b, batch_size=9, seed=1)
    for x, y in zip(la, lb, strict=True):
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))
    b.close()


def test_small_grid_and_features_subfolder(tmp_path: Path) -> None:
    make_folder(tmp_path / "run" / "features", [12, 9], grid=4, dim=6)
    (tmp_path / "run" / "other.h5").write_bytes(b"not hdf5")  # outside features/: ignored
    assert is_region_feature_folder(tmp_path / "run")
    loader = make_feature_loader(tmp_path / "run", batch_size=5)
    assert loader.spec == FeatureCropSpec.for_grid(4) and loader.spec.sizes()[:3] == [3, 3, 2]
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch.views] == [(5, 6, 3, 3)] * 2 + [(5, 6, 2, 2)] * 8
    check_views_are_crops(batch, loader.features, loader.spec)
    with pytest.raises(ConfigError, match="do not fit"):
        make_feature_loader(tmp_path / "run", batch_size=5, spec=FeatureCropSpec())
    with pytest.raises(ValueError, match="no batch"):
        make_feature_loader(tmp_path / "run", batch_size=22)


def test_is_region_feature_folder(tmp_path: Path) -> None:
    assert not is_region_feature_folder(tmp_path)  # empty
    with h5py.File(tmp_path / "patches.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((3, 8)))
    assert not is_region_feature_folder(tmp_path)
    assert not is_region_feature_folder(tmp_path / "patches.h5")  # a file, not a folder
    write_h5(tmp_path / "sub" / "a.h5", 0, 3, attrs=False)
    assert is_region_feature_folder(tmp_path)
    fs = RegionFeatureSet(tmp_path)  # patches.h5 has no region_features: skipped
    assert fs.slides == ["a"] and len(fs) == 3  # no slide attribute: the file stem


def test_bad_files_name_the_file(tmp_path: Path) -> None:
    def one_line_error(folder: Path, bad: Path) -> None:
        with pytest.raises(ConfigError, match=re.escape(str(bad))) as exc:
            RegionFeatureSet(folder)
        assert "\n" not in str(exc.value)

    flat = tmp_path / "flat"
    write_h5(flat / "a.h5", 0, 3)
    bad = write_h5(flat / "b.h5", 1, 3, data=np.zeros((3, 256), np.float16))
    one_line_error(flat, bad)

    nonsquare = tmp_path / "nonsquare"
    bad = write_h5(nonsquare / "a.h5", 0, 3, data=np.zeros((3, 15, 4), np.float16), attrs=False)
    one_line_error(nonsquare, bad)

    dims = tmp_path / "dims"
    write_h5(dims / "a.h5", 0, 3, dim=4)
    bad = write_h5(dims / "b.h5", 1, 3, dim=8)
    one_line_error(dims, bad)

    grids = tmp_path / "grids"
    write_h5(grids / "a.h5", 0, 3, grid=16)
    bad = write_h5(grids / "b.h5", 1, 3, grid=8)
    one_line_error(grids, bad)

    with pytest.raises(ConfigError, match="no regions"):
        RegionFeatureSet([write_h5(tmp_path / "e.h5", 0, 0)])


def test_stopping_early_ends_the_reader_thread_and_errors_surface(tmp_path: Path) -> None:
    loader = make_feature_loader(make_folder(tmp_path, [40]), batch_size=4)
    before = threading.active_count()
    for batch in loader:
        if batch.index == 1:
            break
    assert threading.active_count() == before
    assert loader.state_dict()["batch"] == 2

    def broken(_: Any) -> np.ndarray:
        raise OSError("disk gone")

    loader.features.read = broken  # type: ignore[method-assign]
    with pytest.raises(OSError, match="disk gone"):
        next(iter(loader))
    assert threading.active_count() == before


def test_lazy_exports_keep_pathflow_data_torch_free() -> None:
    import pathflow.data as pd

    assert pd.make_feature_loader is make_feature_loader
    assert pd.RegionFeatureSet is RegionFeatureSet
    code = "import sys, pathflow.data; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
