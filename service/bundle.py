"""Which files and backend the workers load, and on which devices; decided once, in the server process.

The documented check for the ONNX bundle (LOCCA_BACKEND=onnxruntime, the default):
    1. LOCCA_MODEL itself holds manifest.json              -> serve that bundle
    2. LOCCA_MODEL/onnx/manifest.json exists and was exported from LOCCA_MODEL's checkpoint -> serve it
    3. else, if LOCCA_EXPORT_IF_MISSING (default true) and LOCCA_MODEL holds checkpoint.safetensors (or is
       one): run `locca export CHECKPOINT LOCCA_MODEL/onnx` once, then serve it
    4. else, or if onnxruntime or the export is unavailable or fails: log a warning saying why, and serve the
       checkpoint with the torch backend.

A missing or unusable model stops the server at start with a message saying why (InvalidModel, exit 2): a
checkpoint is checked here, structurally and without torch (complete, a LocCa checkpoint); an ONNX bundle is
verified (every file against its sha256) by the workers as they load it, and a worker that cannot load its
model makes the server exit too (service/pool.py), never a restart loop or a failure at the first request.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from export.bundle_format import FORMAT
from model.formats import CHECKPOINT_FORMAT

from .settings import Settings

log = logging.getLogger("locca.bundle")
MAX_HEADER_BYTES = 100 << 20              # safetensors' own limit on a header


class InvalidModel(Exception):
    """The model to serve is missing or unusable: the server does not start."""


@dataclass(frozen=True)
class Source:
    path: str          # what load_inference gets
    backend: str       # torch | onnxruntime
    fallback: str = ""  # why onnxruntime was not used, if it was asked for


def checkpoint_of(model: Path) -> Path:
    ckpt = model if model.is_file() else model / "checkpoint.safetensors"
    if not ckpt.is_file():
        raise InvalidModel(f"no model at {model}: expected a checkpoint.safetensors (or a directory "
                           "holding one) or an exported ONNX bundle; set LOCCA_MODEL or --model")
    check_checkpoint(ckpt)
    return ckpt


def check_checkpoint(path: Path) -> None:
    """A checkpoint is a complete safetensors file (header, then exactly the bytes its tensors need) holding
    a LocCa model config. Reads the header only; never unpickles anything."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"not a safetensors file (a {n}-byte header in {size} bytes)")
            header = json.loads(f.read(n))
        meta = header.pop("__metadata__", None) or {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
        for key in ("model_config", "box_config", "tokenizer"):
            json.loads(meta[key])
        need, have = max((t["data_offsets"][1] for t in header.values()), default=0), size - 8 - n
        if need != have:
            raise ValueError(f"its tensors need {need} bytes of data and it holds {have} (truncated?)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise InvalidModel(f"{path} is not a usable LocCa checkpoint: {e}") from None


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
    if importlib.util.find_spec("torch") is None:  # a serving install (no `train` extra) cannot export
        raise InvalidModel(f"no ONNX bundle at {onnx_dir} to serve, and this install has no torch to export one "
                           f"from {ckpt}: install the train extra (pip install 'locca-serve[train]') and start "
                           "again, or export where torch is installed (locca export CHECKPOINT OUT) and serve "
                           "that bundle (--model OUT)")
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
    retrained or replaced since) or in another bundle format (an older `locca export`): it is exported again
    rather than served."""
    ckpt = model if model.is_file() else model / "checkpoint.safetensors"
    if onnx_dir == model or not ckpt.is_file():
        return False  # a bundle given on its own is served as it is
    try:
        manifest = json.loads((onnx_dir / "manifest.json").read_text())
        source = manifest.get("source", {})
    except (OSError, ValueError, AttributeError):
        log.warning("the ONNX bundle's manifest is unreadable; exporting again", extra={"bundle": str(onnx_dir)})
        return True
    if manifest.get("format") != FORMAT:
        log.info("the ONNX bundle was written by another version of `locca export`; exporting again",
                 extra={"bundle": str(onnx_dir), "format": manifest.get("format"), "expected": FORMAT})
        return True
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


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on, bounded by a container's CPU quota (cgroup v2 cpu.max, or v1
    cpu.cfs_quota_us): a pod limited to 4 CPUs on a 64-core node sees 64 in the affinity mask, and a backend
    that starts a thread per core there spends its quota being throttled."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cores
    if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or not period.isdigit() or int(period) <= 0:
        return cores
    return max(1, min(cores, -(-int(quota) // int(period))))  # a quota of 2.5 CPUs may use 3 at once


def worker_threads(settings: Settings, devices: list[str], cores: int | None = None) -> int:
    """Intra-op threads per worker: --threads, or 0 (auto): on a CPU, the usable cores shared among the workers
    less one for the server's own threads (HTTP, gRPC, image decoding), at least 1; on a GPU, the backend's
    default (0: its CPU threads only feed the device). On 2 cores a worker with onnxruntime's default (2
    spinning threads) fought the front for them: wrk at 64 connections, 3 alternating rounds (2026-12-02),
    92-108 captions/s against 175-191 with 1 thread (service/settings.py --threads, --spin-wait)."""
    if settings.threads or devices[0] != "cpu":
        return settings.threads
    return max(1, ((cores or usable_cores()) - 1) // len(devices))


def image_threads(settings: Settings, devices: list[str], threads: int, cores: int | None = None) -> int:
    """The front's image-decoding threads: --image-threads, or 0 (auto): the usable cores that CPU workers'
    `threads` (worker_threads) leave, or all of them beside GPU workers, at least 1 and at most 4. More threads
    than free cores only queue for them, and each hand-over costs the front CPU."""
    if settings.image_threads:
        return settings.image_threads
    cores = cores or usable_cores()
    left = cores - threads * len(devices) if devices[0] == "cpu" else cores
    return max(1, min(4, left))
