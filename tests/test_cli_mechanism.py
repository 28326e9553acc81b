"""One command mechanism: registries, parsers generated from the config dataclasses, YAML keys
equal to the long option names, one error handler, choice lists from one place."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from pathflow.cli import build_parser, main
from pathflow.commands import COMMANDS, EVALS, Command, register_eval, report
from pathflow.commands.errors import exit_code
from pathflow.exceptions import (
    BackendUnavailableError,
    ConfigError,
    CorruptSlideError,
    InvalidArgumentError,
)
from pathflow.options import cli_fields

_COMMON = {"help", "config", "quiet", "verbose"}

TOY = """
from dataclasses import dataclass, field

from pathflow.config import YamlConfig
from pathflow.exceptions import ConfigError
from pathflow.options import opt


@dataclass
class ToyConfig(YamlConfig):
    _section = "toy"

    values: list[float] = field(default_factory=list, metadata=opt("numbers", positional="*"))
    scale: float = field(default=1.0, metadata=opt("multiplier"))
    fail_with: str = field(default="", metadata=opt("raise this built-in error"))

    def validate(self) -> None:
        if not self.values:
            raise ConfigError("give some numbers")


def run(cfg: ToyConfig, quiet: bool = False) -> int:
    if cfg.fail_with:
        raise {"oserror": OSError, "runtime": RuntimeError}[cfg.fail_with](
            "toy.csv: cannot\\n read   it"
        )
    print(f"toy: {sum(cfg.values) * cfg.scale:g}")
    return 0
"""


def _subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _generated() -> list[tuple[tuple[str, ...], Command]]:
    """Every command with a generated parser (train builds its own from TrainConfig)."""
    out: list[tuple[tuple[str, ...], Command]] = []
    for name, cmd in COMMANDS.items():
        if isinstance(cmd, Command):
            if not cmd.parser:
                out.append(((name,), cmd))
        else:
            out.extend(((name, member), m) for member, m in cmd.members.items())
    return out


def test_adding_an_eval_is_one_file_and_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "toy_eval.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    register_eval(Command("toy", "sum of numbers", config="toy_eval:ToyConfig", run="toy_eval:run"))
    try:
        assert main(["eval", "toy", "1", "2", "3", "--scale", "2"]) == 0
        assert capsys.readouterr().out.strip() == "toy: 12"  # (1 + 2 + 3) * 2
        cfg = tmp_path / "toy.yaml"
        cfg.write_text("toy:\n  scale: 3\n")
        assert main(["eval", "toy", "1.5", "--config", str(cfg)]) == 0
        assert capsys.readouterr().out.strip() == "toy: 4.5"
        assert main(["eval", "toy", "1", "--config", str(cfg), "--scale", "10"]) == 0
        assert capsys.readouterr().out.strip() == "toy: 10"  # the command line wins
        # bad input: one line, exit 2; a failing run: one line, exit 1
        assert main(["eval", "toy"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["pathflow eval toy: error: give some numbers"]
        assert main(["eval", "toy", "1", "--fail-with", "oserror"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["pathflow eval toy: error: toy.csv: cannot read it"]
        with pytest.raises(RuntimeError):  # not a reported error: a bug keeps its traceback
            main(["eval", "toy", "1", "--fail-with", "runtime"])
        with pytest.raises(SystemExit):
            main(["eval", "--help"])
        assert "sum of numbers" in capsys.readouterr().out
    finally:
        del EVALS["toy"]
    with pytest.raises(SystemExit):
        main(["eval", "toy", "1"])


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ConfigError("--patch must be > 0"), 2),
        (InvalidArgumentError("bad value"), 2),
        (ValueError("x.csv: no header"), 2),
        (CorruptSlideError("a.svs: truncated file"), 1),
        (FileNotFoundError(2, "No such file or directory", "a.svs"), 1),
        (PermissionError("out: read-only"), 1),
        (BackendUnavailableError("cucim is not installed"), 1),
        (ImportError("No module named 'dask'"), 1),
    ],
)
def test_error_handler_one_line_and_exit_code(
    exc: BaseException, code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report("tile", exc) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pathflow tile: error: ")
    assert str(exc).split()[0] in err


def test_error_handler_leaves_bugs_alone() -> None:
    assert exit_code(KeyError("x")) is None and exit_code(RuntimeError("x")) is None
    assert exit_code(RuntimeError("x"), (RuntimeError,)) == 1
    with pytest.raises(KeyError):
        report("tile", KeyError("x"))


def test_no_error_tail_outside_the_handler() -> None:
    # The error-to-exit tail is written once: no command module catches and prints itself.
    root = Path(__file__).parents[1] / "python" / "pathflow"
    names = ("cli.py", "demo.py", "commands/builtin.py", "evaluate/retrieval_cli.py",
             "evaluate/slide_knn_cli.py")  # fmt: skip
    files = [root / name for name in names]
    for path in files:
        assert "error: {" not in path.read_text(), path


@pytest.mark.parametrize("names", [n for n, _ in _generated()], ids=" ".join)
def test_parsers_are_generated_from_the_dataclass(names: tuple[str, ...], tmp_path: Path) -> None:
    cmd = dict(_generated())[names]
    cls = cmd.config_class()
    parser = _subparser(build_parser(names[0]), *names)
    dests = {a.dest for a in parser._actions} - _COMMON
    fields = {f.name for f in cli_fields(cls, cmd.fixed)}
    assert dests == fields  # every field has a flag, and nothing else is an option
    flags = {o for a in parser._actions for o in a.option_strings}
    for action in parser._actions:
        if action.dest in fields and action.option_strings:
            assert f"--{action.dest.replace('_', '-')}" in flags
    # YAML keys = long option names: every option, written as on the command line
    defaults = cls().to_dict()
    text = yaml.safe_dump({f.replace("_", "-"): defaults[f] for f in fields})
    (tmp_path / "c.yaml").write_text(text)
    assert set(cls.from_yaml(tmp_path / "c.yaml")) == fields


def test_old_flag_names_are_yaml_keys_too(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    (tmp_path / "c.yaml").write_text(f"weights-256: {weights}\nbatch-size: 8\n")
    cmd = COMMANDS["extract"]
    assert isinstance(cmd, Command)
    ns = argparse.Namespace(config=str(tmp_path / "c.yaml"), inputs=["run"], arch="resnet18")
    cfg = cmd.build_config(ns)
    assert cfg.weights == str(weights) and cfg.batch_size == 8 and cfg.arch == "resnet18"
    args = ["extract", "run", "--arch", "resnet18", "--weights-256", str(weights)]
    assert vars(build_parser("extract").parse_args(args))["weights"] == str(weights)


def test_choice_lists_come_from_one_place() -> None:
    from pathflow import choices, grid, tissue

    assert tuple(tissue.PRESETS) == choices.TILE_PRESETS
    assert tuple(grid.CONTOUR_FNS) == choices.CONTOUR_FNS
    tile = _subparser(build_parser("tile"), "tile")
    by_dest: dict[str, Any] = {a.dest: a.choices for a in tile._actions}
    assert tuple(by_dest["preset"]) == choices.TILE_PRESETS
    assert tuple(by_dest["format"]) == choices.IMAGE_FORMATS
    assert tuple(by_dest["transcode"]) == choices.TRANSCODE_MODES
    knn = _subparser(build_parser("eval"), "eval", "knn")
    assert tuple({a.dest: a.choices for a in knn._actions}["norm"]) == choices.NORM_MODES


def test_a_registered_slide_reader_is_a_backend_choice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pathflow.slide as slide
    from pathflow.slide.image_reader import ImageReader
    from pathflow.tiling.config import TileConfig

    with pytest.raises(ConfigError, match="--backend must be auto, "):
        TileConfig.build({}, {"inputs": ["x.svs"], "backend": "toyreader"})
    registry = {name: slide._REGISTRY[name] for name in slide.list_backends()}
    monkeypatch.setattr(slide, "_REGISTRY", registry)

    class ToyReader(ImageReader):
        pass

    slide.register_backend("toyreader", ToyReader)
    cfg = TileConfig.build({}, {"inputs": ["x.svs"], "backend": "toyreader"})
    assert cfg.backend == "toyreader"
    ns = build_parser("tile").parse_args(["tile", "x.svs", "--backend", "toyreader"])
    assert ns.backend == "toyreader"


def test_tile_help_imports_no_torch() -> None:
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pathflow", "tile", "--help"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and "--remove-ink" in res.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in res.stderr.splitlines()}
    assert "pathflow" in imported
    heavy = imported & {"torch", "timm", "numpy", "sklearn", "h5py"}
    assert not heavy, heavy


def test_demo_calls_the_library_not_argv() -> None:
    import pathflow.demo as demo

    tree = ast.parse(Path(demo.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "pathflow.cli" not in modules
    cfg = demo.DemoConfig.build({}, {"views": "simclr"})
    assert (cfg.views, cfg.retrieval_views) == ("simclr", "simclr")  # --views sets both
    assert demo.DemoConfig(views="simclr").retrieval_views == "pathology"  # the library: as given
    fields = {f.name for f in dataclasses.fields(demo.DemoConfig)}
    assert {"out", "steps", "views", "retrieval_views"} <= fields


def test_dispatch_has_no_if_chain() -> None:
    source = (Path(__file__).parents[1] / "python" / "pathflow" / "cli.py").read_text()
    assert 'ns.command == "' not in source and "ns.method ==" not in source
    assert textwrap.dedent(source).count("def ") <= 4
