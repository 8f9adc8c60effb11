"""Config dataclasses that validate themselves and round-trip through JSON.

Every stage method has its own small dataclass (``<Method><Stage>Config``).
``from_dict`` is strict: an unknown key, a wrong type or an impossible value
raises ``ConfigError`` with the dotted key and the fix, before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar, Literal

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.registry import Registry

# Every stage method's config class, as "<stage>.<method>" (e.g. ``quantize.ptq``) in the entry-point
# group ``edgeslim.stages``: the built-ins' are in edgeslim's own pyproject.toml.
STAGES: Registry[type["StageConfig"]] = Registry("edgeslim.stages", "stage config")
# The layout of a config as ``to_json_dict`` writes it; ``from_dict`` refuses a newer one in one line
# rather than misreading it.
CONFIG_VERSION = 1


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"{key}: got {value!r}; expected one of {', '.join(map(repr, allowed))}{hint}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is not None and type(None) in args and len(args) == 2:
            # Optional[X] with a value: X's own error names the key and the fix.
            return _coerce(value, next(a for a in args if a is not type(None)), key)
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: got {value!r}; expected null")
        return None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping of {tp.__name__} fields")
        return tp.from_dict(value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: got {value!r}; expected true or false")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: got {value!r}; expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: got {value!r}; expected a whole number")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: got {value!r}; expected a string")
        return value
    return value


def unknown_key_error(key: str, known: typing.Iterable[str], where: str) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return ConfigError(f"{where}{key}: unknown key; {hint}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of all config dataclasses: strict ``from_dict``, JSON round-trip."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ConfigError`` for impossible values. Subclasses extend."""

    def require(self, ok: bool, field: str, fix: str, *, section: str = "") -> None:
        """Refuse the value of ``field`` unless ``ok``: one line, ``SECTION.FIELD: got VALUE; FIX``."""
        if not ok:
            raise ConfigError(f"{section + '.' if section else ''}{field}: got {getattr(self, field)}; {fix}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, prefix: str = "") -> "Config":
        data = dict(data or {})
        data.pop("type", None)
        where = f"{prefix}." if prefix else ""
        version = data.pop("version", CONFIG_VERSION)
        if type(version) is not int or version < 1:
            raise ConfigError(f"{where}version: got {version!r}; a config version is a whole number from 1 "
                              f"(this edgeslim writes {CONFIG_VERSION})")
        if version > CONFIG_VERSION:
            raise ConfigError(f"{where}version: got {version}; this edgeslim reads config versions up to "
                              f"{CONFIG_VERSION}: upgrade edgeslim to read it")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in data.items():
            if key not in fields:
                raise unknown_key_error(key, fields, where)
            kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
        missing = [
            n
            for n, f in fields.items()
            if n not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
        ]
        if missing:
            raise ConfigError(f"{where}{missing[0]}: required key is missing; add it")
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            msg = str(exc)
            if prefix and not msg.startswith(prefix):
                # validate() names keys from its own section ("quantize.num_samples"): keep one copy.
                last = prefix.rsplit(".", 1)[-1]
                if msg.startswith(last + "."):
                    msg = msg[len(last) + 1:]
                raise ConfigError(f"{where}{msg}") from None
            raise

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Config) else v
        return out

    def to_json_dict(self) -> dict[str, Any]:
        """The dict with ``type`` and ``version``, as stored in MLflow and reports."""
        return {"type": type(self).__name__, "version": CONFIG_VERSION, **self.to_dict()}


@dataclasses.dataclass(frozen=True)
class StageConfig(Config):
    """A stage's config. Subclasses set ``stage`` and ``method`` and are registered in :data:`STAGES`
    as ``"<stage>.<method>"``; the one whose class body sets ``is_default = True`` (not inherited) is the
    method a recipe gets when its stage names none (a stage with a single method needs none)."""

    stage: ClassVar[str] = ""
    method: ClassVar[str] = ""
    is_default: ClassVar[bool] = False

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, prefix: str = "") -> "Config":
        data = dict(data or {})
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(
                f"{prefix or cls.stage}.method: got {method!r}; {cls.__name__} is method {cls.method!r}")
        return super().from_dict(data, prefix)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **super().to_dict()}


def stage_config_class(stage: str, method: str | None, where: str) -> type[StageConfig]:
    """The config class registered for ``stage`` and ``method`` (``None``: the stage's default method).

    Raises:
        ConfigError: an unknown stage or method (one line with the closest name), or a registered class
            that is not that stage method's config.
    """
    methods = {n.partition(".")[2]: n for n in STAGES.names() if n.partition(".")[0] == stage}
    if not methods:
        stages = sorted({n.partition(".")[0] for n in STAGES.names()})
        raise unknown_key_error(stage, stages, where)
    if method is None:
        method = _default_method(stage, methods, where)
    if method not in methods:
        close = difflib.get_close_matches(method, list(methods), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(methods))}"
        raise ConfigError(f"{where}{stage}.method: unknown method {method!r}; {hint}")
    cls = STAGES.get(methods[method])
    if not (isinstance(cls, type) and issubclass(cls, StageConfig) and (cls.stage, cls.method) == (stage, method)):
        raise ConfigError(f"{where}{stage}.method: the entry point {methods[method]!r} of {STAGES.group!r} is "
                          f"not a StageConfig with stage {stage!r} and method {method!r}; fix its target")
    return cls


def _default_method(stage: str, methods: dict[str, str], where: str) -> str:
    """The method of ``stage`` whose config class sets ``is_default = True`` itself, or its only method."""
    if len(methods) == 1:
        return next(iter(methods))
    defaults = [m for m, name in methods.items() if vars(STAGES.get(name)).get("is_default", False)]
    if len(defaults) != 1:
        raise ConfigError(f"{where}{stage}.method: missing, and the stage has "
                          f"{'no' if not defaults else 'more than one'} default method; "
                          f"name one of {', '.join(sorted(methods))}")
    return defaults[0]
