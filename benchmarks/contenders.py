"""What the benchmark runs: our backends and the peer on one device, and the requests sent to the servers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
import torch

from export.backends import load_inference
from model.core import EngineCore
from model.requests import Request
from model.scheduler import ALL_AT_ONCE
from service import images as request_images
from service.bundle import resolve
from service.settings import Settings

from .batching import Call
from .bench_server import requests_for
from .engine import Contender
from .peers import hf_model

# ONNX Runtime's GPU EPs: (provider, contender name, precision). The TensorRT EP builds fp16 engines
# (export/trt_options.py), from the fp32 bundle, the first time it loads them (minutes).
ORT_GPU = {"cuda": ("CUDAExecutionProvider", "ours ort-cuda fp32", "fp32"),
           "tensorrt": ("TensorrtExecutionProvider", "ours ort-trt fp16", "fp16")}
TRT_MAX_BATCH = 64  # trt_provider_options' default profile: rows 1 / 8 / 64


def contenders(model: str, device: str, threads: int, tmp: Path, backends=("onnxruntime", "torch")
               ) -> tuple[list[Contender], object, Path | None]:
    """Ours first (the first is the server's backend on this device, fp32), then the peer. On a CPU: ONNX
    Runtime fp32 and int8, PyTorch fp32 and bf16. On a GPU: PyTorch fp32 and bf16, and ONNX Runtime on the
    CUDA and TensorRT EPs where the installed onnxruntime has them (onnxruntime-gpu). Returns the contenders,
    the model config and the fp32 ONNX bundle (exported on first use, as the server does; None without
    onnxruntime among `backends`)."""
    def ours(name, precision, loaded, max_batch=None):
        return Contender(name, precision, inference=loaded.inference, tasks=loaded.tasks, device=device,
                         max_batch=max_batch)

    gpu_eps = [k for k, (provider, _, _) in ORT_GPU.items() if provider in ort.get_available_providers()]
    onnx_dir = None
    if "onnxruntime" in backends and (device == "cpu" or gpu_eps):
        src = resolve(Settings(model=model, backend="onnxruntime"))
        onnx_dir = Path(src.path) if src.backend == "onnxruntime" else None
    torch_side = [ours(f"ours torch {p}", p, load_inference(model, "torch", device, threads, dtype=p))
                  for p in ("fp32", "bf16")] if "torch" in backends else []
    cs = []
    if device == "cpu" and onnx_dir is not None:
        from export.onnx_export import int8_from  # noqa: PLC0415
        int8 = int8_from(onnx_dir, tmp / "int8")
        cs = [ours("ours ort fp32", "fp32", load_inference(onnx_dir, "onnxruntime", "cpu", threads)),
              ours("ours ort int8", "int8", load_inference(int8, "onnxruntime", "cpu", threads))]
    cs += torch_side
    if device != "cpu" and onnx_dir is not None:
        cs += [ours(ORT_GPU[k][1], ORT_GPU[k][2], load_inference(onnx_dir, "onnxruntime", k, threads),
                    TRT_MAX_BATCH if k == "tensorrt" else None) for k in gpu_eps]
    cfg = cs[0].inference.cfg
    peers = [Contender("hf generate fp32", "fp32", hf=hf_model(cfg, device), device=device)]
    if device != "cpu":  # on a GPU the peer gets bf16 too
        peers.append(Contender("hf generate bf16", "bf16", hf=hf_model(cfg, device, torch.bfloat16), device=device))
    return cs + peers, cfg, onnx_dir


@dataclass
class Pool:
    """Requests for sections 2 and 3, built from the scenes of bench_server.requests_for."""
    images: list[bytes]           # PNGs, sent to both servers in turn
    caption_tokens: list[int]     # tokens our model generates for each image's caption (<eos> included)
    prompt: int                   # tokens of the caption prompt
    captions: list[Call]          # the longest captions of the pool (section 3's background load)
    refers: list[Call]            # refer questions (section 3's measured client)


def request_pool(default: Contender, n: int) -> Pool:
    reqs = requests_for(n)
    limits = request_images.Limits(1 << 24, 1 << 26)
    size = default.inference.cfg.image_size
    loaded = [request_images.load(data, limits, size) for _, data, _ in reqs]  # (pixels, (w, h)) each
    core = EngineCore(default.inference, default.tasks, ALL_AT_ONCE)
    ids = [core.add(Request("caption"), pixels, wh) for pixels, wh in loaded]
    done = {f.id: f for f in core.run()}
    tokens = [len(done[i].search.best(1)[0].tokens) for i in ids]
    longest = sorted(range(n), key=lambda i: -tokens[i])[: max(1, n // 4)]
    captions = [Call("caption", *loaded[i]) for i in longest]
    refers = [Call("refer", *loaded[i], expression=f["expression"])
              for i, (kind, _, f) in enumerate(reqs) if kind == "refer"]
    return Pool([data for _, data, _ in reqs], tokens, len(default.tasks.caption_prompt()), captions, refers)
