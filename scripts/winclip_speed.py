"""Per-image inference time of WinCLIP vs WinCLIP+ (WinClipPlus), and where the time goes.

Three models with the *same* CLIP weights and the *same* k reference images score the same
pre-processed synthetic images one at a time (batch 1, the paper's "time per image"), in rotating
order per image so that load drift on a shared machine hits all of them alike:

* ``upstream``: anomalib's ``WinClipModel`` (its module globals pointed at the architecture);
* ``plain``: ``WinClipPlusModel(refiner=None)`` (must cost the same as upstream);
* ``refined``: ``WinClipPlusModel`` with the paper's refiner (cosine, lambda 0.1, N 10, alpha 0.5).

Architectures: ``tiny`` (the 2-layer test config of ``anomalib_protorefine.models.winclip_plus.tiny_clip``) and ``real``
(``ViT-B-16-plus-240``, WinCLIP's architecture, with random weights: the cost does not depend on
the weights; no download). The breakdown times each stage separately on the refined model:
full-image encoding, window encoding, zero-shot (text) scoring, plain few-shot scoring and
refined few-shot scoring (their difference is the refinement), plus the one-off costs of the text
embeddings (once per class name) and of the reference embeddings + coresets (once per k-shot set).

Usage:
    python scripts/winclip_speed.py                      # tiny and real, k=2, 8/3 images
    python scripts/winclip_speed.py --archs real --images 5 --k-shot 4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from anomalib.data.utils import read_image
from anomalib.models.image.winclip import torch_model as upstream_torch_model
from anomalib.models.image.winclip.utils import class_scores

from anomalib_protorefine.data import generate_dataset
from anomalib_protorefine.models.winclip_plus import tiny_clip
from anomalib_protorefine.models.winclip_plus.lightning_model import WINCLIP_REFINER_DEFAULTS, WinClipPlus
from anomalib_protorefine.models.winclip_plus.torch_model import WinClipPlusModel
from anomalib_protorefine.refinement import PrototypeRefiner

REAL = "ViT-B-16-plus-240"


def timed(function: Callable[[], object]) -> tuple[float, object]:
    """Seconds of one call (synchronised on GPU) and its result."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def load_images(folder: Path, count: int, device: torch.device) -> torch.Tensor:
    """Load the first ``count`` images of ``folder``, pre-processed like WinClipPlus does (240 px, CLIP norm)."""
    transform = WinClipPlus.configure_pre_processor().transform
    paths = sorted(folder.glob("*.png"))[:count]
    return torch.stack([transform(read_image(str(p), as_tensor=True)) for p in paths]).to(device)


def build_models(backbone: str, device: torch.device, alpha: float) -> dict[str, torch.nn.Module]:
    """Upstream, plain and refined models sharing one set of random CLIP weights."""
    torch.manual_seed(0)
    refined = WinClipPlusModel(
        backbone=backbone,
        pretrained=None,
        refiner=PrototypeRefiner(**WINCLIP_REFINER_DEFAULTS),
        coreset_sampling_ratio=alpha,
    )
    name = refined.backbone
    plain = WinClipPlusModel(backbone=name, pretrained=None)
    upstream_torch_model.BACKBONE, upstream_torch_model.PRETRAINED = name, None
    upstream = upstream_torch_model.WinClipModel()
    for model in (plain, upstream):
        model.clip.load_state_dict(refined.clip.state_dict())
    return {
        "upstream": upstream.to(device).eval(),
        "plain": plain.to(device).eval(),
        "refined": refined.to(device).eval(),
    }


def breakdown(model: WinClipPlusModel, image: torch.Tensor) -> dict[str, float]:
    """Seconds of each stage of the refined model on one image."""
    full, _ = timed(lambda: model.clip.encode_image(image))
    total, (embedding, windows, patches) = timed(lambda: model.encode_image(image))

    def zero_shot() -> torch.Tensor:
        scores = class_scores(embedding, model.text_embeddings, model.temperature, target_class=1)
        return model._compute_zero_shot_scores(scores, windows)

    text, _ = timed(zero_shot)
    refined, _ = timed(lambda: model._compute_few_shot_scores(patches, windows))
    refiner, model.refiner = model.refiner, None
    try:
        plain, _ = timed(lambda: model._compute_few_shot_scores(patches, windows))
    finally:
        model.refiner = refiner
    return {
        "image encoding": full,
        "windows": max(total - full, 0.0),
        "zero-shot text scoring": text,
        "few-shot scoring (plain)": plain,
        "refinement (refined - plain)": refined - plain,
    }


def run(arch: str, args: argparse.Namespace, folder: Path, device: torch.device) -> None:
    backbone = str(tiny_clip.write_config(Path(tempfile.mkdtemp()))) if arch == "tiny" else REAL
    count = args.images if args.images else (8 if arch == "tiny" else 3)
    size = args.batch_size
    models = build_models(backbone, device, args.alpha)
    references = load_images(folder / "train" / "good", args.k_shot, device)
    queries = load_images(folder / "test" / "defect", count * size, device)

    one_off: dict[str, float] = {}
    for name, model in models.items():
        seconds, _ = timed(lambda model=model: model.setup("object"))
        one_off.setdefault("text embeddings (once per class name)", seconds)
        seconds, _ = timed(lambda model=model: model.setup(reference_images=references))
        one_off[f"reference embeddings + banks ({name})"] = seconds

    with torch.no_grad():
        for model in models.values():  # warm-up (allocations, factor caches)
            model(queries[:1])
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        stages: list[dict[str, float]] = []
        for index in range(count):
            image = queries[index * size : (index + 1) * size]
            order = names[index % len(names) :] + names[: index % len(names)]
            for name in order:
                seconds, _ = timed(lambda name=name, image=image: models[name](image))
                times[name].append(seconds / size)
            stages.append({key: value / size for key, value in breakdown(models["refined"], image).items()})

    median = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"\n## {arch}: {models['refined'].backbone}, k={args.k_shot}, alpha={args.alpha}, {count} batches of "
        f"{size} image(s), {device}, {torch.get_num_threads()} thread(s)"
    )
    print("| model | median s/image | mean s/image | vs upstream |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        ratio = median[name] / median["upstream"]
        print(f"| {name} | {median[name]:.4f} | {statistics.mean(values):.4f} | {ratio:.2f}x |")
    added = median["refined"] - median["plain"]
    if args.json:
        record = {"arch": arch, "batch": size, "device": str(device), "seconds_per_image": median}
        with args.json.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
    print(f"\nrefinement adds {added:.4f} s/image = {100 * added / median['plain']:.1f}% over plain WinCLIP")
    print("\n| stage (refined model, per image) | median s | share |")
    print("| --- | ---: | ---: |")
    stage_median = {key: statistics.median(s[key] for s in stages) for key in stages[0]}
    total = sum(stage_median.values())
    for key, value in stage_median.items():
        print(f"| {key} | {value:.4f} | {100 * value / total:.1f}% |")
    print("\n| one-off cost | s |")
    print("| --- | ---: |")
    for key, value in one_off.items():
        print(f"| {key} | {value:.3f} |")
    refined = models["refined"]
    stats = refined.refinement_stats
    banks = [bank.shape[0] for bank in [refined._patch_bank, *refined._window_banks]]
    print(
        f"\nlast refinement: {stats['em_iterations']:.1f} EM and {stats['sinkhorn_iterations']:.0f} Sinkhorn "
        f"iterations per query and reference set; bank sizes (patches, windows per scale) {banks}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    parser.add_argument("--images", type=int, default=0, help="query images (default: 8 tiny, 3 real)")
    parser.add_argument("--k-shot", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=0.5, help="coreset ratio (paper: 0.5 MVTec)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward call (times are per image)")
    parser.add_argument("--json", type=Path, default=None, help="append the medians to this JSON-lines file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = generate_dataset(
        Path(tempfile.gettempdir()) / "protorefine_winclip_speed",
        num_train=max(args.k_shot, 1),
        num_test_good=1,
        num_test_defect=max(args.images or 8, 8) * args.batch_size,
        image_size=240,
    )
    for arch in args.archs:
        run(arch, args, folder, torch.device(args.device))


if __name__ == "__main__":
    main()
