"""Content weights files (``training/msode_train/weights/<name>.pt``): names, format, load and save."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from msode_export.checkpoint import atomic_torch_save

from .networks import ContentConfig, TranslationModel

__all__ = ["WEIGHTS_DIR", "DEFAULT_WEIGHTS", "load_translation_model", "save_weights"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"  # training/msode_train/weights
# v2: v1 fine-tuned against the cross-contrast bias of L_sim's optimum (0.35 vs 0.64 mm at 2 mm); v1 stays
# committed, the earlier ablation reports name it
DEFAULT_WEIGHTS = "content_phantom_v2"
WEIGHTS_FORMAT = "msode-content"
WEIGHTS_FORMAT_VERSION = 1


def _resolve_weights(name_or_path) -> Path:
    if name_or_path is None:
        name_or_path = DEFAULT_WEIGHTS
    p = Path(str(name_or_path))
    if p.suffix == ".pt" and p.exists():
        return p
    cand = WEIGHTS_DIR / f"{name_or_path}.pt"
    if cand.exists():
        return cand
    if p.exists():
        return p
    have = sorted(q.stem for q in WEIGHTS_DIR.glob("*.pt")) if WEIGHTS_DIR.exists() else []
    raise FileNotFoundError(
        f"content weights {name_or_path!r} not found (not a file, not in {WEIGHTS_DIR}; available: {have})"
    )


def load_translation_model(name_or_path=DEFAULT_WEIGHTS, map_location="cpu") -> TranslationModel:
    """Load a :class:`TranslationModel` from a weights file (by name in ``WEIGHTS_DIR`` or by path);
    ``model.meta`` holds the file's provenance."""
    path = _resolve_weights(name_or_path)
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not an msode content-weights file")
    if int(blob.get("format_version", 0)) > WEIGHTS_FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {blob['format_version']} is newer than this reader ({WEIGHTS_FORMAT_VERSION})"
        )
    model = TranslationModel(ContentConfig.from_dict(blob["config"]))
    model.load_state_dict(blob["state_dict"])
    model.eval()
    model.meta = dict(blob.get("meta", {}))
    model.meta["path"] = str(path)
    return model


def save_weights(model: TranslationModel, path, meta: dict | None = None, half: bool = False) -> Path:
    """Write ``model`` (E^c, E^s, G) as a ``weights_only``-loadable dict; atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {
        k: (v.detach().cpu().half() if half and v.is_floating_point() else v.detach().cpu()).clone()
        for k, v in model.state_dict().items()
    }
    blob = {
        "format": WEIGHTS_FORMAT,
        "format_version": WEIGHTS_FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "state_dict": sd,
        "meta": json.loads(json.dumps(meta or {})),
    }
    return atomic_torch_save(blob, path)
