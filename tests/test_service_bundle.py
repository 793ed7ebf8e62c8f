"""An ONNX bundle exported from another checkpoint, or by an older `locca export`, is not served: the server
exports again."""

import hashlib
import json

from export.bundle_format import FORMAT
from service.bundle import stale


def test_a_bundle_exported_from_another_checkpoint_is_stale(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"weights v2")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    manifest = {"format": FORMAT, "source": {"sha256": hashlib.sha256(b"weights v1").hexdigest()}}
    (onnx / "manifest.json").write_text(json.dumps(manifest))
    assert stale(onnx, tmp_path)
    manifest["source"]["sha256"] = hashlib.sha256(b"weights v2").hexdigest()
    (onnx / "manifest.json").write_text(json.dumps(manifest))
    assert not stale(onnx, tmp_path)
    assert not stale(onnx, onnx)  # a bundle given on its own is served as it is


def test_a_bundle_in_an_older_format_is_stale(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"weights")
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    manifest = {"format": "locca-onnx/1", "source": {"sha256": hashlib.sha256(b"weights").hexdigest()}}
    (onnx / "manifest.json").write_text(json.dumps(manifest))
    assert stale(onnx, tmp_path)  # same checkpoint, but its decoder returns whole caches: export again
    manifest["format"] = FORMAT
    (onnx / "manifest.json").write_text(json.dumps(manifest))
    assert not stale(onnx, tmp_path)
