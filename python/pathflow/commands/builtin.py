"""The built-in commands: one registration line each, and their ``run(cfg)``.

Each ``run`` takes the built config and ``quiet`` (no progress bar), prints its summary and
returns the exit status; errors propagate to :func:`pathflow.commands.errors.report`. The
heavy modules are imported inside, so that building the parsers stays cheap.
"""

from __future__ import annotations

import sys
from typing import Any

from pathflow.commands.registry import EVALS, Command, Group, register_command, register_eval


def run_tile(cfg: Any, quiet: bool = False) -> int:
    """``pathflow tile``: tile the slides; the summary goes to stderr."""
    from pathflow.exceptions import ConfigError
    from pathflow.tiling.runner import tile_slides

    if not cfg.inputs and not cfg.sample:
        raise ConfigError("no slides given (paths, folders or --sample NAME)")
    report = tile_slides(cfg, progress=False if quiet else None)
    print(report.summary(), file=sys.stderr)
    return 0 if report.ok else 1


TILE = register_command(
    Command(
        "tile",
        "tissue masks and patch coordinates for slides",
        config="pathflow.tiling.config:TileConfig",
        run="pathflow.commands.builtin:run_tile",
        description=(
            "Whole-slide images -> tissue mask -> patch coordinates. Writes coords/<slide>.h5 "
            "(CLAM-compatible), masks/<slide>.png, overlays/<slide>.jpg, manifest.csv and the "
            "resolved config.yaml into --out. Every option can also be set in a YAML file "
            "(--config) under its long name with underscores; the command line wins."
        ),
    )
)
TRAIN = register_command(
    Command(
        "train",
        "self-supervised training (DINO, SimCLR, ...) of a timm backbone on shards",
        config="pathflow.train.config:TrainConfig",
        parser="pathflow.train.cli:add_train_parser",
        main="pathflow.train.cli:run_train",
        heavy=True,
    )
)


def run_extract(cfg: Any, quiet: bool = False) -> int:
    """``pathflow extract``: features of every slide; the summary goes to stderr."""
    from pathflow.extract.runner import run_extract as extract

    report = extract(cfg, progress=False if quiet else None)
    print(report.summary(), file=sys.stderr)
    return 0 if report.ok else 1


def run_eval(cfg: Any, quiet: bool = False) -> int:
    """``pathflow eval knn|linear``: the metrics summary goes to stdout."""
    from pathflow.evaluate.runner import run_eval as evaluate

    print(evaluate(cfg, progress=False if quiet else None).summary())
    return 0


def run_merge(cfg: Any, quiet: bool = False) -> int:
    """``pathflow merge``: warnings and the summary go to stderr."""
    from pathflow.jobs.merge import merge_job

    report = merge_job(cfg.job, cfg.allow_partial, cfg.ranks, cfg.workers)
    for w in report.warnings:
        print(f"pathflow merge: warning: {w}", file=sys.stderr)
    print(report.summary(), file=sys.stderr)
    return 0


def run_status(cfg: Any, quiet: bool = False) -> int:
    """``pathflow status``: the progress table goes to stdout."""
    from pathflow.jobs.status import job_status

    print(job_status(cfg.job).text())
    return 0


EXTRACT = register_command(
    Command(
        "extract",
        "patch features of shards or image folders; HIPT region features and "
        "descriptors (--model regions|hipt)",
        config="pathflow.extract.config:ExtractConfig",
        run="pathflow.commands.builtin:run_extract",
        loggers=("pathflow.extract",),
        description=(
            "Embed every patch of WebDataset shards (pathflow tile --shards: the tile output "
            "folder or its shards/), of coordinate files + slides (a tile output folder without "
            "shards, its coords/, CLAM's patches/*.h5; --slides) or of image folders "
            "(ROOT/<slide>/<image>) and write one "
            "features/<slide>.h5 (features float32 [N, D], coords int64 [N, 2], CLAM/TRIDENT "
            "layout) or .pt per slide into --out. Finished slides are skipped on re-run."
        ),
    )
)
EVAL = register_command(
    Group(
        "eval",
        "KNN / linear-probe evaluation of a backbone on labelled patches, or slide-level "
        "KNN on extracted slide features",
        "Embed a labelled ImageFolder dataset (ROOT/<class>/<image>) and evaluate "
        "the features with DINO's weighted KNN or a linear probe; or (slide-knn) evaluate "
        "slide embeddings, the mean of each slide's extracted features, with KNN and logistic "
        "regression under stratified k-fold cross-validation as in HIPT.",
        EVALS,
    )
)
DEMO = register_command(
    Command(
        "demo",
        "end-to-end demo on the sample slides: tile -> shards -> SSL -> extract -> eval",
        config="pathflow.demo:DemoConfig",
        run="pathflow.demo:run",
        errors=(RuntimeError,),
        usage_exit=1,
        show_defaults=True,
        description=(
            "Tile the built-in sample slides into shards, pretrain a small backbone "
            "(SimCLR on a ResNet-18 at 64 px with pathology views by default), extract "
            "features, evaluate them with weighted KNN on a labelled patch set built from the "
            "samples (class = source slide) and with label-free augmentation retrieval, each "
            "beside the same evaluation of the random initialisation, and write OUT/REPORT.md."
        ),
    )
)
MERGE = register_command(
    Command(
        "merge",
        "combine the parts of a job folder (tile --part I/N): manifest.csv + shards.json",
        config="pathflow.jobs.config:MergeConfig",
        run="pathflow.commands.builtin:run_merge",
        usage_exit=1,
        description=(
            "Write JOB/manifest.csv and JOB/shards/shards.json (relative paths to every "
            "part's shards and DALI indexes; no data copied) from the parts of a job folder. "
            "Refuses unfinished parts (named) unless --allow-partial. Safe to run again."
        ),
    )
)
STATUS = register_command(
    Command(
        "status",
        "done / failed / running / stale per stage of a job folder",
        config="pathflow.jobs.config:StatusConfig",
        run="pathflow.commands.builtin:run_status",
        usage_exit=1,
        description=(
            "Read-only progress of a job folder: tile coords, shards and extracted "
            "features; live and stale claims (a stale claim belongs to a job that died)."
        ),
    )
)

_EVAL_LOGGERS = ("pathflow.eval", "pathflow.extract")
register_eval(
    Command(
        "knn",
        "weighted k-NN as in DINO (cosine, k=20, T=0.07)",
        config="pathflow.evaluate.config:EvalConfig",
        run="pathflow.commands.builtin:run_eval",
        fixed={"method": "knn"},
        loggers=_EVAL_LOGGERS,
    )
)
register_eval(
    Command(
        "linear",
        "logistic regression on standardised features (L-BFGS, weight decay sweep)",
        config="pathflow.evaluate.config:EvalConfig",
        run="pathflow.commands.builtin:run_eval",
        fixed={"method": "linear"},
        loggers=_EVAL_LOGGERS,
    )
)
register_eval(
    Command(
        "slide-knn",
        "slide-level KNN + logistic regression on mean slide embeddings, stratified k-fold "
        "CV as in HIPT",
        config="pathflow.evaluate.config:SlideKnnConfig",
        run="pathflow.evaluate.slide_knn_cli:run",
        description=(
            "Average each slide's features (.h5 files of pathflow extract: HIPT cls4k / "
            "mean256 / concat, region_features, or patch features) into one embedding, then "
            "score KNN (k=5, as HIPT) and a logistic-regression probe with stratified k-fold "
            "cross-validation: macro AUC and balanced accuracy, mean ± std over the folds. "
            "Writes metrics.json, metrics.txt, config.yaml and slide_knn.png into --out."
        ),
    )
)
register_eval(
    Command(
        "retrieval",
        "label-free augmentation retrieval: find each image's second view from its first",
        config="pathflow.evaluate.config:RetrievalConfig",
        run="pathflow.evaluate.retrieval_cli:run",
        show_defaults=True,
        description=(
            "Make two augmented views of every image under DATA (a views preset, fixed "
            "seed), embed them with the backbone and report the top-1 / top-5 accuracy of "
            "finding each image's second view among all images' second views by cosine "
            "similarity (chance = k / N; ties are credited fractionally). Writes "
            "metrics.json into --out."
        ),
    )
)

__all__ = ["run_eval", "run_extract", "run_merge", "run_status", "run_tile"]
