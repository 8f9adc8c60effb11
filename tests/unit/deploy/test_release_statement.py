"""The release statement of an edge model: built from its own files and its recorded gate verdict."""

from __future__ import annotations

import hashlib
import json

import pytest

from edgeslim.components.common.errors import ConfigError, SourceError
from edgeslim.deploy.release import statement_for_dir


def _edge_model(tmp_path, gate):
    d = tmp_path / "model"
    (d / "engines" / "orin-sm87-jp6.1-trt10.3").mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"onnx bytes")
    (d / "engines" / "orin-sm87-jp6.1-trt10.3" / "model.engine").write_bytes(b"engine bytes")
    (d / "engines" / "empty-class").mkdir()  # a class whose engine was not built: not in the statement
    if gate is not None:
        (d / "edge_meta.json").write_text(json.dumps({"gate": gate}))
    return d


def test_the_statement_covers_the_files_and_the_passed_verdict(tmp_path):
    d = _edge_model(tmp_path, {"passed": True, "summary": "passed: top-1 fell 0.2 pt"})
    s = statement_for_dir(d, name="m-edge", version="3", run_id="r1", expires_s=60)
    assert s["model"] == {"name": "m-edge", "version": "3", "run_id": "r1"}
    assert s["artifact"] == {"sha256": hashlib.sha256(b"onnx bytes").hexdigest(), "size": 10}
    assert s["engines"] == {"orin-sm87-jp6.1-trt10.3": {"sha256": hashlib.sha256(b"engine bytes").hexdigest(),
                                                        "size": 12}}
    assert s["gate"]["passed"] is True and s["expires_at"] - s["issued_at"] == pytest.approx(60)


@pytest.mark.parametrize("gate,error,needle", [
    ({"passed": False, "summary": "failed: top-1 fell 3 pt"}, ConfigError, "did not pass its gate"),
    (None, ConfigError, "records no gate verdict"),
])
def test_a_model_without_a_passed_gate_gets_no_statement(tmp_path, gate, error, needle):
    with pytest.raises(error) as err:
        statement_for_dir(_edge_model(tmp_path, gate), name="m-edge", version="3", run_id=None)
    assert "\n" not in str(err.value) and needle in str(err.value)


def test_only_edge_models_get_statements(tmp_path):
    with pytest.raises(SourceError, match="has no model.onnx: only edge models"):
        statement_for_dir(tmp_path, name="plain", version="1", run_id=None)
