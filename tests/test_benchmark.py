"""The few-shot benchmark pipeline (``anomalib benchmark`` / ``python -m anomalib_protorefine.benchmark``)."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from anomalib_protorefine.benchmark import BenchmarkConfigError, FewShotBenchmark, plan_from_config
from anomalib_protorefine.benchmark.features import make_datamodule
from anomalib_protorefine.benchmark.job import FewShotBenchmarkJob, RunContext
from anomalib_protorefine.benchmark.methods import fastrecon_patch_scores, run_cached, run_engine
from anomalib_protorefine.benchmark.pipeline import main, preflight
from anomalib_protorefine.refinement import PrototypeRefiner

pytestmark = pytest.mark.usefixtures("single_torch_thread")

METRICS = ("image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_F1Max", "pixel_AUPRO")


@pytest.fixture
def tiny_config(quick_synthetic_root: Path, tmp_path: Path, repo_root: Path) -> dict[str, Any]:
    """configs/benchmark/tiny.yaml on the quick synthetic data set, writing into a temporary folder."""
    config = yaml.safe_load((repo_root / "configs" / "benchmark" / "tiny.yaml").read_text())
    config["benchmark"]["output"] = str(tmp_path / "out")
    config["benchmark"]["data"]["init_args"]["root"] = str(quick_synthetic_root / "brushed_metal")
    return config


def _write(config: dict[str, Any], folder: Path) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rows(output: Path) -> list[dict[str, str]]:
    with (output / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(k_shot={"grid": [0, 1]}), "benchmark.k_shot must be integers >= 1"),
        (lambda b: b.update(few_shot_seed=[-5]), "benchmark.few_shot_seed must be integers >= 0"),
        (lambda b: b["model"]["grid"][1].update(base="Nope"), "has base 'Nope'"),
        (lambda b: b["model"]["grid"][0].update(name="PatchCore+"), "appear twice"),
        (lambda b: b["model"]["grid"][0].update(colour="red"), "unknown keys"),
        (lambda b: b.update(sweeps=[{"method": "X", "parameter": "lambda_", "values": [1]}]), "unknown method"),
        (lambda b: b.update(sweeps=[{"method": "PatchCore", "parameter": "lambda_", "values": [1]}]), "no refiner"),
        (lambda b: b["data"]["init_args"].update(root="/no/such/folder"), "does not exist"),
        (lambda b: b["data"]["init_args"].pop("val_split_mode"), "val_split_mode: none"),
        (lambda b: b["shared"].update(colour="red"), "benchmark.shared: unknown options"),
        (lambda b: b.update(max_test_images=1), "max_test_images"),
        (lambda b: b.update(k_shots=1), r"unknown key\(s\) 'k_shots' \(did you mean 'k_shot'\?\)"),
        (lambda b: b.update(decision_rules={"held_out": ["bank"], "positions": [0.5]}), "unknown construction"),
        (lambda b: b.update(decision_rules={"positions": [1.5]}), "positions must be a list of numbers in"),
        (lambda b: b["shared"].update(image_size=0), r"benchmark.shared.image_size must be a positive integer"),
        (lambda b: b["shared"].update(image_size=[64]), r"benchmark.shared.image_size must be a positive integer"),
        (
            lambda b: b["model"]["grid"][0]["init_args"].update(k_shot=3),
            r"'PatchCore': init_args sets \['k_shot'\], which the benchmark sets .* benchmark.k_shot",
        ),
        (
            lambda b: b["model"]["grid"][0]["init_args"].update(few_shot_seed=3),
            r"init_args sets \['few_shot_seed'\]",
        ),
        (
            lambda b: b.update(sweeps=[{"method": "PatchCore", "parameter": "k_shot", "values": [1, 2]}]),
            r"k_shot is swept by the benchmark's own grid",
        ),
        (lambda b: b["model"]["grid"][1].update(base="PatchCore+"), "'PatchCore\\+' has itself as base"),
        (lambda b: b.update(output=""), r"benchmark.output must name a results folder .* got ''"),
        (lambda b: b.update(heatmaps={"images": -1}), r"benchmark.heatmaps.images must be an integer >= 0 .*got -1"),
        (lambda b: b.update(heatmaps={"imgs": 2}), r"heatmaps must be a mapping with the one key images.*'imgs'"),
        (lambda b: b.update(heatmaps=3), r"heatmaps must be a mapping with the one key images.*got 3"),
        (lambda b: b.update(heatmaps={"images": "many"}), r"heatmaps.images must be an integer >= 0.*'many'"),
        (lambda b: b.update(figure7="no"), r"benchmark.figure7 must be true or false"),
        (lambda b: b["model"]["grid"][0]["init_args"].update(tiling=32), r"init_args.tiling must be \{tile_size: int"),
        (
            lambda b: b["model"]["grid"][0]["init_args"].update(tiling={"tile_size": 0}),
            r"init_args.tiling.tile_size must be a positive integer",
        ),
    ],
)
def test_bad_configs_are_reported_before_anything_runs(tiny_config: dict, change: Any, message: str) -> None:
    config = copy.deepcopy(tiny_config)
    change(config["benchmark"])
    with pytest.raises(BenchmarkConfigError, match=message):
        plan_from_config(config)


def test_a_foreign_results_file_in_the_output_folder_is_refused_before_any_job(
    tiny_config: dict, tmp_path: Path
) -> None:
    output = Path(tiny_config["benchmark"]["output"])
    output.mkdir(parents=True)
    (output / "results.csv").write_text("image,score\na.png,0.3\n")
    with pytest.raises(BenchmarkConfigError, match=r"results.csv is not a results file of this benchmark.*'image'"):
        main(["--config", str(_write(tiny_config, tmp_path))])
    assert (output / "results.csv").read_text() == "image,score\na.png,0.3\n"


HOLD_LOCK = """
import sys
from pathlib import Path
from anomalib_protorefine.benchmark.lock import OutputLock
with OutputLock(Path(sys.argv[1]), [sys.argv[2]]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_process_on_the_same_output_folder_is_refused_naming_the_first(
    tiny_config: dict, tmp_path: Path
) -> None:
    """Two processes on one folder would run every job twice: the second stops before any job, naming the first."""
    from anomalib_protorefine.benchmark.lock import OutputLock

    output = Path(tiny_config["benchmark"]["output"])
    label = plan_from_config(tiny_config).datasets[0].label
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(output), label], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            BenchmarkConfigError, match=rf"'{output}' is in use: process {holder.pid} on .* runs data set '{label}'"
        ):
            main(["--config", str(_write(tiny_config, tmp_path))])
        assert not (output / "results.csv").exists()
        with OutputLock(output, ["another data set"]):  # --only on another data set shares the folder
            pass
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=120) == 0
    with OutputLock(output, [label]):  # released when the holder ended
        pass


def test_k_larger_than_the_training_pool_stops_before_any_job(tiny_config: dict, tmp_path: Path) -> None:
    pool = len(list(Path(tiny_config["benchmark"]["data"]["init_args"]["root"], "train", "good").iterdir()))
    tiny_config["benchmark"]["k_shot"] = {"grid": [1, pool + 1]}
    with pytest.raises(BenchmarkConfigError, match="normal training image"):
        main(["--config", str(_write(tiny_config, tmp_path))])
    assert not (tmp_path / "out" / "results.csv").exists()


def test_an_unknown_model_class_stops_before_any_job_with_an_error(tiny_config: dict, tmp_path: Path) -> None:
    """A typo in class_path is a config error (non-zero exit), not a 'skipped for missing weights' line."""
    tiny_config["benchmark"]["model"]["grid"].append({"name": "Typo", "class_path": "NoSuchModel"})
    with pytest.raises(BenchmarkConfigError, match="class_path 'NoSuchModel' is not a model"):
        main(["--config", str(_write(tiny_config, tmp_path))])
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_misspelt_few_shot_key_does_not_fall_through_to_anomalibs_pipeline(tiny_config: dict) -> None:
    section = tiny_config["benchmark"]
    section["k_shots"] = section.pop("k_shot")
    with pytest.raises(BenchmarkConfigError, match="did you mean 'k_shot'"):
        FewShotBenchmark()._setup_runners(tiny_config)


def test_a_config_without_k_shot_runs_anomalibs_own_benchmark() -> None:
    from anomalib.pipelines.benchmark.generator import BenchmarkJobGenerator

    runners = FewShotBenchmark()._setup_runners({"accelerator": "cpu", "benchmark": {"seed": 1}})
    assert isinstance(runners[0].generator, BenchmarkJobGenerator)


def test_sweeps_resolve_presets_into_full_refiner_options(tiny_config: dict) -> None:
    tiny_config["benchmark"]["model"]["grid"][1]["init_args"]["refiner"] = "paper"
    plan = plan_from_config(tiny_config)
    swept = plan.method("PatchCore+ [lambda_=1.0]")
    assert swept.init_args["refiner"]["lambda_"] == 1.0
    assert swept.init_args["refiner"]["score_fusion"] == "none"  # the paper preset's, not the default's
    assert swept.sweep == ("PatchCore+", "lambda_", 1.0)


def test_a_sweep_on_anomaly_dino_plus_resolves_with_its_own_presets(tiny_config: dict) -> None:
    """AnomalyDINOPlus's presets are cosine (lambda 0.1); PatchCorePlus's are Euclidean (lambda 0.3)."""
    from anomalib_protorefine.models.anomaly_dino_plus.lightning_model import DINO_FUSED_REFINER

    grid = tiny_config["benchmark"]["model"]["grid"]
    grid.append({"name": "DINO+", "class_path": "AnomalyDINOPlus", "init_args": {"refiner": "fused"}})
    grid.append({"name": "DINO", "class_path": "AnomalyDINOPlus", "init_args": {}})
    tiny_config["benchmark"]["sweeps"] = [{"method": "DINO+", "parameter": "num_iterations", "values": [2]}]
    plan = plan_from_config(tiny_config)
    swept = plan.method("DINO+ [num_iterations=2]").init_args["refiner"]
    assert swept["distance"] == "cosine"
    assert {key: swept[key] for key in DINO_FUSED_REFINER if key != "num_iterations"} == {
        key: value for key, value in DINO_FUSED_REFINER.items() if key != "num_iterations"
    }
    assert plan.method("DINO").uses_cached_features
    tiny_config["benchmark"]["sweeps"] = [{"method": "DINO", "parameter": "lambda_", "values": [0.2]}]
    with pytest.raises(BenchmarkConfigError, match="no refiner"):  # AnomalyDINOPlus's default is refiner="off"
        plan_from_config(tiny_config)


# ------------------------------------------------------------------------------------------- FastRecon
def test_fastrecon_reconstructs_the_bank_and_scores_outliers_higher() -> None:
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(40, 16, generator=generator)
    inliers = fastrecon_patch_scores(bank[None, :10], bank, lambda_=0.0, ridge=1e-8)
    assert inliers.abs().max() < 1e-3
    outliers = fastrecon_patch_scores(10 * torch.randn(1, 10, 16, generator=generator), bank[:8], lambda_=1.0)
    assert outliers.min() > fastrecon_patch_scores(bank[None, :8], bank[:8], lambda_=1.0).max()


# ------------------------------------------------------------------------------------------- runs
def test_a_truncated_feature_cache_is_discarded_and_recomputed(
    tiny_config: dict, caplog: pytest.LogCaptureFixture
) -> None:
    plan = plan_from_config(tiny_config)
    data, method = plan.datasets[0], plan.method("PatchCore")
    first = RunContext(plan).test_features(data, method)
    (cache,) = (plan.output / "cache").glob("features-*.pt")
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])  # a run killed while writing
    with caplog.at_level("WARNING"):
        again = RunContext(plan).test_features(data, method)
    assert f"discarding unreadable feature cache {cache}" in caplog.text
    assert torch.equal(again.embeddings, first.embeddings)
    assert torch.load(cache, weights_only=False)["paths"] == first.paths  # rewritten whole
    assert not list((plan.output / "cache").glob("*.partial"))


@pytest.mark.slow
def test_a_cell_equals_anomalib_engine_test(tiny_config: dict) -> None:
    """The cached-feature path reports exactly what ``Engine.test`` reports for the same model, draw and test images."""
    tiny_config["benchmark"]["max_test_images"] = 5  # a subset (in the shuffled order) of the 7 test images
    plan = plan_from_config(tiny_config)
    context = RunContext(plan)
    data = plan.datasets[0]
    method = plan.method("PatchCore+")
    test = context.test_features(data, method)
    cached = run_cached(method, context.datamodule(data), test, 1, 1, context.device, batch_size=4)
    engine = run_engine(method, make_datamodule(data.config), plan, 1, 1)
    for metric in METRICS:
        assert cached[metric] == pytest.approx(engine[metric], abs=1e-5), metric


@pytest.mark.slow
def test_a_tiled_cell_equals_anomalib_engine_test_with_its_tiler_callback(tiny_config: dict) -> None:
    """``tiling`` scores what ``Engine.test`` with anomalib's ``TilerConfigurationCallback`` reports."""
    tiny_config["benchmark"]["max_test_images"] = 5
    tiny_config["benchmark"]["model"]["grid"][1]["init_args"]["tiling"] = {"tile_size": 32, "stride": 32}
    plan = plan_from_config(tiny_config)
    context = RunContext(plan)
    data = plan.datasets[0]
    tiled, plain = plan.method("PatchCore+"), plan.method("PatchCore")
    test = context.test_features(data, tiled)
    assert not torch.equal(test.embeddings, context.test_features(data, plain).embeddings)  # not the untiled cache
    cached = run_cached(tiled, context.datamodule(data), context.test_features(data, tiled), 1, 1, context.device, 4)
    engine = run_engine(tiled, make_datamodule(data.config), plan, 1, 1)
    for metric in METRICS:
        assert cached[metric] == pytest.approx(engine[metric], abs=1e-5), metric


@pytest.mark.slow
def test_anomaly_dino_plus_off_equals_anomalibs_anomaly_dino_on_the_same_draw(
    tiny_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AnomalyDINOPlus(refiner=False) on cached features reports what anomalib's AnomalyDINO reports through Engine."""
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor
    from anomalib.models.image.anomaly_dino import torch_model as upstream_torch_model

    def random_weights(*args: object, **kwargs: object) -> TimmFeatureExtractor:  # anomalib's model asks the hub
        return TimmFeatureExtractor(*args, **{**kwargs, "pre_trained": False})

    monkeypatch.setattr(upstream_torch_model, "TimmFeatureExtractor", random_weights)
    tiny_config["benchmark"]["model"] = {
        "grid": [
            {"name": "AnomalyDINO (anomalib)", "class_path": "AnomalyDINO"},
            {
                "name": "AnomalyDINO",
                "class_path": "AnomalyDINOPlus",
                "init_args": {"refiner": False, "pre_trained": False},
            },
            {
                "name": "AnomalyDINO+",
                "class_path": "AnomalyDINOPlus",
                "base": "AnomalyDINO",
                "init_args": {"refiner": "fused", "pre_trained": False},
            },
        ]
    }
    del tiny_config["benchmark"]["sweeps"]
    plan = plan_from_config(tiny_config)
    assert "backbone" not in plan.method("AnomalyDINO").init_args  # `shared` is PatchCorePlus's only
    context = RunContext(plan)
    data = plan.datasets[0]
    test = context.test_features(data, plan.method("AnomalyDINO"))
    assert test.embeddings.shape[1:] == (18 * 18, 384)  # anomalib's 252 px, 14 px patches
    ours = run_cached(plan.method("AnomalyDINO"), context.datamodule(data), test, 2, 1, context.device, batch_size=4)
    theirs = run_engine(plan.method("AnomalyDINO (anomalib)"), make_datamodule(data.config), plan, 2, 1)
    for metric in METRICS:
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-5), metric
    refined = run_cached(plan.method("AnomalyDINO+"), context.datamodule(data), test, 2, 1, context.device, 4)
    assert refined["bank_size"] == ours["bank_size"] == 2 * 18 * 18


@pytest.mark.slow
def test_an_anomalib_model_is_fitted_on_the_same_k_support_images(tiny_config: dict) -> None:
    """Any anomalib model runs through Engine on the cell's draw: its training set is cut to those k images."""
    from anomalib_protorefine.benchmark.config import MethodSpec
    from anomalib_protorefine.benchmark.methods import support_paths

    plan = plan_from_config(tiny_config)
    datamodule = make_datamodule(plan.datasets[0].config)
    expected = sorted(support_paths(make_datamodule(plan.datasets[0].config), 2, 1))
    method = MethodSpec("Patchcore", "Patchcore", {"backbone": "resnet18", "layers": ["layer2"], "pre_trained": False})
    values = run_engine(method, datamodule, plan, 2, 1)
    assert sorted(str(p) for p in datamodule.train_data.samples.image_path) == expected
    assert all(0.0 <= values[metric] <= 1.0 for metric in METRICS)
    assert values["time_ms"] > 0


@pytest.mark.slow
def test_tiny_run_resumes_after_a_stop_and_writes_the_report(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_path = _write(tiny_config, tmp_path)
    output = tmp_path / "out"
    original = FewShotBenchmarkJob.run
    calls: list[str] = []

    def stop_at_third(job: FewShotBenchmarkJob, task_id: int | None = None) -> Any:
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the third job
        calls.append(job.label)
        return original(job, task_id)

    monkeypatch.setattr(FewShotBenchmarkJob, "run", stop_at_third)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line, exit code 130
        main(["--config", str(config_path)])
    assert stopped.value.code == 130
    assert {(r["seed"], r["method"]) for r in _rows(output)} == {("0", "PatchCore"), ("0", "PatchCore+")}

    calls.clear()
    monkeypatch.setattr(FewShotBenchmarkJob, "run", lambda job, task_id=None: calls.append(job.label) or original(job))
    main(["--config", str(config_path)])
    assert len(calls) == 2 * 4 - 2  # 2 seeds x (2 methods + 2 sweep points), minus the 2 finished jobs
    rows = _rows(output)
    cells = [(r["seed"], r["method"], r["metric"]) for r in rows]
    assert len(cells) == len(set(cells))  # nothing ran twice
    for seed in ("0", "1"):
        for method in ("PatchCore", "PatchCore+", "PatchCore+ [lambda_=0.1]", "PatchCore+ [lambda_=1.0]"):
            values = {r["metric"]: float(r["value"]) for r in rows if (r["seed"], r["method"]) == (seed, method)}
            assert set(METRICS) <= set(values), (seed, method)
            assert all(0.0 <= values[m] <= 1.0 for m in METRICS)
            assert values["time_ms"] > 0

    report = (output / "report.md").read_text()

    # The first cell of the PatchCore+ row (1-shot image AUROC): mean ± std over the seeds of results.csv and
    # the mean of the per-seed differences to its base, recomputed here.
    def auroc(method: str) -> dict[str, float]:
        return {
            r["seed"]: 100 * float(r["value"]) for r in rows if (r["method"], r["metric"]) == (method, "image_AUROC")
        }

    refined, base = auroc("PatchCore+"), auroc("PatchCore")
    values = list(refined.values())
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    difference = sum(refined[seed] - base[seed] for seed in refined) / len(refined)
    row = next(line for line in report.splitlines() if line.startswith("| PatchCore+ | "))
    assert row.split(" | ")[1].replace("**", "") == f"{mean:.1f} ± {std:.1f} ({difference:+.1f})"
    # Decisions at the support thresholds: the oracle (best threshold on the test set) is never worse, and
    # the report's cell is the mean ± std of results.csv.
    for seed in ("0", "1"):
        values = {r["metric"]: float(r["value"]) for r in rows if (r["seed"], r["method"]) == (seed, "PatchCore")}
        assert values["oracle_image_BAcc"] >= values["support_image_BAcc"] - 1e-12
        assert values["oracle_image_BAcc"] >= values["fallback_image_BAcc"] - 1e-12
        assert 0.0 <= values["support_image_FAR"] <= 1.0
    bacc = [float(r["value"]) for r in rows if (r["method"], r["metric"]) == ("PatchCore", "support_image_BAcc")]
    mean = sum(bacc) / len(bacc)
    std = (sum((v - mean) ** 2 for v in bacc) / (len(bacc) - 1)) ** 0.5
    assert f"| PatchCore | 1 | {100 * mean:.1f} ± {100 * std:.1f}" in report
    assert "**" in report
    assert "(+" in report or "(-" in report  # the paired difference to the base method
    for name in ("per_shot_brushed_metal", "sweep_patchcoreplus_lambda", "heatmaps_brushed_metal"):
        image = output / f"{name}.png"
        assert image.is_file(), name
        assert image.stat().st_size > 5000, name
        assert f"({name}.png)" in report
    assert (output / "figure7_brushed_metal.png").stat().st_size > 5000

    # a re-run has nothing left to do
    calls.clear()
    main(["--config", str(config_path)])
    assert calls == []


@pytest.mark.slow
def test_anomalib_benchmark_cli_runs_the_few_shot_pipeline(tiny_config: dict, tmp_path: Path) -> None:
    tiny_config["benchmark"]["few_shot_seed"] = 0
    tiny_config["benchmark"].pop("sweeps")
    tiny_config["benchmark"]["model"]["grid"] = tiny_config["benchmark"]["model"]["grid"][:1]
    anomalib = Path(sys.executable).with_name("anomalib")
    if not anomalib.exists():
        pytest.skip("the anomalib console script is not installed next to this Python")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if env.get("PYTHONPATH"):  # the command runs in another folder: keep a relative PYTHONPATH (e.g. src) valid
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep))
    result = subprocess.run(
        [str(anomalib), "benchmark", "--config", str(_write(tiny_config, tmp_path))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(tmp_path / "out")
    assert {r["method"] for r in rows} == {"PatchCore"}
    assert {r["metric"] for r in rows} >= set(METRICS)


def test_a_data_set_without_masks_reports_no_pixel_metrics(tiny_config: dict, tmp_path: Path) -> None:
    """No masks: pixel AUROC / F1 / AUPRO and the pixel decision are absent (not 0.0), and the report says why."""
    tiny_config["benchmark"]["data"]["init_args"].pop("mask_dir")
    tiny_config["benchmark"]["few_shot_seed"] = 0
    tiny_config["benchmark"].pop("sweeps")
    tiny_config["benchmark"]["model"]["grid"] = tiny_config["benchmark"]["model"]["grid"][:1]
    tiny_config["benchmark"]["figure7"] = False
    tiny_config["benchmark"]["heatmaps"] = {"images": 0}
    main(["--config", str(_write(tiny_config, tmp_path))])
    output = Path(tiny_config["benchmark"]["output"])
    metrics = {r["metric"] for r in _rows(output)}
    assert {"image_AUROC", "support_image_BAcc", "oracle_image_BAcc"} <= metrics
    assert not {m for m in metrics if "pixel" in m}
    report = (output / "report.md").read_text()
    assert "Pixel metrics n/a: the test set of this data set has no masks" in report
    assert "| n/a |" in report


def test_decision_rules_judge_every_rule_on_the_cells_own_scores(tiny_config: dict, tmp_path: Path) -> None:
    """The rule at the package's own construction and position reproduces the model's decisions; positions order them.

    A higher position is a higher threshold: never more false alarms nor more detections. The
    report's ratios are recomputed from results.csv.
    """
    from anomalib_protorefine.thresholds import POSITION

    bench = tiny_config["benchmark"]
    bench.pop("sweeps")
    bench.update(k_shot={"grid": [2]}, figure7=False, heatmaps={"images": 0})
    bench["decision_rules"] = {"held_out": ["copies", "leave_one_out"], "positions": [0.0, POSITION, 1.0]}
    main(["--config", str(_write(tiny_config, tmp_path))])
    output = Path(bench["output"])
    values = {(r["method"], int(r["seed"]), r["metric"]): float(r["value"]) for r in _rows(output)}
    for method in ("PatchCore", "PatchCore+"):
        ratios = []
        for seed in (0, 1):
            for metric in ("image_BAcc", "image_FAR", "image_Recall", "pixel_F1"):
                own = values[(method, seed, f"support_{metric}")]
                assert values[(method, seed, f"rule_copies_{POSITION:g}_support_{metric}")] == pytest.approx(own)
            for held_out in ("copies", "leave_one_out"):
                rates = [
                    [values[(method, seed, f"rule_{held_out}_{p:g}_support_image_{m}")] for p in (0.0, POSITION, 1.0)]
                    for m in ("FAR", "Recall")
                ]
                for rate in rates:
                    assert rate == sorted(rate, reverse=True)
            ratios.append(
                values[(method, seed, "rule_leave_one_out_1_support_image_BAcc")]
                / values[(method, seed, "oracle_image_BAcc")]
            )
        report = (output / "report.md").read_text()
        assert f"| leave_one_out | 1 | {method} | {sum(ratios) / 2:.3f} |" in report
    separated = {values[(m, s, f"rule_{h}_separated")] for m in ("PatchCore",) for s in (0, 1) for h in ("copies",)}
    assert separated <= {0.0, 1.0}


def test_self_calibration_records_its_pick_and_the_report_counts_it(tiny_config: dict, tmp_path: Path) -> None:
    """refiner="auto" scores exactly like the candidate it recorded; the report's counts follow from results.csv."""
    bench = tiny_config["benchmark"]
    bench.pop("sweeps")
    bench.update(k_shot={"grid": [1, 2]}, few_shot_seed={"grid": [0, 1, 2]}, figure7=False, heatmaps={"images": 0})
    bench["model"]["grid"].append(
        {"name": "auto", "class_path": "PatchCorePlus", "base": "PatchCore", "init_args": {"refiner": "auto"}}
    )
    main(["--config", str(_write(tiny_config, tmp_path))])
    output = Path(bench["output"])
    values = {(r["method"], int(r["k_shot"]), int(r["seed"]), r["metric"]): float(r["value"]) for r in _rows(output)}
    picks = {key[1:3]: value for key, value in values.items() if key[3] == "auto_refined"}
    assert len(picks) == 6
    assert not any(key[3] == "auto_refined" and key[0] != "auto" for key in values)
    expected_lines = []
    for k in (1, 2):
        better = 0
        for seed in (0, 1, 2):
            chosen, other = ("PatchCore+", "PatchCore") if picks[(k, seed)] else ("PatchCore", "PatchCore+")
            for metric in ("image_AUROC", "pixel_AUROC", "pixel_AUPRO"):
                assert values[("auto", k, seed, metric)] == pytest.approx(values[(chosen, k, seed, metric)], abs=1e-6)
            total = {
                m: values[(m, k, seed, "image_AUROC")] + values[(m, k, seed, "pixel_AUROC")] for m in (chosen, other)
            }
            better += total[chosen] >= total[other]
        refined = int(sum(picks[(k, seed)] for seed in (0, 1, 2)))
        expected_lines.append(f"| auto (vs PatchCore+) | {k} | {refined}/3 | {better}/3 |")
    report = (output / "report.md").read_text()
    for line in expected_lines:
        assert line in report


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b["data"]["init_args"].pop("mask_dir"),
        lambda b: b.update(few_shot_seed={"grid": [0, 1, 2]}),
        lambda b: b["shared"].update(image_size=96),
    ],
    ids=["mask_dir", "seeds", "shared"],
)
def test_resuming_into_a_folder_of_another_run_is_refused(tiny_config: dict, tmp_path: Path, change: Any) -> None:
    """The run guard covers the data, k, seeds and shared settings, not only the methods."""
    tiny_config["benchmark"]["model"]["grid"] = tiny_config["benchmark"]["model"]["grid"][:1]
    tiny_config["benchmark"].pop("sweeps")
    tiny_config["benchmark"]["few_shot_seed"] = {"grid": [0, 1]}
    plan = preflight(plan_from_config(tiny_config), echo=lambda *_: None)
    (plan.output / "results.csv").write_text("dataset,category,k_shot,seed,method,metric,value\n")
    assert preflight(plan_from_config(copy.deepcopy(tiny_config)), echo=lambda *_: None).output == plan.output
    change(tiny_config["benchmark"])
    with pytest.raises(BenchmarkConfigError, match="holds results of a different run"):
        preflight(plan_from_config(tiny_config), echo=lambda *_: None)


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).parents[1] / "configs" / "benchmark").glob("*.yaml"))
)
def test_every_shipped_benchmark_config_is_a_valid_plan(repo_root: Path, name: str) -> None:
    """Each config under configs/benchmark parses into a plan (methods, refiner options, data) without running."""
    config = yaml.safe_load((repo_root / "configs" / "benchmark" / name).read_text())
    plan = plan_from_config(config, check_data=False)
    assert plan.methods, name
    for method in plan.methods:
        refiner = method.init_args.get("refiner")
        if isinstance(refiner, dict):  # options over the preset: each must be a PrototypeRefiner option
            PrototypeRefiner(**{k: v for k, v in refiner.items() if k != "class_path"})


def test_the_measurements_doc_names_only_configs_and_scripts_that_exist(repo_root: Path) -> None:
    """Every number in docs/benchmarks.md says which config or script made it: each one it names exists."""
    import re

    text = (repo_root / "docs" / "benchmarks.md").read_text()
    named = set(re.findall(r"(configs/benchmark/[\w.-]+\.yaml|scripts/[\w.-]+\.(?:py|sh))", text))
    assert any(name.startswith("configs/") for name in named)
    missing = sorted(name for name in named if not (repo_root / name).is_file())
    assert not missing, f"docs/benchmarks.md names files that do not exist: {missing}"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("refinement_forms", "refinement_confirm"),
        ("refinement_forms", "regime"),
        ("em_budget", "calibration"),
        ("decision", "decision_rule"),
        ("default_choice", "default_confirm"),
        ("default_choice", "augmentation"),
        ("tiling", "resolution"),
        ("resolution", "resolution_aspect"),
        ("default_confirm", "resolution_confirm"),
    ],
)
def test_study_configs_share_the_settings_of_the_runs_they_are_compared_with(
    repo_root: Path, first: str, second: str
) -> None:
    """Studies compared in docs/benchmarks.md use the same backbone, bank, test subset and data configs."""
    folder = repo_root / "configs" / "benchmark"
    plans = [
        plan_from_config(yaml.safe_load((folder / f"{n}.yaml").read_text()), check_data=False) for n in (first, second)
    ]
    assert plans[0].shared == plans[1].shared
    assert plans[0].max_test_images == plans[1].max_test_images
    assert plans[0].data_configs[0] == plans[1].data_configs[0]


def test_em_budget_confirmation_differs_only_in_seeds_and_output(repo_root: Path) -> None:
    folder = repo_root / "configs" / "benchmark"
    choice = yaml.safe_load((folder / "em_budget.yaml").read_text())
    confirm = yaml.safe_load((folder / "em_budget_confirm.yaml").read_text())
    assert choice["benchmark"].pop("few_shot_seed") == {"grid": [0, 1, 2, 3, 4]}
    assert confirm["benchmark"].pop("few_shot_seed") == {"grid": [5, 6, 7, 8, 9]}
    assert choice["benchmark"].pop("output") != confirm["benchmark"].pop("output")
    assert choice == confirm


def test_default_confirmation_differs_only_in_seeds_output_and_the_second_data_set(repo_root: Path) -> None:
    folder = repo_root / "configs" / "benchmark"
    choice = yaml.safe_load((folder / "default_choice.yaml").read_text())["benchmark"]
    confirm = yaml.safe_load((folder / "default_confirm.yaml").read_text())["benchmark"]
    assert choice.pop("few_shot_seed") == {"grid": [0, 1, 2, 3, 4]}
    assert confirm.pop("few_shot_seed") == {"grid": [5, 6, 7, 8, 9]}
    assert choice.pop("output") != confirm.pop("output")
    assert confirm.pop("data")["grid"][0] == choice.pop("data")
    assert choice == confirm


def test_ctrl_c_ends_the_benchmark_with_one_line_and_exit_130(
    tiny_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(FewShotBenchmark, "run", interrupted)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    with pytest.raises(SystemExit) as stopped:
        main(["--config", str(config)])
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "interrupted: the finished jobs are kept in the output folder's results.csv" in err
    assert "Traceback" not in err


def test_several_cuda_devices_get_anomalibs_parallel_runner(tiny_config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker per GPU (as anomalib's benchmark), the serial runner on one device or on CPU."""
    import dataclasses

    from anomalib_protorefine.benchmark.job import FewShotRunner, ParallelFewShotRunner

    bench = FewShotBenchmark()
    bench.plan = plan_from_config(tiny_config)
    assert isinstance(bench._setup_runners(tiny_config)[0], FewShotRunner)  # cpu
    bench.plan = dataclasses.replace(bench.plan, accelerator="cuda")
    for count, expected in ((1, FewShotRunner), (3, ParallelFewShotRunner)):
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        (runner,) = bench._setup_runners(tiny_config)
        assert type(runner) is expected
    assert runner.n_jobs == 3


@pytest.mark.slow
def test_parallel_runner_gives_the_serial_results(tiny_config: dict, tmp_path: Path) -> None:
    """anomalib's ParallelRunner (spawned worker processes, here on CPU) scores every job as the serial run."""
    from anomalib_protorefine.benchmark.job import FewShotJobGenerator, ParallelFewShotRunner

    main(["--config", str(_write(tiny_config, tmp_path))])
    serial = {(r["seed"], r["method"], r["metric"]): float(r["value"]) for r in _rows(tmp_path / "out")}

    tiny_config["benchmark"]["output"] = str(tmp_path / "parallel")
    plan = preflight(plan_from_config(tiny_config))
    ParallelFewShotRunner(FewShotJobGenerator(plan), n_jobs=2).run({})
    rows = _rows(tmp_path / "parallel")
    parallel = {(r["seed"], r["method"], r["metric"]): float(r["value"]) for r in rows}
    assert len(parallel) == len(rows)  # every job once
    assert set(parallel) == set(serial)
    for key, value in serial.items():
        if key[2] in METRICS:
            assert parallel[key] == pytest.approx(value, abs=1e-6), key
