"""Device classes: the exact keys an engine is built for, and what this node is.

A TensorRT engine runs only where it was built for: the same TensorRT version,
the same GPU architecture (compute capability) and, on Jetson, the same
JetPack. A *device class* pins all of that under one exact key such as
``orin-sm87-jp6.1-trt10.3``; a device refuses anything else.

This module imports no torch, mlflow, kfp or tensorrt: the device agent on a
Jetson uses it. What GPU 0 is comes from the CUDA driver through ``ctypes``
(``cuda``), toolkit or not.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

from edgeslim.components.common.errors import DeviceError
from edgeslim.components.common.registry import Registry
from edgeslim.components.engine.cuda import gpu0


@dataclasses.dataclass(frozen=True)
class DeviceClass:
    """One kind of device an engine is built for.

    Attributes:
        key: the exact key, e.g. ``orin-sm87-jp6.1-trt10.3``.
        family: ``jetson`` or ``datacenter``.
        arch: GPU architecture name (``Orin``/``Ampere``, ``Xavier``/``Volta``, ``Ada``, ``Hopper``).
        compute_capability: ``(major, minor)``, e.g. ``(8, 7)``.
        tensorrt: the TensorRT version a build node must have, as a prefix
            (``"10.3"`` matches 10.3.0.30; ``"10"`` any 10.x).
        jetpack: JetPack ``major.minor`` on Jetson, else ``None``.
        cuda: the CUDA version the platform ships (informative).
        dla_cores: DLA cores the largest module of the class has (0: none).
        node_selector: Kubernetes labels of a build node of this class (the
            recipe may override them).
        description: one line for people.
    """

    key: str
    family: str
    arch: str
    compute_capability: tuple[int, int]
    tensorrt: str
    jetpack: Optional[str] = None
    cuda: str = ""
    dla_cores: int = 0
    node_selector: dict = dataclasses.field(default_factory=dict)
    description: str = ""

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def is_jetson(self) -> bool:
        return self.family == "jetson"

    @property
    def tensorrt_major(self) -> int:
        return int(self.tensorrt.split(".")[0])

    @property
    def tensorrt_label(self) -> str:
        """The class's TensorRT for people: ``10.3``, or ``10.x`` for a bare major."""
        return self.tensorrt if "." in self.tensorrt else f"{self.tensorrt}.x"

    def tensorrt_matches(self, version: str) -> bool:
        """True when ``version`` (e.g. ``10.3.0.30``) is of this class's TensorRT."""
        want = self.tensorrt.split(".")
        return version.split(".")[: len(want)] == want

    def tensorrt_versions(self, at_least: Optional[str] = None) -> tuple[str, ...]:
        """The TensorRT releases (``major.minor``) a build node of this class may have, oldest first.

        ``10`` admits every 10.x of ``TENSORRT_RELEASES``; a pin no release there matches (an
        in-house class on a newer TensorRT) admits itself. ``at_least`` drops the older ones.
        """
        hits = tuple(v for v in TENSORRT_RELEASES if self.tensorrt_matches(v)) or (self.tensorrt,)
        if at_least:
            hits = tuple(v for v in hits if version_tuple(v) >= version_tuple(at_least)[:2])
        return hits

    @property
    def cpu_arch(self) -> str:
        """The CPU architecture of its build nodes, as Kubernetes labels it (``kubernetes.io/arch``)."""
        return "arm64" if self.is_jetson else "amd64"


def _jetson_selector(key: str) -> dict:
    # Jetson build nodes are the devices themselves (or a lab board) joined to the
    # cluster; nothing standard labels JetPack, so the class key is the label.
    return {"edgeslim.io/device-class": key}


def _gfd_selector(major: int, minor: int) -> dict:
    # Labels written by NVIDIA GPU feature discovery on datacenter nodes.
    return {"nvidia.com/gpu.compute.major": str(major), "nvidia.com/gpu.compute.minor": str(minor)}


# The built-in classes. pyproject.toml registers each under the entry-point group
# "edgeslim.device_classes", exactly as a package of yours registers an in-house board.
ORIN_JP61 = DeviceClass(
    "orin-sm87-jp6.1-trt10.3", "jetson", "Orin (Ampere)", (8, 7), "10.3", "6.1", "12.6", 2,
    _jetson_selector("orin-sm87-jp6.1-trt10.3"),
    "Jetson AGX Orin / Orin NX / Orin Nano, JetPack 6.1 (L4T R36.4), TensorRT 10.3")
ORIN_JP62 = DeviceClass(
    "orin-sm87-jp6.2-trt10.3", "jetson", "Orin (Ampere)", (8, 7), "10.3", "6.2", "12.6", 2,
    _jetson_selector("orin-sm87-jp6.2-trt10.3"),
    "Jetson AGX Orin / Orin NX / Orin Nano, JetPack 6.2 (L4T R36.4.3), TensorRT 10.3")
XAVIER_JP51 = DeviceClass(
    "xavier-sm72-jp5.1-trt8.5", "jetson", "Xavier (Volta)", (7, 2), "8.5", "5.1", "11.4", 2,
    _jetson_selector("xavier-sm72-jp5.1-trt8.5"),
    "Jetson AGX Xavier / Xavier NX, JetPack 5.1 (L4T R35), TensorRT 8.5")
ADA_TRT10 = DeviceClass("ada-sm89-trt10", "datacenter", "Ada", (8, 9), "10", None, "12", 0, _gfd_selector(8, 9),
                        "Ada datacenter GPU (L4, L40S), TensorRT 10.x")
HOPPER_TRT10 = DeviceClass("hopper-sm90-trt10", "datacenter", "Hopper", (9, 0), "10", None, "12", 0,
                           _gfd_selector(9, 0), "Hopper datacenter GPU (H100, H200), TensorRT 10.x")
HOPPER_TRT11 = DeviceClass("hopper-sm90-trt11", "datacenter", "Hopper", (9, 0), "11", None, "13", 0,
                           _gfd_selector(9, 0), "Hopper datacenter GPU (H100, H200), TensorRT 11.x")

# The TensorRT releases (major.minor) a class's ``tensorrt`` prefix can admit, oldest first: JetPack's 8.5,
# and what PyPI carries of 8.6, 10.x and 11.x.
TENSORRT_RELEASES = ("8.5", "8.6", *(f"10.{minor}" for minor in range(17)), *(f"11.{minor}" for minor in range(5)))


def releases_label(versions) -> str:
    """``10.0-10.16`` for a run of releases, ``10.3`` for one."""
    versions = list(versions)
    return versions[0] if len(versions) == 1 else f"{versions[0]}-{versions[-1]}"


DEVICE_CLASSES: Registry[DeviceClass] = Registry("edgeslim.device_classes", "device class", error=DeviceError)

_KEY = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


def _key_problem(key: str) -> Optional[str]:
    if _KEY.match(key):
        return None
    return (f"device class key {key!r}: use lower-case letters, digits, '.' and '-', "
            "like 'orin-sm87-jp6.1-trt10.3'")


def register_device_class(device_class: DeviceClass) -> DeviceClass:
    """Add a device class for this process (a notebook, a test). Its key must be new.

    An entry point in the group ``edgeslim.device_classes`` is the lasting way:
    ``my-board-sm87-trt10.3 = "mypkg.boards:MY_BOARD"``.
    """
    problem = _key_problem(device_class.key)
    if problem:
        raise DeviceError(problem)
    return DEVICE_CLASSES.register(device_class.key, device_class)


def known_device_classes() -> list[str]:
    """The keys of every known device class, sorted."""
    return DEVICE_CLASSES.names()


def get_device_class(key: str) -> DeviceClass:
    """The device class registered under ``key``.

    Raises:
        DeviceError: no such key (the message lists the known ones), or what is
            registered under it is not a ``DeviceClass`` of that key.
    """
    device_class = DEVICE_CLASSES.get(key)
    problem = _key_problem(key)
    if problem:
        raise DeviceError(problem)
    if not (isinstance(device_class, DeviceClass) and device_class.key == key):
        raise DeviceError(f"device class {key!r}: its entry point in the group {DEVICE_CLASSES.group!r} names "
                          f"{device_class!r:.120}, not a DeviceClass with the key {key!r}; point it at one")
    return device_class


# --- where a class's TensorRT comes from -----------------------------------------------------

# The pip extra per TensorRT major, and what it installs (pyproject.toml repeats these; a test
# checks they agree). PyPI's `tensorrt` meta package resolves to the newest major (11.x, CUDA 13)
# whatever it is asked, so the extras name the CUDA line: tensorrt-cu12 10.x, tensorrt-cu13 11.x.
# tensorrt-cu12 ships 11.x too: TENSORRT11_CUDA12 is TensorRT 11 for a node whose driver runs CUDA 12
# (CUDA 13 needs an R580 or newer driver).
TENSORRT_EXTRAS = {10: ("tensorrt10", "tensorrt-cu12>=10.3,<11"), 11: ("tensorrt11", "tensorrt-cu13>=11,<12")}
TENSORRT11_CUDA12 = ("tensorrt11-cu12", "tensorrt-cu12>=11,<12")


def tensorrt_extra(device_class: DeviceClass) -> Optional[str]:
    """The ``edgeslim[...]`` extra that installs this class's TensorRT; ``None`` on Jetson (JetPack ships it)."""
    if device_class.is_jetson or device_class.tensorrt_major not in TENSORRT_EXTRAS:
        return None
    return TENSORRT_EXTRAS[device_class.tensorrt_major][0]


def tensorrt_install_hint(device_class: Optional[DeviceClass] = None) -> str:
    """How to get the TensorRT of ``device_class`` (of any class when ``None``), as one clause."""
    if device_class is None:
        extras = " or ".join(f"pip install 'edgeslim[{extra}]'" for extra, _ in TENSORRT_EXTRAS.values())
        return (f"install it with: {extras} (the extra of this node's device class: edgeslim engine detect); "
                "on Jetson it comes with JetPack")
    extra = tensorrt_extra(device_class)
    if extra and device_class.tensorrt_major == 11:
        return (f"install it with: pip install 'edgeslim[{extra}]' (CUDA 13: an R580 or newer driver), or "
                f"'edgeslim[{TENSORRT11_CUDA12[0]}]' on a CUDA 12 driver")
    if extra:
        return f"install it with: pip install 'edgeslim[{extra}]'"
    if device_class.is_jetson:
        return (f"TensorRT {device_class.tensorrt} comes with JetPack {device_class.jetpack} "
                "(sudo apt install nvidia-jetpack), not from pip")
    return f"install TensorRT {device_class.tensorrt_label} from NVIDIA (edgeslim has no extra for it)"


# --- features only some TensorRT versions have ------------------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    """``(10, 14, 1, 48)`` from ``10.14.1.48.post1``: the leading numeric parts."""
    out = []
    for part in str(version).split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class TensorRTFeature:
    """A build setting that only some TensorRT versions have.

    Attributes:
        field: the ``engines:`` setting that asks for it.
        what: what it is, for the error line (``a version-compatible engine``).
        ranges: the versions that have it, ``(first, first_without)`` pairs (``None``: open-ended).
        api: the ``tensorrt`` attribute that carries it (``Enum.MEMBER``).
        api_marks_support: whether the bindings have ``api`` exactly where the
            feature works (DLA's enum outlives DLA support, so not there).
    """

    field: str
    what: str
    ranges: tuple[tuple[str, Optional[str]], ...]
    api: str = ""
    api_marks_support: bool = True

    def supported_by(self, version: str) -> bool:
        v = version_tuple(version)
        return any(version_tuple(lo) <= v and (hi is None or v < version_tuple(hi)) for lo, hi in self.ranges)

    def lacking_in(self, device_class: DeviceClass, at_least: Optional[str] = None) -> tuple[str, ...]:
        """The releases the class admits (from ``at_least`` on) that do not have it, oldest first."""
        return tuple(v for v in device_class.tensorrt_versions(at_least) if not self.supported_by(v))

    def requirement(self) -> str:
        """``TensorRT 10.9 or newer``, ``TensorRT before 11``, ..."""
        parts = []
        for lo, hi in self.ranges:
            if hi is None:
                parts.append(f"{lo} or newer")
            elif version_tuple(lo) <= (0,):
                parts.append(f"before {hi}")
            else:
                parts.append(f"{lo} to before {hi}")
        return "TensorRT " + ", or ".join(parts)

    def refusal(self, has: str) -> str:
        """The one-line error: the feature, the versions that have it, and what ``has`` (a class, a node) has."""
        return f"engines.{self.field}: {self.what} needs {self.requirement()}; {has}"


TENSORRT_FEATURES: dict[str, TensorRTFeature] = {
    # IBuilderConfig.hardware_compatibility_level came with 8.6; SAME_COMPUTE_CAPABILITY with 10.9.
    "hardware_compatibility.ampere_plus": TensorRTFeature(
        "hardware_compatibility", "ampere_plus", (("8.6", None),), "HardwareCompatibilityLevel.AMPERE_PLUS"),
    "hardware_compatibility.same_compute_capability": TensorRTFeature(
        "hardware_compatibility", "same_compute_capability", (("10.9", None),),
        "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY"),
    "version_compatible": TensorRTFeature("version_compatible", "a version-compatible engine", (("8.6", None),),
                                          "BuilderFlag.VERSION_COMPATIBLE"),
    "strongly_typed": TensorRTFeature("strongly_typed", "a strongly typed network", (("10.0", None),),
                                      "NetworkDefinitionCreationFlag.STRONGLY_TYPED"),
    # TensorRT 11 removed weak typing together with its precision flags (INT8, FP16).
    "weakly_typed": TensorRTFeature("strongly_typed", "a weakly typed network (false)", (("0", "11"),),
                                    "BuilderFlag.INT8"),
    "fp16_flag": TensorRTFeature("precision", "fp16 (the FP16 builder flag)", (("0", "11"),), "BuilderFlag.FP16"),
    # DLA: up to 10.7, gone in 11.0-11.3, back on Jetson AGX Orin (JetPack 7.2.2) in 11.4.1.
    "dla": TensorRTFeature("dla_core", "DLA", (("0", "10.8"), ("11.4.1", None)), "DeviceType.DLA",
                           api_marks_support=False),
}


# --- what this node is ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalDevice:
    """What a build node (or device) has: GPU 0, drivers, TensorRT, JetPack.

    Attributes:
        name: the GPU's name from the driver, e.g. ``Orin`` or ``NVIDIA L4``.
        compute_capability: ``(major, minor)``.
        cuda_driver: the driver's CUDA version, e.g. ``12.6``.
        tensorrt: the installed TensorRT version, or ``None`` when it is not installed.
        jetpack: ``major.minor[.patch]`` on Jetson, else ``None``.
        l4t: the L4T release on Jetson (``36.4.0``), else ``None``.
        total_memory_mib: GPU memory.
    """

    name: str
    compute_capability: tuple[int, int]
    cuda_driver: str = ""
    tensorrt: Optional[str] = None
    jetpack: Optional[str] = None
    l4t: Optional[str] = None
    total_memory_mib: int = 0

    @property
    def sm(self) -> str:
        return f"sm{self.compute_capability[0]}{self.compute_capability[1]}"

    @property
    def is_jetson(self) -> bool:
        return self.l4t is not None

    def describe(self) -> str:
        parts = [f"{self.name} ({self.sm})", f"TensorRT {self.tensorrt or 'not installed'}"]
        if self.jetpack:
            parts.append(f"JetPack {self.jetpack}")
        return ", ".join(parts)


def installed_tensorrt_version() -> Optional[str]:
    """TensorRT's version without importing it when package metadata has it."""
    from importlib import metadata

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:  # JetPack installs it as a Debian package, without pip metadata
        import tensorrt  # noqa: PLC0415

        return str(tensorrt.__version__)
    except (ImportError, OSError):
        return None


# L4T release -> JetPack, for boards without the nvidia-jetpack package record.
_L4T_TO_JETPACK = (
    ("36.4.4", "6.2.1"), ("36.4.3", "6.2"), ("36.4", "6.1"), ("36.3", "6.0"),
    ("35.6", "5.1.4"), ("35.5", "5.1.3"), ("35.4", "5.1.2"), ("35.3", "5.1.1"), ("35.2", "5.1"),
)


def parse_l4t_release(text: str) -> Optional[str]:
    """``36.4.0`` from ``/etc/nv_tegra_release`` (``# R36 (release), REVISION: 4.0, ...``)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_for_l4t(l4t: str) -> Optional[str]:
    for prefix, jetpack in _L4T_TO_JETPACK:
        if l4t == prefix or l4t.startswith(prefix + "."):
            return jetpack
    return None


def _jetpack_from_dpkg(status: Path = Path("/var/lib/dpkg/status")) -> Optional[str]:
    try:
        text = status.read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"^Package: nvidia-jetpack\n(?:[^\n]+\n)*?Version: (\d+(?:\.\d+)*)", text, re.M)
    return m.group(1) if m else None


def detect_local_device(tegra_release: Path = Path("/etc/nv_tegra_release")) -> Optional[LocalDevice]:
    """GPU 0 of this node, or ``None`` where there is no CUDA device."""
    gpu = gpu0()
    if gpu is None:
        return None
    name, cc, driver, mem = gpu
    l4t = jetpack = None
    if tegra_release.exists():
        l4t = parse_l4t_release(tegra_release.read_text(errors="replace"))
        jetpack = _jetpack_from_dpkg() or (jetpack_for_l4t(l4t) if l4t else None)
    return LocalDevice(name=name, compute_capability=cc, cuda_driver=driver,
                       tensorrt=installed_tensorrt_version(), jetpack=jetpack, l4t=l4t,
                       total_memory_mib=mem)


def _jetpack_matches(want: str, have: Optional[str]) -> bool:
    return have is not None and have.split(".")[:2] == want.split(".")[:2]


def mismatch_reason(device_class: DeviceClass, local: LocalDevice, *,
                    hardware_compatibility: str = "none", check_tensorrt: bool = True) -> Optional[str]:
    """Why ``local`` cannot build (or run) engines of ``device_class``; ``None`` if it can.

    Args:
        hardware_compatibility: ``ampere_plus`` lets an Ampere-or-newer datacenter
            node build for another Ampere-or-newer datacenter class.
        check_tensorrt: also require the class's TensorRT version.
    """
    want, have = device_class.compute_capability, local.compute_capability
    arch_ok = want == have
    if (not arch_ok and hardware_compatibility == "ampere_plus" and not device_class.is_jetson
            and not local.is_jetson and want >= (8, 0) and have >= (8, 0)):
        arch_ok = True
    if not arch_ok:
        return (
            f"device class {device_class.key} needs compute capability {want[0]}.{want[1]} "
            f"({device_class.arch}); this node has {have[0]}.{have[1]} ({local.name}): build it on a "
            f"node of that class (node selector {device_class.node_selector}) or on the device itself"
        )
    if device_class.is_jetson != local.is_jetson:
        kind = "a Jetson" if device_class.is_jetson else "a datacenter GPU"
        return (f"device class {device_class.key} is {kind}; this node ({local.describe()}) is not: "
                "build it on a node of that class")
    if device_class.jetpack and not _jetpack_matches(device_class.jetpack, local.jetpack):
        return (f"device class {device_class.key} needs JetPack {device_class.jetpack}; this node has "
                f"JetPack {local.jetpack or 'unknown'}: build it on a device of that class")
    if check_tensorrt and local.tensorrt and not device_class.tensorrt_matches(local.tensorrt):
        return (f"device class {device_class.key} needs TensorRT {device_class.tensorrt}; this node has "
                f"TensorRT {local.tensorrt}: engines are not portable across TensorRT versions; "
                f"{tensorrt_install_hint(device_class)}")
    return None


def match_device_class(key: str, local: LocalDevice, *, hardware_compatibility: str = "none") -> DeviceClass:
    """The device class ``key`` if ``local`` can build for it.

    Raises:
        DeviceError: unknown key (lists the known ones), or the node does not match.
    """
    device_class = get_device_class(key)
    reason = mismatch_reason(device_class, local, hardware_compatibility=hardware_compatibility)
    if reason:
        raise DeviceError(reason)
    return device_class


def classes_for(local: LocalDevice, *, check_tensorrt: bool = True) -> list[DeviceClass]:
    """Every known device class this node matches exactly (its GPU and JetPack alone, without ``check_tensorrt``)."""
    classes = [get_device_class(key) for key in known_device_classes()]
    return [d for d in classes if mismatch_reason(d, local, check_tensorrt=check_tensorrt) is None]


def detect_device_class(local: Optional[LocalDevice] = None) -> DeviceClass:
    """The device class of this build node or device.

    Args:
        local: what the node has; detected when ``None``.

    Raises:
        DeviceError: no CUDA device, or the node matches no known device class.
    """
    if local is None:
        local = detect_local_device()
    if local is None:
        raise DeviceError(
            "no CUDA device on this node (no NVIDIA driver answered); build engines on a GPU node "
            "or on the device, or ship the Q/DQ ONNX and let devices build on first install"
        )
    hits = classes_for(local)
    if not hits:
        raise DeviceError(
            f"this node ({local.describe()}) matches no known device class; known: "
            f"{', '.join(known_device_classes())}; register one with an entry point in the group "
            f"{DEVICE_CLASSES.group!r}"
        )
    # The most specific key wins (a pinned JetPack/minor TensorRT before a bare major).
    return max(hits, key=lambda d: (len(d.tensorrt), d.jetpack or ""))
