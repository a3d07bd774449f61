"""MLflow tracking server: PostgreSQL backend store, artifacts in S3.

The server proxies artifacts (`--artifacts-destination`), so clients log to
`mlflow-artifacts:/` URIs and only the server holds S3 credentials; clients need
nothing but MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

from typing import ClassVar

from .base import LaunchSpec, Service, StackContext, find_binary
from .postgres import pg_url
from .s3 import BUCKETS

__all__ = ["MlflowService"]

_INSTALL = "pip install mlflow"


class MlflowService(Service):
    name: ClassVar[str] = "mlflow"
    port_names: ClassVar[tuple[str, ...]] = ("mlflow",)
    requires: ClassVar[tuple[str, ...]] = ("postgres", "s3")
    # The first start runs MLflow's database migrations.
    ready_timeout_s: ClassVar[float] = 180.0

    def check_installed(self) -> None:
        find_binary(self.name, ["mlflow"], _INSTALL)

    def _url(self, ctx: StackContext) -> str:
        return f"http://127.0.0.1:{ctx.port(self.name)}"

    def launch_spec(self, ctx: StackContext) -> LaunchSpec:
        port = ctx.port(self.name)
        return LaunchSpec(
            argv=[
                find_binary(self.name, ["mlflow"], _INSTALL), "server",
                "--backend-store-uri", pg_url(ctx, "mlflow", driver="postgresql+psycopg"),
                "--artifacts-destination", f"s3://{BUCKETS[0]}/artifacts",
                "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
                "--workers", "1",
                "--allowed-hosts", f"127.0.0.1:{port},localhost:{port},127.0.0.1,localhost",
            ],
            env={
                "MLFLOW_S3_ENDPOINT_URL": ctx.exports["EDGEFLEET_S3_ENDPOINT"],
                "AWS_ACCESS_KEY_ID": ctx.secrets["s3_access_key"],
                "AWS_SECRET_ACCESS_KEY": ctx.secrets["s3_secret_key"],
                "AWS_DEFAULT_REGION": "us-east-1",
            },
            cwd=ctx.dir_for(self.name),
        )

    def is_ready(self, ctx: StackContext) -> bool:
        import httpx

        return httpx.get(f"{self._url(ctx)}/health", timeout=2).status_code == 200

    def health(self, ctx: StackContext) -> tuple[bool, str]:
        try:
            ok = self.is_ready(ctx)
        except Exception as err:  # noqa: BLE001 - status reports any failure as unhealthy
            return False, f"{self._url(ctx)} not answering: {err}"
        return ok, f"{self._url(ctx)} (PostgreSQL store, artifacts in s3://{BUCKETS[0]})"

    def exports(self, ctx: StackContext) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self._url(ctx)}
