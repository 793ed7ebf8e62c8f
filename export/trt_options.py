"""TensorRT through ONNX Runtime's TensorRT EP: the options of a bundle's engines (optimisation profiles, fp16,
an engine cache), which export/onnx_backend.py uses for device="tensorrt" and export/trt_build.py builds ahead.

A TensorRT engine is built per graph for shape ranges fixed in advance: one profile per graph, from 1 row to
`max_batch` rows (batch), 1 token to S tokens, and 1 to S cache slots, with the optimum at `opt_batch` rows,
one token and S slots (a decode step, the call that dominates). Engines and the timing cache land in
`cache_dir` (default: the bundle's trt_cache/) and are reused while the graphs, profiles and TensorRT
version are unchanged.
"""

from __future__ import annotations

from pathlib import Path

from .bundle_format import OnnxBundle, io_names


def _shapes(dims: dict[str, tuple]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in dims.items())


def profiles(bundle: OnnxBundle, rows: int, tokens: int, slots: int | None = None) -> dict[str, dict]:
    """Every dynamic input of each graph at one point of the profile: rows, tokens, cache slots."""
    c = bundle.cfg
    H, Dh, N, px = c.dec_heads, c.dec_width // c.dec_heads, c.num_patches, c.image_size
    S = slots or c.max_seq_len
    names = io_names(c.dec_depth)
    dec = {"tokens": (rows, tokens), "positions": (rows, tokens)}
    for name in names["decoder_in"][2:]:
        dec[name] = (rows, H, S if name.startswith("past") else N, Dh)
    return {"encoder": {"pixels": (rows, 3, px, px)}, "decoder": dec}


def trt_provider_options(bundle: OnnxBundle, max_batch: int = 64, opt_batch: int = 8, fp16: bool = True,
                         cache_dir: str | Path | None = None) -> dict[str, dict]:
    """TensorRT EP options per graph ({"encoder": ..., "decoder": ...}) for OnnxInference(trt_options=...)."""
    S = bundle.cfg.max_seq_len
    lo, opt, hi = profiles(bundle, 1, 1, 1), profiles(bundle, opt_batch, 1, S), profiles(bundle, max_batch, S, S)
    cache = Path(cache_dir or bundle.dir / "trt_cache")
    cache.mkdir(parents=True, exist_ok=True)
    common = {"trt_fp16_enable": fp16 or bundle.manifest["precision"] == "fp16",
              "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
              "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
              "trt_max_workspace_size": 4 << 30}
    return {g: {**common, "trt_profile_min_shapes": _shapes(lo[g]), "trt_profile_opt_shapes": _shapes(opt[g]),
                "trt_profile_max_shapes": _shapes(hi[g])} for g in ("encoder", "decoder")}
