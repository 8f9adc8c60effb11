"""``edgeslim engine ...``: device classes, and building/checking engines by hand.

Imports no torch, mlflow or kfp, so it is cheap on a Jetson too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.common.errors import ConfigError


def _load_config(path: str | None) -> TensorRTEngineConfig | None:
    """A YAML/JSON file holding the ``engines:`` section (or a whole recipe with one)."""
    if not path:
        return None
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file; give a YAML file with an 'engines:' section")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        raise ConfigError(f"--config {p}: not valid YAML; fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p}: expected a mapping with an 'engines:' section")
    return TensorRTEngineConfig.from_dict(data.get("engines", data), prefix="engines")


def _cmd_classes(args: argparse.Namespace) -> int:
    from edgeslim.components.engine.devices import get_device_class, known_device_classes

    for key in known_device_classes():
        dc = get_device_class(key)
        print(f"{key:28s} {dc.description}")
    return 0


def _cmd_detect(args: argparse.Namespace) -> int:
    """This node's device class and where its TensorRT comes from (the pip extra, or JetPack)."""
    from edgeslim.components.common.errors import DeviceError
    from edgeslim.components.engine.devices import (classes_for, detect_device_class, detect_local_device,
                                                    tensorrt_install_hint)

    local = detect_local_device()
    if local is None or classes_for(local):
        dc = detect_device_class(local)  # no CUDA device: its one-line error
        candidates = classes_for(local) if local.tensorrt is None else [dc]
        if len(candidates) == 1:
            print(f"{local.describe()}: device class {dc.key}")
        else:  # no TensorRT yet: the one installed decides between the classes of this GPU
            print(f"{local.describe()}: device class {' or '.join(d.key for d in candidates)}, "
                  "by the TensorRT you install")
        for d in candidates:
            have = f"installed ({local.tensorrt}); " if local.tensorrt else ""
            print(f"  TensorRT for {d.key}: {have}{tensorrt_install_hint(d)}")
        return 0
    same_gpu = classes_for(local, check_tensorrt=False)
    if not same_gpu:
        detect_device_class(local)  # matches no class at all: its one-line error
    raise DeviceError(f"this node ({local.describe()}) has the GPU of "
                      f"{', '.join(d.key for d in same_gpu)} but not its TensorRT: "
                      + "; ".join(f"{d.key} needs TensorRT {d.tensorrt_label} ({tensorrt_install_hint(d)})"
                                  for d in same_gpu))


def _cmd_plan(args: argparse.Namespace) -> int:
    from edgeslim.components.engine.builder import plan_build

    from edgeslim.components.engine.devices import releases_label

    plan = plan_build(args.onnx, args.device_class, _load_config(args.config))
    print(json.dumps({"device_class": plan.device_class.key, "qdq_nodes": plan.onnx.qdq_nodes,
                      "precision": plan.config.precision, "profiles": plan.profiles, "opset": plan.onnx.opset,
                      "build_node_tensorrt": releases_label(plan.tensorrt_versions)}, indent=2))
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from edgeslim.components.engine.builder import build_engine

    built = build_engine(args.onnx, args.out, args.device_class, _load_config(args.config),
                         cache_dir=args.cache_dir, timing_cache=args.timing_cache)
    m = built.metadata
    print(f"{'cached' if built.cached else 'built'} {built.engine_path} for {m['device_class']} "
          f"(TensorRT {m['tensorrt']}, sm{m['compute_capability'].replace('.', '')}, sha256 {m['sha256'][:12]})")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from edgeslim.components.engine.devices import detect_local_device
    from edgeslim.components.engine.builder import check_engine_compatible, read_metadata
    from edgeslim.components.engine.tensorrt_calls import import_tensorrt

    meta = read_metadata(args.engine)
    trt = import_tensorrt("checking an engine against this TensorRT", meta.get("device_class"))
    check_engine_compatible(meta, str(trt.__version__), detect_local_device())
    print(f"{args.engine}: engine for {meta['device_class']} runs here (TensorRT {trt.__version__})")
    return 0


def register(subparsers) -> None:
    """Add ``edgeslim engine`` and its subcommands."""
    p = subparsers.add_parser("engine", help="TensorRT engines and device classes")
    sub = p.add_subparsers(dest="engine_command", metavar="SUBCOMMAND",
                           help="what to do (`edgeslim engine SUBCOMMAND --help` shows its options)")
    sub.required = True
    sub.add_parser("classes", help="list the known device classes").set_defaults(func=_cmd_classes)
    sub.add_parser("detect", help="this node's GPU, device class and the TensorRT extra it needs"
                   ).set_defaults(func=_cmd_detect)

    def common(q):
        q.add_argument("onnx", help="the Q/DQ ONNX")
        q.add_argument("--device-class", required=True, help="an exact device-class key")
        q.add_argument("--config", help="YAML with an 'engines:' section (a recipe works too)")

    q = sub.add_parser("plan", help="check a build without a GPU: class, Q/DQ, profiles")
    common(q)
    q.set_defaults(func=_cmd_plan)
    q = sub.add_parser("build", help="build the engine on this GPU node")
    common(q)
    q.add_argument("--out", required=True, help="folder for model.engine and metadata.json")
    q.add_argument("--cache-dir", help="engine cache keyed by (TensorRT version, compute capability)")
    q.add_argument("--timing-cache", help="a timing cache from an earlier build of this class")
    q.set_defaults(func=_cmd_build)
    q = sub.add_parser("check", help="can this TensorRT/GPU run an engine?")
    q.add_argument("engine", help="an engine folder (model.engine + metadata.json) or model.engine")
    q.set_defaults(func=_cmd_check)
