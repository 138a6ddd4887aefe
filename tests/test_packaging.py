"""Packaging: licence, metadata, typing marker, configs in the wheel, README links that work on a package index."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_readme_links_point_to_existing_files() -> None:
    """Links to repository files are relative (the project has no public address to make them absolute
    with) and must name files that exist; external links are absolute."""
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links, "README has no links"
    for link in links:
        if not link.startswith(("https://", "http://", "#")):
            assert (REPO / link.split("#")[0]).exists(), link
    assert "protorefine-demo" in readme  # the console script is shown


def test_config_path_finds_the_cli_configs() -> None:
    from anomalib_protorefine import config_path

    assert config_path("patchcore_plus_offline.yaml").read_text().startswith("#")
    assert {path.name for path in config_path().glob("*.yaml")} >= {"patchcore_plus.yaml", "winclip_plus.yaml"}
    with pytest.raises(FileNotFoundError, match=r"available: \[.*patchcore_plus\.yaml"):
        config_path("missing.yaml")


@pytest.mark.slow
def test_wheel_has_licence_metadata_typing_marker_and_configs(tmp_path: Path) -> None:
    """Build the wheel (offline, with the installed hatchling) and inspect it."""
    pytest.importorskip("hatchling")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    result = subprocess.run([*command, str(REPO)], capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = tmp_path.glob("anomalib_protorefine-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata_name = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        licence = next(name for name in names if name.endswith(".dist-info/licenses/LICENSE"))
        assert "Apache License" in archive.read(licence).decode()
    assert {
        "anomalib_protorefine/py.typed",
        "anomalib_protorefine_autoload.pth",
        "anomalib_protorefine/configs/patchcore_plus.yaml",
        "anomalib_protorefine/configs/patchcore_plus_offline.yaml",
        "anomalib_protorefine/configs/winclip_plus.yaml",
        "anomalib_protorefine/configs/anomaly_dino_plus.yaml",
        "anomalib_protorefine/models/anomaly_dino_plus/README.md",
    } <= names
    assert metadata["License-Expression"] == "Apache-2.0"
    classifiers = metadata.get_all("Classifier")
    for expected in (
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3.11",
        "Operating System :: OS Independent",
        "Typing :: Typed",
    ):
        assert expected in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    # No Project-URL until the project has a public address: a made-up one would mislead users.
    assert metadata.get_all("Project-URL") is None
