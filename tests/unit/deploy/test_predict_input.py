"""A prediction request as each CLI delivers it (the DataFrame ``mlflow deployments predict`` reads with
``pandas.read_json``, the JSON ``edgeslim fleet predict`` parses) becomes the model's input tensors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from mlflow.types.schema import Schema, TensorSpec

from edgeslim.components.common.errors import SourceError
from edgeslim.deploy.predict_input import model_input

X = np.random.default_rng(0).random((2, 1, 8, 8))
DIGITS = Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 8, 8), "x")])


def _both(tmp_path, payload):
    """The request as ``mlflow deployments predict`` (a DataFrame) and ``edgeslim fleet predict`` (JSON) see it."""
    path = tmp_path / "batch.json"
    path.write_text(json.dumps(payload))
    return [pd.read_json(path), json.loads(path.read_text())]


@pytest.mark.parametrize("payload", [{"inputs": X.tolist()}, {"instances": X.tolist()}, X.tolist(),
                                     X.reshape(2, -1).tolist(), {"inputs": {"x": X.tolist()}}, {"x": X.tolist()}],
                         ids=["inputs", "instances", "bare-samples", "flat-rows", "named", "named-bare"])
def test_every_documented_form_reaches_the_model_as_its_input_tensor(tmp_path, payload):
    for data in _both(tmp_path, payload):
        got = model_input(data, DIGITS)
        assert list(got) == ["x"] and got["x"].dtype == np.float32
        np.testing.assert_allclose(got["x"], X.astype(np.float32))


def test_without_a_signature_the_samples_go_as_float32_arrays(tmp_path):
    x = np.arange(8.0).reshape(2, 4)
    for payload in ({"inputs": x.tolist()}, x.tolist()):
        for data in _both(tmp_path, payload):
            got = model_input(data)
            assert got.dtype == np.float32 and got.shape == (2, 4)


def test_a_model_with_two_inputs_takes_them_by_name(tmp_path):
    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, 3), "a"), TensorSpec(np.dtype(np.float32), (-1, 2), "b")])
    a, b = np.ones((2, 3)), np.zeros((2, 2))
    for data in _both(tmp_path, {"inputs": {"a": a.tolist(), "b": b.tolist()}}):
        got = model_input(data, schema)
        assert got["a"].shape == (2, 3) and got["b"].shape == (2, 2)
    with pytest.raises(SourceError, match="input 'b' is missing; the model's inputs: a, b"):
        model_input({"inputs": {"a": a.tolist()}}, schema)
    with pytest.raises(SourceError, match="the model has 2 inputs"):
        model_input({"inputs": a.tolist()}, schema)


def test_a_shape_the_model_cannot_take_is_one_line_saying_what_it_takes(tmp_path):
    for data in _both(tmp_path, np.zeros((2, 10)).tolist()):
        with pytest.raises(SourceError) as err:
            model_input(data, DIGITS)
        assert str(err.value) == ("predict: input 'x' got shape (2, 10); the model takes samples of shape (1x8x8) "
                                  "after the batch axis: send {\"inputs\": [sample, ...]} with each sample nested "
                                  "as (1x8x8), or rows of 64 numbers")
    with pytest.raises(SourceError, match="input 'x' is not an array of numbers of one shape"):
        model_input({"inputs": [[1, 2], [3]]}, DIGITS)
    with pytest.raises(SourceError, match="the rows are not all numbers"):
        model_input(pd.DataFrame({"a": ["x", "y"], "b": [1, 2]}), DIGITS)


@pytest.mark.parametrize("payload", [{"inputs": {"images": ["aGk=", "aGk="]}}, {"images": ["aGk=", "aGk="]},
                                     {"image": ["aGk=", "aGk="]}], ids=["inputs", "bare", "image-column"])
def test_raw_images_go_to_the_model_as_images_for_it_to_preprocess(tmp_path, payload):
    for data in _both(tmp_path, payload):
        assert model_input(data, DIGITS) == {"images": ["aGk=", "aGk="]}
