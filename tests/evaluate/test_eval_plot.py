"""t-SNE plot: a PNG with one colour per class, written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_tsne_plot_writes_png(tmp_path: Path) -> None:
    from pathflow.evaluate.plot import tsne_plot

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 20)
    x = rng.normal(size=(60, 8)).astype(np.float32) + np.eye(8, dtype=np.float32)[y] * 8
    dest = tmp_path / "plot" / "tsne.png"
    xy = tsne_plot(x, y, ["a", "b", "c"], dest, "test", max_points=45, seed=0)
    assert xy.shape == (45, 2) and np.isfinite(xy).all()
    with Image.open(dest) as im:
        assert im.format == "PNG" and im.size == (900, 720)
        rgb = np.asarray(im.convert("RGB"))
    # tab10 blue / orange / green markers are all drawn
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(rgb.astype(int) - colour).sum(2) < 40).sum() > 20, colour
    assert [p.name for p in dest.parent.iterdir()] == ["tsne.png"]
