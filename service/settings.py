"""Server settings: flags of `locca serve`, or LOCCA_* environment variables (flags win), validated once.

Every field's description is its `--help` text (service/cli.py builds the flags from this class), so the
two cannot drift apart.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.scheduler import SchedulerConfig

_DEFAULT = SchedulerConfig()  # the batching settings' defaults are the scheduler's own


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOCCA_", extra="ignore", frozen=True)

    # --- where ----------------------------------------------------------------------------------------
    host: str = Field("0.0.0.0", description="address the REST and gRPC servers bind to")
    port: int = Field(8000, ge=1, le=65535, description="REST port (OpenAPI docs at /docs)")
    grpc_port: int = Field(50051, ge=1, le=65535, description="gRPC port (locca.v1.LocCa, health, reflection)")

    # --- what ---------------------------------------------------------------------------------------
    model: str = Field("models/locca-tiny-shapes", description=(
        "model bundle: a directory holding checkpoint.safetensors (and, for onnxruntime, onnx/manifest.json),"
        " a checkpoint file, or an exported ONNX bundle directory"))
    backend: Literal["onnxruntime", "torch"] = Field("onnxruntime", description=(
        "inference backend; onnxruntime needs an exported bundle: a missing one is exported first "
        "(see --export-if-missing), and if that is impossible the server falls back to torch and says so"))
    export_if_missing: bool = Field(True, description=(
        "with --backend onnxruntime and no ONNX bundle, run `locca export CHECKPOINT MODEL/onnx` at start"))
    device: str = Field("auto", description="cpu, cuda, cuda:N, or auto (every GPU if there is one, else cpu)")
    workers: int = Field(0, ge=0, description="model worker processes; 0 = one per GPU, or one on a CPU")
    threads: int = Field(0, ge=0, description=(
        "intra-op threads per worker; 0 = auto: on a CPU, the usable cores (a container's CPU quota included) "
        "shared among the workers, less one for the server's own threads, at least 1; on a GPU, the backend's "
        "default. On 2 cores, wrk at 64 connections, 3 alternating rounds: 175-191 captions/s with auto (1 "
        "thread) against 92-108 with onnxruntime's default (2 spinning threads)"))
    spin_wait: bool = Field(False, description=(
        "let ONNX Runtime's intra-op threads spin-wait for work between parallel sections (its own default): a "
        "little faster where they have cores to themselves, but on cores shared with the server's threads they "
        "burn the CPU the front needs. On 2 cores with 2 threads, wrk at 64 connections, 5 alternating rounds: "
        "131-175 captions/s with it off, 71-106 with it on"))

    # --- batching -----------------------------------------------------------------------------------
    max_batch_size: int = Field(_DEFAULT.max_batch, ge=1, description="most images encoded (and prompts prefilled) together")
    max_wait_ms: float = Field(_DEFAULT.max_wait * 1000, ge=0, description=(
        "while a worker is decoding, how long a newly arrived long request (a caption, a ground) may wait for "
        "others to share its encoder call before it is prefilled anyway (Triton's max_queue_delay, but only "
        "under load): an idle worker starts at once, and short requests (refers) never wait. Default 10: with "
        "wrk at 64 connections, 1.21x the captions/s of 0, the same latency at 1 connection"))
    max_rows: int = Field(_DEFAULT.max_rows, ge=33, description=(
        "most KV-cache rows decoded together (a caption or refer takes 1 row; /ground without a box and a "
        "grounded caption up to 33: a row per corner their region search follows, and the caption's)"))
    short_job_tokens: int = Field(_DEFAULT.short_tokens, ge=0, description=(
        "requests that generate at most this many tokens (a refer: 5) are prefilled before longer ones, and "
        "while one is decoding, newly arrived longer ones wait (see --short-job-max-defer-ms), so that a refer "
        "among long captions is not slowed by their encoder calls; 0 = strictly in arrival order"))
    short_job_max_defer_ms: float = Field(_DEFAULT.max_defer * 1000, ge=0, description=(
        "the longest a longer request is held back for short ones"))

    encoder_cache_mb: int = Field(256, ge=0, description=(
        "each worker's encoded-image cache, in MiB: the encoder's output of recent images, by a hash of their "
        "decoded pixels, so that more questions on an image (refer after refer) skip the encoder; least "
        "recently used out first. 0 turns it off: where images never repeat, keeping them costs about 7% of the "
        "captions/s on CPU (README, Performance). 256 holds about 900 images of the default model (288 KiB "
        "each); on a GPU it is device memory"))

    # --- admission ----------------------------------------------------------------------------------
    max_queue: int = Field(256, ge=1, description=(
        "most requests held at once (being decoded or waiting); one more is answered 429 / RESOURCE_EXHAUSTED"))
    retry_after_s: int = Field(1, ge=1, description="the Retry-After sent with 429 and 503 answers")
    request_timeout_s: float = Field(30.0, gt=0, description=(
        "deadline of a request that sets none; a shorter X-Request-Timeout header or gRPC deadline wins"))
    max_body_bytes: int = Field(20 << 20, ge=1024, description="largest REST body; larger is 413")
    max_image_bytes: int = Field(16 << 20, ge=1024, description="largest encoded image; larger is 413")
    max_image_pixels: int = Field(40_000_000, ge=1, description=(
        "largest width x height (decompression bombs); larger is 413 / INVALID_ARGUMENT"))
    body_timeout_s: float = Field(30.0, gt=0, description=(
        "longest a client may take to send a REST request's body; slower is 408 (slow or stalled uploads "
        "must not hold connections and buffers)"))
    max_buffered_bytes: int = Field(256 << 20, ge=1024, description=(
        "most bytes of REST bodies and gRPC messages held at once, across all requests in progress; a body "
        "that would go over is read, dropped and answered 429, a gRPC message RESOURCE_EXHAUSTED (a flood of "
        "large uploads must not exhaust memory)"))
    image_threads: int = Field(0, ge=0, description=(
        "threads decoding and preprocessing images; 0 = auto: the usable cores the CPU workers' model threads "
        "leave (all of them beside GPU workers), at least 1 and at most 4. On 2 cores beside a CPU worker that is "
        "1: wrk at 64 connections, 3 alternating rounds, the front spent 0.95x the CPU per caption of 4 threads, "
        "whose decodes only queued for the one core"))
    loop: Literal["auto", "uvloop", "asyncio"] = Field("auto", description=(
        "the event loop REST and gRPC run on: uvloop (libuv; auto picks it where it is installed, as it is with "
        "this package on Linux and macOS) or the standard library's asyncio. With uvloop the server's own "
        "threads spend about 5 percent less CPU per caption under wrk at 64 connections (3 alternating rounds)"))
    front_nice: int = Field(5, ge=0, le=19, description=(
        "how much lower than the model workers' the scheduling priority of the server's own threads is (HTTP, "
        "gRPC, image decoding; Linux nice): where they share cores, a worker's model call, which serves a whole "
        "batch, goes first. Measured on 2 cores under wrk at 64 connections, 4 alternating rounds: 162 captions/s against 144 "
        "with 0 (1.13x). 0 = the same priority"))

    # --- access -------------------------------------------------------------------------------------
    api_keys: SecretStr = Field(SecretStr(""), description=(
        "comma-separated API keys (16+ characters each); when set, REST /v1/* and gRPC locca.v1.LocCa need "
        "`Authorization: Bearer <key>` (401 / UNAUTHENTICATED otherwise). Off when empty. Prefer the variable "
        "to the flag: a flag shows in the process list"))

    # --- operations ---------------------------------------------------------------------------------
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    worker_stall_timeout_s: float = Field(60.0, gt=0, description=(
        "a worker that holds requests and has sent nothing for this long (a busy worker reports 4 times a "
        "second) is taken as frozen: it is killed, its requests get 503 / UNAVAILABLE and a new one starts"))
    keep_alive_s: int = Field(75, ge=1, description=(
        "how long an idle REST connection is kept open; longer than any client's or proxy's idle timeout (httpx "
        "5 s, nginx 60-75 s, cloud load balancers 60 s), so that the server never closes a connection just as a "
        "request is sent on it (uvicorn's own default, 5 s, races httpx's)"))
    warmup: bool = Field(True, description="run each task once per worker before reporting ready")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_json: bool = Field(True, description="structured JSON logs (one object a line) on stderr")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.port == self.grpc_port:
            raise ValueError("port and grpc_port must differ")
        if self.max_body_bytes < self.max_image_bytes:
            raise ValueError("max_body_bytes must be at least max_image_bytes")
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError("max_buffered_bytes must be at least max_body_bytes")
        if any(len(k) < 16 for k in self.api_key_list()):
            raise ValueError("every API key needs at least 16 characters")
        return self

    def scheduler(self) -> SchedulerConfig:
        """The batching settings as the engine core takes them, whole (model/scheduler.py)."""
        return SchedulerConfig(max_batch=self.max_batch_size, max_wait=self.max_wait_ms / 1000,
                               max_rows=self.max_rows, short_tokens=self.short_job_tokens,
                               max_defer=self.short_job_max_defer_ms / 1000)

    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
