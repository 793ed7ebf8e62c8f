"""Which files and backend the workers load, and on which devices; decided once, in the server process.

The documented check for the ONNX bundle (LOCCA_BACKEND=onnxruntime, the default):
    1. LOCCA_MODEL itself holds manifest.json              -> serve that bundle
    2. LOCCA_MODEL/onnx/manifest.json exists and was exported from LOCCA_MODEL's checkpoint -> serve it
    3. else, if LOCCA_EXPORT_IF_MISSING (default true) and LOCCA_MODEL holds checkpoint.safetensors (or is
       one): run `locca export CHECKPOINT LOCCA_MODEL/onnx` once, then serve it
    4. else, or if onnxruntime or the export is unavailable or fails: log a warning saying why, and serve the
       checkpoint with the torch backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings

log = logging.getLogger("locca.bundle")


@dataclass(frozen=True)
class Source:
    path: str          # what load_inference gets
    backend: str       # torch | onnxruntime
    fallback: str = ""  # why onnxruntime was not used, if it was asked for


def checkpoint_of(model: Path) -> Path:
    ckpt = model if model.is_file() else model / "checkpoint.safetensors"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no model at {model}: expected a checkpoint.safetensors (or a directory "
                                "holding one) or an exported ONNX bundle; set LOCCA_MODEL or --model")
    return ckpt


def resolve(settings: Settings) -> Source:
    model = Path(settings.model)
    if settings.backend == "torch":
        return Source(str(checkpoint_of(model)), "torch")
    onnx_dir = model if (model / "manifest.json").is_file() else model / "onnx"
    try:
        import export.onnx_backend  # noqa: F401, PLC0415 (is the backend importable here?)
    except ImportError as e:
        return _fallback(model, f"the onnxruntime backend cannot be imported ({e})")
    if (onnx_dir / "manifest.json").is_file() and not stale(onnx_dir, model):
        return Source(str(onnx_dir), "onnxruntime")
    ckpt = checkpoint_of(model)
    if not settings.export_if_missing:
        return _fallback(model, f"no ONNX bundle at {onnx_dir} and exporting one is turned off")
    log.info("no ONNX bundle; exporting one", extra={"checkpoint": str(ckpt), "out": str(onnx_dir)})
    try:
        rc = subprocess.run([sys.executable, "-m", "locca.cli", "export", str(ckpt), str(onnx_dir)],
                            stdout=sys.stderr, check=False).returncode
    except OSError as e:
        rc = f"not run: {e}"
    if rc == 0 and (onnx_dir / "manifest.json").is_file():
        return Source(str(onnx_dir), "onnxruntime")
    return _fallback(model, f"`locca export {ckpt} {onnx_dir}` failed (exit {rc})")


def stale(onnx_dir: Path, model: Path) -> bool:
    """An ONNX bundle beside a checkpoint is stale when it was exported from another checkpoint (the model was
    retrained or replaced since): it is exported again rather than served."""
    ckpt = model if model.is_file() else model / "checkpoint.safetensors"
    if onnx_dir == model or not ckpt.is_file():
        return False  # a bundle given on its own is served as it is
    source = json.loads((onnx_dir / "manifest.json").read_text()).get("source", {})
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    if source.get("sha256") != digest:
        log.info("the ONNX bundle was exported from another checkpoint; exporting again",
                 extra={"bundle": str(onnx_dir), "checkpoint": str(ckpt)})
        return True
    return False


def _fallback(model: Path, why: str) -> Source:
    ckpt = checkpoint_of(model)
    log.warning(f"falling back to the torch backend: {why}", extra={"checkpoint": str(ckpt)})
    return Source(str(ckpt), "torch", why)


def gpu_count() -> int:
    """GPUs this process may use. Without an NVIDIA driver that is 0 and torch is never imported (it costs
    the server process seconds and memory); with one, torch confirms it can use them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    gpus = Path("/proc/driver/nvidia/gpus")
    if not (gpus.is_dir() and any(gpus.iterdir())):
        return 0
    try:
        import torch  # noqa: PLC0415
        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def model_name(model: str) -> str:
    """models/locca-tiny-shapes, its checkpoint.safetensors or its onnx/ bundle -> "locca-tiny-shapes"."""
    p = Path(model)
    if p.suffix == ".safetensors" and p.stem != "checkpoint":
        return p.stem
    if p.suffix == ".safetensors" or p.name == "onnx":
        p = p.parent
    return p.resolve().name


def devices(settings: Settings) -> list[str]:
    """One device per worker: every GPU once (LOCCA_DEVICE auto or cuda), or LOCCA_WORKERS on one device."""
    device, gpus = settings.device, 0
    if device in ("auto", "cuda", "tensorrt"):
        gpus = gpu_count()
        if device != "auto" and not gpus:
            raise RuntimeError(f"LOCCA_DEVICE={device} but no GPU is visible")
        device = "cpu" if device == "auto" and not gpus else ("cuda" if device == "auto" else device)
    n = settings.workers or (gpus if gpus and ":" not in device and device != "cpu" else 1)
    if device == "cpu" or ":" in device:
        return [device] * n
    return [f"{device}:{i % gpus}" for i in range(n)]
