"""What edgeslim's code touches on TensorRT, found by following types through the code, not variable names.

Starting from the module (``trt``, ``import tensorrt as trt``), a constructor (``trt.Builder(...)``) gives an
instance of that class, and a method call gives what the recorded pybind signature says it returns
(``create_network(...) -> tensorrt.INetworkDefinition``). Types flow through assignments (``c2 =
self.context``), attributes of ``self`` set anywhere in a class, the parameters of functions the scanned
code calls (``_attach_timing_cache(cfg, ...)``), nested functions, and subclasses of TensorRT classes (whose
methods are overrides TensorRT calls). Every attribute of a typed object is a use; every call of a typed
method records how many arguments it passes, for the signature check.

Used by tests/unit/test_trt_conformance.py.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections import defaultdict

_RETURNS = re.compile(r"->\s*(?:\w+(?:\.|::))*(\w+)\s*$")
# Return types pybind prints as the C++ class: the Python class it binds to.
_CPP = {"IParserError": "ParserError"}


@dataclasses.dataclass(frozen=True)
class Call:
    owner: str      # the TensorRT class
    member: str
    nargs: int      # positional and keyword arguments, ``self`` not counted
    where: str      # file:line


class TypeScan:
    """Scan functions and classes of Python sources against the TensorRT classes of some snapshots."""

    def __init__(self, snapshots: list[dict]):
        self.classes = set().union(*(s["classes"] for s in snapshots))
        self.enums = set().union(*(s["enums"] for s in snapshots))
        self.returns: dict[tuple[str, str], str] = {}
        for snap in snapshots:
            for key, sigs in snap["signatures"].items():
                owner, _, member = key.rpartition(".")
                for sig in sigs:
                    m = _RETURNS.search(sig)
                    cls = _CPP.get(m.group(1), m.group(1)) if m else None
                    if cls in self.classes:
                        self.returns[(owner, member)] = cls
        self.uses: set[tuple[str, str]] = set()
        self.calls: set[Call] = set()
        self.params: dict[str, dict[str, str]] = defaultdict(dict)   # function -> parameter -> type
        self.self_attrs: dict[str, dict[str, str]] = defaultdict(dict)  # class -> attribute -> type
        self.positions: dict[str, list[str]] = {}  # function or Class.method -> its parameters (no self)
        self._file = ""

    # --- entry ---------------------------------------------------------------------------------------------
    def scan(self, source: str, names: tuple[str, ...], filename: str) -> list[str]:
        """Scan the top-level functions and classes ``names`` of ``source``; returns the names found."""
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef):
                        self.positions[f"{node.name}.{item.name}"] = [a.arg for a in item.args.args[1:]]
            elif isinstance(node, ast.FunctionDef):
                self.positions.setdefault(node.name, [a.arg for a in node.args.args])
        found = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
        self._file = filename
        for _ in range(3):  # parameter and self-attribute types settle after a few passes
            for scope in found:
                if isinstance(scope, ast.ClassDef):
                    self._class(scope, {"trt": "trt"})
                else:
                    self._function(scope, {"trt": "trt"})
        return [n.name for n in found]

    # --- scopes --------------------------------------------------------------------------------------------
    def _class(self, cls: ast.ClassDef, outer: dict) -> None:
        bases = [self._type(b, outer) for b in cls.bases]
        trt_base = next((b[6:] for b in bases if b and b.startswith("class:")), None)
        for item in cls.body:
            if not isinstance(item, ast.FunctionDef):
                continue
            if trt_base and item.name != "__init__":  # an override: TensorRT calls it with these arguments
                self.calls.add(Call(trt_base, item.name, len(item.args.args) - 1, self._at(item)))
                self.uses.add((trt_base, item.name))
            env = dict(outer, self=f"self:{cls.name}")
            self._function(item, env, owner=cls.name)

    def _function(self, fn: ast.FunctionDef, outer: dict, owner: str | None = None) -> None:
        env = dict(outer)
        key = f"{owner}.{fn.name}" if owner else fn.name
        for arg in fn.args.args:
            if arg.arg in self.params[key]:
                env[arg.arg] = self.params[key][arg.arg]
        self._block(fn.body, env, owner)

    def _block(self, body: list, env: dict, owner: str | None) -> None:
        for stmt in body:
            self._stmt(stmt, env, owner)

    def _stmt(self, stmt, env: dict, owner: str | None) -> None:
        if isinstance(stmt, ast.FunctionDef):
            self._function(stmt, env)
            env[stmt.name] = f"func:{stmt.name}"
        elif isinstance(stmt, ast.ClassDef):
            self._class(stmt, env)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for alias in stmt.names:
                if alias.name == "tensorrt" or (isinstance(stmt, ast.ImportFrom) and stmt.module == "tensorrt"):
                    env[alias.asname or alias.name] = "trt"
        elif isinstance(stmt, ast.Assign):
            typ = self._type(stmt.value, env, owner)
            for target in stmt.targets:
                self._bind(target, typ, env, owner)
        elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
            typ = self._type(stmt.value, env, owner) if stmt.value is not None else None
            self._bind(stmt.target, typ if isinstance(stmt, ast.AnnAssign) else None, env, owner)
        elif isinstance(stmt, ast.With):
            for item in stmt.items:
                typ = self._type(item.context_expr, env, owner)
                if item.optional_vars is not None:
                    self._bind(item.optional_vars, typ, env, owner)
            self._block(stmt.body, env, owner)
        elif isinstance(stmt, ast.For):
            self._type(stmt.iter, env, owner)
            self._bind(stmt.target, None, env, owner)
            self._block(stmt.body + stmt.orelse, env, owner)
        elif isinstance(stmt, (ast.If, ast.While)):
            self._type(stmt.test, env, owner)
            self._block(stmt.body + stmt.orelse, env, owner)
        elif isinstance(stmt, ast.Try):
            self._block(stmt.body, env, owner)
            for handler in stmt.handlers:
                self._block(handler.body, env, owner)
            self._block(stmt.orelse + stmt.finalbody, env, owner)
        else:
            for child in ast.iter_child_nodes(stmt):
                if isinstance(child, ast.expr):
                    self._type(child, env, owner)

    def _bind(self, target, typ, env: dict, owner: str | None) -> None:
        if isinstance(target, ast.Name):
            env[target.id] = typ
        elif isinstance(target, ast.Attribute):
            holder = self._type(target.value, env, owner)
            if holder and holder.startswith("self:") and typ:
                self.self_attrs[holder[5:]][target.attr] = typ
            self._attribute(holder, target.attr)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self._bind(elt, None, env, owner)
        else:
            self._type(target, env, owner)

    # --- expressions ---------------------------------------------------------------------------------------
    def _attribute(self, holder, attr: str) -> str | None:
        """Record ``holder.attr`` where ``holder`` is typed; the attribute's own type where known."""
        if holder == "trt":
            self.uses.add(("tensorrt", attr))
            if attr in self.classes:
                return f"class:{attr}"
            return f"enum:{attr}" if attr in self.enums else None
        if holder and holder.startswith("class:"):
            cls = holder[6:]
            self.uses.add((cls, attr))
            return f"enum:{cls}.{attr}" if f"{cls}.{attr}" in self.enums else None
        if holder and holder.startswith("enum:"):
            self.uses.add((holder[5:], attr))
            return None
        if holder and holder.startswith("self:"):
            return self.self_attrs[holder[5:]].get(attr)
        if holder in self.classes:
            self.uses.add((holder, attr))
        return None

    def _type(self, node, env: dict, owner: str | None = None) -> str | None:
        if node is None:
            return None
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            return self._attribute(self._type(node.value, env, owner), node.attr)
        if isinstance(node, ast.Call):
            return self._call(node, env, owner)
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = dict(env)
            for gen in node.generators:
                self._type(gen.iter, inner, owner)
                self._bind(gen.target, None, inner, owner)
                for cond in gen.ifs:
                    self._type(cond, inner, owner)
            for part in ((node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,)):
                self._type(part, inner, owner)
            return None
        if isinstance(node, ast.IfExp):
            self._type(node.test, env, owner)
            return self._type(node.body, env, owner) or self._type(node.orelse, env, owner)
        if isinstance(node, ast.Lambda):
            self._type(node.body, dict(env), owner)
            return None
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self._type(child, env, owner)
        return None

    def _call(self, node: ast.Call, env: dict, owner: str | None) -> str | None:
        arg_types = [self._type(a, env, owner) for a in node.args]
        for kw in node.keywords:
            self._type(kw.value, env, owner)
        nargs = len(node.args) + len(node.keywords)
        starred = any(isinstance(a, ast.Starred) for a in node.args) or any(kw.arg is None for kw in node.keywords)
        func = node.func
        if isinstance(func, ast.Name):
            if func.id == "str" and len(node.args) == 1 and arg_types[0] in self.classes:
                self.uses.add((arg_types[0], "__str__"))
                self.calls.add(Call(arg_types[0], "__str__", 0, self._at(node)))
            elif func.id == "enum_member" and len(node.args) == 3 and all(
                    isinstance(a, ast.Constant) for a in node.args[1:]):
                self.uses.add((node.args[1].value, node.args[2].value))
            self._bind_params(func.id, arg_types)
            return None
        holder = self._type(func.value, env, owner) if isinstance(func, ast.Attribute) else self._type(func, env, owner)
        if not isinstance(func, ast.Attribute):
            return None
        if holder and holder.startswith("self:"):
            self._bind_params(f"{holder[5:]}.{func.attr}", arg_types)
            return None
        typ = self._attribute(holder, func.attr)
        if holder == "trt" and typ and typ.startswith("class:"):  # a constructor
            cls = typ[6:]
            self.uses.add((cls, "__init__"))
            if not starred:
                self.calls.add(Call(cls, "__init__", nargs, self._at(node)))
            return cls
        if holder and holder.startswith("class:") and func.attr == "__init__":  # Base.__init__(self, ...)
            if not starred:
                self.calls.add(Call(holder[6:], "__init__", nargs - 1, self._at(node)))
            return None
        if holder in self.classes:
            if not starred:
                self.calls.add(Call(holder, func.attr, nargs, self._at(node)))
            return self.returns.get((holder, func.attr))
        return None

    def _bind_params(self, name: str, arg_types: list) -> None:
        """Remember the types a call passes to a function or method of the scanned code, by parameter."""
        for i, typ in enumerate(arg_types):
            if typ and i < len(self.positions.get(name, ())):
                self.params[name][self.positions[name][i]] = typ

    def _at(self, node) -> str:
        return f"{self._file}:{getattr(node, 'lineno', '?')}"
