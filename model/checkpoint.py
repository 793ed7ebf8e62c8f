"""Model checkpoints: one safetensors file that carries the weights, the model and box configs and the
tokenizer, so nothing has to be told the shape of a model. Loading never unpickles anything."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .codec import BoxCodec
from .config import BoxConfig, ModelConfig
from .formats import CHECKPOINT_FORMAT
from .model import LocCa
from .tasks import Tasks
from .tokenizer import LoccaTokenizer


@dataclass
class Bundle:
    """A model with everything needed to talk to it."""
    model: LocCa
    tok: LoccaTokenizer
    box: BoxConfig
    meta: dict

    @property
    def codec(self) -> BoxCodec:
        return BoxCodec(self.box, self.tok.loc_offset)

    @property
    def tasks(self) -> Tasks:
        return Tasks(self.tok, self.codec)


def build(cfg: ModelConfig, tok: LoccaTokenizer, box: BoxConfig) -> LocCa:
    if box.bins != tok.num_loc:
        raise ValueError(f"box config has {box.bins} bins but the tokenizer {tok.num_loc} location tokens")
    return LocCa(cfg.replace(vocab_size=tok.vocab_size))


def save(path: str | Path, model: LocCa, tok: LoccaTokenizer, box: BoxConfig, dtype: torch.dtype | None = None,
         **meta) -> None:
    """dtype: store the floating-point weights in this type (torch.float16 halves a bundle committed to git);
    `load` builds the model in fp32 whatever the stored type."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": CHECKPOINT_FORMAT, "model_config": json.dumps(dataclasses.asdict(model.cfg)),
              "box_config": json.dumps(dataclasses.asdict(box)), "tokenizer": tok.to_json(),
              "meta": json.dumps(meta)}
    state = {k: v.detach().to(dtype if dtype and v.is_floating_point() else v.dtype).contiguous().cpu()
             for k, v in model.state_dict().items()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=header)
    tmp.chmod(0o644)  # safetensors creates files 0600; a bundle must be readable by a non-root server
    tmp.replace(path)  # atomic: a crash mid-save never leaves a truncated checkpoint


def read_header(path: str | Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a LocCa checkpoint (format {header.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT})")
    return header


def load(path: str | Path, device: str = "cpu") -> Bundle:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    header = read_header(path)
    cfg = ModelConfig(**json.loads(header["model_config"]))
    box = BoxConfig(**json.loads(header["box_config"]))
    tok = LoccaTokenizer.from_json(header["tokenizer"])
    model = build(cfg, tok, box)
    model.load_state_dict(load_file(str(path), device=device))
    return Bundle(model.to(device).eval(), tok, box, json.loads(header.get("meta", "{}")))


__all__ = ["Bundle", "build", "save", "load", "read_header"]
