"""A uniform model soup: the element-wise mean of the weights of models fine-tuned from the same
base with different seeds (Wortsman et al., 2022). It serves at one model's cost; measured here,
it evens out the seed-to-seed spread of a single run (docs/classifier.md, *Where it stands*)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def average_weights(members: Sequence[Path], out: Path) -> int:
    """Write to ``out`` the first member's ONNX graph with every floating-point initializer
    replaced by the mean over all members; return how many were averaged (0 for one member,
    which is copied). The graphs must be the same export: same nodes, same initializer names
    and shapes, equal integer initializers."""
    if not members:
        raise ValueError("a soup needs at least one model")
    if len(members) == 1:
        shutil.copyfile(members[0], out)
        return 0
    base, *others = (onnx.load(str(m)) for m in members)
    ops = [n.op_type for n in base.graph.node]
    tables = []
    for path, model in zip(members[1:], others, strict=True):
        if [n.op_type for n in model.graph.node] != ops:
            raise ValueError(f"{path} is not the same graph as {members[0]}")
        tables.append({i.name: numpy_helper.to_array(i) for i in model.graph.initializer})
    averaged = 0
    for init in base.graph.initializer:
        first = numpy_helper.to_array(init)
        rest = []
        for path, table in zip(members[1:], tables, strict=True):
            other = table.get(init.name)
            if other is None or other.shape != first.shape:
                raise ValueError(f"{path}: initializer {init.name} is missing or shaped otherwise")
            rest.append(other)
        if first.dtype.kind != "f":
            if not all(np.array_equal(first, other) for other in rest):
                raise ValueError(f"initializer {init.name} (integer) differs between members")
            continue
        mean = (first.astype(np.float64) + sum(o.astype(np.float64) for o in rest)) / len(members)
        init.CopyFrom(numpy_helper.from_array(mean.astype(first.dtype), init.name))
        averaged += 1
    onnx.save(base, str(out))
    return averaged
