"""What an install holds: the wheel ships the gRPC stubs and the .proto (generated when it is built), and serving
needs none of the `train` extra (torch, plotting, CIDEr, the ONNX exporter)."""

import subprocess
import sys
import zipfile
from pathlib import Path

from locca.cli import TRAIN_EXTRA

ROOT = Path(__file__).resolve().parents[1]

# Run a snippet with the train extra's packages made unimportable, as in an install without it.
WITHOUT_TRAIN = f"""
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {sorted(TRAIN_EXTRA)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NotInstalled())
"""


def without_train(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TRAIN + code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_the_wheel_ships_the_grpc_stubs_and_the_proto(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("locca_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"locca_grpc/locca_pb2.py", "locca_grpc/locca_pb2_grpc.py", "locca_grpc/locca.proto"} <= set(names)
    static = {f"service/static/{p.name}" for p in (ROOT / "service" / "static").iterdir()}
    assert static and static <= set(names), "the demo page's files"
    assert zipfile.ZipFile(wheel).read("locca_grpc/locca.proto") == (ROOT / "proto/locca/v1/locca.proto").read_bytes()
    # the shipped stubs import as a package (no top-level locca_pb2 needed) and serve the .proto's methods
    probe = subprocess.run([sys.executable, "-c", f"""
import sys; sys.path.insert(0, {str(wheel)!r})
from locca_grpc import locca_pb2, locca_pb2_grpc
assert locca_pb2_grpc.locca__pb2 is locca_pb2
print(sorted(m.name for m in locca_pb2.DESCRIPTOR.services_by_name["LocCa"].methods))
"""], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["['Caption',", "'Ground',", "'Refer']"]


def test_serving_and_the_client_need_nothing_of_the_train_extra():
    done = without_train("""
import client, export.backends, export.onnx_backend, model.core, service.app, service.grpc_server, service.rest
import service.worker
from locca.cli import main
for command in ("serve", "predict"):
    try:
        main([command, "--help"])
    except SystemExit as e:
        assert e.code == 0, command
print("ok", "torch" in sys.modules)
""")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok False")


def test_a_training_command_without_the_train_extra_says_what_to_install():
    done = without_train("from locca.cli import main\nmain(['train', '--help'])")
    assert done.returncode == 1
    assert "locca train needs the train extra" in done.stderr and "locca-serve[train]" in done.stderr


def _pins(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].split(";")[0].strip()  # without an environment marker (uvloop's: not Windows)
        if "==" in line:
            name, version = line.split("==")
            out[name.lower().replace("_", "-")] = version.split("+")[0]  # 2.13.0+cpu is the 2.13.0 pin
    return out


def test_the_lock_files_hold_pyprojects_pins():
    """`make lock` after changing a pin: every pin of pyproject.toml is in the lock files at its version."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    for lock, groups in (("dev.lock", ["dev", "train"]), ("serve.lock", []), ("export-cpu.lock", ["train"])):
        locked = _pins((ROOT / "requirements" / lock).read_text().splitlines())
        wanted = _pins(project["dependencies"] + [r for g in groups for r in extras[g]])
        assert {k: locked.get(k) for k in wanted} == wanted, f"requirements/{lock} is stale: run make lock"
    assert "torch" not in _pins(project["dependencies"]), "the serving install has no torch"


def test_the_serving_lock_has_nothing_of_the_train_extra():
    """The CPU image installs requirements/serve.lock (issue 20: an image without torch), and the ONNX bundle it
    serves is exported in a stage with requirements/export-cpu.lock: the two agree on every package they share."""
    serve = _pins((ROOT / "requirements" / "serve.lock").read_text().splitlines())
    export = _pins((ROOT / "requirements" / "export-cpu.lock").read_text().splitlines())
    assert not TRAIN_EXTRA & serve.keys(), sorted(TRAIN_EXTRA & serve.keys())
    assert TRAIN_EXTRA <= export.keys()
    assert {k: export.get(k) for k in serve} == serve, "serve.lock and export-cpu.lock differ: run make lock"
