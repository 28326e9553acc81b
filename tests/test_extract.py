"""``pathflow extract``: features of shards and image folders, CLAM layout, resume."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from pathflow.cli import main
from pathflow.extract.decode import decode_resize
from pathflow.extract.model import IMAGENET_MEAN, IMAGENET_STD, load_extractor, resolve_norm
from pathflow.extract.sources import discover
from pathflow.extract.writer import read_features
from PIL import Image

ARCH = "test_vit"  # timm's 0.3M-parameter ViT, 160 px input, 64-d features


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def tile(*args: str | Path) -> None:
    """``pathflow tile`` in a child process: cuCIM's import hangs in a process that has
    already loaded a CUDA build of torch (libcufile initialisation without a driver)."""
    cmd = [sys.executable, "-m", "pathflow", "tile", *map(str, args), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path) -> Path:
    """43 real 256-px H&E patches of cmu-small in WebDataset shards."""
    out = tmp_path_factory.mktemp("tiled")
    tile(cmu_path, "--out", out, "--shards")
    return out / "shards"


def shard_images(sdir: Path) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Encoded patches and (x, y) of every sample, in shard order (read with tarfile)."""
    data, xy = [], []
    for tar in sorted(sdir.glob("*.tar")):
        with tarfile.open(tar) as tf:
            files: dict[str, dict[str, bytes]] = {}
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                f = tf.extractfile(m)
                assert f is not None
                files.setdefault(key, {})[ext] = f.read()
        for parts in files.values():
            meta = json.loads(parts["json"])
            data.append(parts["jpg"])
            xy.append((meta["x"], meta["y"]))
    return data, xy


def reference(
    images: np.ndarray,
    arch: str = ARCH,
    weights: str | Path | None = None,
    mean: tuple[float, ...] = (0.485, 0.456, 0.406),
    std: tuple[float, ...] = (0.229, 0.224, 0.225),
    module: torch.nn.Module | None = None,
) -> np.ndarray:
    """The model run by hand: uint8 NHWC -> /255 -> mean/std (ImageNet's) -> forward."""
    if module is None:
        module = load_extractor(arch, str(weights) if weights else None, device="cpu").module
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return module.eval()((x - m) / s).numpy()


def pil_resized(data: list[bytes], size: int) -> np.ndarray:
    return np.stack([
        np.asarray(Image.open(io.BytesIO(d)).convert("RGB").resize((size, size), Image.BILINEAR))
        for d in data
    ])  # fmt: skip


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """What CLAM's datasets do: h5py, ``features`` and ``coords`` as arrays."""
    with h5py.File(path, "r") as f:
        assert f["features"].dtype == np.float32 and f["coords"].dtype == np.int64
        return f["features"][:], f["coords"][:], dict(f.attrs)


def sort_by_xy(feats: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    return feats[order], coords[order]


@pytest.fixture(scope="module")
def extracted(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("extract")
    assert run_cli("extract", sample_shards, "--arch", ARCH, "--out", out, "--batch-size", "16",
                   "-q") == 0  # fmt: skip
    return out


def test_features_equal_model_on_pil_decoded_patches(extracted: Path, sample_shards: Path) -> None:
    feats, coords, _ = read_h5(extracted / "features" / "cmu_small_region.h5")
    data, xy = shard_images(sample_shards)
    assert feats.shape == (43, 64) and coords.tolist() == [list(p) for p in xy]
    # Exactly the model on the Rust-decoded pixels (the pipeline adds no error) ...
    np.testing.assert_allclose(feats, reference(decode_resize(data, 160).images), atol=1e-5)
    # ... and on PIL-decoded, PIL-resized patches up to the resize's rounding (+-1 level).
    pil = pil_resized(data, 160)
    assert np.abs(pil.astype(int) - decode_resize(data, 160).images).max() <= 1
    ref = reference(pil)
    np.testing.assert_allclose(feats, ref, atol=2e-2, rtol=1e-2)
    cos = (feats * ref).sum(1) / np.linalg.norm(feats, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999


def test_h5_layout_is_clam_readable(extracted: Path, sample_shards: Path) -> None:
    path = extracted / "features" / "cmu_small_region.h5"
    feats, coords, attrs = read_h5(path)
    tile_coords = h5py.File(sample_shards.parent / "coords" / "cmu_small_region.h5")["coords"][:]
    assert sorted(map(tuple, coords.tolist())) == sorted(map(tuple, tile_coords.tolist()))
    assert attrs["arch"] == ARCH and attrs["weights"] == "random-init"
    assert attrs["embed_dim"] == 64 and attrs["image_size"] == 160
    assert attrs["patch_size"] == 256 and attrs["patch_level"] == 0
    assert attrs["num_patches"] == 43 and attrs["num_skipped"] == 0
    assert attrs["slide"] == "cmu_small_region"
    with h5py.File(path) as f:  # CLAM reads patch_size / patch_level from coords' attrs
        assert f["coords"].attrs["patch_size"] == 256 and f["coords"].attrs["patch_level"] == 0
        assert f["features"].attrs["arch"] == ARCH
    assert torch.from_numpy(feats).shape == (43, 64)
    saved = (extracted / "extract.yaml").read_text()
    assert "arch: test_vit" in saved and "format: h5" in saved
    with open(extracted / "extract_manifest.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["slide"], r["status"], r["patches"]) for r in rows] == [
        ("cmu_small_region", "ok", "43")
    ]


def test_resume_skips_finished_slides(
    extracted: Path, sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(extracted, out)
    dest = out / "features" / "cmu_small_region.h5"
    before = dest.stat().st_mtime_ns
    assert run_cli("extract", sample_shards, "--arch", ARCH, "--out", out, "-q") == 0
    assert dest.stat().st_mtime_ns == before
    assert "resumed 1; 0 images embedded" in capsys.readouterr().err
    # a truncated file is not complete: redone
    dest.write_bytes(dest.read_bytes()[:1000])
    assert run_cli("extract", sample_shards, "--arch", ARCH, "--out", out, "-q") == 0
    assert read_h5(dest)[0].shape == (43, 64)
    # another model into the same folder is refused ...
    assert run_cli("extract", sample_shards, "--arch", "test_resnet", "--out", out, "-q") == 2
    assert "holds features of another setup" in capsys.readouterr().err
    # ... unless --overwrite
    assert run_cli("extract", sample_shards, "--arch", "test_resnet", "--out", out, "-q",
                   "--overwrite") == 0  # fmt: skip
    assert read_h5(dest)[2]["arch"] == "test_resnet"


def test_shuffled_multi_slide_shards_and_pt(
    tmp_path: Path, cmu_path: Path, extracted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two copies of the slide (one id with dots), interleaved over 5 shards; no index for one.
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_path, slides / "a.svs")
    shutil.copy(cmu_path, slides / "TCGA-XX.01.svs")
    run = tmp_path / "run"
    tile(slides, "--out", run, "--shards", "--shuffle", "--shard-samples", "20")
    (run / "shards" / "shard-000001.idx").unlink()
    kind, groups = discover(run)
    assert kind == "shards" and [(g.name, len(g)) for g in groups] == [
        ("TCGA-XX.01", 43), ("a", 43)
    ]  # fmt: skip
    monkeypatch.chdir(tmp_path)  # default --out is ./pathflow_out
    assert run_cli("extract", run, "--arch", ARCH, "--batch-size", "7", "-q") == 0
    ref, ref_xy = sort_by_xy(*read_h5(extracted / "features" / "cmu_small_region.h5")[:2])
    for name in ("a", "TCGA-XX.01"):
        f, xy = sort_by_xy(*read_h5(tmp_path / "pathflow_out" / "features" / f"{name}.h5")[:2])
        assert (xy == ref_xy).all()
        np.testing.assert_allclose(f, ref, atol=1e-5)
    out = tmp_path / "pt"
    assert run_cli("extract", run, "--arch", ARCH, "--format", "pt", "--out", out, "-q") == 0
    t = torch.load(out / "features" / "a.pt")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (43, 64)


def test_weights_file_is_loaded(extracted: Path, sample_shards: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(123)
    import timm

    model = timm.create_model(ARCH, num_classes=0)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in model.state_dict().items()},
                "student": {}}, tmp_path / "dino.pth")  # fmt: skip
    data, _ = shard_images(sample_shards)
    with torch.no_grad():
        x = torch.from_numpy(decode_resize(data, 160).images).permute(0, 3, 1, 2).float() / 255
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        ref = model.eval()((x - mean) / std).numpy()
    for name in ("w.safetensors", "dino.pth"):
        out = tmp_path / f"out-{name}"
        assert run_cli("extract", sample_shards, "--arch", ARCH, "--weights", tmp_path / name,
                       "--out", out, "-q") == 0  # fmt: skip
        feats, _, attrs = read_h5(out / "features" / "cmu_small_region.h5")
        np.testing.assert_allclose(feats, ref, atol=1e-5)
        assert attrs["weights"] == str((tmp_path / name).resolve())
    assert not np.allclose(ref, read_h5(extracted / "features" / "cmu_small_region.h5")[0])
    # weights of another architecture: a clear error naming the file
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp_path / "r.st")
    assert run_cli("extract", sample_shards, "--arch", ARCH, "--weights", tmp_path / "r.st",
                   "--out", tmp_path / "bad", "-q") == 1  # fmt: skip


def _save_random_weights(path: Path, seed: int) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    import timm

    save_file(timm.create_model(ARCH, num_classes=0).state_dict(), path)


@pytest.mark.parametrize("fmt", ["h5", "pt"])
def test_weights_retrained_into_the_same_file_are_recomputed(
    fmt: str, sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = tmp_path / "backbone.safetensors"
    out = tmp_path / "out"
    dest = out / "features" / f"cmu_small_region.{fmt}"
    args = ("extract", sample_shards, "--arch", ARCH, "--weights", w, "--out", out, "--format",
            fmt, "-q")  # fmt: skip
    _save_random_weights(w, 1)
    assert run_cli(*args) == 0
    first = read_features(dest)[0]
    # unchanged weights file: resumed, not recomputed
    before = dest.stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(*args) == 0
    assert dest.stat().st_mtime_ns == before
    assert "resumed 1; 0 images embedded" in capsys.readouterr().err
    # weights retrained into the same file: same path, same size, even the same mtime
    stat = w.stat()
    _save_random_weights(w, 2)
    os.utime(w, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert w.stat().st_size == stat.st_size and w.stat().st_mtime_ns == stat.st_mtime_ns
    assert run_cli(*args) == 0
    assert "ok 1; 43 images embedded" in capsys.readouterr().err
    second = read_features(dest)[0]
    assert not np.allclose(first, second, atol=1e-3)
    data, _ = shard_images(sample_shards)
    np.testing.assert_allclose(second, reference(decode_resize(data, 160).images, weights=w),
                               atol=1e-5)  # fmt: skip
    if fmt == "h5":
        attrs = read_h5(dest)[2]
        assert attrs["weights_sha256"] == hashlib.sha256(w.read_bytes()).hexdigest()
    # and the new features are now the ones resumed
    assert run_cli(*args) == 0
    assert "resumed 1; 0 images embedded" in capsys.readouterr().err


def test_norm_auto_resolution_with_a_non_imagenet_pretrained_cfg() -> None:
    import timm

    # CLIP's normalisation; the config alone, no weights are built or downloaded
    cfg = timm.get_pretrained_cfg("vit_base_patch16_clip_224.openai").to_dict()
    clip_mean, clip_std = tuple(cfg["mean"]), tuple(cfg["std"])
    assert clip_mean != IMAGENET_MEAN and abs(clip_mean[0] - 0.4815) < 1e-3
    assert resolve_norm("auto", cfg, pretrained=True) == (clip_mean, clip_std, "pretrained_cfg")
    assert resolve_norm("model", cfg) == (clip_mean, clip_std, "pretrained_cfg")
    # random initialisation or our own weights: ImageNet's (what pathflow trains with)
    assert resolve_norm("auto", cfg, pretrained=False) == (IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    assert resolve_norm("imagenet", cfg, pretrained=True)[2] == "imagenet"
    # a normalisation recorded in the weights file wins over both
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert resolve_norm("auto", cfg, True, half) == (*half, "weights")
    assert resolve_norm("auto", {}, False, half) == (*half, "weights")
    assert resolve_norm("imagenet", {}, False, half)[2] == "imagenet"
    with pytest.raises(ValueError, match="norm"):
        resolve_norm("clip", cfg)


def test_norm_default_follows_pretrained_cfg_and_weights_metadata(
    sample_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--pretrained`` without a network: timm reads the "pretrained" weights from a local
    file (``pretrained_cfg_overlay``), whose config says mean = std = 0.5."""
    import timm
    from pathflow.train.export import export_backbone

    torch.manual_seed(7)
    model = timm.create_model(ARCH, num_classes=0)
    w = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), w)
    create = timm.create_model

    def offline(name: str, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        if pretrained:
            kw["pretrained_cfg_overlay"] = {"file": str(w), "mean": (0.5,) * 3,
                                            "std": (0.5,) * 3}  # fmt: skip
        return create(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    data, _ = shard_images(sample_shards)
    pixels = decode_resize(data, 160).images
    half = (0.5, 0.5, 0.5)
    out = tmp_path / "pretrained"
    assert run_cli("extract", sample_shards, "--arch", ARCH, "--pretrained", "--out", out,
                   "-q") == 0  # fmt: skip
    feats, _, attrs = read_h5(out / "features" / "cmu_small_region.h5")
    assert attrs["mean"].tolist() == list(half) and attrs["std"].tolist() == list(half)
    assert attrs["norm"] == "pretrained_cfg" and attrs["weights"] == "timm-pretrained"
    np.testing.assert_allclose(feats, reference(pixels, mean=half, std=half, module=model),
                               atol=1e-5)  # fmt: skip
    # --norm imagenet still forces ImageNet's (a new setting: refused in the same folder,
    # recomputed with --overwrite)
    args = ("extract", sample_shards, "--arch", ARCH, "--pretrained", "--out", out, "--norm",
            "imagenet", "-q")  # fmt: skip
    assert run_cli(*args) == 2
    assert run_cli(*args, "--overwrite") == 0
    feats, _, attrs = read_h5(out / "features" / "cmu_small_region.h5")
    np.testing.assert_allclose(attrs["mean"], IMAGENET_MEAN)
    assert attrs["norm"] == "imagenet"
    np.testing.assert_allclose(feats, reference(pixels, module=model), atol=1e-5)
    # our export recording the training normalisation: used by default
    exported = export_backbone(model, tmp_path / "e.safetensors", arch=ARCH, mean=half, std=half)
    out = tmp_path / "exported"
    assert run_cli("extract", sample_shards, "--arch", ARCH, "--weights", exported, "--out", out,
                   "-q") == 0  # fmt: skip
    feats, _, attrs = read_h5(out / "features" / "cmu_small_region.h5")
    assert attrs["mean"].tolist() == list(half) and attrs["norm"] == "weights"
    np.testing.assert_allclose(feats, reference(pixels, mean=half, std=half, module=model),
                               atol=1e-5)  # fmt: skip


def test_image_folders_and_undecodable_patches(
    tmp_path: Path, sample_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, xy = shard_images(sample_shards)
    root = tmp_path / "patches"
    for slide in ("s1", "s2"):
        (root / slide).mkdir(parents=True)
    for i, (d, (x, y)) in enumerate(zip(data[:6], xy[:6], strict=True)):
        im = Image.open(io.BytesIO(d))
        fmt = ["jpg", "png", "tif"][i % 3]
        im.save(root / "s1" / f"s1_{x}_{y}.{fmt}")
    (root / "s1" / "s1_9_9.jpg").write_bytes(data[0][: len(data[0]) // 2])  # truncated JPEG
    (root / "s2" / "broken.png").write_bytes(b"not an image")
    (root / "s2" / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="pathflow.extract"):
        assert run_cli("extract", root, "--arch", ARCH, "--out", out, "-q") == 1  # s2 failed
    assert "s1: 1 of 7 patches undecodable, skipped (e.g. truncated JPEG" in caplog.text
    with h5py.File(out / "features" / "s1.h5") as f:
        names = [n.decode() for n in f["names"][:]]
        assert f["features"].shape == (6, 64) and f.attrs["num_skipped"] == 1
        coords = f["coords"][:]
        feats = f["features"][:]
    assert sorted(map(tuple, coords.tolist())) == sorted(xy[:6])
    assert "s1/s1_9_9.jpg" not in names and len(names) == 6
    # same features as the shard patches (PNG/TIFF decoded losslessly from the same pixels)
    pixels = np.stack([np.asarray(Image.open(root / n).convert("RGB")) for n in names])
    ref = reference(np.stack([np.asarray(Image.fromarray(p).resize((160, 160), Image.BILINEAR))
                              for p in pixels]))  # fmt: skip
    np.testing.assert_allclose(feats, ref, atol=2e-2)
    assert not (out / "features" / "s2.h5").exists()
    with open(out / "extract_manifest.csv") as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert rows["s2"]["status"] == "failed" and "no decodable patch" in rows["s2"]["error"]
    assert rows["s1"]["skipped"] == "1"


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("extract", tmp_path / "missing", "--arch", ARCH) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing: not a folder" in err
    (tmp_path / "empty").mkdir()
    assert run_cli("extract", tmp_path / "empty", "--arch", ARCH, "-q") == 1
    assert "empty: no images found" in capsys.readouterr().err
    assert run_cli("extract", tmp_path / "empty", "--arch", "no_such_model", "-q") == 1
    assert run_cli("extract", tmp_path / "empty") == 2
    assert "--arch" in capsys.readouterr().err
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shard-000000.tar").write_bytes(b"x" * 100)
    assert run_cli("extract", shards, "--arch", ARCH, "-q") == 1
    assert "shard-000000.tar: unreadable shard" in capsys.readouterr().err


def test_decode_formats_match_pil(sample_shards: Path) -> None:
    data, _ = shard_images(sample_shards)
    im = Image.open(io.BytesIO(data[0])).convert("RGB")
    encoded = {}
    for fmt in ("PNG", "TIFF", "BMP", "WEBP"):
        buf = io.BytesIO()
        im.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        encoded[fmt] = buf.getvalue()
    batch = decode_resize(
        [data[0], *encoded.values(), b"", b"garbage", data[1][: len(data[1]) // 2]], 160
    )
    assert batch.ok.tolist() == [True] * 5 + [False] * 3
    ref = np.asarray(im.resize((160, 160), Image.BILINEAR))
    for k in range(5):  # JPEG, PNG, WebP in Rust (rounding may differ by 1), the rest in PIL
        assert np.abs(batch.images[k].astype(int) - ref).max() <= (1 if k in (0, 1, 4) else 0)
    assert batch.reasons[5:] == [
        "empty image data",
        "not a recognised image (JPEG, PNG, TIFF, BMP, WebP)",
        batch.reasons[7],
    ]
    assert batch.reasons[7] is not None and "truncated JPEG" in batch.reasons[7]
    assert not batch.images[5:].any()
