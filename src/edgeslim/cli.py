"""The ``edgeslim`` command.

Every ``EdgeslimError`` becomes one line on stderr and its exit code (2 for
bad input, 3 for a candidate the gate rejected). Tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import warnings
from typing import Callable

from edgeslim.components.common.errors import EdgeslimError, MissingDependencyError

# Subcommands live beside the code they drive; each module has
# ``register(subparsers)`` and sets ``func`` on its parsers.
_COMMAND_MODULES = (
    "edgeslim.cli_main",
    "edgeslim.deploy.fleet_cli",
    "edgeslim.pipelines.bench",
    "edgeslim.components.engine.cli",
)


# Modules of the optional extras, by the name Python imports: (package to name, extra). The base
# install (the device agent, `edgeslim fleet`, `edgeslim engine`) has none of them. onnx alone is
# hinted as `pip install onnx`: `edgeslim engine plan|build` on a device needs it, not the pipeline.
_OPTIONAL = {
    "torch": ("torch", "pipeline"), "mlflow": ("mlflow", "pipeline"), "kfp": ("kfp", "pipeline"),
    "onnx": ("onnx", None), "onnxscript": ("onnxscript", "pipeline"),
    "sklearn": ("scikit-learn", "pipeline"), "torch_pruning": ("torch-pruning", "pipeline"),
    "kfp.kubernetes": ("kfp-kubernetes", "kubernetes"),
    "tensorrt": ("tensorrt", "tensorrt"), "polygraphy": ("polygraphy", "tensorrt"),
}
# `demo` first starts `mlflow server` as a child process: check the pipeline is installed up front.
_PIPELINE_COMMANDS = {"demo": ("torch", "mlflow", "kfp")}


def missing_dependency(exc: ModuleNotFoundError) -> MissingDependencyError | None:
    """The one-line error for a missing optional package; None for anything else (a bug)."""
    if exc.name not in _OPTIONAL:
        return None
    return MissingDependencyError(*_OPTIONAL[exc.name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeslim",
        description="Compress an MLflow-registered PyTorch model to an int8 edge model, "
        "gate it, register it, and roll it out.",
    )
    from edgeslim.components.common.version import __version__

    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"edgeslim {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines: only results, warnings and errors")
    parser.add_argument("-v", "--verbose", dest="verbose_all", action="store_true",
                        help="more detail: info logs, and the local runner's own output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="what to do (`edgeslim COMMAND --help` shows its options)")
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        mod.register(sub)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    os.environ.setdefault("MLFLOW_PRINT_MODEL_URLS_ON_CREATION", "false")
    os.environ.setdefault("TORCH_LOGS", "-all")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "urllib3", "kfp", "torch", "torch.onnx", "onnxscript", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO if args.verbose_all else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.debug:
        _quiet_libraries()
    if args.quiet:
        from edgeslim.components.common.progress import ENV

        os.environ[ENV] = "off"
    if args.verbose_all and hasattr(args, "verbose"):
        args.verbose = True
    from edgeslim.components.common import processes

    # SIGKILL cannot be caught: whatever this command starts carries the lifeline, and its watchdog
    # ends those processes if this one dies without the cleanup below.
    lifeline = processes.Lifeline().start().hold_environ()
    # A caller's own children (tests call main in-process), and the lifeline's watchdog, which
    # lifeline.close() ends after its sweep.
    already_running = set(processes.descendants())
    previous_handlers = processes.handle_termination()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        for mod in _PIPELINE_COMMANDS.get(args.command, ()):
            if importlib.util.find_spec(mod) is None:
                raise MissingDependencyError(*_OPTIONAL[mod])
        try:
            return int(func(args) or 0)
        except ModuleNotFoundError as exc:
            missing = missing_dependency(exc)
            if missing is None or args.debug:
                raise
            raise missing from None
    except EdgeslimError as exc:
        if args.debug:
            raise
        print(f"edgeslim: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP (processes.Terminated)
        signum = getattr(exc, "signum", 2)
        print(f"edgeslim: {'interrupted' if signum == 2 else 'stopped by ' + str(exc)}", file=sys.stderr)
        return 128 + signum
    finally:
        # Whatever ended the command, nothing it started outlives it (task subprocesses, servers).
        stopped = processes.stop_descendants(keep=already_running)
        lifeline.close()
        processes.restore(previous_handlers)
        if stopped and args.debug:
            print(f"edgeslim: stopped {len(stopped)} process(es) it had started", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
