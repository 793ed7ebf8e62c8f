"""Load a model for inference behind the one interface of model/interface.py, whichever backend runs it.

    load_inference("models/locca-tiny-shapes", backend="torch")        # the PyTorch checkpoint
    load_inference("models/locca-tiny-shapes/onnx", backend="onnxruntime")

A model path is a checkpoint file (`checkpoint.safetensors`), a directory holding one, or an exported ONNX
bundle directory (`manifest.json`, see export/onnx_export.py). Everything a caller needs besides the
inference object comes back with it: tokenizer, tasks (prompts, parsing), model config and metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model.codec import BoxCodec
from model.config import ModelConfig
from model.interface import Inference
from model.tasks import Tasks
from model.tokenizer import LoccaTokenizer

from .bundle_format import read_bundle

BACKENDS = ("torch", "onnxruntime")


@dataclass
class Loaded:
    inference: Inference
    tok: LoccaTokenizer
    tasks: Tasks
    cfg: ModelConfig
    backend: str
    device: str
    meta: dict = field(default_factory=dict)


def find_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "checkpoint.safetensors"
    if not p.is_file():
        raise FileNotFoundError(f"no LocCa checkpoint at {path} (expected a checkpoint.safetensors file or a "
                                "directory holding one)")
    return p


def load_inference(path: str | Path, backend: str = "torch", device: str = "cpu", threads: int | None = None,
                   dtype: str | None = None, spin: bool = True) -> Loaded:
    """device: "cpu" or "cuda[:i]" (torch); "cpu", "cuda[:i]", "tensorrt[:i]" or "auto" (onnxruntime).
    dtype: torch only, "fp32" (default), "bf16" or "fp16"; an ONNX bundle's precision is fixed at export.
    spin: onnxruntime only, whether its pool threads spin-wait (export/onnx_backend.py `session_options`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        import torch

        from model import checkpoint
        from model.inference import TorchInference

        dtypes = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        if dtype not in dtypes:
            raise ValueError(f"unknown dtype {dtype!r}; choose fp32, bf16 or fp16")
        if threads:
            torch.set_num_threads(threads)
        bundle = checkpoint.load(find_checkpoint(path), device="cpu")
        inf = TorchInference(bundle.model, device, dtypes[dtype])
        return Loaded(inf, bundle.tok, bundle.tasks, bundle.model.cfg, "torch", str(inf.device), bundle.meta)
    if dtype is not None:
        raise ValueError("an ONNX bundle's precision is chosen at export (locca export --precision)")
    return load_onnx(path, device=device, threads=threads, spin=spin)


def load_onnx(path: str | Path, device: str = "cpu", threads: int | None = None, spin: bool = True) -> Loaded:
    """An exported bundle on ONNX Runtime, verified against its manifest before a session is built."""
    from .onnx_backend import OnnxInference  # noqa: PLC0415 (onnxruntime is imported only when asked for)

    bundle = read_bundle(path)
    inf = OnnxInference(bundle, device, threads, spin=spin)
    tok = LoccaTokenizer.load(bundle.dir / "tokenizer.json")
    tasks = Tasks(tok, BoxCodec(bundle.box, tok.loc_offset))
    meta = {**bundle.meta, "precision": bundle.manifest.get("precision")}
    return Loaded(inf, tok, tasks, bundle.cfg, "onnxruntime", inf.device, meta)
