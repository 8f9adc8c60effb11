"""The edge-compression pipeline: registry -> stages -> gate -> registry.

One generic pipeline, parameterised by the recipe (as JSON), so a cluster
compiles and uploads it once and every model reuses it::

    pull -> export(parent) ----------------------------.
         \\-> transform -> export(student) -> quantize -> evaluate -> gate
                                                       If passed: register / Else: reject
                                                       -> report (OneOf)
"""


from pathlib import Path

from kfp import compiler, dsl

from edgeslim.components.engine.config import TensorRTEngineConfig
from edgeslim.components.kfp.placement import apply_device_class_placement, parallel_items
from edgeslim.components.kfp.ops import DEFAULT_IMAGE, make_ops

PIPELINE_NAME = "edgeslim-edge-compression"
COMPILED = Path(__file__).with_name("edge_compression.yaml")


def build_pipeline(base_image: str = DEFAULT_IMAGE, *, engines: TensorRTEngineConfig | None = None,
                   placement: bool = True):
    """The ``@dsl.pipeline`` function, with components on ``base_image``.

    Args:
        base_image: image of the CPU tasks (edgeslim installed).
        engines: the device classes engine tasks are laid out for, with their node
            selectors (Kubernetes places tasks when the pipeline is compiled, so the
            classes are fixed then; the recipe's ``engines`` settings apply at run time).
        placement: give engine tasks a GPU request and their device class's node
            selector (Kubernetes only; the local runner has no nodes to select).
    """
    ops = make_ops(base_image)
    engines = engines or TensorRTEngineConfig()
    items = parallel_items(engines)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Compress a registered PyTorch model to a gated int8 Q/DQ ONNX and register it "
        "back in MLflow with its lineage.",
    )
    def edge_compression(recipe_json: str, tracking_uri: str = "") -> dsl.Artifact:
        pulled = ops.pull_op(recipe_json=recipe_json, tracking_uri=tracking_uri).set_display_name("pull")
        parent_onnx = ops.export_op(recipe_json=recipe_json, model=pulled.outputs["model"]) \
            .set_display_name("export parent")
        transformed = ops.transform_op(recipe_json=recipe_json, model=pulled.outputs["model"]) \
            .set_display_name("transform (distill, prune)")
        student_onnx = ops.export_op(recipe_json=recipe_json, model=transformed.outputs["student"]) \
            .set_display_name("export student")
        quantized = ops.quantize_op(
            recipe_json=recipe_json, tracking_uri=tracking_uri, onnx_model=student_onnx.outputs["onnx_model"],
            student=transformed.outputs["student"], parent_onnx=parent_onnx.outputs["onnx_model"],
        ).set_display_name("quantize")
        evaluated = ops.evaluate_op(
            recipe_json=recipe_json, qdq_model=quantized.outputs["qdq_model"],
            parent_onnx=parent_onnx.outputs["onnx_model"], student_onnx=student_onnx.outputs["onnx_model"],
        ).set_display_name("evaluate")
        gated = ops.gate_op(recipe_json=recipe_json, evaluation=evaluated.outputs["evaluation"]) \
            .set_display_name("gate")
        for t in (pulled, parent_onnx, transformed, student_onnx, quantized, evaluated, gated):
            t.set_caching_options(False)
        # One engine task per device class, each on a GPU node of that class. It builds
        # only when the gate passed, verifies its engine, and a failing engine stops the
        # registration. (The loop sits outside dsl.If: loop-item node selectors cannot
        # cross into a condition branch.)
        plan = ops.plan_engines_op(recipe_json=recipe_json, parent=pulled.outputs["parent"],
                                   verdict=gated.outputs["verdict"]) \
            .set_display_name("plan engines").set_caching_options(False)
        collected = []
        if items:
            with dsl.ParallelFor(items, name="device-classes") as item:
                eng = ops.engine_build_op(
                    qdq_model=quantized.outputs["qdq_model"], device_class=item.device_class,
                    plan=plan.outputs["plan"],
                ).set_display_name("engine").set_caching_options(False)
                if placement:
                    apply_device_class_placement(eng, item, engines)
            collected = dsl.Collected(eng.outputs["Output"])
        with dsl.If(gated.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (KFP condition)
            reg = ops.register_op(
                recipe_json=recipe_json, tracking_uri=tracking_uri, qdq_model=quantized.outputs["qdq_model"],
                parent=pulled.outputs["parent"], evaluation=evaluated.outputs["evaluation"],
                verdict=gated.outputs["verdict"], engines=collected,
            ).set_display_name("register").set_caching_options(False)
        with dsl.Else(name="gate-failed"):
            rej = ops.reject_op(verdict=gated.outputs["verdict"]).set_display_name("reject") \
                .set_caching_options(False)
        report = ops.report_op(
            recipe_json=recipe_json, tracking_uri=tracking_uri, parent=pulled.outputs["parent"],
            parent_export=parent_onnx.outputs["info"], transform=transformed.outputs["info"],
            quantized=quantized.outputs["info"], evaluation=evaluated.outputs["evaluation"],
            verdict=gated.outputs["verdict"],
            registered=dsl.OneOf(reg.output, rej.output),
            qdq_model=quantized.outputs["qdq_model"],
        ).set_display_name("report").set_caching_options(False)
        return report.outputs["report"]

    return edge_compression


def compile_pipeline(out: str | Path, base_image: str = DEFAULT_IMAGE,
                     engines: TensorRTEngineConfig | None = None) -> Path:
    """Write the pipeline as Kubeflow IR YAML (engine tasks for ``engines``; default: the demo recipe's)."""
    if engines is None:
        from edgeslim.components.recipe import load_recipe
        from edgeslim.pipelines.demo import DEMO_RECIPE

        engines = load_recipe(DEMO_RECIPE).engines
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(base_image, engines=engines), package_path=str(out))
    return out


if __name__ == "__main__":
    print(compile_pipeline(COMPILED))
