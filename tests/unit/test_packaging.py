"""The distribution's shape: folders are subpackages, and `edge` stays Raspberry-Pi small."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]

# Never on a gateway device: the training/orchestration stack and FastAPI's server stack.
FORBIDDEN_ON_EDGE = {
    "mlflow", "mlflow-skinny", "apache-airflow", "apache-airflow-core", "fastapi",
    "starlette", "uvicorn", "scikit-learn", "skl2onnx",
}


def resolve(requirement: str) -> set[str]:
    """Every distribution `requirement` pulls in, transitively, with markers evaluated
    for this platform: the closure pip would install, read from installed metadata."""
    seen: set[str] = set()
    pending = [(Requirement(requirement), frozenset[str]())]
    while pending:
        req, _ = pending.pop()
        name = canonicalize_name(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError as err:
            raise AssertionError(f"{name} (needed by {requirement}) is not installed") from err
        for text in dist.requires or []:
            child = Requirement(text)
            wanted_extras = req.extras or {""}
            if child.marker is not None and not any(
                child.marker.evaluate({**default_environment(), "extra": extra})
                for extra in wanted_extras
            ):
                continue
            pending.append((child, frozenset()))
    return {key.split("[")[0] for key in seen}


def test_edge_extra_excludes_the_cloud_stack() -> None:
    closure = resolve("edgefleet[edge]")
    assert {"onnxruntime", "pymodbus", "asyncua", "paho-mqtt", "sqlite-utils"} <= closure
    assert closure & FORBIDDEN_ON_EDGE == set(), sorted(closure & FORBIDDEN_ON_EDGE)


def test_resolver_sees_what_the_cloud_extra_pulls() -> None:
    # The check above only means something if the resolver finds forbidden packages
    # where they are wanted.
    closure = resolve("edgefleet[cloud]")
    assert {"mlflow", "apache-airflow", "fastapi", "scikit-learn"} <= closure


def test_each_component_folder_is_the_subpackage_imported() -> None:
    for folder, module in [
        ("protocols", "edgefleet.protocols"),
        ("edge-agent", "edgefleet.edge_agent"),
        ("fog-gateway", "edgefleet.fog_gateway"),
        ("cloud", "edgefleet.cloud"),
        ("firmware-sim", "edgefleet.firmware_sim"),
        ("deploy", "edgefleet.deploy"),
    ]:
        imported = importlib.import_module(module)
        assert imported.__file__ is not None
        assert Path(imported.__file__).resolve().parent == REPO / folder
        assert (REPO / folder / "py.typed").exists()
