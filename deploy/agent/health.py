"""Device health check: load the release, run the golden input, compare, time it.

The agent runs this in a child process (``python -m edgeslim.deploy.agent.health``):
the runtime's memory goes away after the check, so the idle agent stays small,
and a model that crashes the runtime fails its check instead of killing the agent.

TensorRT runs the engine (through Polygraphy) where it imports and the release has an
engine; otherwise ONNX Runtime runs the Q/DQ ONNX with basic graph optimisation, which
keeps Q/DQ semantics (docs/design.md: the fused CPU int8 kernels can saturate). The
TensorRT-only agent (``edgeslim[agent-trt]``) has no ONNX Runtime: there a release
without a usable engine fails its check, and says why.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from edgeslim.components.common.processes import die_with_parent

RESULT_MARK = "EDGESLIM_HEALTH "


def _onnxruntime_runner(model_path: Path):
    from edgeslim.components.common.onnx_runtime import make_session

    sess = make_session(model_path, threads=1)
    inp = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]

    def run(x):
        return dict(zip(names, sess.run(None, {inp: x})))

    return run, "onnxruntime:CPUExecutionProvider"


def _tensorrt_runner(engine_path: Path):
    """Deserialize the engine and run it through Polygraphy's TensorRT runner.

    Only reachable on a device with TensorRT; there is no GPU on the test
    machines, so this path is not exercised by the test-suite (tests marked gpu).
    """
    import tensorrt as trt  # noqa: F401  (the import itself proves the runtime is there)
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
    runner.activate()

    def run(x):
        # Polygraphy feeds by input name; our models have one input.
        name = runner.get_input_metadata().keys()
        return dict(runner.infer({next(iter(name)): x}))

    return run, f"tensorrt:{trt.__version__}"


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


NO_ONNXRUNTIME = ("this agent has no ONNX Runtime to run the Q/DQ ONNX with (a TensorRT-only install, "
                  "edgeslim[agent-trt]): ship an engine for its device class, or install edgeslim[agent]")


def run_health_check(release_dir: str | Path, check: dict[str, Any] | None) -> dict[str, Any]:
    """Check one release directory (``model.onnx`` and maybe ``model.engine``).

    Args:
        release_dir: the directory ``current`` points at.
        check: the manifest's ``health_check``: ``input`` and ``outputs`` (encoded
            arrays), ``atol``, ``rtol``, ``latency_budget_ms``, ``repeats``.

    Returns:
        ``{"ok", "backend", "max_abs_err", "latency_ms", "error", "fallback"}``; ``fallback`` says why
        TensorRT could not load the engine (ONNX Runtime then ran the check and ``backend`` says so).
    """
    from edgeslim.components.common.tasks import runtime_for
    from edgeslim.deploy.manifest import decode_array

    release_dir = Path(release_dir)
    result: dict[str, Any] = {"ok": False, "backend": None, "max_abs_err": None, "latency_ms": None,
                              "error": None, "fallback": None}
    try:
        engine = release_dir / "model.engine"
        run = None
        if engine.exists() and _importable("tensorrt"):
            try:
                run, result["backend"] = _tensorrt_runner(engine)
            except Exception as exc:  # TensorRT cannot load the engine here: ONNX Runtime serves, and says so
                result["fallback"] = " ".join(f"TensorRT engine unusable: {type(exc).__name__}: {exc}".split())[:500]
        if run is None and not _importable("onnxruntime"):
            why = result["fallback"] or ("the release has no TensorRT engine" if not engine.exists()
                                         else "TensorRT cannot be imported")
            result["error"] = f"{why}; {NO_ONNXRUNTIME}"[:700]
            return result
        if run is None:
            run, result["backend"] = _onnxruntime_runner(release_dir / "model.onnx")
            if result["fallback"]:
                result["backend"] += " (fallback from tensorrt)"
        if not check:
            result["error"] = "manifest has no health check (golden input); refusing to commit blind"
            return result
        x = decode_array(check["input"])
        outs = run(x)
        # The task the release records judges its outputs (a detector compares boxes, not raw maps).
        error, result["max_abs_err"] = runtime_for(check.get("task")).compare(check, outs)
        if error:
            result["error"] = error
            return result
        _latency_verdict(result, check, run, x)
    except Exception as exc:  # any failure to load or run is a failed check, with its reason
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return result


def _latency_verdict(result: dict[str, Any], check: dict[str, Any], run, x) -> dict[str, Any]:
    """Outputs matched: time the golden input; ok unless the median is over the budget."""
    times = []
    for _ in range(max(1, int(check.get("repeats", 5)))):
        t0 = time.perf_counter()
        run(x)
        times.append((time.perf_counter() - t0) * 1000)
    lat = sorted(times)[len(times) // 2]
    result["latency_ms"] = round(lat, 3)
    budget = check.get("latency_budget_ms")
    if budget is not None and lat > float(budget):
        result["error"] = f"median latency {lat:.2f} ms is over the budget of {budget} ms"
        return result
    result["ok"] = True
    return result


def check_in_subprocess(release_dir: str | Path, check: dict[str, Any] | None, *,
                        timeout_s: float = 120.0) -> dict[str, Any]:
    """Run :func:`run_health_check` in a child Python; a crash or hang is a failed check."""
    payload = json.dumps({"release": str(release_dir), "check": check})
    try:
        proc = subprocess.run([sys.executable, "-m", "edgeslim.deploy.agent.health"], input=payload,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "backend": None, "error": f"health check did not finish in {timeout_s:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
    return {"ok": False, "backend": None,
            "error": f"health check process exited {proc.returncode}: {tail[0][:300]}"}


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog="python -m edgeslim.deploy.agent.health", description="Health-check a release directory: reads the agent's JSON "
                                   "request on stdin, prints the result line on stdout (the agent runs it).")


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    die_with_parent()  # an agent that is killed mid-check takes its check with it
    req = json.loads(sys.stdin.read())
    res = run_health_check(req["release"], req.get("check"))
    print(RESULT_MARK + json.dumps(res), flush=True)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
