"""Device-class registry, matching a node to a class, and the refusals.

The nodes here are described by ``LocalDevice`` values (what
``detect_local_device`` reads from the driver on a real node): this machine
has no GPU, so an Orin or an L4 is spelled out, not detected.
"""

from __future__ import annotations

import pytest

from edgeslim.components.engine import cuda, devices
from edgeslim.components.common.errors import DeviceError
from edgeslim.components.common.registry import Registry
from edgeslim.components.engine.devices import (DeviceClass, LocalDevice, detect_device_class, get_device_class,
                                         known_device_classes, match_device_class, parse_l4t_release)
from tests.entry_points import install_entry_points

ORIN_JP61 = LocalDevice("Orin", (8, 7), "12.6", "10.3.0.30", jetpack="6.1", l4t="36.4.0")
XAVIER = LocalDevice("Xavier", (7, 2), "11.4", "8.5.2.2", jetpack="5.1.2", l4t="35.4.1")
L4_TRT10 = LocalDevice("NVIDIA L4", (8, 9), "12.8", "10.13.0.35")
H100_TRT11 = LocalDevice("NVIDIA H100 80GB HBM3", (9, 0), "13.0", "11.1.0.5")


def test_registry_has_orin_xavier_and_datacenter_classes_with_exact_keys():
    keys = known_device_classes()
    assert "orin-sm87-jp6.1-trt10.3" in keys
    assert "xavier-sm72-jp5.1-trt8.5" in keys
    orin = get_device_class("orin-sm87-jp6.1-trt10.3")
    assert (orin.compute_capability, orin.jetpack, orin.tensorrt) == ((8, 7), "6.1", "10.3")
    xavier = get_device_class("xavier-sm72-jp5.1-trt8.5")
    assert (xavier.compute_capability, xavier.jetpack, xavier.tensorrt) == ((7, 2), "5.1", "8.5")
    dc = [get_device_class(k) for k in keys if get_device_class(k).family == "datacenter"]
    assert {d.compute_capability for d in dc} >= {(8, 9), (9, 0)}
    assert {d.tensorrt_major for d in dc} >= {10, 11}


@pytest.mark.parametrize("local, expected", [
    (ORIN_JP61, "orin-sm87-jp6.1-trt10.3"),
    (XAVIER, "xavier-sm72-jp5.1-trt8.5"),
    (L4_TRT10, "ada-sm89-trt10"),
    (H100_TRT11, "hopper-sm90-trt11"),
])
def test_detect_device_class_picks_the_class_of_the_node(local, expected):
    assert detect_device_class(local).key == expected


def test_detect_device_class_tells_jetpack_62_from_61():
    jp62 = LocalDevice("Orin", (8, 7), "12.6", "10.3.0.30", jetpack="6.2", l4t="36.4.3")
    assert detect_device_class(jp62).key == "orin-sm87-jp6.2-trt10.3"


def test_unknown_node_lists_known_classes():
    turing = LocalDevice("Tesla T4", (7, 5), "12.2", "10.3.0")
    with pytest.raises(DeviceError) as exc:
        detect_device_class(turing)
    msg = str(exc.value)
    assert "Tesla T4 (sm75)" in msg and "orin-sm87-jp6.1-trt10.3" in msg and "\n" not in msg


def test_no_cuda_device_is_refused_plainly(monkeypatch):
    monkeypatch.setattr(cuda, "load_libcuda", lambda: None)  # this machine has no driver either way
    assert devices.detect_local_device() is None
    with pytest.raises(DeviceError, match="no CUDA device"):
        detect_device_class()


def test_unknown_class_key_lists_the_known_ones_and_a_close_match():
    with pytest.raises(DeviceError) as exc:
        get_device_class("orin-sm87-jp6.1-trt10")
    msg = str(exc.value)
    assert "unknown device class 'orin-sm87-jp6.1-trt10'" in msg
    assert "did you mean 'orin-sm87-jp6.1-trt10.3'" in msg
    for key in known_device_classes():
        assert key in msg


def test_architecture_mismatch_with_the_build_node_is_refused():
    with pytest.raises(DeviceError) as exc:
        match_device_class("orin-sm87-jp6.1-trt10.3", L4_TRT10)
    msg = str(exc.value)
    assert "compute capability 8.7" in msg and "8.9 (NVIDIA L4)" in msg and "node selector" in msg


def test_tensorrt_and_jetpack_mismatches_are_refused():
    old_trt = LocalDevice("Orin", (8, 7), "12.2", "8.6.2.3", jetpack="6.0", l4t="36.3.0")
    with pytest.raises(DeviceError, match="needs JetPack 6.1; this node has JetPack 6.0"):
        match_device_class("orin-sm87-jp6.1-trt10.3", old_trt)
    with pytest.raises(DeviceError, match="needs TensorRT 11; this node has TensorRT 10.13.0.35"):
        match_device_class("hopper-sm90-trt11", LocalDevice("NVIDIA H100", (9, 0), "12.8", "10.13.0.35"))


def test_hardware_compatible_build_may_target_another_ampere_plus_datacenter_gpu():
    with pytest.raises(DeviceError):
        match_device_class("hopper-sm90-trt10", L4_TRT10)
    dc = match_device_class("hopper-sm90-trt10", L4_TRT10, hardware_compatibility="ampere_plus")
    assert dc.key == "hopper-sm90-trt10"
    with pytest.raises(DeviceError):  # never for Jetson: TensorRT has no hardware compatibility there
        match_device_class("orin-sm87-jp6.1-trt10.3", L4_TRT10, hardware_compatibility="ampere_plus")


def test_tensorrt_prefix_matching():
    orin = get_device_class("orin-sm87-jp6.1-trt10.3")
    assert orin.tensorrt_matches("10.3.0.30")
    assert not orin.tensorrt_matches("10.13.0")  # 10.13 is not 10.3
    assert get_device_class("ada-sm89-trt10").tensorrt_matches("10.13.0")


def test_l4t_release_and_jetpack_parsing():
    text = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13"
    assert parse_l4t_release(text) == "36.4.0"
    assert devices.jetpack_for_l4t("36.4.0") == "6.1"
    assert devices.jetpack_for_l4t("36.4.3") == "6.2"
    assert devices.jetpack_for_l4t("35.4.1") == "5.1.2"
    assert parse_l4t_release("not a tegra file") is None


@pytest.fixture
def fresh_registry(monkeypatch):
    """The device classes as a fresh registry for one test: what it registers, or installs, goes with it."""
    registry = Registry(devices.DEVICE_CLASSES.group, "device class", error=DeviceError)
    monkeypatch.setattr(devices, "DEVICE_CLASSES", registry)
    return registry


def test_registering_a_custom_class_makes_it_matchable(fresh_registry):
    board = DeviceClass("thor-sm110-trt10.13", "jetson", "Thor", (11, 0), "10.13", "7.0", "13.0", 0)
    devices.register_device_class(board)
    thor = LocalDevice("Thor", (11, 0), "13.0", "10.13.2", jetpack="7.0", l4t="38.2.0")
    assert detect_device_class(thor).key == "thor-sm110-trt10.13"
    with pytest.raises(DeviceError, match="lower-case"):
        devices.register_device_class(DeviceClass("Bad Key", "jetson", "x", (1, 0), "1"))
    with pytest.raises(DeviceError, match="'ada-sm89-trt10' is already registered"):
        devices.register_device_class(DeviceClass("ada-sm89-trt10", "datacenter", "Ada", (8, 9), "10.3"))


LAB_BOARDS = """
from edgeslim.components.engine.devices import DeviceClass

LAB_ORIN = DeviceClass("lab-orin-sm87-jp6.1-trt10.3", "jetson", "Orin (Ampere)", (8, 7), "10.3", "6.1", "12.6", 2,
                       {"lab.example/board": "orin-7"}, "the lab's Orin carrier board")
MISNAMED = LAB_ORIN
NOT_A_CLASS = {"key": "lab-dict-trt10"}
"""


def test_a_device_class_from_another_packages_entry_point_is_found(tmp_path, monkeypatch, fresh_registry):
    install_entry_points(tmp_path, monkeypatch, {devices.DEVICE_CLASSES.group: {
        "lab-orin-sm87-jp6.1-trt10.3": "lab_boards:LAB_ORIN", "lab-misnamed-trt10.3": "lab_boards:MISNAMED",
        "lab-dict-trt10": "lab_boards:NOT_A_CLASS", "Lab-Orin": "lab_boards:LAB_ORIN"}},
        modules={"lab_boards.py": LAB_BOARDS})
    assert "lab-orin-sm87-jp6.1-trt10.3" in known_device_classes()
    assert "ada-sm89-trt10" in known_device_classes()  # the built-in ones, through edgeslim's own entry points
    board = get_device_class("lab-orin-sm87-jp6.1-trt10.3")
    assert (board.description, board.node_selector) == ("the lab's Orin carrier board", {"lab.example/board": "orin-7"})
    lab = LocalDevice("Orin", (8, 7), "12.6", "10.3.0.30", jetpack="6.1", l4t="36.4.0")
    assert match_device_class("lab-orin-sm87-jp6.1-trt10.3", lab) is board
    with pytest.raises(DeviceError) as exc:
        get_device_class("lab-orin-sm87-jp6.1-trt10")
    assert "did you mean 'lab-orin-sm87-jp6.1-trt10.3'" in str(exc.value)
    for key, why in (("lab-misnamed-trt10.3", "not a DeviceClass with the key 'lab-misnamed-trt10.3'"),
                     ("lab-dict-trt10", "names {'key': 'lab-dict-trt10'}, not a DeviceClass"),
                     ("Lab-Orin", "use lower-case letters")):
        with pytest.raises(DeviceError, match=why) as exc:
            get_device_class(key)
        assert "\n" not in str(exc.value)
