"""`spp models`: the shipped detectors (or given model files) and what they detect."""

from __future__ import annotations

import sys
from pathlib import Path

from spp_cli import ui
from spp_cli.errors import ModelError


def model_folders() -> list[Path]:
    """Where shipped detectors live: ``weights/`` beside the package (a source
    checkout), then ``<prefix>/share/spp/weights`` (an installed package)."""
    return [Path(__file__).resolve().parents[2] / "weights", Path(sys.prefix) / "share" / "spp" / "weights"]


def shipped_models() -> list[Path]:
    """Model files in the first folder of :func:`model_folders` that has any."""
    for folder in model_folders():
        found = sorted(folder.glob("*.safetensors"))
        if found:
            return found
    return []


def default_model_path() -> Path | None:
    """The detector `spp detect` uses without ``--model``: ``default.safetensors``."""
    for folder in model_folders():
        candidate = folder / "default.safetensors"
        if candidate.is_file():
            return candidate
    return None


def run_models(paths: tuple[Path, ...]) -> int:
    from spp_cli.model import Detector

    files = list(paths) or shipped_models()
    if not files:
        raise ModelError("no shipped detector found (looked in " + ", ".join(str(f) for f in model_folders()) + ")")
    default = default_model_path()
    bad = []
    for path in files:
        try:
            detector = Detector.load(path)
        except ModelError as exc:
            bad.append((path, str(exc)))
            continue
        features = detector.features
        marker = " (default)" if default is not None and Path(path).resolve() == default.resolve() else ""
        scales = ",".join(str(s) for s in features.scales)
        ui.console.print(f"{path}{marker}: {path.stat().st_size / 1e6:.1f} MB")
        ui.console.print(f"  classes: {', '.join(detector.classes)}")
        ui.console.print(
            f"  {features.backbone} {features.layer}, scales {scales}, SVMs on {detector.feature_kind}, "
            f"box regression {'on' if detector.regressors is not None else 'off'}",
        )
        if detector.proposal_model is not None:
            ui.console.print(f"  proposals: its own network on the conv map, {detector.proposal_model.config.top_n} per image")
        else:
            ui.console.print("  proposals: selective search")
        weight = detector.detect.objectness_weight
        term = f" + {weight:g} x log objectness" if weight else ""  # DetectConfig.objectness_weight
        if detector.localisation is not None and detector.detect.iou_weight:
            term += f" + {detector.detect.iou_weight:g} x predicted IoU"  # DetectConfig.iou_weight
        if detector.calibration is not None:
            of = f" (of the SVM margin{term})" if term else ""
            ui.console.print(f"  scores: calibrated probabilities{of}, shown from {detector.calibration.display_probability:.2f}")
        else:
            ui.console.print(f"  scores: SVM margins{term}, shown from {detector.detect.display_threshold:g}")
        images = detector.training.get("images")
        if images:
            readme = " (see README.md beside the file for data and held-out AP)" if marker or not paths else ""
            ui.console.print(f"  trained on {images} image(s){readme}")
    ui.print_bad(bad)
    return 1 if bad else 0
