"""The Task is chosen once from the recipe through the task registry; your own task plugs in through an
entry point, the built-in ones the same way."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.common.tasks import TASKS, Task, runtime_for, task_class, task_for, task_from_dict
from edgeslim.components.recipe import recipe_from_dict

DETECTION = {"kind": "detection", "num_classes": 3,
             "decoder": {"heads": [{"box": "output_0", "cls": "output_1", "stride": 8}]}}


def test_built_in_tasks_by_kind():
    from importlib.metadata import entry_points

    # the built-in tasks are registered exactly as a plugin's: entry points of the installed distribution
    installed = {ep.name: ep.value for ep in entry_points(group="edgeslim.tasks")}
    assert installed["classification"] == "edgeslim.components.tasks.classification:ClassificationTask"
    assert installed["detection"] == "edgeslim.components.tasks.detection:DetectionTask"
    cls = task_for(task_from_dict(None))
    det = task_for(task_from_dict(DETECTION))
    assert type(cls).__name__ == "ClassificationTask" and cls.metadata() == "classification"
    assert type(det).__name__ == "DetectionTask" and det.metadata()["num_classes"] == 3
    assert isinstance(cls, Task) and isinstance(det, Task)  # every method of the protocol


def test_no_task_subclasses_another():
    kinds = [task_class(k) for k in TASKS.names()]
    for t in kinds:
        assert [b for b in t.__mro__[1:] if b is not object] == [], f"{t.__name__} inherits {t.__mro__[1:]}"
    # and each has its own runtime half
    assert type(runtime_for(None)).__name__ == "ClassificationRuntime"
    assert type(runtime_for(DETECTION)).__name__ == "DetectionRuntime"


def test_a_detection_recipe_may_ask_for_qat():
    raw = {"source": "models:/m@champion", "task": DETECTION, "stages": [{"quantize": {"method": "qat"}}]}
    assert recipe_from_dict(raw).quantize.method == "qat"


def test_a_detection_recipe_with_a_top_level_gate_is_refused_not_ignored():
    raw = {"source": "models:/m@champion", "task": DETECTION, "stages": [{"quantize": {"method": "ptq"}}],
           "gate": {"max_metric_drop": 0.5}}
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("gate: a detection recipe is gated by task.gate")
    assert "max_map_drop" in msg  # it names where the checks go
    # ...and the same checks under task.gate are taken
    raw = {**raw, "task": {**DETECTION, "gate": {"max_map_drop": 0.5}}}
    del raw["gate"]
    assert recipe_from_dict(raw).task.gate.max_map_drop == 0.5


def test_an_unknown_kind_names_the_entry_point_group():
    with pytest.raises(ConfigError, match="edgeslim.tasks") as err:
        task_from_dict({"kind": "detecton"})
    assert "did you mean 'detection'" in str(err.value) and "\n" not in str(err.value)


def test_your_own_task_through_an_installed_entry_point(tmp_path):
    # A real distribution on sys.path: importlib.metadata finds its entry point as it would a pip install.
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent('''
        import dataclasses
        from typing import Literal
        from edgeslim.components.common.tasks import TaskConfig

        @dataclasses.dataclass(frozen=True)
        class DepthConfig(TaskConfig):
            kind: Literal["depth"] = "depth"
            num_classes: int = 2
            quantize_methods = ("ptq", "auto")

        class DepthTask:
            kind = "depth"
            config_class = DepthConfig

            def __init__(self, config):
                self.config = config

            def gate(self, metrics, recipe):
                return {"passed": metrics["delta1"] > 50, "summary": "delta1", "checks": []}

            def metadata(self):
                return self.config.metadata()
    '''))
    dist = tmp_path / "my_tasks-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-tasks\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[edgeslim.tasks]\ndepth = my_tasks:DepthTask\n")
    code = textwrap.dedent('''
        from edgeslim.components.recipe import recipe_from_dict
        from edgeslim.components.common.tasks import task_for
        r = recipe_from_dict({"source": "models:/m@champion", "task": {"kind": "depth", "num_classes": 5}})
        t = task_for(r.task)
        print(type(t).__name__, r.task.num_classes, t.gate({"delta1": 61.0}, r)["passed"], t.metadata()["kind"])
        try:  # a method the task's config does not list is refused when the recipe loads, in one line
            recipe_from_dict({"source": "models:/m@champion", "task": {"kind": "depth"},
                              "stages": [{"quantize": {"method": "qat"}}]})
        except Exception as e:
            print(type(e).__name__, "|", str(e).replace(" ", "_"))
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    first, refusal = out.stdout.splitlines()
    assert first.split() == ["DepthTask", "5", "True", "depth"]
    assert refusal == ("ConfigError | stages:_quantize_method_'qat'_is_not_available_for_a_depth_task;_"
                       "use_one_of_ptq,_auto")
