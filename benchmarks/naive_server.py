"""The server a user would write first: FastAPI, one endpoint, Hugging Face `generate()` per request.

    python -m benchmarks.naive_server --model models/locca-tiny-shapes --port 8001 --threads 1

POST /v1/caption (multipart: `image`, `new_tokens`): open and preprocess the image, `generate()` exactly
`new_tokens` tokens for it with the peer model of benchmarks/peers.py (our model's dimensions, random weights),
answer the token ids. `new_tokens` is how many tokens our model generates for the same image, so both servers do
the same work per request. The endpoint is a plain `def`: FastAPI runs it in its thread pool, so concurrent
requests call `generate()` at once, each on its own thread (torch releases the GIL in its kernels). That is the
peer's better configuration here, not ours: serialising the calls with a lock (`--lock`) measured slower on the
2-core machine (6.8 against 10.5 requests/s at 32 clients, one torch thread per call: unlocked, the calls use
both cores).
"""

from __future__ import annotations

import argparse
import io
import json
import threading

import torch
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image

from export.backends import find_checkpoint
from model.checkpoint import read_header
from model.config import ModelConfig
from model.image import preprocess

from .peers import hf_generate, hf_model


def build_app(cfg: ModelConfig, device: str = "cpu", dtype: torch.dtype = torch.float32, lock: bool = False):
    model = hf_model(cfg, device, dtype)
    hf_generate(model, torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype), 2)  # warm
    guard = threading.Lock() if lock else None
    app = FastAPI(title="naive HF server")

    @app.get("/readyz")
    def ready() -> dict:
        return {"ok": True}

    @app.post("/v1/caption")
    def caption(image: UploadFile = File(...), new_tokens: int = Form(...)) -> dict:
        pixels = preprocess(Image.open(io.BytesIO(image.file.read())), cfg.image_size)
        x = torch.from_numpy(pixels[None]).to(device, dtype)
        if guard is None:
            out = hf_generate(model, x, new_tokens)
        else:
            with guard:
                out = hf_generate(model, x, new_tokens)
        return {"tokens": out[0, 1:].tolist()}

    return app


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/locca-tiny-shapes", help="our checkpoint: only its dimensions are used")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--lock", action="store_true", help="one generate() at a time (default: concurrent calls)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(**json.loads(read_header(find_checkpoint(args.model))["model_config"]))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    app = build_app(cfg, args.device, dtype, lock=args.lock)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
