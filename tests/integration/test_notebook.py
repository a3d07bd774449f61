"""The exploration notebook `cloud/notebooks/explore.ipynb`, executed with nbclient in a
kernel of this test's interpreter: on embedded defaults (a simulated history), on a store
named by the environment, and failing with the data module's error on an empty store.

No servers: every file (store, labels, Jupyter and matplotlib state, temporary folders)
lives in the test's `tmp_path`."""

from __future__ import annotations

import base64
import re
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from edgefleet.cloud.training.data import DEFAULT_SPEC, extract, simulate_history
from edgefleet.fog_gateway.store import open_store

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).resolve().parents[2] / "cloud" / "notebooks" / "explore.ipynb"
CELL_TIMEOUT_S = 120
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def kernel_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Environment the kernel inherits: nothing from the user's home or Jupyter/IPython
    configuration, matplotlib headless, temporary folders inside `tmp_path`."""
    tmp = tmp_path / "tmp"
    for name, folder in {
        "HOME": "home", "JUPYTER_CONFIG_DIR": "jupyter/config", "JUPYTER_DATA_DIR":
        "jupyter/data", "JUPYTER_RUNTIME_DIR": "jupyter/runtime", "IPYTHONDIR": "ipython",
        "MPLCONFIGDIR": "matplotlib", "TMPDIR": "tmp",
    }.items():
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(tmp_path / folder))
    for name in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "EDGEFLEET_NOTEBOOK_STORE",
                 "EDGEFLEET_NOTEBOOK_LABELS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return tmp


def execute(tmp_path: Path) -> Any:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": tmp_path}})
    client.execute()
    return nb


def stdout(nb: Any) -> str:
    return "".join(output.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for output in cell.outputs
                   if output.output_type == "stream" and output.name == "stdout")


def printed_int(text: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}: (\d+)$", text, re.MULTILINE)
    assert match, f"no '{label}: N' line in the notebook's output:\n{text}"
    return int(match.group(1))


def assert_ran_cleanly(nb: Any) -> None:
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"code cell {index} did not run"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"code cell {index}: {errors[0].ename}: {errors[0].evalue}"
    # The kernel is this interpreter (ipykernel's spec resolves "python" to it).
    text = stdout(nb)
    assert f"python: {sys.executable}\n" in text
    assert f"prefix: {sys.prefix}\n" in text
    assert "sanity checks passed" in text


def test_committed_notebook_has_parameters_and_no_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "EDGEFLEET_NOTEBOOK_STORE" in code[0].source
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_notebook_runs_on_embedded_defaults(kernel_env: Path, tmp_path: Path) -> None:
    nb = execute(tmp_path)
    assert_ran_cleanly(nb)
    text = stdout(nb)
    # The simulated history went to a temporary folder (TMPDIR), not the home folder.
    assert f"store: sqlite://{kernel_env}/edgefleet-notebook-" in text
    # 1 h of 3 assets at 1 Hz: a window ends every 5th aligned second from the 30th on.
    window, hop, seconds, assets = DEFAULT_SPEC.window, 5, 3600, 3
    assert printed_int(text, "feature windows") == assets * ((seconds - window) // hop + 1)
    assert printed_int(text, "dropped rows (incomplete or bad quality)") == 0
    pngs = [base64.b64decode(output.data["image/png"])
            for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs
            if output.output_type == "display_data" and "image/png" in output.data]
    assert len(pngs) == 2  # raw series with episodes, feature histogram
    assert all(png.startswith(PNG_MAGIC) and len(png) > 10_000 for png in pngs)


def test_notebook_reads_the_store_named_by_the_environment(
    kernel_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = simulate_history(f"sqlite://{tmp_path / 'fog.db'}", tmp_path / "labels.jsonl",
                               hours=0.75, assets=2, seed=11, anomaly_rate=0.3)
    expected = extract(history.store_url, history.labels_path, start_ns=history.start_ns,
                       end_ns=history.end_ns, hop=5)
    monkeypatch.setenv("EDGEFLEET_NOTEBOOK_STORE", history.store_url)
    monkeypatch.setenv("EDGEFLEET_NOTEBOOK_LABELS", str(history.labels_path))
    nb = execute(tmp_path)
    assert_ran_cleanly(nb)
    text = stdout(nb)
    assert "simulated" not in text
    assert f"store: {history.store_url}\n" in text
    assert printed_int(text, "feature windows") == len(expected) > 0
    positives = int(expected.y.sum())
    assert 0 < positives < len(expected)
    assert re.search(rf"^anomalous +{positives} ", text, re.MULTILINE), text


def test_notebook_fails_on_a_store_without_readings(
    kernel_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_url = f"sqlite://{tmp_path / 'empty.db'}"
    store = open_store(store_url)
    store.setup()  # the readings table exists, with no rows
    store.close()
    labels = tmp_path / "labels.jsonl"
    labels.write_text("", encoding="utf-8")
    monkeypatch.setenv("EDGEFLEET_NOTEBOOK_STORE", store_url)
    monkeypatch.setenv("EDGEFLEET_NOTEBOOK_LABELS", str(labels))
    with pytest.raises(CellExecutionError) as raised:
        execute(tmp_path)
    assert raised.value.ename == "TrainingDataError"
    assert f"the store {store_url} holds no readings" in raised.value.evalue
    assert "TrainingDataError" in str(raised.value)
