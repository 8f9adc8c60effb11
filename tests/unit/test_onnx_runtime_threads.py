"""ONNX Runtime sessions take their thread count from $EDGESLIM_ORT_THREADS on a shared machine."""

from __future__ import annotations

import pytest

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.onnx_runtime import make_session
from tests.fleet_it_helpers import make_onnx


def test_the_environment_caps_intra_op_threads_unless_the_caller_chooses(tmp_path, monkeypatch):
    path = make_onnx(tmp_path / "m.onnx")
    monkeypatch.setenv("EDGESLIM_ORT_THREADS", "1")
    assert make_session(path).get_session_options().intra_op_num_threads == 1
    assert make_session(path, threads=2).get_session_options().intra_op_num_threads == 2
    monkeypatch.delenv("EDGESLIM_ORT_THREADS")
    assert make_session(path).get_session_options().intra_op_num_threads == 0  # ONNX Runtime's own choice


def test_a_thread_count_that_is_not_a_number_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESLIM_ORT_THREADS", "two")
    with pytest.raises(ConfigError) as err:
        make_session(make_onnx(tmp_path / "m.onnx"))
    assert "\n" not in str(err.value) and "EDGESLIM_ORT_THREADS='two'" in str(err.value)
