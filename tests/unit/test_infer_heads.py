"""`edgeslim init` reads a YOLO-style detector's heads from its output shapes."""

import pytest

from edgeslim.components.common.errors import ConfigError
from edgeslim.components.tasks.detection.runtime import infer_heads

NAMES = [f"output_{i}" for i in range(6)]


def test_box_and_class_pairs_become_heads_with_their_strides():
    shapes = [[2, 4, 80, 80], [2, 3, 80, 80], [2, 3, 40, 40], [2, 4, 40, 40], [2, 4, 20, 20], [2, 3, 20, 20]]
    heads = infer_heads(NAMES, shapes, (640, 640), num_classes=3)
    assert heads == [{"box": "output_0", "cls": "output_1", "stride": 8},
                     {"box": "output_3", "cls": "output_2", "stride": 16},  # class map first: still paired
                     {"box": "output_4", "cls": "output_5", "stride": 32}]


@pytest.mark.parametrize("shapes,num_classes,needle", [
    ([[2, 84, 8400]], 80, "expected (box, class) output pairs"),
    ([[2, 4, 80, 80], [2, 7, 80, 80]], 3, "are not a [N, 4, H, W] box map and a [N, 3, H, W] class map"),
    ([[2, 4, 80, 80], [2, 3, 40, 40]], 3, "are not a [N, 4, H, W]"),
    ([[2, 4, 30, 30], [2, 3, 30, 30]], 3, "does not divide the 640x640 input"),
    ([[2, 4, 8, 8], [2, 4, 8, 8]], 4, "num_classes=4"),
])
def test_outputs_that_are_not_yolo_pairs_are_refused_with_the_way_out(shapes, num_classes, needle):
    with pytest.raises(ConfigError) as e:
        infer_heads(NAMES[:len(shapes)], shapes, (640, 640), num_classes)
    msg = str(e.value)
    assert needle in msg and "task.decode_fn" in msg and "\n" not in msg
