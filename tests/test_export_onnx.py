"""ONNX / OpenVINO export of PatchCorePlus, with and without refinement (the ``export`` extra).

A tiny model (resnet18 without pretrained weights, ``layers=("layer2",)``, 64 px, k = 2 random
support images) is exported once per refiner setting with dynamic batch, height and width, and the
exported graph is run on 96 px images (so the antialiased resize of the pre-processing really
downsamples) at batch sizes 1 and 3. The refined export runs ``sinkhorn_method="fixed"`` with
``EXPORT_SINKHORN_ITERATIONS`` iterations per E-step; it is compared with

* the same fixed-iteration path in torch: the same arithmetic, so ``RTOL_SAME_PATH`` (1e-4 relative
  to the largest value) holds (measured: 1e-6 scores, 2e-6 maps);
* the default test-time solver (batched, tolerance-based): a different stopping rule. Measured here
  6e-7 (scores) and 2e-6 (maps) relative; the bound
  ``RTOL_DEFAULT_SOLVER`` (1e-3) leaves room for other random draws (BSData features: 6e-5 scores,
  2e-3 maps, README "Predict and export").

OpenVINO runs the same ``.onnx`` in float32 (its CPU default on bf16-capable processors is bfloat16,
which the refinement cannot tolerate); on images of other sizes it decides like torch too
(tests/test_export_resize.py: the exported resize is two matrix products, not ONNX's ``Resize``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import InferenceBatch

from anomalib_protorefine import PatchCorePlus, PrototypeRefiner
from anomalib_protorefine.refinement.refiner import EXPORT_SINKHORN_ITERATIONS
from anomalib_protorefine.refinement.transport import SinkhornMarginalError, solve_plans, solve_plans_fixed

ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need the export extra: pip install '.[export]'")
pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript: pip install '.[export]'")

SIZE = 64
#: Exported graph vs the same fixed-iteration path in torch (relative to the largest value).
RTOL_SAME_PATH = 1e-4
#: Exported graph (fixed Sinkhorn iterations) vs the default tolerance-based solver in torch.
RTOL_DEFAULT_SOLVER = 1e-3
OUTPUTS = ("pred_score", "anomaly_map")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(refiner: object) -> PatchCorePlus:
    """A 64 px PatchCorePlus whose bank comes from two random support images."""
    torch.manual_seed(0)
    model = PatchCorePlus(
        backbone="resnet18",
        layers=("layer2",),
        pre_trained=False,
        k_shot=2,
        refiner=refiner,
        visualizer=False,
        pre_processor=PatchCorePlus.configure_pre_processor(image_size=(SIZE, SIZE), backbone="resnet18"),
    )
    model.fit_support(torch.rand(2, 3, SIZE, SIZE))
    return model.eval()


def run_onnx(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": images.numpy()}), strict=True))


def relative_error(exported: np.ndarray, reference: torch.Tensor) -> float:
    reference_np = reference.detach().numpy()
    assert exported.shape == reference_np.shape
    return float(np.abs(exported - reference_np).max() / np.abs(reference_np).max())


def torch_outputs(model: PatchCorePlus, images: torch.Tensor, **refiner_options: object) -> InferenceBatch:
    """The model's eager outputs, with its refiner's options changed by ``refiner_options``."""
    saved = model.model.refiner
    if saved is not None and refiner_options:
        model.model.refiner = PrototypeRefiner(**{**saved.options.as_dict(), **refiner_options})
    try:
        with torch.no_grad():
            return model(images)
    finally:
        model.model.refiner = saved


@pytest.fixture(scope="module")
def refined(tmp_path_factory: pytest.TempPathFactory) -> tuple[PatchCorePlus, Path]:
    model = tiny_model(True)
    path = model.to_onnx(tmp_path_factory.mktemp("refined"))  # dynamic batch, height and width
    return model, path


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[PatchCorePlus, Path]:
    model = tiny_model(False)
    return model, model.to_onnx(tmp_path_factory.mktemp("plain"), input_size=(96, 96))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("batch", [1, 3])
def test_refined_onnx_reproduces_the_fixed_iteration_torch_path(refined, images, batch) -> None:
    model, path = refined
    exported = run_onnx(path, images[:batch])
    reference = torch_outputs(
        model, images[:batch], sinkhorn_method="fixed", sinkhorn_max_iter=EXPORT_SINKHORN_ITERATIONS
    )
    for name in OUTPUTS:
        assert relative_error(exported[name], getattr(reference, name)) <= RTOL_SAME_PATH, name


@pytest.mark.parametrize("batch", [1, 3])
def test_refined_onnx_is_close_to_the_default_solver(refined, images, batch) -> None:
    model, path = refined
    assert model.model.refiner.options.sinkhorn_method == "auto"  # the export left the options as they were
    exported = run_onnx(path, images[:batch])
    reference = torch_outputs(model, images[:batch])
    for name in OUTPUTS:
        assert relative_error(exported[name], getattr(reference, name)) <= RTOL_DEFAULT_SOLVER, name


def test_refined_onnx_ranks_images_as_torch_does_whatever_the_batch_and_differs_from_plain(
    refined, plain, images
) -> None:
    """The graph really refines (its scores are not plain PatchCore's), ranks the images as the torch model, and
    batching changes nothing."""
    (model, refined_path), (_, plain_path) = refined, plain
    together = run_onnx(refined_path, images)["pred_score"]
    alone = np.concatenate([run_onnx(refined_path, images[i : i + 1])["pred_score"] for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    reference = torch_outputs(model, images).pred_score.numpy().reshape(-1)
    assert np.diff(np.sort(reference)).min() > 1e-3  # distinct scores, so the order is meaningful
    np.testing.assert_array_equal(np.argsort(together.reshape(-1)), np.argsort(reference))
    assert np.abs(together - run_onnx(plain_path, images)["pred_score"]).max() > 1e-3


@pytest.mark.parametrize("batch", [1, 3])
def test_plain_onnx_accepts_any_batch_size(plain, images, batch) -> None:
    model, path = plain
    exported = run_onnx(path, images[:batch])
    reference = torch_outputs(model, images[:batch])
    for name in OUTPUTS:
        assert relative_error(exported[name], getattr(reference, name)) <= RTOL_SAME_PATH, name


def test_openvino_runs_the_refined_onnx_in_float32(refined) -> None:
    ov = pytest.importorskip("openvino", reason="OpenVINO is part of the export extra: pip install '.[export]'")
    model, path = refined
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))  # no resize: see module doc
    compiled = ov.Core().compile_model(ov.convert_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for batch in (1, 3):
        exported = {out.get_any_name(): value for out, value in compiled(images[:batch].numpy()).items()}
        reference = torch_outputs(
            model, images[:batch], sinkhorn_method="fixed", sinkhorn_max_iter=EXPORT_SINKHORN_ITERATIONS
        )
        assert relative_error(exported["pred_score"], reference.pred_score) <= RTOL_SAME_PATH
        assert relative_error(exported["anomaly_map"], reference.anomaly_map) <= RTOL_SAME_PATH


# ------------------------------------------------------------------------------ static refiner pieces
def test_fixed_sinkhorn_reaches_the_batched_solvers_plan() -> None:
    costs = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0))
    reference, state = solve_plans(costs, 0.05, 5000, 1e-7)
    plans, potential = solve_plans_fixed(costs, 0.05, 300)
    assert (plans - reference).abs().sum((-1, -2)).max() < 1e-4
    # Warm start from the converged row potentials: already at the fixed point after one iteration,
    # also for a cost shifted by a column constant (the refiner's E-step cost between EM iterations).
    shift = torch.rand(3, 1, 30, generator=torch.Generator().manual_seed(1))
    for shifted in (costs, costs + shift):
        warm, _ = solve_plans_fixed(shifted, 0.05, 1, state.row_potential)
        assert (warm - reference).abs().sum((-1, -2)).max() < 1e-4
    torch.testing.assert_close(
        potential - potential[:, :1], state.row_potential - state.row_potential[:, :1], atol=1e-4, rtol=0
    )


def test_fixed_sinkhorn_graph_loop_computes_the_python_loop() -> None:
    costs = torch.rand(2, 6, 9, generator=torch.Generator().manual_seed(3))
    unrolled = solve_plans_fixed(costs, 0.1, 7)
    looped = solve_plans_fixed(costs, 0.1, 7, graph_loop=True)
    for a, b in zip(unrolled, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_fixed_method_outside_export_still_checks_the_marginals() -> None:
    queries, bank = torch.randn(2, 40, 8), torch.randn(15, 8)
    with pytest.raises(SinkhornMarginalError, match="sinkhorn_max_iter=1"):
        PrototypeRefiner(sinkhorn_method="fixed", sinkhorn_max_iter=1, epsilon=0.01).refine(queries, bank)
    stats = PrototypeRefiner(sinkhorn_method="fixed", sinkhorn_max_iter=200, num_iterations=3)
    stats.refine(queries, bank)
    assert stats.last_stats["sinkhorn_iterations"] == 600


def test_exporting_restores_the_options_and_pins_the_bank() -> None:
    refiner, bank = PrototypeRefiner(em_tol=1e-3, sinkhorn_method="fixed", sinkhorn_max_iter=40), torch.randn(9, 4)
    before = refiner.options
    with refiner.exporting(bank):
        assert refiner.is_exporting
        assert (refiner.options.sinkhorn_max_iter, refiner.options.em_tol) == (40, 0.0)  # the refiner's own count
    assert refiner.options is before
    assert not refiner.is_exporting


@pytest.mark.parametrize(
    ("options", "match"),
    [({"m_step": "gradient"}, "m_step='closed_form'"), ({"neighbors": 4}, "neighbors=4")],
)
def test_unexportable_refiner_options_are_named(options, match) -> None:
    with pytest.raises(ValueError, match=match), PrototypeRefiner(**options).exporting(torch.randn(9, 4)):
        pass


def test_online_model_refuses_export(tmp_path) -> None:
    model = tiny_model(True)
    model.model.online = True
    with pytest.raises(ValueError, match="online=True"):
        model.to_onnx(tmp_path)
    assert not model.model.refiner.is_exporting


def test_openvino_export_warns_about_bfloat16_and_runs_in_float32_with_the_hint(refined, tmp_path: Path) -> None:
    """``to_openvino`` names the float32 option (the IR cannot carry it: OpenVINO ignores ``rt_info`` runtime
    options); compiled with it the IR reproduces torch, without it on a bfloat16-capable CPU it is far off."""
    ov = pytest.importorskip("openvino", reason="OpenVINO is part of the export extra: pip install '.[export]'")
    model, _ = refined
    with pytest.warns(UserWarning, match=r"INFERENCE_PRECISION_HINT': 'f32'"):
        path = model.to_openvino(tmp_path)
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    reference = torch_outputs(model, images, sinkhorn_method="fixed", sinkhorn_max_iter=EXPORT_SINKHORN_ITERATIONS)
    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    exported = {out.get_any_name(): value for out, value in compiled(images.numpy()).items()}
    assert relative_error(exported["pred_score"], reference.pred_score) <= RTOL_SAME_PATH
    assert relative_error(exported["anomaly_map"], reference.anomaly_map) <= RTOL_SAME_PATH
    if "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        # Without the option: bfloat16 on this CPU, and visibly off (what the warning is about).
        plain = {
            out.get_any_name(): value for out, value in core.compile_model(str(path), "CPU")(images.numpy()).items()
        }
        assert relative_error(plain["anomaly_map"], reference.anomaly_map) > 10 * RTOL_SAME_PATH
