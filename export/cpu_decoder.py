"""decoder_cpu.onnx: the decode step as ONNX Runtime's CPU runs it fastest, written node by node.

The portable decoder.onnx (export/onnx_export.py) is LocCa.decode_layers as torch exports it: standard ONNX
ops only, so that TensorRT and every EP can take it, and no step writes the cache (the backend does). On
CPU, ONNX Runtime has fused operators (domain com.microsoft) that do the same work in far fewer kernels:

    per layer   LayerNorm -> MatMul qkv (+ bias) -> GroupQueryAttention (packed q|k|v; writes the new keys /
                values into the cache in place and reads only the slots each row has) -> MatMul proj (+ bias)
                -> Add residual -> LayerNorm -> MatMul cross_q (+ bias) -> MultiHeadAttention (the image's
                keys / values) -> MatMul cross_proj (+ bias) -> Add residual -> LayerNorm -> MatMul fc1
                -> BiasGelu -> MatMul fc2 (+ bias) -> Add residual

ONNX Runtime fuses the bias and residual Adds into its LayerNorms itself (SkipLayerNormalization written
into the file instead measured 6% slower a step at batch 32): about 70 nodes in the file, where decoder.onnx
has 157 after ONNX Runtime's own fusions. Inputs and outputs:

    tokens, positions (B, T) int64; past_k_l, past_v_l (B, H, S, Dh); cross_k_l, cross_v_l (B, H, N, Dh)
    -> logits (B, T, V); present_k_l, present_v_l: the caches with the T new slots written

The backend binds each present_* to the very buffer of its past_* (IOBinding), which GroupQueryAttention
takes as "share buffer": the cache is updated in place and nothing is copied. Row r's T tokens sit at
positions[r, 0] .. positions[r, 0] + T - 1, as in decoder.onnx; seqlens_k = positions[:, -1] tells each row
how many slots it has. The weights are read from the model itself, so this file is built from the same
checkpoint as the bundle's other graphs; tests/test_export.py checks it against PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.model import LocCa

from .bundle_format import io_names

EPS = 1e-5  # nn.LayerNorm's default


def build(model: LocCa) -> bytes:
    """The serialized decoder_cpu.onnx of `model` (fp32)."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    c = model.cfg
    L, H, Dh, N = c.dec_depth, c.dec_heads, c.dec_width // c.dec_heads, c.num_patches
    f32 = lambda t: t.detach().float().cpu().numpy()  # noqa: E731
    inits, nodes = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, ins: list[str], outs: list[str], domain: str = "", **attrs) -> list[str]:
        nodes.append(helper.make_node(op, ins, outs, name=outs[0], domain=domain, **attrs))
        return outs

    def linear(x: str, layer: torch.nn.Linear, name: str) -> str:
        y = node("MatMul", [x, const(f"{name}.weight_t", f32(layer.weight).T.copy())], [f"{name}.mm"])[0]
        return node("Add", [y, const(f"{name}.bias", f32(layer.bias))], [name])[0]

    # each row's slots after this call (GroupQueryAttention's seqlens_k), and the most of any row
    last = node("Gather", ["positions", const("minus_one", np.array(-1, np.int64))], ["last_position"], axis=1)[0]
    seqlens = node("Cast", [last], ["seqlens_k"], to=TensorProto.INT32)[0]
    most = node("ReduceMax", [seqlens], ["max_seqlen"], keepdims=0)[0]
    total = node("Add", [most, const("one", np.array(1, np.int32))], ["total_sequence_length"])[0]

    tok = node("Gather", [const("tok_emb", f32(model.tok_emb.weight)), "tokens"], ["tok"])[0]
    pos = node("Gather", [const("pos_emb", f32(model.pos_emb.weight)), "positions"], ["pos"])[0]
    x = node("Add", [tok, pos], ["x0"])[0]

    def norm(ln, name: str) -> str:
        g, be = const(f"{name}.weight", f32(ln.weight)), const(f"{name}.bias", f32(ln.bias))
        return node("LayerNormalization", [x, g, be], [name], axis=-1, epsilon=EPS)[0]

    for i, b in enumerate(model.blocks):
        p = f"blocks.{i}"
        qkv = linear(norm(b.ln1, f"{p}.ln1"), b.qkv, f"{p}.qkv")
        attn = node("GroupQueryAttention", [qkv, "", "", f"past_k_{i}", f"past_v_{i}", seqlens, total],
                    [f"{p}.self", f"present_k_{i}", f"present_v_{i}"], domain="com.microsoft",
                    num_heads=H, kv_num_heads=H, scale=Dh ** -0.5)[0]
        x = node("Add", [x, linear(attn, b.proj, f"{p}.proj")], [f"{p}.x1"])[0]
        q = linear(norm(b.ln2, f"{p}.ln2"), b.cross_q, f"{p}.cross_q")
        cross = node("MultiHeadAttention", [q, f"cross_k_{i}", f"cross_v_{i}"], [f"{p}.cross"],
                     domain="com.microsoft", num_heads=H, scale=Dh ** -0.5)[0]
        x = node("Add", [x, linear(cross, b.cross_proj, f"{p}.cross_proj")], [f"{p}.x2"])[0]
        h = node("MatMul", [norm(b.ln3, f"{p}.ln3"), const(f"{p}.fc1.weight_t", f32(b.mlp.fc1.weight).T.copy())],
                 [f"{p}.fc1"])[0]
        h = node("BiasGelu", [h, const(f"{p}.fc1.bias", f32(b.mlp.fc1.bias))], [f"{p}.gelu"], domain="com.microsoft")[0]
        x = node("Add", [x, linear(h, b.mlp.fc2, f"{p}.fc2")], [f"{p}.x3"])[0]
    node("MatMul", [norm(model.ln, "ln"), const("tok_emb_t", f32(model.tok_emb.weight).T.copy())], ["logits"])

    fl, i64 = TensorProto.FLOAT, TensorProto.INT64
    names = io_names(L)
    cache = lambda n: helper.make_tensor_value_info(n, fl, ["batch", H, "slots", Dh])  # noqa: E731
    image = lambda n: helper.make_tensor_value_info(n, fl, ["batch", H, N, Dh])  # noqa: E731
    ins = [helper.make_tensor_value_info(n, i64, ["batch", "tokens"]) for n in ("tokens", "positions")]
    ins += [cache(n) for n in names["decoder_in"][2:2 + 2 * L]] + [image(n) for n in names["decoder_in"][2 + 2 * L:]]
    outs = [helper.make_tensor_value_info("logits", fl, ["batch", "tokens", c.vocab_size])]
    outs += [cache(n) for n in names["decoder_cpu_out"][1:]]
    graph = helper.make_graph(nodes, "locca_decoder_cpu", ins, outs, inits)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                          helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    return onnx_model.SerializeToString()


def write(model: LocCa, path: str | Path) -> Path:
    """Write decoder_cpu.onnx of `model` (its weights as float32, whatever the model's dtype)."""
    path = Path(path)
    path.write_bytes(build(model.eval()))
    return path
