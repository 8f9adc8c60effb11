"""The accuracy-aware int8 search on models it was not built around: the float fallback's candidate
groups come from the graph (each output's tail: decode, DFL, concat, sigmoid, back to the last weighted
layers), so an Ultralytics YOLOv8n with one decoded (N, 4+nc, A) output gets its head kept in float, and a
classifier whose output ends in a softmax gets that tail measured beside its single layers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
SIZE = 256  # YOLOv8n takes any multiple of 32; 640 is its real size, 256 keeps this test fast


def decode_yolo(outputs):
    """The test's ``task.decode_fn`` for Ultralytics' decoded output: cx, cy, w, h, then class scores."""
    from edgeslim.components.tasks.detection.runtime import batched_nms

    dets = []
    for o in outputs[0]:
        score, cls = o[4:].max(0), o[4:].argmax(0)
        top = np.argsort(-score)[:300]
        cx, cy, w, h = o[:4, top]
        d = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score[top], cls[top]], 1)
        dets.append(batched_nms(d[d[:, 4] > 1e-4], 0.5, 100))
    return dets


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    """A random-init YOLOv8n (nc=3) exported with its decoded output, and splits of smooth random images
    whose labels are the fp32 model's own best boxes (no trained weights here: int8 damage shows as mAP)."""
    from ultralytics.nn.tasks import DetectionModel

    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.onnx_runtime import make_session, run_outputs

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    x = torch.nn.functional.interpolate(torch.rand(12, 3, SIZE // 16, SIZE // 16), size=(SIZE, SIZE),
                                        mode="bilinear").numpy()
    for bn in model.modules():  # BatchNorm statistics of the images, as training would leave them
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None
    with torch.no_grad():
        model.train()(torch.from_numpy(x))
    model.eval().model[-1].export = True
    path = tmp_path_factory.mktemp("yolo") / "yolov8n.onnx"
    torch.onnx.export(model, torch.from_numpy(x[:1]), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, opset_version=17, dynamo=False)
    _, (out,) = run_outputs(make_session(path), x)
    y = np.empty(len(x), dtype=object)
    y[:] = [d[:3][:, [0, 1, 2, 3, 5]] for d in decode_yolo([out])]
    return path, Splits(x[:6], y[:6], x[6:9], y[6:9], x[9:], y[9:], source="yolov8n-random")


def test_yolov8n_output_tail_is_its_head_and_the_search_keeps_it_float_from_the_first_trial(yolo, tmp_path):
    # Weighted placement (Q/DQ on conv inputs only): the output convs' int8 inputs and weights are what
    # keeping the tail float avoids. (On a random network 3 val images' own-box mAP swings by tens of points
    # with any change of the int8 model, so the search is judged here against a loose gate only.)
    from edgeslim.components.quantize import ptq as ptq_module
    from edgeslim.components.common.onnx_runtime import make_session, run_outputs, sqnr_db
    from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig
    from edgeslim.components.tasks.detection.config import DetectionGateConfig, DetectionTaskConfig
    from edgeslim.components.tasks.detection.search import quantize_detector_auto
    from edgeslim.components.quantize.sensitivity import output_tails, preprocessed

    path, data = yolo
    (tail,) = output_tails(preprocessed(path, tmp_path / "pre.onnx"))
    # Found from the graph: the DFL (softmax and its fixed conv) and box decode, and the six per-level output
    # convs (what Ultralytics' own int8 export keeps out of int8, by name), nothing of the backbone.
    assert {"/model.22/dfl/Softmax", "/model.22/dfl/conv/Conv", "/model.22/Sigmoid"} <= set(tail["nodes"])
    assert sorted(tail["layers"]) == sorted(f"/model.22/cv{b}.{i}/cv{b}.{i}.2/Conv" for b in (2, 3) for i in range(3))
    assert all(n.startswith("/model.22/") for n in tail["nodes"])

    task = DetectionTaskConfig(num_classes=3, score_threshold=0.001, decode_fn="test_search_any_model:decode_yolo",
                               gate=DetectionGateConfig(max_map_drop=15.0, max_map50_95_drop=30.0,
                                                        max_recall_drop=15.0))
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=6, max_float_layers=1, qat=False,
                                      placement="weighted")
    res = quantize_detector_auto(path, cfg, data=data, task=task, out_dir=tmp_path / "auto")
    report = json.loads((tmp_path / "auto" / "autotune.json").read_text())
    (ptq,) = report["trials"]
    assert ptq["kind"] == "ptq" and ptq["passed"] and set(tail["nodes"]) <= set(ptq["float_layers"])
    # and the first conv, which reads the image itself
    assert "float in every trial: ['output', " in res.metrics["reason"] and "/model.0/conv/Conv" in ptq["float_layers"]
    all_int8 = ptq_module.quantize(path, cfg.ptq("minmax"), data=data, out_dir=tmp_path / "all-int8").model

    # The chosen int8 model's decoded output is closer to fp32 than all-int8 PTQ's, on the validation images.
    def out(p):
        return run_outputs(make_session(p), data.x_val)[1][0]

    ref = out(path)
    assert sqnr_db(ref, out(res.model)) > sqnr_db(ref, out(all_int8))


class _OneOutputDetector(torch.nn.Module):
    """Two feature convs and a (box, class) conv pair whose maps are flattened, joined and put out as one
    decoded (N, 4+nc, A) tensor: a single output, nothing like the reference detector's map pairs."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.ReLU())
        self.box, self.cls = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(8, 3, 1)

    def forward(self, x):
        f = self.features(x)
        return torch.cat([self.box(f).flatten(2).exp() * 8, self.cls(f).flatten(2).sigmoid()], 1)


def test_with_fewer_tails_than_the_fallback_may_keep_single_layers_are_ranked_after_the_tail(tmp_path):
    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig
    from edgeslim.components.tasks.detection.config import DetectionTaskConfig
    from edgeslim.components.tasks.detection.search import DetectorStrategy
    from edgeslim.components.quantize.ptq import calibrate_onnx
    from edgeslim.components.quantize.sensitivity import output_tails, preprocessed, quantizable_layers

    torch.manual_seed(0)
    path = tmp_path / "det.onnx"
    torch.onnx.export(_OneOutputDetector().eval(), torch.rand(1, 3, 32, 32), str(path), input_names=["input"],
                      output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
                      opset_version=17, dynamo=False)
    x = np.random.default_rng(0).random((10, 3, 32, 32), dtype=np.float32)
    y = np.empty(10, dtype=object)
    y[:] = [np.array([[4.0, 4.0, 20.0, 20.0, 1.0]], np.float32)] * 10
    data = Splits(x[:4], y[:4], x[4:7], y[4:7], x[7:], y[7:])
    strategy = DetectorStrategy(path, DetectionTaskConfig(num_classes=3, decode_fn="test_search_any_model:decode_yolo"))
    strategy.reference(data)
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=4, max_float_layers=3, qat=False)
    groups = strategy.rank(path, cfg, calibrator="minmax", ranges=calibrate_onnx(path, cfg.ptq("minmax"), data),
                           data=data, out_dir=tmp_path, pinned=[])
    pre = preprocessed(path, tmp_path / "p.onnx")
    (tail,) = output_tails(pre)
    assert len(tail["layers"]) == 2  # the box and class convs
    feature_convs = [lay["node"] for lay in quantizable_layers(pre) if lay["node"] not in tail["nodes"]]
    assert groups[0]["nodes"] == tail["nodes"] and len(groups) == 3
    assert sorted(g["nodes"][0] for g in groups[1:]) == sorted(feature_convs)
    singles = strategy.table[1:]
    assert [r["sqnr_db"] for r in singles] == sorted(r["sqnr_db"] for r in singles)  # the most damaged first


def test_the_one_pass_layer_proxy_finds_the_layer_whose_int8_rounding_clips(tmp_path):
    """The single layers' ranking comes from one pass that captures every layer's input: a layer whose
    input range is cut to a hundredth (a calibrator clipping it) ranks as the most damaged, and the
    other layers' figures do not move."""
    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize.ptq import calibrate_onnx
    from edgeslim.components.quantize.sensitivity import layer_noise_proxy, preprocessed, quantizable_layers

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 3)).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, torch.rand(1, 3, 8, 8), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, opset_version=17, dynamo=False)
    x = np.random.default_rng(0).random((12, 3, 8, 8), dtype=np.float32)
    y = np.zeros(12, dtype=np.int64)
    data = Splits(x[:6], y[:6], x[6:], y[6:], x[6:], y[6:])
    pre = preprocessed(path, tmp_path / "pre.onnx")
    ranges = calibrate_onnx(path, PTQQuantizeConfig(calibrator="minmax", num_samples=6), data)
    layers = [lay["node"] for lay in quantizable_layers(pre)]
    base = layer_noise_proxy(pre, ranges, data.x_val)
    assert sorted(base) == sorted(layers) and all(20 < v < 80 for v in base.values())  # int8: tens of dB

    import onnx

    third = next(n for n in onnx.load(str(pre)).graph.node if n.name == layers[2])
    clipped = layer_noise_proxy(pre, {**ranges, third.input[0]: ranges[third.input[0]] / 100}, data.x_val)
    assert min(clipped, key=clipped.get) == layers[2] and clipped[layers[2]] < 10
    assert {k: v for k, v in clipped.items() if k != layers[2]} == {k: v for k, v in base.items() if k != layers[2]}


def test_a_classifiers_softmax_tail_is_measured_beside_its_layers(tmp_path):
    import onnx

    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import AccuracyAwareQuantizeConfig
    from edgeslim.components.recipe import AccuracyGateConfig
    from edgeslim.components.tasks.classification.search import ClassifierStrategy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3), torch.nn.Softmax(dim=1)).eval()
    x = torch.rand(24, 1, 8, 8)
    path = tmp_path / "cls.onnx"
    torch.onnx.export(model, x[:1], str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, opset_version=17, dynamo=False)
    y = model(x).argmax(1).numpy()
    data = Splits(x[:8].numpy(), y[:8], x[8:16].numpy(), y[8:16], x[16:].numpy(), y[16:])
    strategy = ClassifierStrategy(path, AccuracyGateConfig())
    strategy.reference(data)
    cfg = AccuracyAwareQuantizeConfig(calibrators=["minmax"], num_samples=8, max_float_layers=2, qat=False)
    groups = strategy.rank(path, cfg, calibrator="minmax", ranges={}, data=data, out_dir=tmp_path, pinned=[])
    rows = {r["layer"]: r for r in strategy.table["layers"]}
    assert rows["tail of output"]["op"] == "tail"
    ops = {n.name: n.op_type for n in onnx.load(str(path)).graph.node}
    assert sorted(ops[n] for n in rows["tail of output"]["nodes"]) == ["Gemm", "Softmax"]
    assert len(rows) == 3  # the conv and the linear layer alone, and the tail
    assert {tuple(g["nodes"]) for g in groups} == {tuple(r["nodes"]) for r in rows.values()}


def _entropy_bin_loop(hist: np.ndarray) -> int:
    """The entropy calibrator's threshold search as it was, one candidate at a time (the reference)."""
    n, levels = len(hist), 128
    if n <= levels:
        return n
    hist = hist.astype(np.float64)
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, max(1, (n - levels) // 256)):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()
        nonzero = hist[:i] != 0
        q = np.zeros(i, dtype=np.float64)
        for idx in np.array_split(np.arange(i), levels):
            cnt = nonzero[idx].sum()
            if cnt:
                q[idx[nonzero[idx]]] = hist[idx].sum() / cnt
        p = ref / ref.sum()
        if q.sum() == 0:
            continue
        q = q / q.sum()
        mask = p > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.where(q[mask] > 0, q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def test_the_entropy_threshold_search_gives_the_same_amax_as_the_loop_it_replaced():
    from edgeslim.components.quantize import calibrate

    rng = np.random.default_rng(0)
    samples = [rng.normal(0, 1, 100_000), rng.standard_cauchy(50_000), rng.exponential(2.0, 30_000),
               np.concatenate([rng.normal(0, 1, 50_000), [60.0]]),  # a rare outlier
               rng.normal(0, 1, 300) * (rng.random(300) < 0.3)]  # few samples: many empty bins
    for x in samples:
        for bins in (2048, 1000, 300):
            amax, hist, top = calibrate.collect(lambda b: [b], ["t"], [x.astype(np.float32)], bins)["t"]
            expected = min(float(np.linspace(0.0, top, len(hist) + 1)[_entropy_bin_loop(hist)]), amax)
            assert calibrate.choose_amax(amax, hist, "entropy", top=top) == expected


def test_calibration_reads_a_batch_at_a_time_and_its_maxima_do_not_depend_on_the_batch(tmp_path, monkeypatch):
    from edgeslim.components.common.data import Splits
    from edgeslim.components.common.stage_configs import PTQQuantizeConfig
    from edgeslim.components.quantize import ptq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3)).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, torch.rand(1, 1, 8, 8), str(path), input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "n"}, "output": {0: "n"}}, opset_version=17, dynamo=False)
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    y = np.zeros(20, dtype=np.int64)
    data = Splits(x[:12], y[:12], x[12:16], y[12:16], x[16:], y[16:])
    cfg = PTQQuantizeConfig(calibrator="minmax", num_samples=10)
    whole = ptq.calibrate_onnx(path, cfg, data)
    monkeypatch.setattr(ptq, "CALIB_MEMORY", 1)  # a memory budget of one image per batch
    assert ptq.calibrate_onnx(path, cfg, data) == whole
    assert len(list(ptq._Rows(data.x_train, data.calibration_rows(10), 3))) == 4  # 10 rows, 3 at a time
    assert np.array_equal(np.concatenate(list(ptq._Rows(data.x_train, data.calibration_rows(10), 3))),
                          data.calibration(10))
