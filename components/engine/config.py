"""Settings of the TensorRT engine builds: the recipe's top-level ``engines:`` section.

Kept apart from the builder so that a recipe validates without TensorRT,
torch or onnxruntime installed.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from edgeslim.components.common.config import Config
from edgeslim.components.common.errors import ConfigError, DeviceError

HardwareCompatibility = Literal["none", "ampere_plus", "same_compute_capability"]


@dataclasses.dataclass(frozen=True)
class ShapeProfileConfig(Config):
    """The shapes one dynamic input is optimized for (TensorRT optimization profile).

    Attributes:
        input: the ONNX input name.
        min: smallest shape the engine accepts, one entry per dimension.
        opt: the shape TensorRT tunes kernels for.
        max: largest shape the engine accepts.
    """

    input: str
    min: list[int]
    opt: list[int]
    max: list[int]

    def validate(self) -> None:
        where = f"input {self.input!r}"
        if not (len(self.min) == len(self.opt) == len(self.max)) or not self.min:
            raise ConfigError(
                f"{where}: min {self.min}, opt {self.opt}, max {self.max} must have the same, non-zero "
                "number of dimensions (one per input dimension)"
            )
        for axis, (lo, mid, hi) in enumerate(zip(self.min, self.opt, self.max)):
            if lo < 1:
                raise ConfigError(f"{where}: dimension {axis} has min {lo}; use 1 or more")
            if not lo <= mid <= hi:
                raise ConfigError(
                    f"{where}: dimension {axis} has min {lo}, opt {mid}, max {hi}; "
                    "it needs min <= opt <= max"
                )


@dataclasses.dataclass(frozen=True)
class EngineVerifyConfig(Config):
    """The gate an engine passes on its build node, against the Q/DQ ONNX under ONNX Runtime.

    Attributes:
        min_top1_agreement: smallest agreement with the Q/DQ ONNX, as the model's task measures it: the
            share of evaluation samples whose top-1 matches for a classifier, the share of the Q/DQ
            ONNX's detections the engine also makes for a detector.
        min_sqnr_db: smallest signal-to-noise ratio of the engine's outputs against the Q/DQ ONNX's, in
            dB (the worst output's).
        max_metric_drop: largest drop of the task metric (top-1, mAP@0.5) against the Q/DQ ONNX, in points.
        samples: evaluation samples from the test split (0: all of it).
    """

    min_top1_agreement: float = 0.99
    min_sqnr_db: float = 20.0
    max_metric_drop: float = 1.0
    samples: int = 0

    def validate(self) -> None:
        where = "engines.verify"
        self.require(0.0 <= self.min_top1_agreement <= 1.0, "min_top1_agreement", "use a share in [0, 1]",
                     section=where)
        self.require(self.max_metric_drop >= 0, "max_metric_drop", "use 0 or more points", section=where)
        self.require(self.samples >= 0, "samples", "use 0 (all) or more", section=where)


@dataclasses.dataclass(frozen=True)
class TensorRTEngineConfig(Config):
    """How TensorRT engines are built, per device class, from the Q/DQ ONNX.

    Attributes:
        device_classes: exact device-class keys to build for (``edgeslim engine classes`` lists
            them); empty: none.
        precision: ``int8`` needs a Q/DQ ONNX (explicit quantization); ``fp16``
            only on TensorRT 8/10 (11 has no precision flags); ``fp32``.
        min_batch: smallest batch of the default profile (dynamic batch axis only).
        opt_batch: batch the default profile tunes for.
        max_batch: largest batch of the default profile.
        profiles: explicit optimization profiles, one per dynamic input; they
            override the default batch profile for that input.
        workspace_mib: TensorRT workspace memory pool limit.
        dla_core: run on this DLA core (Jetson) instead of the GPU; ``None``: GPU.
        gpu_fallback: with a DLA core, let layers DLA cannot run fall back to the GPU.
        version_compatible: build engines later TensorRT versions of the same
            major can run (8.6 or newer; slower).
        strongly_typed: build a strongly typed network (types from the ONNX, no
            precision flags; TensorRT 10 or newer); ``None``: TensorRT 11 yes, before it no.
        hardware_compatibility: ``ampere_plus`` or ``same_compute_capability``
            engines run on other GPUs (datacenter only; not on JetPack).
        timing_cache: keep the builder's timing cache and reuse it for the next
            build of the same device class.
        min_tensorrt: per device class, the oldest TensorRT release (``10.9``) its build
            nodes may have, for a setting only newer releases of the class's range can
            build; the class's build nodes must then have that release or newer.
        node_selectors: per device class, the Kubernetes node labels of its
            build nodes; a class not listed uses its registry default.
        images: per device class, the image of its engine task; a class not listed uses
            the image of its platform (``edgeslim compile --help`` names them).
        tolerations: the Kubernetes tolerations of every engine task, so that it can run on
            tainted GPU nodes (each a mapping with ``key`` and optionally ``operator``,
            ``value``, ``effect``).
        accelerator_type: the accelerator an engine task requests.
        accelerator_limit: how many of them.
        verify: the gate an engine passes right after its build.
    """

    device_classes: list[str] = dataclasses.field(default_factory=list)
    precision: Literal["int8", "fp16", "fp32"] = "int8"
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    profiles: list[ShapeProfileConfig] = dataclasses.field(default_factory=list)
    workspace_mib: int = 1024
    dla_core: Optional[int] = None
    gpu_fallback: bool = True
    version_compatible: bool = False
    strongly_typed: Optional[bool] = None
    hardware_compatibility: HardwareCompatibility = "none"
    timing_cache: bool = True
    min_tensorrt: dict = dataclasses.field(default_factory=dict)
    node_selectors: dict = dataclasses.field(default_factory=dict)
    images: dict = dataclasses.field(default_factory=dict)
    tolerations: list[dict] = dataclasses.field(
        default_factory=lambda: [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1
    verify: EngineVerifyConfig = dataclasses.field(default_factory=EngineVerifyConfig)

    def validate(self) -> None:
        from edgeslim.components.engine.devices import get_device_class

        seen = set()
        for key in self.device_classes:
            try:
                dc = get_device_class(key)
            except DeviceError as exc:
                raise ConfigError(f"engines.device_classes: {exc}") from None
            if key in seen:
                raise ConfigError(f"engines.device_classes: {key!r} is listed twice; keep one")
            seen.add(key)
            if self.dla_core is not None and self.dla_core >= dc.dla_cores:
                raise ConfigError(
                    f"engines.dla_core: {self.dla_core}, but device class {key} has "
                    f"{dc.dla_cores} DLA core(s); use 0..{dc.dla_cores - 1} or null for the GPU"
                    if dc.dla_cores else
                    f"engines.dla_core: device class {key} has no DLA; set dla_core: null"
                )
            if self.hardware_compatibility != "none" and dc.is_jetson:
                raise ConfigError(
                    f"engines.hardware_compatibility: TensorRT does not support it on JetPack "
                    f"(device class {key}); set hardware_compatibility: none"
                )
            self._check_features(dc)
        self._validate_per_class()
        if self.precision == "fp16" and self.strongly_typed:
            raise ConfigError("engines.precision: fp16 is a builder flag, and a strongly typed network takes "
                              "none (it runs in the ONNX's own types); use int8 with the Q/DQ ONNX, or fp32")
        if self.dla_core is not None and self.dla_core < 0:
            raise ConfigError(f"engines.dla_core: got {self.dla_core}; use 0 or more, or null for the GPU")
        if self.min_batch < 1 or not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ConfigError(
                f"engines: min_batch {self.min_batch}, opt_batch {self.opt_batch}, max_batch "
                f"{self.max_batch}; they need 1 <= min_batch <= opt_batch <= max_batch"
            )
        names = [p.input for p in self.profiles]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"engines.profiles: input {sorted(dup)[0]!r} has two profiles; keep one")
        if self.workspace_mib < 16:
            raise ConfigError(f"engines.workspace_mib: got {self.workspace_mib}; use 16 or more (default 1024)")
        if self.accelerator_limit < 1:
            raise ConfigError(f"engines.accelerator_limit: got {self.accelerator_limit}; use 1 or more")
        for key, selector in self.node_selectors.items():
            if key not in self.device_classes:
                raise ConfigError(
                    f"engines.node_selectors: {key!r} is not in engines.device_classes "
                    f"({', '.join(self.device_classes) or 'empty'}); add it there or remove the selector"
                )
            if not isinstance(selector, dict) or not selector or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in selector.items()
            ):
                raise ConfigError(
                    f"engines.node_selectors.{key}: got {selector!r}; use a mapping of label to value, "
                    "e.g. {nvidia.com/gpu.product: NVIDIA-L4}"
                )

    def _validate_per_class(self) -> None:
        """``min_tensorrt``, ``images`` and ``tolerations``: shapes and keys."""
        from edgeslim.components.engine.devices import get_device_class, releases_label, version_tuple

        for section in ("min_tensorrt", "images"):
            for key, value in getattr(self, section).items():
                if key not in self.device_classes:
                    raise ConfigError(f"engines.{section}: {key!r} is not in engines.device_classes "
                                      f"({', '.join(self.device_classes) or 'empty'}); add it there or remove it")
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(f"engines.{section}.{key}: got {value!r}; use a string, e.g. "
                                      + ("'10.9'" if section == "min_tensorrt" else "'registry.example/edgeslim:tag'"))
        for key, version in self.min_tensorrt.items():
            admitted = get_device_class(key).tensorrt_versions()
            if not version_tuple(version) or not self.tensorrt_versions_for(key):
                raise ConfigError(f"engines.min_tensorrt.{key}: got {version!r}; device class {key} admits TensorRT "
                                  f"{releases_label(admitted)}: use one of those releases, e.g. {admitted[-1]!r}")
        for i, tol in enumerate(self.tolerations):
            if not (isinstance(tol, dict) and isinstance(tol.get("key", ""), str)
                    and set(tol) <= {"key", "operator", "value", "effect"}
                    and tol.get("operator", "Equal") in ("Equal", "Exists")
                    and tol.get("effect", "") in ("", "NoSchedule", "PreferNoSchedule", "NoExecute")):
                raise ConfigError(f"engines.tolerations[{i}]: got {tol!r}; use a mapping like {{key: nvidia.com/gpu, "
                                  "operator: Exists, effect: NoSchedule} (operator Equal or Exists; effect "
                                  "NoSchedule, PreferNoSchedule or NoExecute)")

    def tensorrt_versions_for(self, device_class: str) -> tuple[str, ...]:
        """The TensorRT releases a build node of ``device_class`` may have, with ``min_tensorrt`` applied."""
        from edgeslim.components.engine.devices import get_device_class

        return get_device_class(device_class).tensorrt_versions(self.min_tensorrt.get(device_class))

    def _check_features(self, dc) -> None:
        """Refuse, in one line, a setting that some TensorRT release the class admits cannot build."""
        from edgeslim.components.engine.devices import releases_label

        versions = self.tensorrt_versions_for(dc.key)
        for feature in self.tensorrt_features():
            lacking = feature.lacking_in(dc, self.min_tensorrt.get(dc.key))
            if not lacking:
                continue
            if lacking == versions:
                has = releases_label(versions) if dc.key in self.min_tensorrt else dc.tensorrt_label
                raise ConfigError(feature.refusal(f"device class {dc.key} has TensorRT {has}"))
            able = [v for v in versions if v not in lacking]
            raise ConfigError(feature.refusal(
                f"device class {dc.key} admits TensorRT {releases_label(versions)}, and a build node with "
                f"{releases_label(lacking)} cannot build it: build it only on nodes with {releases_label(able)} "
                f"(engines.min_tensorrt: {{{dc.key}: '{able[0]}'}}, and node selectors for those nodes), "
                f"or drop the setting"))

    def to_dict(self) -> dict:
        # The base class leaves configs inside lists as objects; JSON wants mappings.
        out = super().to_dict()
        out["profiles"] = [p.to_dict() for p in self.profiles]
        out["node_selectors"] = {k: dict(v) for k, v in self.node_selectors.items()}
        out["tolerations"] = [dict(t) for t in self.tolerations]
        # Written only when set, so that a recipe without them keeps its digest.
        for key in ("min_tensorrt", "images", "tolerations"):
            if out[key] == getattr(type(self)(), key):
                del out[key]
        return out

    def tensorrt_features(self) -> list:
        """The ``TensorRTFeature`` of every setting here that only some TensorRT versions have."""
        from edgeslim.components.engine.devices import TENSORRT_FEATURES as features

        out = []
        if self.hardware_compatibility != "none":
            out.append(features[f"hardware_compatibility.{self.hardware_compatibility}"])
        if self.version_compatible:
            out.append(features["version_compatible"])
        if self.strongly_typed is not None:
            out.append(features["strongly_typed" if self.strongly_typed else "weakly_typed"])
        if self.precision == "fp16" and not self.strongly_typed:
            out.append(features["fp16_flag"])
        if self.dla_core is not None:
            out.append(features["dla"])
        return out

    def tensorrt_version_problem(self, version: str, device_class: Optional[str] = None) -> Optional[str]:
        """Why TensorRT ``version`` cannot build these settings (for ``device_class``), in one line; ``None`` if it can."""
        from edgeslim.components.engine.devices import version_tuple

        for feature in self.tensorrt_features():
            if not feature.supported_by(version):
                return feature.refusal(f"this node has TensorRT {version}")
        least = self.min_tensorrt.get(device_class or "")
        if least and version_tuple(version) < version_tuple(least):
            return (f"engines.min_tensorrt: {device_class} builds on TensorRT {least} or newer; this node has "
                    f"TensorRT {version}: run the build on a node with a newer TensorRT")
        return None

    def strongly_typed_for(self, tensorrt_version: str) -> bool:
        """Whether the network is strongly typed on this TensorRT (always from 11 on)."""
        major = int(str(tensorrt_version).split(".")[0])
        return major >= 11 if self.strongly_typed is None else self.strongly_typed

    def node_selector_for(self, device_class: str) -> dict[str, str]:
        """The node labels of build nodes for ``device_class`` (recipe, else registry default)."""
        from edgeslim.components.engine.devices import get_device_class

        if device_class in self.node_selectors:
            return dict(self.node_selectors[device_class])
        return dict(get_device_class(device_class).node_selector)

    def profile_for(self, input_name: str) -> Optional[ShapeProfileConfig]:
        for p in self.profiles:
            if p.input == input_name:
                return p
        return None
