"""The ONNX bundle's format: the names, files and manifest that `locca export` writes and every reader checks.

No onnxruntime and no torch here, so that the writer (export/onnx_export.py), the runtime
(export/onnx_backend.py), the TensorRT tools and the server's choice of what to serve (service/bundle.py)
share one definition instead of copies. A bundle is a directory: the graphs (encoder.onnx, decoder.onnx, in
fp32 and int8 bundles decoder_cpu.onnx), tokenizer.json, config.json (model and box config, the checkpoint's
metadata) and manifest.json (format, precision, the sha256 of every other file): export/README.md, "The bundle".
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from model.config import BoxConfig, ModelConfig

# 3: fp32 and int8 bundles add decoder_cpu.onnx; 2: the decoder returns the new keys/values only; 1: whole caches
FORMAT = "locca-onnx/3"
FILES = ("encoder.onnx", "decoder.onnx", "tokenizer.json", "config.json")  # in every bundle
CPU_DECODER = "decoder_cpu.onnx"  # export/cpu_decoder.py: ONNX Runtime's fused CPU operators, cache written in place


def io_names(layers: int) -> dict[str, list[str]]:
    """Input and output names of the graphs; a name ending in _{l} is layer l's. decoder_cpu.onnx takes
    decoder_in too; its outputs are decoder_cpu_out (present_*: the past_* buffers, written in place)."""
    per = lambda *stems: [f"{s}_{i}" for s in stems for i in range(layers)]  # noqa: E731
    return {"encoder_in": ["pixels"], "encoder_out": ["visual", *per("cross_k", "cross_v")],
            "decoder_in": ["tokens", "positions", *per("past_k", "past_v", "cross_k", "cross_v")],
            "decoder_out": ["logits", *per("new_k", "new_v")],
            "decoder_cpu_out": ["logits", *per("present_k", "present_v")]}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class BundleError(ValueError):
    """An exported bundle that is missing, incomplete or corrupt."""


@dataclass
class OnnxBundle:
    dir: Path
    manifest: dict
    cfg: ModelConfig
    box: BoxConfig
    meta: dict


def read_bundle(path: str | Path) -> OnnxBundle:
    """Read and verify a bundle: every file the manifest lists must exist and match its sha256."""
    d = Path(path)
    d = d.parent if d.name == "manifest.json" else d
    if not (d / "manifest.json").is_file():
        raise BundleError(f"no ONNX bundle at {path}: {d / 'manifest.json'} is missing (write one with "
                          "`locca export CHECKPOINT OUT_DIR`)")
    manifest = json.loads((d / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{d}: manifest format {manifest.get('format')!r}, expected {FORMAT!r}")
    for name in FILES:
        if name not in manifest["files"]:
            raise BundleError(f"{d}: the manifest lists no {name}")
    for name, digest in manifest["files"].items():
        f = d / name
        if not f.is_file():
            raise BundleError(f"{d}: {name} is missing (the manifest lists it); re-export the bundle")
        if sha256(f) != digest:
            raise BundleError(f"{d}: {name} does not match its sha256 in manifest.json (corrupt or "
                              "modified); re-export the bundle")
    config = json.loads((d / "config.json").read_text())
    return OnnxBundle(d, manifest, ModelConfig(**config["model_config"]), BoxConfig(**config["box_config"]),
                      config.get("meta", {}))
