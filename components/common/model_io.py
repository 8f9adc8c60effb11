"""Saving and loading torch modules whole, with the code their classes come from.

A module pickled by ``torch.save`` names its classes (``my_models.Classifier``); it loads
back only where ``my_models`` can be imported. Models logged with MLflow's ``code_paths``
carry that code in ``<model dir>/code``; here it travels with every intermediate model:

* :func:`save_module` finds the code roots the model's classes come from (roots registered
  with :func:`use_code`, explicit ``code_paths``, and MLflow ``code/`` directories that
  ``mlflow.pytorch.load_model`` put on ``sys.path``) and writes them twice: as a sidecar
  folder ``<model file>.code/`` beside the file, and inside the file's own zip archive
  (``<archive>/edgeslim_code/...``, records ``torch.load`` ignores). The copy inside the
  file travels wherever the file does (a KFP artifact on another pod, a ``shutil.copyfile``).
* :func:`load_module` puts that code on ``sys.path`` before unpickling (the sidecar, or the
  archive's copy unpacked into a sidecar), and turns a class that cannot be imported into
  one line naming the module and the two fixes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from edgeslim.components.common.errors import SourceError

CODE_SUFFIX = ".code"          # the sidecar folder: <model file>.code/
_EMBEDDED = "edgeslim_code"    # inside the torch zip: <archive>/edgeslim_code/<relative path>
_SKIP = ("__pycache__",)
_STAMP = ".edgeslim-code-digest"  # in a code folder: the digest of the code it holds
_code_roots: list[Path] = []   # code roots this process loaded models with


def code_dir_of(path: str | Path) -> Path:
    """The sidecar folder that holds the code of the model file ``path``."""
    return Path(str(path) + CODE_SUFFIX)


def use_code(root: str | Path) -> Path:
    """Put a code root on ``sys.path`` (first, as MLflow does) and remember it for :func:`save_module`."""
    root = Path(root).resolve()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if root not in _code_roots:
        _code_roots.append(root)
    return root


def missing_code_error(where: str, module: str | None, cls: str | None = None) -> SourceError:
    """The one line for a model whose class cannot be imported: the module and the two fixes."""
    module = module or "?"
    top = module.split(".")[0]
    path_hint = f"{top}/" if "." in module else f"{top}.py"
    what = f"class {cls!r} in module {module!r}" if cls else f"module {module!r}"
    return SourceError(
        f"{where}: the model's {what} cannot be imported; log the model with "
        f"mlflow.pytorch.log_model(..., code_paths=[{path_hint!r}]) or install the package that "
        f"provides {top!r} in the pipeline image"
    )


def _referenced_modules(model) -> set[str]:
    """Names of the modules the pickled model refers to (its classes, their bases, callables it holds)."""
    names: set[str] = set()
    for m in model.modules():
        for cls in type(m).__mro__:
            names.add(cls.__module__)
        for v in vars(m).values():
            mod = getattr(v, "__module__", None)
            if isinstance(mod, str) and not isinstance(v, dict):
                names.add(mod)
    return names


def _mlflow_code_dirs() -> list[Path]:
    """MLflow ``code/`` folders that ``mlflow.pytorch.load_model`` put on ``sys.path``."""
    out = []
    for p in sys.path:
        if p and Path(p).name == "code" and (Path(p).parent / "MLmodel").is_file():
            out.append(Path(p).resolve())
    return out


def code_roots_for(model) -> list[Path]:
    """The known code roots that hold a module ``model``'s classes come from."""
    files = []
    for name in _referenced_modules(model):
        f = getattr(sys.modules.get(name), "__file__", None)
        if f:
            files.append(Path(f).resolve())
    roots = []
    for root in [*_code_roots, *_mlflow_code_dirs()]:
        if root not in roots and any(f.is_relative_to(root) for f in files):
            roots.append(root)
    return roots


def _code_files(roots: list[Path], code_paths: list[str | Path]) -> dict[str, Path]:
    """``{relative path: file}`` of everything to ship: each root's contents, each code path by its name."""
    files: dict[str, Path] = {}

    def add_tree(base: Path, prefix: str) -> None:
        for f in sorted(base.rglob("*")):
            rel = f.relative_to(base)
            if f.is_file() and not any(p in _SKIP for p in rel.parts) and f.suffix != ".pyc" \
                    and f.name != _STAMP:
                files.setdefault(f"{prefix}{rel.as_posix()}", f)

    for root in roots:
        add_tree(root, "")
    for p in code_paths:
        p = Path(p)
        if p.is_dir():
            add_tree(p, f"{p.resolve().name}/")
        elif p.is_file():
            files.setdefault(p.name, p)
        else:
            raise SourceError(f"code path {p}: no such file or folder")
    return files


def _publish_dir(src: Path, dst: Path, *, replace: bool) -> Path:
    """Move the finished folder ``src`` to ``dst``; without ``replace``, a ``dst`` already there wins."""
    if replace and dst.exists():
        shutil.rmtree(dst, ignore_errors=True)
    try:
        os.replace(src, dst)
    except OSError:  # a concurrent writer got there first; its copy is the same code
        shutil.rmtree(src, ignore_errors=True)
    return dst


def save_module(model, path: str | Path, *, code_paths: list[str | Path] | None = None) -> Path:
    """Save a whole module (architecture and weights) with ``torch.save``, and its code.

    Args:
        model: the module.
        path: the file to write.
        code_paths: files or folders to ship besides the code roots found automatically
            (as MLflow's ``code_paths``: a file lands at the code root, a folder keeps its name).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    files = _code_files(code_roots_for(model), list(code_paths or []))
    torch.save(model, path)
    sidecar = code_dir_of(path)
    if not files:
        if sidecar.is_dir():
            shutil.rmtree(sidecar)
        return path
    with zipfile.ZipFile(path) as z:
        archive = z.namelist()[0].split("/")[0]
    with zipfile.ZipFile(path, "a") as z:
        for rel, f in files.items():
            z.write(f, f"{archive}/{_EMBEDDED}/{rel}")
    tmp = Path(tempfile.mkdtemp(prefix=sidecar.name + ".", dir=path.parent))
    for rel, f in files.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, tmp / rel)
    (tmp / _STAMP).write_text(_digest(path, _embedded_code(path)))
    _publish_dir(tmp, sidecar, replace=True)
    return path


def _embedded_code(path: Path) -> list[zipfile.ZipInfo]:
    """The code records inside a model file; empty for a plain ``torch.save``."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError):
        return []
    return [i for i in infos if not i.is_dir() and len(parts := i.filename.split("/", 2)) == 3
            and parts[1] == _EMBEDDED and parts[2]]


def _digest(path: Path, records: list[zipfile.ZipInfo]) -> str:
    """What identifies the code a file carries (names, sizes, CRCs: no need to read the weights)."""
    h = hashlib.sha256()
    for i in sorted(records, key=lambda i: i.filename):
        h.update(f"{i.filename}\0{i.file_size}\0{i.CRC}\n".encode())
    return h.hexdigest()[:16]


def _unpack(path: Path, records: list[zipfile.ZipInfo], digest: str, target: Path) -> Path | None:
    """Unpack the file's code into ``target`` (atomically); None when ``target``'s folder is not writable."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError:
        return None
    with zipfile.ZipFile(path) as z:
        for info in records:
            rel = info.filename.split("/", 2)[2]
            dst = (tmp / rel).resolve()
            if not dst.is_relative_to(tmp.resolve()):
                shutil.rmtree(tmp, ignore_errors=True)
                raise SourceError(f"model file {path}: its code record {rel!r} points outside its folder")
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(z.read(info))
    (tmp / _STAMP).write_text(digest)
    return _publish_dir(tmp, target, replace=False)


def _stamp_of(folder: Path) -> str | None:
    try:
        return (folder / _STAMP).read_text()
    except OSError:
        return None


def attach_code(path: str | Path) -> Path | None:
    """Put the code saved with the model file ``path`` on ``sys.path``; its folder, or None if it has none.

    The code inside the file is the truth: its sidecar is used when it holds that code,
    else the code is unpacked into the sidecar (when there is none yet) or a temp folder.
    """
    path = Path(path)
    sidecar = code_dir_of(path)
    records = _embedded_code(path)
    if not records:
        return use_code(sidecar) if sidecar.is_dir() else None
    digest = _digest(path, records)
    candidates = [sidecar, Path(tempfile.gettempdir()) / "edgeslim-code" / digest]
    for folder in candidates:
        if _stamp_of(folder) == digest:
            return use_code(folder)
    for folder in candidates:
        if not folder.exists():
            got = _unpack(path, records, digest, folder)
            if got is not None and _stamp_of(got) == digest:
                return use_code(got)
    raise SourceError(f"model file {path}: found no writable folder to unpack the code it carries")


_MISSING_ATTR = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def class_import_error(where: str, exc: BaseException) -> SourceError | None:
    """The one-line error when unpickling failed because a class cannot be imported; else None."""
    if isinstance(exc, ModuleNotFoundError):
        return missing_code_error(where, exc.name)
    m = _MISSING_ATTR.search(str(exc)) if isinstance(exc, AttributeError) else None
    return missing_code_error(where, m.group(2), m.group(1)) if m else None


def load_module(path: str | Path):
    """Load a module saved by :func:`save_module` (or by a plain ``torch.save``).

    The code saved with it goes on ``sys.path`` first.

    Raises:
        SourceError: the file is missing, corrupt, not a ``torch.nn.Module``, or its class
            cannot be imported (one line naming the module and the fixes).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise SourceError(f"model file {path}: no such file")
    attach_code(path)
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        missing = class_import_error(f"model file {path}", exc)
        if missing is not None:
            raise missing from None
        raise SourceError(f"model file {path} is corrupt or unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError) as exc:
        raise SourceError(
            f"model file {path} is corrupt or unreadable ({type(exc).__name__}: {str(exc)[:120]}); "
            "re-log the model with mlflow.pytorch.log_model(..., serialization_format='pickle')"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise SourceError(f"model file {path} holds a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()
