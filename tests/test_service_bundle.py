"""An ONNX bundle exported from another checkpoint, or by an older `locca export`, is not served: the server
exports again."""

import hashlib
import json

import pytest

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


# --- how many threads a worker runs ------------------------------------------------------------------------
def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    tmp_path.mkdir()
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return tmp_path


def test_usable_cores_follow_the_affinity_mask_and_a_containers_cpu_quota(tmp_path):
    import os

    from service.bundle import usable_cores
    cores = len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path) == cores                                       # no cgroup files: the mask
    assert usable_cores(_cgroup(tmp_path / "a", v2="max 100000")) == cores       # no quota
    assert usable_cores(_cgroup(tmp_path / "b", v2="100000 100000")) == 1        # 1 CPU
    assert usable_cores(_cgroup(tmp_path / "c", v2="50000 100000")) == 1         # half a CPU still runs 1 thread
    assert usable_cores(_cgroup(tmp_path / "d", v2=f"{cores * 400000} 100000")) == cores  # never above the mask
    assert usable_cores(_cgroup(tmp_path / "e", v1=("100000", "100000"))) == 1   # cgroup v1
    assert usable_cores(_cgroup(tmp_path / "f", v1=("-1", "100000"))) == cores
    assert usable_cores(_cgroup(tmp_path / "g", v2="garbage")) == cores
    if cores >= 2:
        assert usable_cores(_cgroup(tmp_path / "h", v2="150000 100000")) == 2    # 1.5 CPUs: 2 threads at once


def test_a_cpu_worker_leaves_a_core_to_the_front_unless_told_otherwise():
    from service.bundle import worker_threads
    from service.settings import Settings
    auto = Settings()
    assert worker_threads(auto, ["cpu"], cores=2) == 1
    assert worker_threads(auto, ["cpu"], cores=1) == 1
    assert worker_threads(auto, ["cpu"], cores=16) == 15
    assert worker_threads(auto, ["cpu", "cpu"], cores=16) == 7
    assert worker_threads(auto, ["cpu"] * 4, cores=2) == 1
    assert worker_threads(auto, ["cuda:0", "cuda:1"], cores=64) == 0             # the backend's default
    assert worker_threads(Settings(threads=3), ["cpu"], cores=2) == 3            # --threads wins


def test_image_threads_take_the_cores_the_workers_leave():
    from service.bundle import image_threads
    from service.settings import Settings
    auto = Settings()
    assert image_threads(auto, ["cpu"], 1, cores=2) == 1           # this machine: the front's one core
    assert image_threads(auto, ["cpu"], 15, cores=16) == 1
    assert image_threads(auto, ["cpu"], 4, cores=16) == 4          # at most 4
    assert image_threads(auto, ["cpu", "cpu"], 3, cores=8) == 2
    assert image_threads(auto, ["cpu"], 3, cores=2) == 1           # --threads over the cores: still 1
    assert image_threads(auto, ["cuda:0", "cuda:1"], 0, cores=64) == 4
    assert image_threads(auto, ["cuda:0"], 0, cores=2) == 2
    assert image_threads(Settings(image_threads=6), ["cpu"], 1, cores=2) == 6  # --image-threads wins


def test_the_server_turns_onnxruntimes_spin_waiting_off():
    from export.onnx_backend import session_options
    from service.settings import Settings
    assert Settings().spin_wait is False
    assert session_options(1, spin=False).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(1, spin=False).get_session_config_entry("session.inter_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have"):  # onnxruntime's own default elsewhere (benchmarks)
        session_options(1).get_session_config_entry("session.intra_op.allow_spinning")
    # (that a session without spinning answers as one with it: tests/test_export.py)


def test_the_event_loop_setting():
    import asyncio

    import uvloop

    from service.app import loop_factory
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None  # asyncio.Runner's own loop
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
