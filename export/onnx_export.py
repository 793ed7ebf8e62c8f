"""`locca export`: a checkpoint -> a self-contained ONNX bundle for ONNX Runtime and TensorRT.

    locca export models/locca-tiny-shapes/checkpoint.safetensors models/locca-tiny-shapes/onnx
    locca export CHECKPOINT OUT_DIR --precision fp16    # for GPUs (CUDA / TensorRT EP)
    locca export CHECKPOINT OUT_DIR --precision int8    # CPU: dynamic int8 quantization of the fp32 graphs

The bundle: encoder.onnx, decoder.onnx, tokenizer.json, config.json (model + box config, checkpoint
metadata), in fp32 and int8 bundles decoder_cpu.onnx (the same step in ONNX Runtime's fused CPU operators,
export/cpu_decoder.py, which the CPU backend prefers) and manifest.json (sha256 of each file, checked at load). Graphs, with B, T and S dynamic
(the names are export/bundle_format.io_names; letters as in model/model.py):

    encoder  pixels (B, 3, I, I) float32 -> visual (B, N, D), cross_k_l, cross_v_l (B, H, N, Dh) for each layer l
    decoder  tokens, positions (B, T) int64, past_k_l, past_v_l (B, H, S, Dh), cross_k_l, cross_v_l (B, H, N, Dh)
             -> logits (B, T, V) float32, new_k_l, new_v_l (B, H, T, Dh)

The decoder is LocCa.decode_layers itself: it reads the past and returns the keys/values of its T tokens,
which the backend writes into slots `positions` (in place on CPU); each query sees the slots at or before its
position. So one graph serves the prompt prefill (T > 1) and every later step (T = 1), and no step copies
the cache: see export/README.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model import checkpoint
from model.model import LocCa

from . import cpu_decoder
from .bundle_format import CPU_DECODER, FILES, FORMAT, io_names, read_bundle, sha256

PRECISIONS = ("fp32", "fp16", "int8")
GRAPHS = ("encoder.onnx", "decoder.onnx")  # and CPU_DECODER in fp32 and int8 bundles


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """aten.scaled_dot_product_attention -> Transpose, MatMul, Mul, [Add mask], Softmax, MatMul.

    torchlib's generic translation transposes K through Shape/Slice/Concat/Reshape (any rank) and adds an
    IsNaN guard for fully masked rows: about 15 nodes per attention, which cost more than the arithmetic
    at batch 1. Our tensors are 4-D and no row is fully masked (a query always sees its own slot), so ONNX
    Runtime fuses this form into one FusedMatMul with the scale, a Softmax and a MatMul.
    """
    from onnxscript import ir  # noqa: PLC0415
    from onnxscript import opset18 as op  # noqa: PLC0415 (torchlib's opset)

    assert not is_causal and not enable_gqa and dropout_p == 0.0, "the exported graphs use no causal flag, GQA or dropout"
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    const = lambda v: op.Constant(value=ir.tensor(v, dtype=query.dtype))  # noqa: E731
    scores = op.Mul(op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2])), const(scale))  # (B, H, T, S)
    if attn_mask is not None:
        if attn_mask.dtype == ir.DataType.BOOL:
            attn_mask = op.Where(attn_mask, const(0.0), const(-math.inf))
        scores = op.Add(scores, attn_mask)
    return op.MatMul(op.Softmax(scores, axis=-1), value)


class EncoderGraph(nn.Module):
    def __init__(self, model: LocCa):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        p = self.model.tok_emb.weight
        visual = self.model.encode(pixels.to(p.dtype))  # fp16 bundles still take float32 pixels
        kv = self.model.cross_kv_layers(visual)
        return visual, *(k for k, _ in kv), *(v for _, v in kv)


class DecoderGraph(nn.Module):
    def __init__(self, model: LocCa):
        super().__init__()
        self.model = model

    def forward(self, tokens, positions, *tensors):
        L = self.model.cfg.dec_depth
        past_k, past_v, cross_k, cross_v = (tensors[i * L:(i + 1) * L] for i in range(4))
        logits, k, v = self.model.decode_layers(tokens, positions, past_k, past_v, cross_k, cross_v)
        return logits.float(), *k, *v  # logits leave as float32 whatever the precision


def _export(module: nn.Module, args: tuple, dynamic_shapes, names: dict, kind: str, path: Path) -> None:
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" and the like
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # axis-renaming notes and deprecations inside torch.export
        prog = torch.onnx.export(module.eval(), args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                 input_names=names[f"{kind}_in"], output_names=names[f"{kind}_out"],
                                 custom_translation_table={torch.ops.aten.scaled_dot_product_attention.default: attention},
                                 verbose=False)
    prog.save(str(path), external_data=False)  # every size in model/config.SIZES is under protobuf's 2 GB


def example_inputs(model: LocCa, batch: int = 2, tokens: int = 3, slots: int | None = None, seed: int = 0):
    """Random encoder and decoder inputs (positions mixed across rows), as torch tensors."""
    c, g = model.cfg, torch.Generator().manual_seed(seed)
    S, dt = slots or c.max_seq_len, model.tok_emb.weight.dtype
    H, Dh, L = c.dec_heads, c.dec_width // c.dec_heads, c.dec_depth
    pixels = torch.randn(batch, 3, c.image_size, c.image_size, generator=g)
    starts = torch.randint(0, S - tokens + 1, (batch, 1), generator=g)
    positions = starts + torch.arange(tokens)
    rand = lambda *s: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    caches = [rand(batch, H, S, Dh) for _ in range(2 * L)] + [rand(batch, H, c.num_patches, Dh) for _ in range(2 * L)]
    return pixels, torch.randint(0, c.vocab_size, (batch, tokens), generator=g), positions, caches


def export_graphs(model: LocCa, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """encoder.onnx and decoder.onnx of `model` at `dtype` into `out`."""
    from torch.export import Dim  # noqa: PLC0415

    if model.tok_emb.weight.dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    model.eval()
    names = io_names(model.cfg.dec_depth)
    L, B, T, S = model.cfg.dec_depth, Dim("batch"), Dim("tokens"), Dim("slots")
    pixels, tokens, positions, caches = example_inputs(model, batch=2, tokens=3)
    with torch.no_grad():
        _export(EncoderGraph(model), (pixels,), ({0: B},), names, "encoder", out / "encoder.onnx")
        dyn = ({0: B, 1: T}, {0: B, 1: T}, tuple([{0: B, 2: S}] * (2 * L) + [{0: B}] * (2 * L)))
        _export(DecoderGraph(model), (tokens, positions, *caches), dyn, names, "decoder", out / "decoder.onnx")


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantization (onnxruntime.quantization): MatMul weights to int8 per tensor, activations
    quantized per call. Only MatMul: the patch Conv, the embedding Gather and everything else stay fp32.
    Per tensor because it agreed with fp32 more often than per channel (97.9 % vs 91.0 % of answers on 100
    held-out scenes, export/README.md "int8"). The output projection (the tied embeddings, location tokens
    included) stays fp32: quantized in decoder_cpu.onnx, answers agreed with fp32 on 89.6 % of 884 against
    95.9 % with decoder.onnx, whose exported projection the quantizer leaves alone."""
    from onnx import TensorProto  # noqa: PLC0415
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

    root = logging.getLogger()
    level, _ = root.level, root.setLevel(logging.ERROR)  # "consider pre-processing": the exporter already
    try:                                                  # folded constants, which is what it would add
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize=["MatMul"],
                         nodes_to_exclude=["logits"],  # decoder_cpu's output projection: see below
                         extra_options={"DefaultTensorType": TensorProto.FLOAT})  # for decoder_cpu's fused ops
    finally:
        root.setLevel(level)


def export(checkpoint_path: str | Path, out_dir: str | Path, precision: str = "fp32") -> Path:
    """Write the bundle; manifest.json goes last, so an interrupted export never leaves a loadable bundle."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    bundle = checkpoint.load(checkpoint_path)
    if precision == "int8":
        with tempfile.TemporaryDirectory() as tmp:
            export_graphs(bundle.model, Path(tmp))
            cpu_decoder.write(bundle.model, Path(tmp) / CPU_DECODER)
            for g in (*GRAPHS, CPU_DECODER):
                quantize_int8(Path(tmp) / g, out / g)
    else:
        export_graphs(bundle.model, out, torch.float16 if precision == "fp16" else torch.float32)
        if precision == "fp32":  # the CPU's graph (fp16 bundles are for GPUs)
            cpu_decoder.write(bundle.model, out / CPU_DECODER)
    bundle.tok.save(out / "tokenizer.json")
    config = {"model_config": dataclasses.asdict(bundle.model.cfg), "box_config": dataclasses.asdict(bundle.box),
              "meta": bundle.meta}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    source = {"checkpoint": Path(checkpoint_path).name, "sha256": sha256(Path(checkpoint_path)),
              "step": bundle.meta.get("step")}
    write_manifest(out, precision, source)
    return out


def int8_from(fp32_dir: str | Path, out_dir: str | Path) -> Path:
    """The int8 bundle of an fp32 one (no re-export: quantization works on the ONNX graphs)."""
    src, out = read_bundle(fp32_dir), Path(out_dir)
    if src.manifest["precision"] != "fp32":
        raise ValueError(f"{fp32_dir} is a {src.manifest['precision']} bundle; int8 is made from fp32")
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for g in (*GRAPHS, *([CPU_DECODER] if CPU_DECODER in src.manifest["files"] else [])):
        quantize_int8(src.dir / g, out / g)
    for f in ("tokenizer.json", "config.json"):
        shutil.copyfile(src.dir / f, out / f)
    write_manifest(out, "int8", src.manifest["source"])
    return out


def write_manifest(out: Path, precision: str, source: dict) -> None:
    """manifest.json: format, precision, sha256 of every file, the graphs' inputs and outputs (dims by name
    where dynamic), the source checkpoint and the versions that wrote it. Written last, atomically."""
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415

    graphs, extra = {}, [CPU_DECODER] if (out / CPU_DECODER).is_file() else []
    for g in (*GRAPHS, *extra):
        m = onnx.load(out / g, load_external_data=False)
        dims = lambda v: " x ".join(str(d.dim_param or d.dim_value) for d in v.type.tensor_type.shape.dim)  # noqa: E731
        graphs[g] = {"inputs": {v.name: dims(v) for v in m.graph.input},
                     "outputs": {v.name: dims(v) for v in m.graph.output},
                     "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))}
    manifest = {"format": FORMAT, "precision": precision, "files": {f: sha256(out / f) for f in (*FILES, *extra)},
                "graphs": graphs, "source": source,
                "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                             "onnxruntime": onnxruntime.__version__}}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / "manifest.json")


def check(checkpoint_path: str | Path, out_dir: str | Path) -> dict:
    """Largest |ORT - PyTorch fp32| of the bundle's outputs on random inputs (prefill, mixed positions)."""
    from .onnx_backend import OnnxInference, OrtState  # noqa: PLC0415

    model = checkpoint.load(checkpoint_path).model.eval()
    inf = OnnxInference(out_dir, threads=1)
    pixels, tokens, positions, caches = example_inputs(model, batch=3, tokens=4, seed=1)
    L = model.cfg.dec_depth
    with torch.no_grad():
        ref_cross = [t for kv in model.cross_kv_layers(model.encode(pixels)) for t in kv]
        ref = model.decode_layers(tokens, positions, caches[:L], caches[L:2 * L], caches[2 * L:3 * L], caches[3 * L:])
    cross = inf.encode(pixels.numpy())
    feed = dict(zip(io_names(L)["decoder_in"], [tokens.numpy(), positions.numpy(), *(c.numpy().astype(inf.dtype) for c in caches)], strict=True))
    out = inf.portable.run(None, feed)
    ref_cross = ref_cross[0::2] + ref_cross[1::2]
    err = lambda a, b: float(np.abs(np.asarray(a, np.float32) - b.float().numpy()).max())  # noqa: E731
    result = {"cross": max(err(a, b) for a, b in zip(cross.k + cross.v, ref_cross, strict=True)),
              "logits": err(out[0], ref[0]),
              "cache": max(err(a, b) for a, b in zip(out[1:], ref[1] + ref[2], strict=True))}
    if inf.cpu_graph:  # decoder_cpu.onnx through the backend's in-place step against decode_step's writes:
        for name, T in (("cpu_prompt", tokens.shape[1]), ("cpu_step", 1)):  # a prompt from slot 0, one token
            pos = torch.arange(T).expand(len(tokens), T) if T > 1 else positions[:, :1]
            state = OrtState.of([c.numpy().copy() for c in caches])
            got = inf.step(state, tokens[:, :T].numpy(), pos.numpy())
            with torch.no_grad():
                kc, vc = torch.stack(caches[:L]).clone(), torch.stack(caches[L:2 * L]).clone()
                want = model.decode_step(tokens[:, :T], pos, kc, vc, torch.stack(caches[2 * L:3 * L]),
                                         torch.stack(caches[3 * L:]))
            result[f"{name}_logits"] = err(got, want)
            result[f"{name}_cache"] = max(err(a, b) for a, b in zip(state.cache_k + state.cache_v, [*kc, *vc],
                                                                   strict=True))
    return result


def add_arguments(p):
    p.add_argument("checkpoint", help="a checkpoint.safetensors")
    p.add_argument("out_dir", help="bundle directory to write (encoder.onnx, decoder.onnx, manifest.json, ...)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default, any device), fp16 (GPU), int8 (CPU, dynamic quantization)")
    p.add_argument("--no-check", action="store_true", help="skip the ORT-vs-PyTorch check of the written bundle")


def run(args) -> int:
    out = export(args.checkpoint, args.out_dir, args.precision)
    print(f"wrote {out} ({args.precision})")
    if not args.no_check and args.precision != "fp16":  # fp16 graphs need a GPU to run at speed; trt_build checks them
        print("max |onnxruntime - pytorch fp32|:", json.dumps(check(args.checkpoint, out)))
    return 0
