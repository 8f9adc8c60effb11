"""Registry-triggered compression: the receiver of ``edgeslim trigger``.

MLflow POSTs registry webhooks here (``model_version.created`` and
``model_version_alias.created``); the server is the fleet webhook's hardened one
(:class:`edgeslim.deploy.webhook.WebhookServer`: size caps before reading, MLflow's v1 HMAC,
stale timestamps and replayed delivery ids refused, bounded reader and worker threads). For a
*watched* model, a new version or its ``champion`` alias (``--alias``) moving to a version
queues one compression of ``models:/NAME/VERSION``:

- the answer is 202 at once; the compression runs in one background worker, one at a time,
  from a queue of bounded length (full: 503 with ``Retry-After``, so MLflow retries, and the
  replay cache lets that retry in);
- another model's event is logged as ignored and answered 204; a version already queued is
  answered 200;
- the worker resolves the version in MLflow (one that does not exist is logged, nothing runs)
  and keeps a ledger on the parent version's tags, ``edgeslim.trigger.<recipe hash>`` =
  ``submitted`` | ``done`` | ``rejected`` | ``failed``, with the run, result or reason in
  ``edgeslim.trigger.<recipe hash>.detail``. Tags survive pod restarts. A version whose tag is
  ``submitted``, ``done`` or ``rejected`` for this recipe is not compressed again, whatever
  event arrives; ``failed`` (the work could not run: KFP unreachable, a task error) is retried
  on the version's next event;
- ``GET /healthz``: the process and its compression worker are up; ``GET /readyz``: MLflow
  answers. For the Kubernetes Deployment's probes.

What a compression is (the local runner or a Kubeflow submission) is the ``run`` callable the
command gives (``pipelines/trigger.py``): this module holds no pipeline code.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable

from edgeslim.components.common.errors import ConfigError, EdgeslimError, SourceError, TrackingUnavailable
from edgeslim.deploy.webhook import WebhookServer, _printable

log = logging.getLogger("edgeslim.trigger")

VERSION_CREATED = ("model_version", "created")
ALIAS_CREATED = ("model_version_alias", "created")
TAG_PREFIX = "edgeslim.trigger."
SUBMITTED, DONE, REJECTED, FAILED = "submitted", "done", "rejected", "failed"
SETTLED = frozenset({SUBMITTED, DONE, REJECTED})  # a new event for the version starts nothing
_VERSION = re.compile(r"^[0-9]{1,19}$")
_HASH = re.compile(r"^[0-9a-f]{8,64}$")
MAX_DETAIL = 1000


@dataclass(frozen=True)
class Outcome:
    """What became of one compression: a ledger state and one line about it."""

    state: str
    detail: str


def ledger_key(recipe_hash: str) -> str:
    """The parent version's tag that holds the state of its compression with this recipe."""
    return TAG_PREFIX + recipe_hash


def trigger_hash(recipe) -> str:
    """The recipe's hash with its source left out: the same for every version it compresses."""
    return recipe.with_overrides(source="").digest()


def settle_submitted(client, recipe, report: dict) -> str | None:
    """At the end of a compression run (the pipeline's report task, on the cluster too): if the parent
    version's ledger for this recipe says ``submitted``, it now says ``done`` or ``rejected``, with
    what was registered (or why not) and the KFP run. Returns the state written, or None when the
    run was not one the trigger submitted (no ledger tag, another state, an alias source).
    """
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", recipe.source or "")
    if not m:
        return None
    name, version = m.groups()
    key = ledger_key(trigger_hash(recipe))
    if (client.get_model_version(name, version).tags or {}).get(key) != SUBMITTED:
        return None
    run = (report.get("runs") or {}).get("kfp_run_id")
    by = f" (kfp run {run})" if run else ""
    gate = report.get("gate") or {}
    reg = report.get("registered") or {}
    if gate.get("passed") and reg.get("version"):
        state, detail = DONE, f"registered {reg.get('name')} v{reg.get('version')} as @{reg.get('alias')}{by}"
    else:
        state, detail = REJECTED, f"gate rejected the candidate: {gate.get('summary', '?')}{by}"
    client.set_model_version_tag(name, version, key + ".detail", _one_line(detail) or "-")
    client.set_model_version_tag(name, version, key, state)
    return state


def _one_line(text: str, cap: int = MAX_DETAIL) -> str:
    return " ".join(str(text).split())[:cap]


class TagLedger:
    """The ledger as MLflow model-version tags on the *parent* version.

    ``client`` is an ``MlflowClient`` (or anything with ``get_model_version`` and
    ``set_model_version_tag``). A version still being registered (``PENDING_REGISTRATION``) is
    waited for up to ``ready_wait_s``.
    """

    def __init__(self, client, *, ready_wait_s: float = 120.0, poll_s: float = 2.0) -> None:
        self.client, self.ready_wait_s, self.poll_s = client, ready_wait_s, poll_s

    def tags(self, name: str, version: str) -> dict[str, str]:
        """The tags of a registered, READY version.

        Raises:
            SourceError: no such model or version, or its registration failed.
            TrackingUnavailable: MLflow did not answer.
        """
        from mlflow.exceptions import MlflowException

        deadline = time.monotonic() + self.ready_wait_s
        while True:
            try:
                mv = self.client.get_model_version(name, version)
            except MlflowException as exc:
                if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    raise SourceError(f"registered model {name!r} has no version {version}") from None
                raise TrackingUnavailable(f"MLflow: {_one_line(exc.message, 200)}") from None
            except (OSError, ConnectionError) as exc:
                raise TrackingUnavailable(f"MLflow did not answer ({_one_line(str(exc), 200)})") from None
            status = str(getattr(mv, "status", "READY") or "READY")
            if status == "READY":
                return dict(mv.tags or {})
            if status != "PENDING_REGISTRATION":
                raise SourceError(f"version {version} of {name!r} is {status}: {getattr(mv, 'status_message', '')}")
            if time.monotonic() > deadline:
                raise SourceError(f"version {version} of {name!r} is still being registered after "
                                  f"{self.ready_wait_s:.0f} s")
            time.sleep(self.poll_s)

    def mark(self, name: str, version: str, recipe_hash: str, state: str, detail: str) -> None:
        key = ledger_key(recipe_hash)
        self.client.set_model_version_tag(name, version, key + ".detail", _one_line(detail) or "-")
        self.client.set_model_version_tag(name, version, key, state)


def mlflow_ready(tracking_uri: str, timeout: float = 5.0) -> tuple[bool, str]:
    """Whether MLflow answers: its ``/health`` for a server, a registry call otherwise."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
                resp.read(1024)
            return True, f"MLflow at {tracking_uri} answers"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return False, f"MLflow at {tracking_uri} is not reachable ({_one_line(getattr(exc, 'reason', exc), 200)})"
    try:
        from mlflow import MlflowClient

        MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).search_registered_models(max_results=1)
        return True, f"MLflow at {tracking_uri} answers"
    except Exception as exc:  # any failure means not ready
        return False, f"MLflow at {tracking_uri}: {_one_line(str(exc), 200)}"


class Trigger:
    """Routing, filtering, the bounded queue, the worker and the ledger; no HTTP.

    Args:
        models: registered models watched; every other model's event is ignored.
        alias: the alias whose move triggers (``champion``).
        recipe_hash: the recipe's hash, the ledger's key with the version.
        ledger: a :class:`TagLedger` (or the same interface).
        run: ``run(name, version) -> Outcome`` compresses ``models:/NAME/VERSION`` (may raise:
            an ``EdgeslimError`` is a ``failed`` outcome with its message as the reason).
        runner: the runner's name, for the log and the ledger.
        queue_size: versions that may wait while one compresses.
        ready: ``ready() -> (bool, text)`` for ``/readyz``; asked at most every ``ready_cache_s``.
    """

    def __init__(self, *, models: list[str], alias: str, recipe_hash: str, ledger, run: Callable[[str, str], Outcome],
                 runner: str = "local", queue_size: int = 16, ready: Callable[[], tuple[bool, str]] | None = None,
                 ready_cache_s: float = 2.0) -> None:
        if not models:
            raise ConfigError("name the registered models to watch: --model NAME (repeat it); events of every other "
                              "model are ignored")
        if not alias:
            raise ConfigError("--alias: give the alias whose move starts a compression (e.g. champion)")
        if not _HASH.match(recipe_hash or ""):
            raise ConfigError(f"recipe hash {recipe_hash!r}: want 8-64 lowercase hex digits")
        if queue_size < 1:
            raise ConfigError("--queue-size must be at least 1")
        self.models, self.alias, self.recipe_hash = frozenset(models), alias, recipe_hash
        self.ledger, self.run, self.runner = ledger, run, runner
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready_fn, self._ready_cache_s = ready, ready_cache_s
        self._ready_at, self._ready_answer = -1e9, (False, "not checked yet")
        self._ready_lock = threading.Lock()
        self.current: tuple[str, str] | None = None

    # ------------------------------------------------------------------ the HTTP side
    def on_event(self, delivery: str, event: dict) -> tuple[int, str, dict[str, str] | None]:
        """The answer to one signed, first-seen event; queues a compression for a watched model."""
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        kind = (event.get("entity"), event.get("action"))
        if kind not in (VERSION_CREATED, ALIAS_CREATED):
            return 204, "not an event this receiver acts on", None
        if kind == ALIAS_CREATED and data.get("alias") != self.alias:
            return 204, f"only the alias {self.alias} starts a compression", None
        name, version = data.get("name"), data.get("version")
        if not isinstance(name, str) or isinstance(version, bool) or not isinstance(version, (str, int)):
            return 400, "data.name or data.version missing", None
        version = str(version)
        if not _VERSION.match(version):
            return 400, "data.version is not a version number", None
        what = "new version" if kind == VERSION_CREATED else f"alias {self.alias}"
        if name not in self.models:
            log.warning("ignored: model %s is not watched by this trigger (%s v%s; watching %s)", _printable(name),
                        what, version, ", ".join(sorted(self.models)))
            return 204, "model not watched", None
        key = (name, version)
        with self._lock:
            if key in self._pending:
                log.info("delivery %s: %s v%s (%s) is already queued or compressing", delivery, name, version, what)
                return 200, f"{name} v{version} is already queued", None
            try:
                self._jobs.put_nowait((name, version, delivery))
            except queue.Full:
                log.warning("delivery %s: %s v%s (%s): the queue is full (%d waiting); answered 503 so MLflow "
                            "retries", delivery, name, version, what, self._jobs.maxsize)
                return 503, "compression queue full; retry", {"Retry-After": "30"}
            self._pending.add(key)
        log.info("delivery %s: %s v%s (%s): compression queued (recipe %s, %s runner)", delivery, name, version,
                 what, self.recipe_hash, self.runner)
        return 202, f"compression of {name} v{version} queued", None

    def health(self) -> tuple[int, str]:
        if self._thread is None or not self._thread.is_alive():
            return 503, "the compression worker is not running"
        busy = f"compressing {self.current[0]} v{self.current[1]}" if self.current else "idle"
        return 200, f"ok: {busy}, {self._jobs.qsize()} queued"

    def ready(self) -> tuple[int, str]:
        if self._ready_fn is None:
            return 200, "ready"
        with self._ready_lock:
            if time.monotonic() - self._ready_at > self._ready_cache_s:
                try:
                    self._ready_answer = self._ready_fn()
                except Exception as exc:  # a probe must answer
                    self._ready_answer = (False, _one_line(f"{type(exc).__name__}: {exc}", 200))
                self._ready_at = time.monotonic()
            ok, text = self._ready_answer
        return (200 if ok else 503), text

    # ------------------------------------------------------------------ the worker
    def start(self) -> "Trigger":
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="trigger-compression", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; a compression under way is not waited for past ``timeout``."""
        if self._thread is None:
            return
        with self._lock:
            while True:  # drop what waits: it was answered 202 but never started (no ledger entry)
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    log.warning("not compressing %s v%s: the receiver is stopping (set the alias again to "
                                "retry)", job[0], job[1])
            self._jobs.put_nowait(None)
        self._thread.join(timeout)
        current = self.current
        if current is not None and self._thread.is_alive():
            # The process is going away with it (its task processes are stopped): say so in the
            # ledger, or the version would stay "submitted" and never be compressed.
            reason = "the receiver stopped during this compression; the version's next event starts it again"
            try:
                self.ledger.mark(current[0], current[1], self.recipe_hash, FAILED, reason)
                log.warning("%s v%s: %s: %s", current[0], current[1], FAILED, reason)
            except Exception as exc:
                log.error("%s v%s: interrupted, and the ledger tag could not be written (%s)", current[0],
                          current[1], _one_line(str(exc), 300))

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once nothing is queued or compressing (for tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.02)
        return False

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            name, version, delivery = job
            self.current = (name, version)
            try:
                self.process(name, version, delivery)
            except Exception:  # a bug must not stop the worker
                log.exception("%s v%s: unexpected error", name, version)
            finally:
                self.current = None
                with self._lock:
                    self._pending.discard((name, version))

    def process(self, name: str, version: str, delivery: str = "-") -> Outcome | None:
        """One queued version: check it and the ledger, compress, record the outcome.

        Returns the outcome, or None when nothing ran (no such version, already settled,
        MLflow unreachable).
        """
        label, key = f"{name} v{version}", ledger_key(self.recipe_hash)
        try:
            tags = self.ledger.tags(name, version)
        except SourceError as exc:
            log.error("%s: %s; nothing submitted", label, _one_line(str(exc), 300))
            return None
        except TrackingUnavailable as exc:
            log.error("%s: %s; nothing submitted: set the alias again once MLflow answers", label,
                      _one_line(str(exc), 300))
            return None
        state = tags.get(key)
        if state in SETTLED:
            log.info("%s: already %s with recipe %s (%s); not submitting it again (delete the tag %s to rerun)",
                     label, state, self.recipe_hash, tags.get(key + ".detail", "-"), key)
            return None
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            self.ledger.mark(name, version, self.recipe_hash, SUBMITTED,
                             f"{self.runner} runner, started {started}, delivery {delivery}")
        except Exception as exc:
            log.error("%s: could not write the ledger tag %s (%s); nothing submitted", label, key,
                      _one_line(str(exc), 300))
            return None
        log.info("%s: compressing with recipe %s on the %s runner%s", label, self.recipe_hash, self.runner,
                 f" (it failed before: {tags.get(key + '.detail', '-')})" if state == FAILED else "")
        try:
            outcome = self.run(name, version)
        except EdgeslimError as exc:
            outcome = Outcome(FAILED, str(exc))
        except Exception as exc:
            log.exception("%s: the %s runner raised", label, self.runner)
            outcome = Outcome(FAILED, f"{type(exc).__name__}: {exc}")
        if outcome.state not in (SUBMITTED, DONE, REJECTED, FAILED):
            outcome = Outcome(FAILED, f"the runner answered an unknown state {outcome.state!r}: {outcome.detail}")
        outcome = Outcome(outcome.state, _one_line(outcome.detail))
        try:
            self.ledger.mark(name, version, self.recipe_hash, outcome.state, outcome.detail)
        except Exception as exc:
            log.error("%s: %s, but the ledger tag %s could not be written (%s)", label, outcome.state, key,
                      _one_line(str(exc), 300))
        (log.error if outcome.state == FAILED else log.info)("%s: %s: %s", label, outcome.state, outcome.detail)
        return outcome


class TriggerServer(WebhookServer):
    """The hardened webhook server with the trigger's routing and its health routes."""

    def __init__(self, host: str, port: int, secret: str, trigger: Trigger, *, read_timeout: float = 10.0,
                 workers: int = 4, max_connections: int = 256, tls=None) -> None:
        self.trigger = trigger
        super().__init__(host, port, secret, trigger.alias, models=sorted(trigger.models), read_timeout=read_timeout,
                         workers=workers, max_connections=max_connections,
                         routes={"/healthz": trigger.health, "/readyz": trigger.ready}, tls=tls)

    def handle_event(self, delivery: str, event: dict) -> tuple[int, str, dict[str, str] | None]:
        return self.trigger.on_event(delivery, event)


def make_trigger_server(host: str, port: int, secret: str, trigger: Trigger, *, read_timeout: float = 10.0,
                        workers: int = 4, max_connections: int = 256, tls=None) -> TriggerServer:
    """The receiver for ``trigger`` (started here: its worker runs from now on); HTTPS with ``tls``
    (a :class:`~edgeslim.deploy.webhook_tls.TlsFiles`)."""
    server = TriggerServer(host, port, secret, trigger, read_timeout=read_timeout, workers=workers,
                           max_connections=max_connections, tls=tls)
    trigger.start()
    return server
