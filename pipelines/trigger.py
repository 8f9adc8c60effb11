"""``edgeslim trigger``: compress a watched model's new or ``champion`` versions, on webhooks.

The receiver (routing, filtering, the queue, the ledger, the HTTP server) is
``deploy/trigger.py``; this module is what a compression *is*, per runner:

- ``local``: Kubeflow's local runner in this process's worker (:func:`run_pipeline`, as
  ``edgeslim run`` does), the reports in ``WORKDIR/NAME-vVERSION-HASH/``; ``done`` once the
  candidate is registered, ``rejected`` when the gate refused it;
- ``kfp``: the pipeline laid out for the recipe (as ``edgeslim submit`` does) and submitted to
  ``--host``; the ledger says ``submitted`` with the run's id and page. The run on the cluster
  registers the candidate itself, and its report task turns the ledger to ``done`` or ``rejected``
  (:func:`~edgeslim.deploy.trigger.settle_submitted`).

Each compression is the recipe with ``source: models:/NAME/VERSION``. Its ledger key is the
recipe's hash without the source (:func:`trigger_hash`), so one recipe compresses each
version once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from edgeslim.components.common.errors import ConfigError
from edgeslim.deploy.trigger import DONE, REJECTED, SUBMITTED, Outcome, trigger_hash

log = logging.getLogger("edgeslim.trigger")


def for_version(recipe, name: str, version: str):
    return recipe.with_overrides(source=f"models:/{name}/{version}")


def _dirname(name: str, version: str, h: str) -> str:
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}-v{version}-{h}"


def local_runner(recipe, *, tracking_uri: str, workdir: str | Path,
                 preflight: Callable[..., None] | None = None) -> Callable[[str, str], Outcome]:
    """Compress with Kubeflow's local runner, one version at a time (the trigger's worker).

    ``preflight(recipe, tracking_uri, workdir)`` runs first (``edgeslim run``'s checks).
    """
    from edgeslim.pipelines.local import run_pipeline

    h = trigger_hash(recipe)
    root = Path(workdir).resolve()

    def run(name: str, version: str) -> Outcome:
        r = for_version(recipe, name, version)
        wd = root / _dirname(name, version, h)
        wd.mkdir(parents=True, exist_ok=True)

        def progress(msg: str, kind: str = "note") -> None:
            log.info("%s v%s: %s", name, version, msg.strip())

        if preflight is not None:
            preflight(r, tracking_uri, wd)
        report = run_pipeline(r, tracking_uri=tracking_uri, workdir=wd, progress=progress)
        html = Path(report.pop("_html_src", ""))
        (wd / "report.json").write_text(json.dumps(report, indent=2))
        if html.is_file():
            shutil.copyfile(html, wd / "report.html")
        gate = report.get("gate") or {}
        if not gate.get("passed"):
            return Outcome(REJECTED, f"gate rejected the candidate: {gate.get('summary', '?')}; "
                                     f"report {wd / 'report.json'}")
        reg = report.get("registered") or {}
        reused = " (reused)" if reg.get("reused") else ""
        return Outcome(DONE, f"registered {reg.get('name')} v{reg.get('version')}{reused} "
                             f"as @{reg.get('alias')}; report {wd / 'report.json'}")

    return run


def kfp_runner(recipe, *, host: str, tracking_uri: str, experiment: str = "edgeslim", namespace: str | None = None,
               token: str | None = None, images: dict | None = None) -> Callable[[str, str], Outcome]:
    """Submit to Kubeflow Pipelines at ``host``, as ``edgeslim submit`` does.

    The pipeline is laid out here, once, for the recipe: a recipe Kubernetes cannot place
    fails when the receiver starts, not on the first event. The token is ``token``, else
    ``$KFP_TOKEN`` read at each submission (a rotated token is picked up).
    """
    from edgeslim.pipelines.edge_compression import build_pipeline, submit_run

    if not host.startswith(("http://", "https://")):
        raise ConfigError(f"--host: got {host!r}; use the URL of the KFP UI or API, e.g. "
                          "http://ml-pipeline.kubeflow.svc.cluster.local:8888")
    pipeline = build_pipeline(recipe=recipe, recipe_default=False, **(images or {}))

    def run(name: str, version: str) -> Outcome:
        r = for_version(recipe, name, version)
        _, run_id, url = submit_run(
            pipeline, host=host, token=token or os.environ.get("KFP_TOKEN") or None,
            arguments={"recipe_json": r.to_json(), "tracking_uri": tracking_uri or ""},
            experiment=experiment, namespace=namespace, run_name=f"edgeslim {r.source}")
        return Outcome(SUBMITTED, f"kfp run {run_id}: {url}")

    return run


def serve(recipe, *, run: Callable[[str, str], Outcome], runner: str, models: list[str], alias: str,
          tracking_uri: str, secret: str, host: str = "127.0.0.1", port: int = 8089, queue_size: int = 16,
          read_timeout: float = 10.0, workers: int = 4, recipe_label: str = "", tls=None,
          url: str | None = None) -> int:
    """Run the receiver until SIGTERM or Ctrl-C; the first stdout line says where it listens, and a
    second one what MLflow's server needs to deliver there when its defaults refuse the URL
    (``url``: the one given to ``create_webhook``; by default the listening address).
    ``tls``: serve HTTPS (a :class:`~edgeslim.deploy.webhook_tls.TlsFiles`)."""
    from edgeslim.components.common.tracking import DEFAULT_ENV
    from edgeslim.deploy.trigger import TagLedger, Trigger, ledger_key, make_trigger_server, mlflow_ready
    from edgeslim.deploy.webhook_tls import needs_line, receiver_url

    if not secret:
        raise ConfigError("set EDGESLIM_WEBHOOK_SECRET to the secret given to MLflow's create_webhook")
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    from mlflow import MlflowClient

    restore = _service_log()
    try:
        if recipe.register.name and len(set(models)) > 1:
            log.warning("the recipe registers every model as %r: leave register.name empty to get NAME-edge per "
                        "watched model", recipe.register.name)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        h = trigger_hash(recipe)
        trigger = Trigger(models=models, alias=alias, recipe_hash=h, ledger=TagLedger(client), run=run,
                          runner=runner, queue_size=queue_size, ready=lambda: mlflow_ready(tracking_uri))
        ok, text = mlflow_ready(tracking_uri)
        if not ok:
            log.warning("%s; /readyz answers 503 until it does", text)
        server = make_trigger_server(host, port, secret, trigger, read_timeout=read_timeout, workers=workers,
                                     tls=tls)
        print(f"listening on {server.scheme}://{host}:{server.server_port}/ for new versions and @{alias} of "
              f"{', '.join(sorted(set(models)))}; recipe {recipe_label or '-'} ({h}) on the {runner} runner; "
              f"ledger: tag {ledger_key(h)} on each version in {tracking_uri}", flush=True)
        needs = needs_line(receiver_url(host, server.server_port, tls=tls is not None, url=url))
        if needs:
            print(needs, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.warning("stopping")
        finally:
            trigger.stop(timeout=2.0)
            server.server_close()
    finally:
        restore()
    return 0


def _service_log() -> Callable[[], None]:
    """The receiver's decisions and the compressions' progress, on this process's stderr.

    Kubeflow's local runner swaps the root logger's handlers for one on (redirected) stdout
    while a pipeline runs: without their own handler, every line logged meanwhile, by the
    HTTP workers too, would end up in that run's ``pipeline.log``. Returns the undo.
    """
    handler = logging.StreamHandler(sys.stderr)  # the real stderr: bound now, not looked up per line
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = min(logging.INFO, logging.getLogger().getEffectiveLevel())  # --debug shows the probes too
    saved = []
    for name in ("edgeslim.trigger", "edgeslim.webhook"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.level, lg.propagate))
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False

    def undo() -> None:
        for lg, lvl, prop in saved:
            lg.removeHandler(handler)
            lg.setLevel(lvl)
            lg.propagate = prop

    return undo
