"""A loader backend added from one file (a class plus one registration line) is reached
through ``make_loader(backend=...)`` and gets the loader's real batches of the sample shards."""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from pathflow.data import backends, list_loader_backends, make_loader
from PIL import Image

TOY = '''
"""Toy loader backend: every view is the whole image, decoded by Pillow and resized."""
import io

import numpy as np
import torch
from PIL import Image

from pathflow.data import register_loader_backend
from pathflow.data.batch import Batch

CREATED = []


class ToyBackend:
    def __init__(self, cfg, spec):
        self.cfg, self.spec = cfg, spec
        CREATED.append(self)

    def iterate(self, source, start):
        mean = np.asarray(self.spec.mean, dtype=np.float32)
        std = np.asarray(self.spec.std, dtype=np.float32)
        for raw in source.raw_batches(start):
            images = [Image.open(io.BytesIO(d.tobytes())).convert("RGB") for d in raw.data]
            views = []
            for p in raw.params:
                s = p.size
                a = np.stack([np.asarray(im.resize((s, s), Image.BILINEAR)) for im in images])
                a = (a.astype(np.float32) / 255 - mean) / std
                views.append(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous())
            yield Batch.from_raw(views, raw)

    def close(self):
        pass


register_loader_backend("toy", ToyBackend)
'''


@pytest.fixture
def toy_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Import the toy plug-in from its own file; the registry is restored afterwards."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    path = tmp_path / "toy_loader_backend.py"
    path.write_text(TOY)
    spec = importlib.util.spec_from_file_location("toy_loader_backend", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "toy_loader_backend", module)
    spec.loader.exec_module(module)
    yield module


def _shard_images(shards: Path) -> dict[str, bytes]:
    """Every sample's encoded image, read straight from the tar files."""
    out: dict[str, bytes] = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    f = tf.extractfile(m)
                    assert f is not None
                    out[m.name[: -len(".jpg")]] = f.read()
    return out


def test_toy_backend_from_one_file_yields_the_loaders_batches(
    sample_shards: Path, toy_backend: object
) -> None:
    assert "toy" in list_loader_backends()
    kw = dict(views="simclr", batch_size=8, device="cpu", num_workers=0, seed=3)
    loader = make_loader(sample_shards, backend="toy", **kw)  # type: ignore[arg-type]
    assert loader.cfg.backend == "toy"
    batches = list(loader)
    assert len(batches) == 43 // 8 == len(loader)
    assert len(toy_backend.CREATED) == 1  # type: ignore[attr-defined]

    # the same samples in the same order as the built-in torch backend gives
    ref = list(make_loader(sample_shards, backend="torch", **kw))  # type: ignore[arg-type]
    for b, r in zip(batches, ref, strict=True):
        assert b.index == r.index and b.epoch == r.epoch == 0
        assert b.meta["key"] == r.meta["key"]
        assert b.meta["index"].tolist() == r.meta["index"].tolist()
        assert [v.shape for v in b.views] == [v.shape for v in r.views] == [(8, 3, 224, 224)] * 2

    # real pixels: each view is the sample's own JPEG, decoded independently from the tar
    images = _shard_images(sample_shards)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for i in (0, 5):
        key = batches[2].meta["key"][i]
        rgb = np.asarray(Image.open(io.BytesIO(images[key])).convert("RGB"))
        assert rgb.shape == (256, 256, 3) and rgb.std() > 10  # real tissue, not blank
        want = np.asarray(Image.fromarray(rgb).resize((224, 224), Image.BILINEAR))
        got = batches[2].views[1][i].permute(1, 2, 0).numpy() * std + mean
        np.testing.assert_allclose(got * 255, want, atol=1e-3)
    assert loader.stats["samples"] == 40 and loader.stats["batches"] == 5

    # the backend is kept across epochs and the loader's position still works
    assert len(list(loader)) == 5 and loader.epoch == 2
    assert len(toy_backend.CREATED) == 1  # type: ignore[attr-defined]


def test_unknown_loader_backend_names_the_registered_ones(
    sample_shards: Path, toy_backend: object
) -> None:
    with pytest.raises(ValueError, match=r"got 'nope'") as e:
        make_loader(sample_shards, backend="nope", device="cpu", num_workers=0)
    assert "'toy'" in str(e.value) and "'torch'" in str(e.value) and "'auto'" in str(e.value)


def test_registry_rejects_bad_names_and_reports_missing_dependencies(
    monkeypatch: pytest.MonkeyPatch, sample_shards: Path
) -> None:
    from pathflow.exceptions import BackendUnavailableError, InvalidArgumentError

    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    for bad in ("auto", "Toy", "", "1x"):
        with pytest.raises(InvalidArgumentError):
            backends.register_loader_backend(bad, object)
    backends.register_loader_backend(
        "absent", "no_such_module:Backend", available=lambda: False, install="needs X: pip x"
    )
    assert "absent" in list_loader_backends()
    assert "absent" not in list_loader_backends(available_only=True)
    with pytest.raises(BackendUnavailableError, match=r"backend='absent' needs X: pip x"):
        make_loader(sample_shards, backend="absent", device="cpu", num_workers=0)


def test_train_cli_reaches_the_toy_backend(
    sample_shards: Path, toy_backend: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pathflow train --loader-backend toy`` trains on the toy backend's batches."""
    import json

    from pathflow.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "train", "--method", "simclr", "--arch", "resnet18", "--data", str(sample_shards),
            "--out", str(out), "--steps", "2", "--batch-size", "4", "--global-size", "32",
            "--loader-backend", "toy", "--num-workers", "0", "--no-tensorboard", "-q",
            "--device", "cpu",
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert len(toy_backend.CREATED) == 1  # type: ignore[attr-defined]
    (made,) = toy_backend.CREATED  # type: ignore[attr-defined]
    assert made.spec.expand()[0].size == 32 and made.cfg.batch_size == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] is not None
