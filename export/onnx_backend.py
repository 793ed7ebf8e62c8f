"""ONNX Runtime backend: the inference interface (model/interface.py) over an exported bundle (export/onnx_export.py).

    inf = OnnxInference("models/locca-tiny-shapes/onnx", device="cpu", threads=2)
    inf.encode(pixels) ...                                  # as TorchInference

(export/backends.load_onnx adds the bundle's tokenizer and tasks: what a caller loads a model with.)

Devices: "cpu", "cuda[:i]", "tensorrt[:i]" (the TensorRT EP, CUDA and CPU behind it for what it cannot take),
or "auto": the first of those the installed onnxruntime offers. On CPU the caches are numpy arrays. A bundle
with decoder_cpu.onnx (export/cpu_decoder.py) steps through it: each cache array is bound (IOBinding) as both
the past and the present of its layer, and the graph writes the new slots into it in place. Otherwise a step
is one `run` of decoder.onnx and its new keys/values are written into the arrays in place. Either way the
cache is never copied. On a GPU they are OrtValues in device memory: a step binds them
as inputs and its new K/V as device outputs, and write / select / merge / start run tiny ScatterElements /
Gather / Concat / ConstantOfShape graphs on the device, so a cache never crosses to the host; only tokens and
logits do. (Those graphs write a copy: onnxruntime offers no in-place update of a device tensor.)

Dimension letters as in model/model.py; the graphs take one (B, H, S, Dh) tensor per layer and cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model.config import ModelConfig

from .bundle_format import CPU_DECODER, OnnxBundle, io_names, read_bundle
from .trt_options import trt_provider_options

DEVICES = ("cpu", "cuda", "tensorrt")


def resolve_device(device: str) -> tuple[str, int]:
    """'auto' | 'cpu' | 'cuda[:i]' | 'tensorrt[:i]' -> (kind, index), checked against the installed providers."""
    have = ort.get_available_providers()
    if device == "auto":
        kind = next(k for k, p in (("tensorrt", "TensorrtExecutionProvider"), ("cuda", "CUDAExecutionProvider"),
                                   ("cpu", "CPUExecutionProvider")) if p in have)
        return kind, 0
    kind, _, index = device.partition(":")
    if kind not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose auto, cpu, cuda[:i] or tensorrt[:i]")
    need = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    if need[kind] not in have:
        raise ValueError(f"device {device!r} needs onnxruntime's {need[kind]}, which this install lacks "
                         f"(available: {', '.join(have)}); install onnxruntime-gpu (pip install .[gpu])")
    return kind, int(index or 0)


def providers_for(kind: str, index: int, trt_options: dict | None = None) -> list:
    cuda = ("CUDAExecutionProvider", {"device_id": index})
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        return [cuda, "CPUExecutionProvider"]
    return [("TensorrtExecutionProvider", {"device_id": index, **(trt_options or {})}), cuda,
            "CPUExecutionProvider"]


def session_options(threads: int | None = None, inter_threads: int | None = None,
                    spin: bool = True) -> ort.SessionOptions:
    """spin: whether ONNX Runtime's pool threads spin-wait for work between parallel sections (its default). A
    few per cent faster on cores of their own; on cores shared with other busy threads (a server's HTTP and
    image decoding) they burn the CPU those need: the server turns it off (service/settings.py)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # fusions: LayerNorm, Gelu, MatMul+scale
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # the graphs are one chain: nothing to run in parallel
    so.intra_op_num_threads = threads or 0   # 0: onnxruntime's default (one per physical core)
    so.inter_op_num_threads = inter_threads or 0
    so.log_severity_level = 3
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


@dataclass
class OrtCross:
    k: list  # L x (B, H, N, Dh): numpy on CPU, OrtValue on a GPU
    v: list

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(x) for x in self.k + self.v)


def _nbytes(x) -> int:
    if isinstance(x, np.ndarray):
        return x.nbytes
    return int(np.prod(x.shape())) * (2 if "float16" in x.data_type() else 4)


@dataclass
class OrtState:
    cache_k: list  # L x (R, H, S, Dh)
    cache_v: list
    cross_k: list  # L x (R, H, N, Dh): each row's image
    cross_v: list
    rows_buffer: list | None = None  # CPU: the arrays the tensors are leading-row views of, with spare rows
    binding: tuple | None = None     # CPU graph: (the arrays' ids, the IOBinding made for them, the arrays)

    @property
    def rows(self) -> int:
        x = self.cache_k[0]
        return x.shape[0] if isinstance(x, np.ndarray) else x.shape()[0]

    def tensors(self) -> list:
        return [*self.cache_k, *self.cache_v, *self.cross_k, *self.cross_v]

    @classmethod
    def of(cls, tensors: list, rows_buffer: list | None = None) -> OrtState:
        L = len(tensors) // 4
        return cls(*(tensors[i * L:(i + 1) * L] for i in range(4)), rows_buffer)

    @property
    def capacity(self) -> int:
        return self.rows_buffer[0].shape[0] if self.rows_buffer is not None else self.rows


class OnnxInference:
    """The inference interface (model/interface.py) on ONNX Runtime.

    io_binding: keep caches as OrtValues and bind them (default: on GPUs only; on CPU it exists so that the
    GPU code path is tested without a GPU). cpu_graph: step through decoder_cpu.onnx (default: on CPU when
    the bundle has it; False: decoder.onnx, as on GPUs). trt_options: TensorRT EP options per graph,
    {"encoder": {...}, "decoder": {...}} (default: export/trt_options.py's profiles, fp16 and engine cache for
    this bundle). spin: `session_options`.
    """

    name = "onnxruntime"

    def __init__(self, bundle: OnnxBundle | str | Path, device: str = "cpu", threads: int | None = None,
                 inter_threads: int | None = None, trt_options: dict | None = None,
                 io_binding: bool | None = None, cpu_graph: bool | None = None, spin: bool = True):
        self.bundle = bundle if isinstance(bundle, OnnxBundle) else read_bundle(bundle)
        self.cfg: ModelConfig = self.bundle.cfg
        self.kind, self.index = resolve_device(device)
        if self.kind == "tensorrt" and trt_options is None:
            trt_options = trt_provider_options(self.bundle)
        so = session_options(threads, inter_threads, spin)
        bind = self.kind != "cpu" if io_binding is None else io_binding
        # CPU: the fused graph where the bundle has one (not when IOBinding of the GPU path is asked for: tests)
        has = self.kind == "cpu" and not bind and CPU_DECODER in self.bundle.manifest["files"]
        if cpu_graph and not has:
            raise ValueError(f"{self.bundle.dir}: no {CPU_DECODER} for {self.device} (re-export the bundle)")
        self.cpu_graph = has if cpu_graph is None else cpu_graph
        self.encoder, self.decoder = (
            ort.InferenceSession(str(self.bundle.dir / f), so,
                                 providers=providers_for(self.kind, self.index, (trt_options or {}).get(g)))
            for g, f in (("encoder", "encoder.onnx"),
                         ("decoder", CPU_DECODER if self.cpu_graph else "decoder.onnx")))
        self._so, self._portable = so, None if self.cpu_graph else self.decoder
        self.names = io_names(self.cfg.dec_depth)
        self.dtype = np.float16 if "float16" in self.decoder.get_inputs()[2].type else np.float32
        self.mem = _Bound(self.kind, self.index, self.dtype) if bind else _Host(self.dtype)

    @property
    def portable(self) -> ort.InferenceSession:
        """decoder.onnx: on CPU the fallback for the calls decoder_cpu.onnx cannot take (below)."""
        if self._portable is None:
            self._portable = ort.InferenceSession(str(self.bundle.dir / "decoder.onnx"), self._so,
                                                  providers=["CPUExecutionProvider"])
        return self._portable

    @property
    def device(self) -> str:
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"

    def encode(self, pixels: np.ndarray) -> OrtCross:
        out = self.mem.run(self.encoder, {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)},
                           self.names["encoder_out"][1:])  # the visual tokens stay inside the graph
        L = self.cfg.dec_depth
        return OrtCross(out[:L], out[L:])

    def start(self, cross: OrtCross, images: np.ndarray, slots: int | None = None) -> OrtState:
        c = self.cfg
        shape = (len(images), c.dec_heads, slots or c.max_seq_len, c.dec_width // c.dec_heads)
        return OrtState.of([*self.mem.zeros(shape, 2 * c.dec_depth),
                            *self.mem.take(cross.k + cross.v, np.asarray(images, dtype=np.int64))])

    def step(self, state: OrtState, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        # GroupQueryAttention takes several new tokens per row after a past only for one row; prompts (the
        # only multi-token calls decoding makes) start at slot 0, so this fallback is for other callers
        if self.cpu_graph and (positions.shape[1] == 1 or len(positions) == 1 or not positions[:, 0].any()):
            return self._step_in_place(state, tokens, positions)
        feed = dict(zip(self.names["decoder_in"][2:], state.tensors(), strict=True))
        feed["tokens"] = np.asarray(tokens, dtype=np.int64)
        feed["positions"] = positions
        out = self.mem.run(self.portable, feed, self.names["decoder_out"], host={"logits"})
        L = self.cfg.dec_depth
        caches = self.mem.write([*state.cache_k, *state.cache_v], out[1:], feed["positions"])
        state.cache_k, state.cache_v = caches[:L], caches[L:]
        return self.mem.numpy(out[0])

    def _step_in_place(self, state: OrtState, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """A step of decoder_cpu.onnx: every cache array is its layer's past and present (GroupQueryAttention
        writes the new slots into it). The binding is kept while the state's arrays stay the same ones (greedy
        steps with every row running), and made again after a select or merge replaced them."""
        tensors = state.tensors()
        key = tuple(map(id, tensors))  # the binding holds the arrays, so no id is reused while it lives
        if state.binding is None or state.binding[0] != key:
            caches = [*state.cache_k, *state.cache_v]
            if not all(c.flags.c_contiguous for c in caches):  # the graph writes through the arrays' memory
                caches = [np.ascontiguousarray(c) for c in caches]
                L = len(caches) // 2
                state.cache_k, state.cache_v = caches[:L], caches[L:]
                tensors = state.tensors()
                key = tuple(map(id, tensors))
            io = self.decoder.io_binding()
            io.bind_output("logits", "cpu")  # first: the run's outputs come back in binding order
            n = len(caches)
            for name, out, x in zip(self.names["decoder_in"][2:2 + n], self.names["decoder_cpu_out"][1:], caches,
                                    strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(x)  # the array's memory, not a copy
                io.bind_ortvalue_input(name, value)
                io.bind_ortvalue_output(out, value)
            for name, x in zip(self.names["decoder_in"][2 + n:], tensors[n:], strict=True):
                io.bind_cpu_input(name, np.ascontiguousarray(x))
            state.binding = (key, io, tensors)
        io = state.binding[1]
        io.bind_output("logits", "cpu")  # again each step (it keeps its place): unallocated, so T may change
        io.bind_cpu_input("tokens", np.ascontiguousarray(tokens, dtype=np.int64))
        io.bind_cpu_input("positions", np.ascontiguousarray(positions, dtype=np.int64))
        self.decoder.run_with_iobinding(io)
        logits = io.get_outputs()[0]
        assert logits.shape()[:2] == list(np.shape(tokens)), "the binding's first output is the logits"
        return logits.numpy()

    def select(self, state: OrtState, rows: np.ndarray) -> None:
        idx = np.asarray(rows, dtype=np.int64)
        if len(idx) == state.rows and (idx == np.arange(len(idx))).all():
            return  # every row in place (greedy search while all sequences run): nothing to move
        if state.rows_buffer is not None and len(idx) <= state.capacity:  # arrays with spare rows (CPU)
            new = OrtState.of(_Host.take_in_place(state.rows_buffer, state.tensors(), idx), state.rows_buffer)
        elif isinstance(self.mem, _Host):  # into new arrays with room to spare, so the next selects fit in place
            buffer = [np.empty((_room(len(idx)), *x.shape[1:]), x.dtype) for x in state.tensors()]
            for buf, x in zip(buffer, state.tensors(), strict=True):
                np.take(x, idx, axis=0, out=buf[:len(idx)])
            new = OrtState.of([buf[:len(idx)] for buf in buffer], buffer)
        else:
            new = OrtState.of(self.mem.take(state.tensors(), idx))
        state.cache_k, state.cache_v, state.cross_k, state.cross_v = new.cache_k, new.cache_v, new.cross_k, new.cross_v
        state.rows_buffer = new.rows_buffer

    def split(self, cross: OrtCross) -> list[OrtCross]:
        """One OrtCross per image, each in memory of its own (a cache entry must not hold its whole batch)."""
        L, xs = self.cfg.dec_depth, cross.k + cross.v
        B = xs[0].shape[0] if isinstance(xs[0], np.ndarray) else xs[0].shape()[0]
        out = []
        for i in range(B):
            one = self.mem.take(xs, np.array([i], dtype=np.int64))  # fancy indexing / Gather: a copy
            out.append(OrtCross(one[:L], one[L:]))
        return out

    def join(self, crosses: list[OrtCross]) -> OrtCross:
        if len(crosses) == 1:
            return crosses[0]  # `start` copies the rows it takes
        L = self.cfg.dec_depth
        if isinstance(self.mem, _Host):
            xs = [np.concatenate(parts) for parts in zip(*(c.k + c.v for c in crosses), strict=True)]
        else:
            xs = crosses[0].k + crosses[0].v
            for c in crosses[1:]:
                xs = self.mem.cat(xs, c.k + c.v)
        return OrtCross(xs[:L], xs[L:])

    def merge(self, a: OrtState, b: OrtState) -> OrtState:
        """a's rows then b's. On CPU the result takes over a's arrays (a must not be used again): b's rows are
        copied into their spare rows, or, when there are too few, both into new arrays with room to spare
        (twice the rows, a power of two), so that a running batch that requests keep joining is not copied
        whole at every join, nor at every `select` (rows leaving, beams reordering) that fits."""
        if not isinstance(self.mem, _Host):
            return OrtState.of(self.mem.cat(a.tensors(), b.tensors()))
        n, m = a.rows, b.rows
        buffer = a.rows_buffer
        if buffer is None or a.capacity < n + m:
            buffer = [np.empty((_room(n + m), *x.shape[1:]), x.dtype) for x in a.tensors()]
            for buf, x in zip(buffer, a.tensors(), strict=True):
                buf[:n] = x
        for buf, x in zip(buffer, b.tensors(), strict=True):
            buf[n:n + m] = x
        return OrtState.of([buf[:n + m] for buf in buffer], buffer)


def _room(rows: int) -> int:
    """Rows to allocate for `rows`: twice as many, a power of two, at least 8 (amortised growth)."""
    return 1 << max(3, (2 * rows - 1).bit_length())


class _Host:
    """Caches as numpy arrays (CPU EP): row operations are numpy's, a step is a plain `run`."""

    def __init__(self, dtype):
        self.dtype = dtype

    def run(self, sess, feed: dict, outputs: list[str], host=frozenset()) -> list:
        return sess.run(outputs, feed)

    def numpy(self, x) -> np.ndarray:
        return x

    def take(self, xs: list, idx: np.ndarray) -> list:
        return [x[idx] for x in xs]

    @staticmethod
    def take_in_place(buffer: list, xs: list, idx: np.ndarray) -> list:
        """`take` inside the arrays `buffer` (xs are their leading rows): only the rows that change are copied
        (gathered first, so a row can move where another is read from); returns the new leading-row views."""
        moved = np.flatnonzero(idx != np.arange(len(idx)))
        for buf, x in zip(buffer, xs, strict=True):
            buf[moved] = x[idx[moved]]
        return [buf[:len(idx)] for buf in buffer]

    def write(self, caches: list, new: list, positions: np.ndarray) -> list:
        if len(positions) <= 2:  # a row or two (batch-1 latency): slices beat fancy indexing (4 vs 9 us)
            T, starts = positions.shape[1], positions[:, 0].tolist()
            for c, n in zip(caches, new, strict=True):
                for r, p in enumerate(starts):
                    c[r, :, p:p + T] = n[r]  # a call's positions are consecutive in each row
            return caches
        rows = np.arange(len(positions))[:, None]
        for c, n in zip(caches, new, strict=True):
            c[rows, :, positions, :] = n.transpose(0, 2, 1, 3)  # indexed dims first: (R, T, H, Dh)
        return caches

    def cat(self, a: list, b: list) -> list:
        return [np.concatenate([x, y]) for x, y in zip(a, b, strict=True)]

    def zeros(self, shape: tuple, n: int) -> list:
        return [np.zeros(shape, self.dtype) for _ in range(n)]


class _Bound:
    """Caches as OrtValues in device memory: steps bind them (IOBinding); row operations are tiny
    Gather / Concat / ConstantOfShape graphs run on the device."""

    def __init__(self, kind: str, index: int, dtype):
        self.device = ("cpu", 0) if kind == "cpu" else ("cuda", index)  # TensorRT's memory is CUDA memory
        self.providers = providers_for("cpu" if kind == "cpu" else "cuda", index)
        self.dtype, self.graphs = dtype, {}

    def run(self, sess, feed: dict, outputs: list[str], host=frozenset()) -> list:
        io = sess.io_binding()
        for name, x in feed.items():
            if isinstance(x, np.ndarray):
                io.bind_cpu_input(name, x)  # copied to the device by onnxruntime
            else:
                io.bind_ortvalue_input(name, x)
        for name in outputs:
            io.bind_output(name, *(("cpu", 0) if name in host else self.device))
        sess.run_with_iobinding(io)
        return io.get_outputs()

    def numpy(self, x) -> np.ndarray:
        return x.numpy()

    def take(self, xs: list, idx: np.ndarray) -> list:
        return self._op("Gather", len(xs), xs, {"idx": idx})

    def write(self, caches: list, new: list, positions: np.ndarray) -> list:
        R, H, T, Dh = new[0].shape()
        idx = np.ascontiguousarray(np.broadcast_to(positions[:, None, :, None], (R, H, T, Dh)))
        return self._op("ScatterElements", len(caches), caches + new, {"idx": idx})

    def cat(self, a: list, b: list) -> list:
        return self._op("Concat", len(a), a + b, {})

    def zeros(self, shape: tuple, n: int) -> list:
        return self._op("ConstantOfShape", n, [], {"shape": np.array(shape, dtype=np.int64)})

    def _op(self, op: str, n: int, xs: list, extra: dict) -> list:
        if (op, n) not in self.graphs:
            self.graphs[op, n] = ort.InferenceSession(_row_graph(op, n, self.dtype), providers=self.providers)
        feed = {f"x{i}": x for i, x in enumerate(xs)} | extra
        return self.run(self.graphs[op, n], feed, [f"y{i}" for i in range(n)])


def _row_graph(op: str, n: int, dtype) -> bytes:
    """A graph of n independent ops: along axis 0 (rows) Gather(x_i, idx), Concat(x_i, x_{n+i}) or zeros; along
    axis 2 (slots) ScatterElements(x_i, idx, x_{n+i}), the new keys/values of a step written into cache i."""
    from onnx import TensorProto, helper  # noqa: PLC0415

    t = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    x = lambda name: helper.make_tensor_value_info(name, t, [None] * 4)  # noqa: E731
    ins, nodes = [], []
    if op == "Gather":
        ins = [x(f"x{i}") for i in range(n)] + [helper.make_tensor_value_info("idx", TensorProto.INT64, [None])]
        nodes = [helper.make_node("Gather", [f"x{i}", "idx"], [f"y{i}"], axis=0) for i in range(n)]
    elif op == "ScatterElements":
        ins = [x(f"x{i}") for i in range(2 * n)] + [helper.make_tensor_value_info("idx", TensorProto.INT64, [None] * 4)]
        nodes = [helper.make_node("ScatterElements", [f"x{i}", "idx", f"x{n + i}"], [f"y{i}"], axis=2)
                 for i in range(n)]
    elif op == "Concat":
        ins = [x(f"x{i}") for i in range(2 * n)]
        nodes = [helper.make_node("Concat", [f"x{i}", f"x{n + i}"], [f"y{i}"], axis=0) for i in range(n)]
    else:
        ins = [helper.make_tensor_value_info("shape", TensorProto.INT64, [4])]
        zero = helper.make_tensor("zero", t, [1], [0])
        nodes = [helper.make_node("ConstantOfShape", ["shape"], [f"y{i}"], value=zero) for i in range(n)]
    graph = helper.make_graph(nodes, f"rows_{op}", ins, [x(f"y{i}") for i in range(n)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()

