"""Each service installs with only its own dependencies.

The auditor must never pull onnxruntime or transformers; the classifier and the dispatcher must
never pull faust-streaming (it pins click<8.4, which holds transformers back). Checked on the
declared requirements and on their full transitive closure as installed in this environment.
"""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "pointsman-auditor": {"onnxruntime", "transformers", "torch", "tokenizers"},
    "pointsman-classifier": {"faust-streaming", "torch"},
    "pointsman-dispatcher": {"faust-streaming", "onnxruntime", "transformers", "torch"},
    "pointsman": {"faust-streaming", "onnxruntime", "transformers", "torch", "httpx"},
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    return canonical(re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0])


def closure(dist_name: str) -> set[str]:
    """Every distribution a distribution needs, following installed metadata (no extras)."""
    seen: set[str] = set()
    todo = [canonical(dist_name)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req.replace('"', "'").replace("extra==", "extra =="):
                continue
            todo.append(requirement_name(req))
    return seen


@pytest.mark.parametrize(
    "project",
    [
        "pyproject.toml",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "services").glob("*/pyproject.toml")),
    ],
)
def test_declared_dependencies_stay_in_their_lane(project: str) -> None:
    meta = tomllib.loads((ROOT / project).read_text())["project"]
    declared = {requirement_name(r) for r in meta["dependencies"]}
    assert not declared & FORBIDDEN[meta["name"]], (project, declared & FORBIDDEN[meta["name"]])


@pytest.mark.parametrize("dist", sorted(FORBIDDEN))
def test_installed_closure_stays_in_its_lane(dist: str) -> None:
    needed = closure(dist)
    assert canonical(dist) in needed
    assert len(needed) > 3, needed  # it really followed the metadata
    assert not needed & FORBIDDEN[dist], (dist, needed & FORBIDDEN[dist])


def test_services_share_the_core_and_copy_nothing() -> None:
    for project in (ROOT / "services").glob("*/pyproject.toml"):
        meta = tomllib.loads(project.read_text())["project"]
        assert "pointsman" in {requirement_name(r) for r in meta["dependencies"]}
