"""`edgeslim init`'s data: an image folder gets a classification recipe with the preprocessing it needs,
written so that `edgeslim run` accepts it; the demo's digits are named explicitly; no data flag, or wrong
arguments, are one line."""

from __future__ import annotations

import pytest

from edgeslim.components.recipe import load_recipe
from tests.conftest import run_cli
from tests.image_datasets import write_imagefolder


def test_an_image_folder_gets_a_classification_recipe_with_imagenet_preprocessing(tmp_path):
    write_imagefolder(tmp_path / "images", counts=(20, 5, 5), classes=3)
    out = tmp_path / "recipe.yaml"
    proc = run_cli("init", "--source", "models:/my-resnet@champion", "--data", "imagefolder",
                   "--data-arg", f"root={tmp_path / 'images'}", "--data-arg", "workers=2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    recipe = load_recipe(out)
    assert recipe.task.kind == "classification"
    assert recipe.data.provider == "imagefolder"
    assert recipe.data.args == {"root": str(tmp_path / "images"), "workers": 2}
    pre = recipe.data.preprocess
    assert (pre.resize, pre.center_crop, pre.mean, pre.std) == (256, 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    # --preprocess picks another preset, or none
    proc = run_cli("init", "--source", "models:/m@a", "--data", "imagefolder", "--data-arg", "root=/nowhere",
                   "--preprocess", "none", "-o", str(tmp_path / "plain.yaml"), "--task", "classification")
    assert proc.returncode == 0, proc.stderr
    assert load_recipe(tmp_path / "plain.yaml").data.preprocess is None


def test_the_demo_data_is_named_explicitly(tmp_path):
    out = tmp_path / "recipe.yaml"
    proc = run_cli("init", "--source", "models:/digits-teacher@champion", "--data", "sklearn-digits", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    recipe = load_recipe(out)
    assert (recipe.data.provider, recipe.task.kind) == ("sklearn-digits", "classification")
    # the gate's confidence, commented, with the split sizes a 1-pt bound needs beside the data's
    text = out.read_text()
    assert recipe.gate.confidence is None and "  # confidence: 0.95" in text
    need = next(line for line in text.splitlines() if "bound needs about" in line)
    assert int(need.split("about ")[1].split()[0].replace(",", "")) > 360  # more than the digits hold
    assert "(val has 180 images, test 359)" in text


@pytest.mark.parametrize("args, needle", [
    ([], "no data: pass --npz PATH"),  # init never guesses the data
    (["--data", "imagefolder", "--data-arg", "root"], "--data-arg 'root': use KEY=VALUE"),
    (["--npz", "x.npz", "--data", "imagefolder"], "--npz and --data: give one data source"),
    (["--data-arg", "root=/x"], "--data-arg: name the provider with --data"),
    (["--data", "no-such-provider", "--task", "detection"], "data.provider: unknown provider 'no-such-provider'"),
])
def test_wrong_data_arguments_are_one_line(tmp_path, args, needle):
    proc = run_cli("init", "--source", "models:/m@a", *args, "-o", str(tmp_path / "r.yaml"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    if not args:
        assert "--data PROVIDER" in lines[0] and "--data sklearn-digits" in lines[0]
    assert not (tmp_path / "r.yaml").exists()
