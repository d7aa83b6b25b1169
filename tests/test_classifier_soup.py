"""The model soup: element-wise weight means over members of the same graph (pure onnx/numpy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pointsman_classifier.soup import average_weights


def linear(path: Path, weight: float, shape_value: int = 2, op: str = "MatMul") -> Path:
    """y = reshape(x, [1, shape_value]) @ W, W filled with ``weight``."""
    w = numpy_helper.from_array(np.full((2, 2), weight, dtype=np.float32), "W")
    shape = numpy_helper.from_array(np.array([1, shape_value], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node(op, ["flat", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [w, shape],
    )
    onnx.save(helper.make_model(graph), str(path))
    return path


def weights(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_float_weights_are_averaged_and_integers_kept(tmp_path: Path) -> None:
    members = [linear(tmp_path / f"m{i}.onnx", w) for i, w in enumerate((1.0, 2.0, 6.0))]
    out = tmp_path / "soup.onnx"
    assert average_weights(members, out) == 1
    w = weights(out)
    assert np.allclose(w["W"], 3.0) and w["W"].dtype == np.float32
    assert w["shape"].tolist() == [1, 2]


def test_one_member_is_copied(tmp_path: Path) -> None:
    out = tmp_path / "soup.onnx"
    assert average_weights([linear(tmp_path / "m.onnx", 5.0)], out) == 0
    assert np.allclose(weights(out)["W"], 5.0)


def test_members_of_other_graphs_are_refused(tmp_path: Path) -> None:
    a = linear(tmp_path / "a.onnx", 1.0)
    with pytest.raises(ValueError, match="not the same graph"):
        average_weights([a, linear(tmp_path / "b.onnx", 1.0, op="Add")], tmp_path / "s.onnx")
    with pytest.raises(ValueError, match="integer"):
        average_weights([a, linear(tmp_path / "c.onnx", 1.0, shape_value=-1)], tmp_path / "s.onnx")
    with pytest.raises(ValueError, match="at least one"):
        average_weights([], tmp_path / "s.onnx")
