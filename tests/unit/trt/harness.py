"""The real TensorRT Python bindings on a machine without a GPU, a driver or TensorRT itself.

PyPI carries the bindings as small wheels: ``tensorrt_cu12_bindings`` (10.x),
``tensorrt_cu13_bindings`` (11.x) and ``tensorrt-bindings`` (8.6.1; 8.5 was never
on PyPI). Their extension module only needs ``libnvinfer.so.N``,
``libnvonnxparser.so.N`` and ``libnvinfer_plugin.so.N`` (8.x: also
``libnvparsers.so.N``) to load; stub libraries that export the symbols it binds,
each returning NULL/0, are enough for ``import tensorrt`` and full introspection.
``trt.Builder(...)`` and ``trt.Runtime(...)`` then raise ``TypeError: pybind11::init():
factory function returned nullptr``, as on a node whose driver or CUDA does not fit.

The wheel installs ``tensorrt_bindings``; the name ``tensorrt`` comes from NVIDIA's
meta package, so a two-line ``tensorrt/__init__.py`` stands in for it. Versions
cannot share one environment: each gets its own folder under the cache
(``~/.cache/edgeslim/trt-bindings``, or ``$EDGESLIM_TRT_BINDINGS_CACHE``) and runs
in a subprocess with ``PYTHONPATH`` and ``LD_LIBRARY_PATH`` set.

Used by tests/unit/test_trt_conformance.py and tests/unit/trt/generate_snapshots.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SNAPSHOTS = HERE / "snapshots"
INTROSPECT = HERE / "introspect.py"

# TensorRT version -> (the bindings wheel on PyPI, the SONAME major its extension links).
BINDINGS = {
    "8.6.1": ("tensorrt-bindings==8.6.1", 8),              # the newest 8.x on PyPI (Xavier runs 8.5)
    "10.3.0": ("tensorrt_cu12_bindings==10.3.0", 10),      # JetPack 6.x
    "10.16.1.11": ("tensorrt_cu12_bindings==10.16.1.11", 10),  # the newest 10.x
    "11.4.0.106": ("tensorrt_cu13_bindings==11.4.0.106", 11),  # the newest 11.x
}
POLYGRAPHY = "polygraphy==0.53.6"  # the device agent's health check loads engines through it

# Every symbol the bindings import from the TensorRT libraries (`nm -D --undefined-only`), as C
# functions returning NULL/0. 8.x also binds the UFF/Caffe parsers (C++ names, mangled).
STUB_C = """
void *createInferBuilder_INTERNAL(void *logger, int version) { return 0; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return 0; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return 0; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return 0; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return 0; }
void *getPluginRegistry(void) { return 0; }
void *getBuilderPluginRegistry(int capability) { return 0; }
int getNvOnnxParserVersion(void) { return 0; }
int initLibNvInferPlugins(void *logger, const char *ns) { return 0; }
void *_ZN11nvuffparser15createUffParserEv(void) { return 0; }
void _ZN11nvuffparser8FieldMapC1EPKcPKvNS_9FieldTypeEi(void *self, const char *n, const void *d, int t, int l) {}
void *_ZN14nvcaffeparser117createCaffeParserEv(void) { return 0; }
void _ZN14nvcaffeparser123shutdownProtobufLibraryEv(void) {}
"""
STUB_LIBS = ("nvinfer", "nvonnxparser", "nvinfer_plugin", "nvparsers")
SHIM = "from tensorrt_bindings import *  # noqa: F403\nfrom tensorrt_bindings import __version__  # noqa: F401\n"


class Unavailable(Exception):
    """The bindings cannot be set up here (PyPI unreachable, no C compiler); the message says which."""


@dataclasses.dataclass(frozen=True)
class Bindings:
    """One TensorRT version's bindings, ready for a subprocess."""

    version: str
    site: Path        # holds tensorrt_bindings/ and the tensorrt/ shim
    libs: Path        # the stub libraries
    polygraphy: Path  # polygraphy's wheel, unpacked

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.site), str(self.polygraphy), env.get("PYTHONPATH", "")])
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(self.libs), env.get("LD_LIBRARY_PATH", "")])
        return env

    def run(self, *args: str, timeout: float = 180) -> dict:
        """``introspect.py ARGS`` against these bindings; its JSON answer."""
        proc = subprocess.run([sys.executable, str(INTROSPECT), *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"introspect.py {' '.join(args)} with TensorRT {self.version} exited "
                               f"{proc.returncode}: {proc.stderr.strip()[-3000:]}")
        return json.loads(lines[-1])


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESLIM_TRT_BINDINGS_CACHE", "~/.cache/edgeslim/trt-bindings")).expanduser()


def _download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel into ``dest``; its path."""
    dest.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--disable-pip-version-check", "-q", "-d", str(dest), requirement],
                          capture_output=True, text=True, timeout=300)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise Unavailable(f"pip download {requirement} failed (is PyPI reachable?): {tail}")
    return wheels[0]


def _unpacked(requirement: str, folder: Path, shim: bool) -> Path:
    """The wheel of ``requirement`` unpacked into ``folder/site`` (cached: done once)."""
    site = folder / "site"
    done = site / ".complete"
    if done.exists():
        return site
    part = folder.with_name(folder.name + f".part{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    wheel = _download(requirement, part / "wheel")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(part / "site")
    if shim:
        (part / "site" / "tensorrt").mkdir()
        (part / "site" / "tensorrt" / "__init__.py").write_text(SHIM)
    (part / "site" / ".complete").write_text(requirement + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    part.rename(folder)
    return site


def stub_libraries(major: int) -> Path:
    """``lib<name>.so.<major>`` stubs, built with the C compiler (cached)."""
    out = cache_dir() / f"stubs-{major}"
    if all((out / f"lib{name}.so.{major}").exists() for name in STUB_LIBS):
        return out
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise Unavailable("no C compiler (gcc/cc) to build the stub TensorRT libraries")
    out.mkdir(parents=True, exist_ok=True)
    src = out / "stub.c"
    src.write_text(STUB_C)
    for name in STUB_LIBS:
        lib = f"lib{name}.so.{major}"
        proc = subprocess.run([cc, "-shared", "-fPIC", f"-Wl,-soname,{lib}", "-o", str(out / (lib + ".tmp")),
                               str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise Unavailable(f"{cc} could not build {lib}: {proc.stderr.strip()[-500:]}")
        os.replace(out / (lib + ".tmp"), out / lib)
    return out


def prepare(version: str) -> Bindings:
    """The bindings of ``version`` (a key of ``BINDINGS``), downloaded and unpacked once."""
    requirement, major = BINDINGS[version]
    site = _unpacked(requirement, cache_dir() / version, shim=True)
    poly = _unpacked(POLYGRAPHY, cache_dir() / POLYGRAPHY.replace("==", "-"), shim=False)
    return Bindings(version, site, stub_libraries(major), poly)


def snapshot_path(version: str) -> Path:
    return SNAPSHOTS / f"tensorrt-{version}.json"


# --- TensorRT 8.5 (Xavier, JetPack 5.1): not on PyPI, so from its documented API ----------------

DOCUMENTED = "8.5.2.2"  # JetPack 5.1's TensorRT
DOCUMENTED_FROM = "8.6.1"


def derive_documented(base: dict, delta: dict) -> dict:
    """The 8.5 snapshot: the real 8.6.1 one minus what 8.6 added (``delta``, from the pybind sources
    of TensorRT OSS at tags 8.5.2 and v8.6.1; see generate_snapshots.py --oss-repo)."""
    enums = {name: {k: v for k, v in members.items() if k not in delta["members"].get(name, ())}
             for name, members in base["enums"].items() if name not in delta["new"]}
    classes = {name: [m for m in members if m not in delta["members"].get(name, ())]
               for name, members in base["classes"].items() if name not in delta["new"]}
    signatures = {k: v for k, v in base["signatures"].items()
                  if k.split(".")[0] in classes and k.split(".")[1] in classes[k.split(".")[0]]}
    return {"version": DOCUMENTED, "toplevel": [n for n in base["toplevel"] if n not in delta["new"]],
            "enums": enums, "classes": classes, "signatures": signatures,
            "nptype": {k: v for k, v in base["nptype"].items() if k in enums["DataType"]}}


def load_snapshot(version: str) -> dict:
    return json.loads(snapshot_path(version).read_text())


def snapshot_versions() -> list[str]:
    """Every version with a checked-in snapshot: the real bindings', then the documented 8.5."""
    return [*BINDINGS, DOCUMENTED]
