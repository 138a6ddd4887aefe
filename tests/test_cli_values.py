"""Model values on the stock ``anomalib`` command line: presets with options, and one error line per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from anomalib.cli import AnomalibCLI

from anomalib_protorefine.refinement import PrototypeRefiner
from cli_helpers import run_anomalib

pytestmark = pytest.mark.usefixtures("single_torch_thread")

#: A small PatchCorePlus and a Folder that is never read (the classes are only built).
MODEL = ["--model", "PatchCorePlus", "--model.backbone", "resnet18", "--model.pre_trained", "false"]
DATA = ["--data", "anomalib.data.Folder", "--data.root", "unused", "--data.name", "x", "--data.normal_dir", "good"]


def build(arguments: list[str]) -> AnomalibCLI:
    """Parse and build ``anomalib test`` with ``arguments`` (anomalib's CLI class, nothing run)."""
    return AnomalibCLI(["test", *MODEL, *arguments, *DATA, "--trainer.accelerator", "cpu"], run=False)


@pytest.mark.parametrize(
    "arguments",
    [
        ["--model.refiner", "paper", "--model.refiner.lambda_", "1.0"],
        ["--model.refiner.preset", "paper", "--model.refiner.lambda_", "1.0"],
    ],
)
def test_a_preset_with_options_is_the_preset_with_those_options(arguments: list[str]) -> None:
    """``--model.refiner paper --model.refiner.lambda_ 1.0``: the paper form (no score fusion) with lambda 1."""
    cli = build(arguments)
    expected = PrototypeRefiner(lambda_=1.0, num_iterations=10, distance="euclidean", score_fusion="none")
    assert cli.model.model.refiner.options == expected.options
    saved = yaml.safe_load(cli.parser.dump(cli.config))["test"]["model"]["init_args"]["refiner"]
    assert saved == {"preset": "paper", "lambda_": 1.0}


def test_a_preset_alone_and_options_alone_keep_their_meaning() -> None:
    """A bare preset is saved as its name; options alone still change the default (fused) form."""
    paper = build(["--model.refiner", "paper"])
    assert paper.model.model.refiner.options.score_fusion == "none"
    assert yaml.safe_load(paper.parser.dump(paper.config))["test"]["model"]["init_args"]["refiner"] == "paper"
    options = build(["--model.refiner.lambda_", "0.2"]).model.model.refiner.options
    assert (options.lambda_, options.score_fusion) == (0.2, "geometric")
    assert build(["--model.refiner", "false"]).model.model.refiner is None


@pytest.mark.parametrize(("arguments", "size"), [(["--model.image_size", "512"], (512, 512)), ([], (256, 256))])
def test_image_size_on_the_command_line_sets_the_input_size(arguments: list[str], size: tuple[int, int]) -> None:
    """``--model.image_size 512``: the default pre-processor resizes to 512 x 512 (anomalib's Resize), with the
    backbone's normalisation; the local refiner is one preset name away."""
    from torchvision.transforms.v2 import Normalize, Resize

    cli = build([*arguments, "--model.refiner", "local"])
    resize, normalize = cli.model.pre_processor.transform.transforms
    assert isinstance(resize, Resize)
    assert tuple(resize.size) == size
    assert isinstance(normalize, Normalize)
    assert normalize.mean == [0.485, 0.456, 0.406]  # resnet18's ImageNet values
    assert cli.model.model.refiner.options.neighbors == 16


def test_options_over_a_preset_that_takes_none_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """``auto`` chooses the refiner itself: options over it are refused naming the presets that take them."""
    with pytest.raises(SystemExit):
        build(["--model.refiner", "auto", "--model.refiner.lambda_", "1.0"])
    assert "error: PatchCorePlus: refiner preset 'auto' takes no options" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "line"),
    [
        (["--model.threshold", "bogus"], "threshold='bogus' is not a threshold source: use one of 'auto', 'support'"),
        (["--model.k_shot", "0"], "k_shot must be a positive integer"),
        (["--model.refiner.lambda_", "nan"], "lambda_ must be a number"),
        (["--model.refiner.lamda", "0.5"], "refiner has unknown option(s) ['lamda']: valid PrototypeRefiner options"),
    ],
)
def test_a_bad_model_value_is_one_error_line_naming_it(
    arguments: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first error line names the parameter and what is allowed, not jsonargparse's NoneType subtype."""
    with pytest.raises(SystemExit) as exit_info:
        build(arguments)
    assert exit_info.value.code == 2
    errors = [text for text in capsys.readouterr().err.splitlines() if "error" in text.lower()]
    assert errors[0].startswith(f"error: PatchCorePlus: {line}"), errors
    assert len(errors) == 1


def test_the_stock_command_reports_a_bad_value_in_one_line(tmp_path: Path) -> None:
    """The installed ``anomalib`` command itself: a few lines, exit code 2, the first error line names threshold."""
    result = run_anomalib(["test", *MODEL, "--model.threshold", "bogus", *DATA, "--default_root_dir", str(tmp_path)])
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [text for text in output.splitlines() if "error" in text.lower()]
    assert errors[0].startswith("error: PatchCorePlus: threshold='bogus' is not a threshold source"), output[-3000:]
    assert len(output.splitlines()) < 15, output
