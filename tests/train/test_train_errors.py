"""A misspelt ``--arch`` or ``--method`` is a one-line error naming the close matches."""

from __future__ import annotations

from pathlib import Path

import pytest
from pathflow.cli import main
from pathflow.exceptions import ConfigError
from pathflow.train.backbones import check_backbone, create_backbone
from pathflow.train.methods import method_class


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_arch_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    # checked before the data (none given here), so the misspelling is what is reported
    assert main(["train", "--arch", "vit_smal_patch16_224"]) == 2
    line = _one_line(capsys)
    assert "unknown backbone 'vit_smal_patch16_224'" in line
    assert "did you mean vit_small_patch16_224" in line


def test_unknown_method_in_a_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    yaml = tmp_path / "train.yaml"
    yaml.write_text("method: dinno\n")
    assert main(["train", "--config", str(yaml)]) == 2
    line = _one_line(capsys)
    assert "unknown method 'dinno'; did you mean dino?" in line


def test_close_matches_of_backbones_and_methods() -> None:
    with pytest.raises(ConfigError, match="did you mean resnet50_trunc"):
        create_backbone("resnet50_trnc")  # pathflow's own names are candidates too
    with pytest.raises(ConfigError, match="did you mean vit4k_xs"):
        check_backbone("vit4k_x")
    with pytest.raises(ConfigError, match=r"unknown backbone 'qqqqzzzz' \(expected"):
        check_backbone("qqqqzzzz")  # nothing close: no suggestion
    with pytest.raises(ConfigError, match="did you mean simclr"):
        method_class("simclrr")
    for name in ("resnet50.tv_in1k", "resnet50_trunc", "vit4k_xs", "test_vit"):
        check_backbone(name)  # timm pretrained tags and pathflow's names pass


def test_cli_method_typo_is_one_line_with_close_matches(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A misspelt --method on the command line: one stderr line naming the close match (not
    argparse's usage block), exit 2; the help still lists every registered method."""
    from pathflow.cli import main
    from pathflow.train.methods import list_methods

    assert main(["train", "--method", "byoll", "--data", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'byoll'" in err[0] and "byol" in err[0]
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "{" + ",".join(list_methods()) + "}" in capsys.readouterr().out
