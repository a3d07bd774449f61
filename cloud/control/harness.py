"""`ControlProcess`: an `edgefleet control run` child process, for tests, benches and demos;
and a local MLflow registry of reference models to publish from.

```
ControlProcess(folder, db_url=…, tracking_uri=…) ─► python -m edgefleet.deploy.cli control run
    --state-dir folder/state --port <free loopback port> … ─► GET /healthz answers ─► ready
    .url  .admin_headers()  .operator_headers()  .public_key_text()  .stop() (SIGTERM, then kill)
build_registry(folder, name, [model files]) ─► sqlite MLflow in folder, versions 1…n, each
    tagged onnx_sha256 (as training does) ─► its tracking URI
```

The control plane's log (uvicorn's and the app's) goes to `<folder>/control.log`. Without
`db_url` the database is the CLI's embedded default, `sqlite:///<folder>/state/control.db`.
`rss_bytes()` and `cpu_seconds()` read the child's `/proc` entries (Linux), so a bench
measures the control plane alone.

`build_nan_model` writes a servable model that turns NaN on live data only: it passes the
publisher's zero-row run and the agent's fixed probe batch (`model_manager.probe_batch`),
and scores NaN for any row whose feature `trigger_index` exceeds `trigger_above`.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgefleet.deploy.child import ChildProcess

__all__ = ["ControlProcess", "build_nan_model", "build_registry", "free_port"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the usual small race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ControlProcess(ChildProcess):
    """One `edgefleet control run` child on a free loopback port (see the module doc)."""

    stop_grace_s = 20.0

    def __init__(
        self,
        folder: Path,
        *,
        db_url: str | None = None,
        tracking_uri: str | None = None,
        shadow_s: float = 1.0,
        poll_s: float = 1.0,
        bake_s: float = 0.0,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.folder = Path(folder)
        self.extra_args = list(extra_args)
        self.state_dir = self.folder / "state"
        self.db_url = db_url
        self.tracking_uri = tracking_uri
        self.shadow_s = shadow_s
        self.poll_s = poll_s
        self.bake_s = bake_s
        self.env = {**os.environ, **(env or {})}
        self.log_path = self.folder / "control.log"
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._operator: dict[str, str] | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the control plane is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifact_root(self) -> Path:
        return self.state_dir / "artifacts"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "edgefleet.deploy.cli", "control", "run",
                "--state-dir", str(self.state_dir), "--host", "127.0.0.1",
                "--port", str(self.port), "--shadow-s", str(self.shadow_s),
                "--poll-s", str(self.poll_s), "--bake-s", str(self.bake_s)]
        if self.db_url is not None:
            args += ["--db", self.db_url]
        if self.tracking_uri is not None:
            args += ["--tracking-uri", self.tracking_uri]
        return args + self.extra_args

    def start(self, timeout_s: float = 60.0) -> ControlProcess:
        import httpx

        # The state folder is made here: `control run` migrates its default database,
        # sqlite:///<state>/control.db, before it creates the folder.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(self.command(), stdout=log_file,
                                            stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0) as http:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"control plane exited with {self.process.returncode}:"
                                       f"\n{self.log()[-3000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.url}/healthz").status_code == 200:
                        return self
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"control plane not serving after {timeout_s} s:\n"
                                       f"{self.log()[-3000:]}")
                time.sleep(0.1)

    def admin_token(self) -> str:
        token = self.env.get("EDGEFLEET_CONTROL_ADMIN_TOKEN")
        if token:
            return token
        return (self.state_dir / "admin.token").read_text(encoding="utf-8").strip()

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token()}"}

    def operator_headers(self) -> dict[str, str]:
        """An operator token's headers (the token is made once, on the first call)."""
        if self._operator is None:
            import httpx

            answer = httpx.post(f"{self.url}/v1/tokens", headers=self.admin_headers(),
                                json={"name": "harness-operator", "role": "operator"},
                                timeout=30.0)
            if answer.status_code != 201:
                raise RuntimeError(f"cannot make an operator token: {answer.status_code} "
                                   f"{answer.text[:300]}")
            self._operator = {"Authorization": f"Bearer {answer.json()['token']}"}
        return dict(self._operator)

    def public_key_text(self) -> str:
        """The fleet's public key, base64 of its 32 raw bytes (an agent's `public_keys`)."""
        from edgefleet.protocols.manifest import load_signing_key, public_key_text

        key = load_signing_key(self.state_dir / "fleet-signing-key.pem")
        return public_key_text(key.public_key())


# --- models -------------------------------------------------------------------------------


def build_nan_model(
    path: Path,
    spec: Any,
    *,
    means: Sequence[float],
    stds: Sequence[float],
    trigger_index: int = 0,
    trigger_above: float = 4.5,
    name: str = "zscore",
    version: str = "zscore-nan",
    threshold: float = 3.0,
) -> Path:
    """The max-|z| model of `build_zscore_model`, plus `0 * sqrt(trigger_above - x_k)`:
    finite while feature k ≤ `trigger_above`, NaN for a row above it. Checks that the
    agent's probe batch stays below the trigger (so the model installs and fails only in
    the shadow, on live data)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.cloud.reference_models import METADATA_KEY
    from edgefleet.edge_agent.model_manager import probe_batch

    width = len(spec.feature_names())
    if not 0 <= trigger_index < width:
        raise ValueError(f"trigger_index must be in [0, {width})")
    if float(probe_batch(width)[:, trigger_index].max()) >= trigger_above:
        raise ValueError("the agent's probe batch reaches the trigger: the model would be "
                         "refused at install, not fail in the shadow")
    mean = np.asarray(means, dtype=np.float32)
    std = np.asarray(stds, dtype=np.float32)
    inits = [
        numpy_helper.from_array(mean, "mean"), numpy_helper.from_array(std, "std"),
        numpy_helper.from_array(np.array([trigger_index], dtype=np.int64), "k"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([trigger_above], dtype=np.float32), "limit"),
        numpy_helper.from_array(np.array([0.0], dtype=np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "std"], ["z"]),
        helper.make_node("Abs", ["z"], ["abs_z"]),
        helper.make_node("ReduceMax", ["abs_z"], ["zmax"], axes=[1], keepdims=0),
        helper.make_node("Gather", ["features", "k"], ["xk2"], axis=1),
        helper.make_node("Squeeze", ["xk2", "axis1"], ["xk"]),
        helper.make_node("Sub", ["limit", "xk"], ["room"]),
        helper.make_node("Sqrt", ["room"], ["root"]),  # NaN where x_k > limit
        helper.make_node("Mul", ["root", "zero"], ["poison"]),
        helper.make_node("Add", ["zmax", "poison"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", 17)]
    model = helper.make_model(graph, opset_imports=opsets,
                              ir_version=helper.find_min_ir_version_for(opsets),
                              producer_name="edgefleet.cloud.control.harness")
    metadata = {"name": name, "version": version, "threshold": threshold,
                "features": spec.model_dump(mode="json"), "score_output": "score",
                "score_sign": 1}
    helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    onnx.checker.check_model(model, full_check=True)
    path = Path(path)
    onnx.save(model, path)
    return path


def build_registry(folder: Path, name: str, models: Sequence[Path]) -> str:
    """A sqlite MLflow registry in `folder` with `models` (ONNX files) registered as
    versions 1…n of `name`, each tagged `onnx_sha256`; returns its tracking URI."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    from edgefleet.protocols.manifest import sha256_hex

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    previous = mlflow.get_tracking_uri()
    saved = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
             if k in os.environ}
    mlflow.set_tracking_uri(uri)
    try:
        experiment = client.create_experiment(
            "edgefleet-rollout", artifact_location=(folder / "mlruns").as_uri())
        for number, path in enumerate(models, start=1):
            with mlflow.start_run(experiment_id=experiment):
                info = mlflow.onnx.log_model(onnx.load(path), name="model",
                                             save_as_external_data=False,
                                             pip_requirements=["onnx", "onnxruntime"])
            registered = str(mlflow.register_model(info.model_uri, name).version)
            if registered != str(number):
                raise RuntimeError(f"{path} registered as version {registered}, "
                                   f"expected {number}")
            client.set_model_version_tag(name, registered, "onnx_sha256",
                                         sha256_hex(Path(path).read_bytes()))
    finally:
        mlflow.set_tracking_uri(previous)
        os.environ.update(saved)
    return uri
