"""Model code travels with the model: a class from the user's own module, saved with its code,
loads in a fresh process where that module exists nowhere else; without its code, one line."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from edgeslim.components.common.errors import SourceError
from edgeslim.components.common.model_io import code_dir_of, load_module, save_module

MODULE = "my_models"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    def twice(x):
        return 2 * x


    class TinyNet(nn.Module):
        """A user's classifier for 1x8x8 inputs, in the user's own module."""

        def __init__(self, width=4):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 3, padding=1)
            self.head = nn.Linear(width * 64, 10)
            self.act = twice

        def forward(self, x):
            return self.head(torch.flatten(self.act(torch.relu(self.conv(x))), 1))
''')


def import_user_model(src: Path):
    """Build a TinyNet from ``src/my_models.py``, then forget the module (sys.path and sys.modules)."""
    src.mkdir(parents=True, exist_ok=True)
    (src / f"{MODULE}.py").write_text(SOURCE)
    sys.path.insert(0, str(src))
    try:
        mod = importlib.import_module(MODULE)
        torch.manual_seed(0)
        model = mod.TinyNet().eval()
    finally:
        sys.path.remove(str(src))
    return model


@pytest.fixture(autouse=True)
def _forget_user_module():
    saved = list(sys.path)
    yield
    sys.modules.pop(MODULE, None)
    sys.path[:] = saved


def in_fresh_process(code: str, cwd: Path) -> dict:
    """Run ``code`` in a new interpreter (cwd outside the repo); it prints one JSON line."""
    prog = textwrap.dedent('''
        import importlib.util, json, sys
        import torch
        from edgeslim.components.common.errors import SourceError
        from edgeslim.components.common.model_io import load_module, save_module
        out = {"importable_before": importlib.util.find_spec("my_models") is not None}
    ''') + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", prog], check=False, capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_code_travels_with_every_saved_model_to_a_fresh_process(tmp_path):
    src = tmp_path / "user-src"
    model = import_user_model(src)
    x = torch.randn(3, 1, 8, 8)
    expected = model(x).detach()
    torch.save(x, tmp_path / "x.pt")
    parent = save_module(model, tmp_path / "pull" / "model", code_paths=[src / f"{MODULE}.py"])
    assert (code_dir_of(parent) / f"{MODULE}.py").read_text() == SOURCE
    # The module exists nowhere but in what was saved with the model.
    sys.modules.pop(MODULE)
    shutil.rmtree(src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    # Task 2 (transform): loads the parent, saves a derived model without naming any code.
    out = in_fresh_process(f'''
        m = load_module({str(parent)!r})
        out["cls"] = type(m).__module__ + "." + type(m).__name__
        out["y"] = m(torch.load({str(tmp_path / "x.pt")!r})).tolist()
        m.head.bias.data += 1.0
        save_module(m, {str(tmp_path / "transform" / "student")!r})
    ''', elsewhere)
    assert out["importable_before"] is False
    assert out["cls"] == "my_models.TinyNet"
    assert torch.allclose(torch.tensor(out["y"]), expected, atol=1e-5)
    student = tmp_path / "transform" / "student"
    assert (code_dir_of(student) / f"{MODULE}.py").read_text() == SOURCE

    # Task 3 (quantize), on "another pod": only the file travels, no sidecar folder beside it.
    pod = tmp_path / "pod" / "student"
    pod.parent.mkdir()
    shutil.copyfile(student, pod)
    out = in_fresh_process(f'''
        m = load_module({str(pod)!r})
        out["y"] = m(torch.load({str(tmp_path / "x.pt")!r})).tolist()
    ''', elsewhere)
    assert out["importable_before"] is False
    assert torch.allclose(torch.tensor(out["y"]), expected + 1.0, atol=1e-5)
    assert (code_dir_of(pod) / f"{MODULE}.py").read_text() == SOURCE  # unpacked from the file


def test_mlflow_code_dir_on_sys_path_is_shipped_without_asking(tmp_path):
    # As after mlflow.pytorch.load_model of a model logged with code_paths: <model dir>/code on sys.path.
    model_dir = tmp_path / "download" / "parent"
    (model_dir / "MLmodel").parent.mkdir(parents=True)
    (model_dir / "MLmodel").write_text("flavors: {pytorch: {code: code}}\n")
    model = import_user_model(model_dir / "code")
    sys.path.insert(0, str(model_dir / "code"))
    path = save_module(model, tmp_path / "out" / "model")
    assert (code_dir_of(path) / f"{MODULE}.py").read_text() == SOURCE


def test_models_without_user_code_have_no_sidecar(tmp_path):
    # Classes from installed packages (torch here) need nothing beside the file.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    path = save_module(model, tmp_path / "model")
    assert not code_dir_of(path).exists()
    assert isinstance(load_module(path)[1], torch.nn.Linear)
    # A plain torch.save'd module loads too.
    torch.save(model, tmp_path / "plain.pt")
    assert isinstance(load_module(tmp_path / "plain.pt"), torch.nn.Sequential)


def test_a_class_that_cannot_be_imported_is_one_line_with_both_fixes(tmp_path):
    src = tmp_path / "user-src"
    model = import_user_model(src)
    torch.save(model, tmp_path / "model")  # no code with it
    sys.modules.pop(MODULE)
    with pytest.raises(SourceError) as err:
        load_module(tmp_path / "model")
    msg = str(err.value)
    assert "\n" not in msg and err.value.__cause__ is None and err.value.__suppress_context__
    assert "'my_models'" in msg
    assert "code_paths=['my_models.py']" in msg and "pipeline image" in msg

    # The module is there but the class is not (stale code): the class and module are named.
    (src / f"{MODULE}.py").write_text("x = 1\n")
    sys.path.insert(0, str(src))
    with pytest.raises(SourceError) as err:
        load_module(tmp_path / "model")
    msg = str(err.value)
    assert "\n" not in msg and "class 'TinyNet' in module 'my_models'" in msg and "code_paths" in msg
