"""The MLflow model registry side of a rollout.

Resolving ``models:/NAME@ALIAS`` (or ``/VERSION``) to a version and downloading its edge model;
moving ``edge-canary``/``edge-stable`` (the version an alias pointed at is kept in the record and
put back if the rollout aborts); tagging the version with how its rollout ended (``edgeslim.fleet.FLEET``,
the last rollout's summary, and ``edgeslim.fleet.FLEET.ended.ROLLOUT_ID``, one per ended rollout
generation with the controller state's counter), a record outside the store that
:meth:`RegistrySync.ended` holds a replayed rollout record against.
MLflow is imported only inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from edgeslim.components.common.errors import FleetError, SourceError
from edgeslim.components.common.tracking import parse_model_uri
from edgeslim.deploy import trust
from edgeslim.deploy.fleet_context import FleetContext, FleetPart
from edgeslim.deploy.records import RolloutRecords, tally
from edgeslim.deploy.rollout_config import TERMINAL

log = logging.getLogger("edgeslim.controller")

TAG_PREFIX = "edgeslim.fleet"


class RegistryUnavailable(FleetError):
    """MLflow did not answer a check the controller needs before it acts."""
KFP_RUN_TAG = "edgeslim.kfp_run_id"  # written on the version by the pipeline's report task


@dataclasses.dataclass
class ModelRef:
    name: str
    version: str
    alias: str | None
    run_id: str | None
    uri: str
    release: str | None = None  # the release statement (JSON of a signed envelope) from the version's tag
    kfp_run_id: str | None = None  # the Kubeflow run that compressed it (its register/report tag), if any

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "release"}


def resolve_model(uri: str) -> ModelRef:
    """Resolve an alias to a version in the MLflow registry."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise SourceError(f"{uri}: registered model {name!r} has no {what} ({exc.error_code})") from None
    except Exception as exc:  # connection refused and friends
        raise SourceError(f"{uri}: cannot reach the MLflow registry ({type(exc).__name__})") from None
    tags = mv.tags or {}
    return ModelRef(name=name, version=str(mv.version), alias=alias, run_id=mv.run_id, uri=uri,
                    release=tags.get(trust.RELEASE_TAG), kfp_run_id=tags.get(KFP_RUN_TAG) or None)


def download_model(ref: ModelRef, dst: str | Path) -> Path:
    """Download the version's edge-model directory (model.onnx, edge_meta.json, engines/)."""
    from mlflow.artifacts import download_artifacts

    path = Path(download_artifacts(f"models:/{ref.name}/{ref.version}", dst_path=str(dst)))
    if not (path / "model.onnx").exists():
        raise SourceError(
            f"{ref.uri} (version {ref.version}) has no model.onnx: register it with "
            "edgeslim.plugins.edge_flavor.log_model"
        )
    return path


class RegistrySync(FleetPart):
    """Aliases and the version tag of the fleet's rollouts, in the MLflow registry."""

    def __init__(self, ctx: FleetContext, records: RolloutRecords) -> None:
        super().__init__(ctx)
        self.records = records

    def client(self):
        """The MLflow registry client (of the tracking URI in effect)."""
        from mlflow import MlflowClient

        return MlflowClient()

    def set_alias(self, rec: dict[str, Any], alias: str) -> None:
        """Point ``alias`` at the rollout's version; what it pointed at before is saved in the record
        first (``aliases``), so an abort can put it back."""
        m = rec["model"]
        try:
            client = self.client()
            moved = rec.setdefault("aliases", {})
            if alias not in moved:  # a resumed rollout must not record its own version as "before"
                before = (client.get_registered_model(m["name"]).aliases or {}).get(alias)
                moved[alias] = {"before": None if before is None else str(before), "to": str(m["version"])}
                self.records.save(rec)
            client.set_registered_model_alias(m["name"], alias, m["version"])
            log.info("moved alias %s of %s to version %s", alias, m["name"], m["version"])
        except FleetError:
            raise  # the record could not be saved: another controller; stop
        except Exception as exc:  # the rollout itself stands; say what did not happen
            log.error("could not move alias %s: %s", alias, exc)
            rec.setdefault("warnings", []).append(f"alias {alias} not moved: {type(exc).__name__}")

    def restore_aliases(self, rec: dict[str, Any]) -> None:
        """After an abort: each alias this rollout moved goes back to the version it pointed at before
        (deleted if there was none), unless it has been moved again since."""
        m = rec["model"]
        for alias, a in (rec.get("aliases") or {}).items():
            if not isinstance(a, dict) or a.get("restored"):
                continue
            try:
                client = self.client()
                now = (client.get_registered_model(m["name"]).aliases or {}).get(alias)
                if now is None or str(now) != str(a.get("to")):
                    a["restored"] = f"left alone: it points at {now} now, not at this rollout's version"
                elif a.get("before"):
                    client.set_registered_model_alias(m["name"], alias, a["before"])
                    a["restored"] = f"back to version {a['before']}"
                else:
                    client.delete_registered_model_alias(m["name"], alias)
                    a["restored"] = "deleted (it pointed at no version before)"
                log.info("rollout %s: alias %s %s", rec["name"], alias, a["restored"])
            except Exception as exc:  # the rollback itself stands; say what did not happen
                log.error("rollout %s: could not restore alias %s: %s", rec["name"], alias, exc)
                rec.setdefault("warnings", []).append(f"alias {alias} not restored: {type(exc).__name__}")

    def tag(self, rec: dict[str, Any]) -> None:
        """Record on the model version (tag ``edgeslim.fleet.FLEET``) how this rollout ended."""
        m = rec["model"]
        reported, failed = tally(rec)
        summary = {"rollout": rec["name"], "generation": rec.get("generation", 1), "state": rec["state"],
                   "rollout_id": rec.get("rollout_uid"), "counter": rec.get("state_counter"),
                   "devices": len(rec["devices"]), "reported": reported, "failed": failed,
                   "reason": rec.get("reason"), "finished_at": self.clock(),
                   # what made this version: the registration run and, on a cluster, the KFP run
                   **{k: m[k] for k in ("run_id", "kfp_run_id") if m.get(k)}}
        try:
            client = self.client()
            if isinstance(rec.get("rollout_uid"), str):
                client.set_model_version_tag(m["name"], m["version"], self.ended_tag(rec["rollout_uid"]),
                                             json.dumps({k: summary[k] for k in ("rollout", "generation", "state",
                                                                                  "counter")}, sort_keys=True))
            client.set_model_version_tag(m["name"], m["version"], f"{TAG_PREFIX}.{self.fleet}",
                                         json.dumps(summary, sort_keys=True))
        except Exception as exc:
            log.error("could not tag the model version: %s", exc)

    def ended_tag(self, rollout_uid: str) -> str:
        return f"{TAG_PREFIX}.{self.fleet}.ended.{rollout_uid}"

    def ended(self, rec: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
        """``(MLflow's record that this generation of the rollout ended, or None; the highest controller
        state counter MLflow's end tags of this model version carry)``.

        A bucket writer can put back an older, validly signed version of a record (``pending``
        after it was aborted, say), and of the controller state with it; the model version's tags,
        which the controller writes when a rollout ends, are outside the store and say otherwise.
        Raises :class:`RegistryUnavailable` when MLflow does not answer: nothing is resumed unchecked.
        """
        m = rec.get("model") or {}
        try:
            tags = self.client().get_model_version(m["name"], m["version"]).tags or {}
        except Exception as exc:
            raise RegistryUnavailable(f"cannot check its end in MLflow ({type(exc).__name__}: "
                                      f"{' '.join(str(exc).split())[:200]})") from None
        prefix, floor, mine = f"{TAG_PREFIX}.{self.fleet}.ended.", 0, None
        for key, value in tags.items():
            if not key.startswith(prefix):
                continue
            try:
                got = json.loads(value)
            except ValueError:
                continue
            if not isinstance(got, dict):
                continue
            counter = got.get("counter")
            if isinstance(counter, int) and not isinstance(counter, bool):
                floor = max(floor, counter)
            if key == self.ended_tag(str(rec.get("rollout_uid"))) and got.get("state") in TERMINAL:
                mine = got
        return mine, floor
