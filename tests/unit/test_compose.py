"""deploy/compose.yaml describes the same stack as the local launcher (`edgefleet services`).

No Docker engine runs here, so nothing is started: these tests read the compose file
(and the config files it mounts) and hold it to the launcher — same service names, the
same client variables pointing at ports the containers really listen on, no default
secrets, health-gated start order, pinned images, loopback-only ports — and run
deploy/compose-secrets.sh, which writes the secrets compose reads.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from edgefleet.deploy.services import postgres as pg_module
from edgefleet.deploy.services.base import StackContext
from edgefleet.deploy.services.launcher import STACK
from edgefleet.deploy.services.mosquitto import DEVICE_TOPIC_ROOT, SERVICE_ACCOUNT
from edgefleet.deploy.services.postgres import DATABASES
from edgefleet.deploy.services.s3 import BUCKETS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
SECRETS_SCRIPT = DEPLOY / "compose-secrets.sh"
ENV_ANCHOR = "x-edgefleet-env"

# Launcher exports that `x-edgefleet-env` leaves out, with the reason. Empty: every
# service export has a container equivalent (the CA file is mounted where
# EDGEFLEET_CA_FILE points; the Prometheus targets folder is a shared volume).
EXCLUDED_EXPORTS: dict[str, str] = {}
# Added by `Launcher.env()` itself, not by a service: it names the launcher's data folder.
LAUNCHER_ONLY = {"EDGEFLEET_SERVICES_DIR"}

# The port(s) each launcher service listens on inside its container.
CONTAINER_PORTS: dict[str, set[int]] = {
    "postgres": {5432},
    "mosquitto": {1883, 8883},
    "kafka": {9092},
    "s3": {9000},
    "mlflow": {5000},
    "prometheus": {9090},
}

SECRET_KEY_NAME = re.compile(r"PASSWORD|SECRET|KEY")
# `${VAR:?message}`: compose refuses to start without VAR and prints the message.
REQUIRED_REF = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*):\?(?P<message>[^}]+)\}")
ANY_REF = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\}")
# A URL's user:password@ part (a `${…}` message may hold '/', never '@').
USERINFO = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?P<userinfo>[^@]+)@")
# Variables with a harmless default (`${VAR:-default}`): never a secret.
NON_SECRET_DEFAULTS = {"AIRFLOW_UID"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def client_env(compose: dict[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in compose[ENV_ANCHOR].items()}


@pytest.fixture
def launcher_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The union of every launcher service's exports, from a context with fake values."""
    # Whether TimescaleDB is installed here must not matter (nor whether PostgreSQL is).
    monkeypatch.setattr(pg_module, "_bindir", lambda: tmp_path / "pg" / "15" / "bin")
    port_names = [name for service in STACK for name in service.port_names]
    secret_names = [name for service in STACK for name in service.secret_names]
    ctx = StackContext(
        root=tmp_path / "stack",
        ports={name: 20000 + i for i, name in enumerate(port_names)},
        secrets={name: f"fake-{name}" for name in secret_names},
        exports={},
        run_as_root=False,
    )
    exports: dict[str, str] = {}
    for service in STACK:
        produced = service.exports(ctx)
        ctx.exports.update(produced)
        exports.update(produced)
    return exports


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _unref(value: str) -> str:
    """The value with every `${…}` reference replaced by a placeholder (messages may
    hold '/' and spaces, which would confuse URL parsing)."""
    return ANY_REF.sub("REF", value)


def _as_url(value: str) -> Any:
    text = _unref(value)
    return urlsplit(text if "://" in text else f"//{text}")


def _is_address(value: str) -> bool:
    """URL-valued, or a bare host:port (Kafka's bootstrap)."""
    return "://" in value or re.fullmatch(r"[A-Za-z0-9.-]+:\d+", _unref(value)) is not None


def _ports_in(obj: Any) -> set[int]:
    """Every number that may be a port in a service definition's strings."""
    if isinstance(obj, dict):
        return set().union(*(_ports_in(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_ports_in(v) for v in obj)) if obj else set()
    return {int(n) for n in re.findall(r"(?<![\d.])(\d{2,5})(?![\d.])", str(obj))}


def _container_ports(service: dict[str, Any]) -> set[int]:
    """Ports the service declares: `ports:` (container side) and `expose:`."""
    found = set()
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            found.add(int(entry["target"]))
        else:
            found.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    found |= {int(str(entry).split("/")[0]) for entry in service.get("expose", [])}
    return found


def _listen_evidence(service: dict[str, Any]) -> set[int]:
    """Ports a service is seen listening on: declared ports, and the ports named in its
    command, healthcheck and environment (e.g. KAFKA_LISTENERS)."""
    named = _ports_in([service.get("command"), service.get("healthcheck"), _environment(service)])
    return _container_ports(service) | named


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return {name: dict(spec or {"condition": "service_started"}) for name, spec in deps.items()}


def _is_one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart", "no") in ("no", False) and not service.get("ports")


def _required_vars(compose_text: str) -> set[str]:
    return {m["name"] for m in REQUIRED_REF.finditer(compose_text)}


# ---- 1. service names ----------------------------------------------------------------


def test_every_launcher_service_is_a_compose_service(services: dict[str, Any]) -> None:
    names = [service.name for service in STACK]
    assert len(names) == 6
    missing = [name for name in names if name not in services]
    assert not missing, f"launcher services missing from compose.yaml: {missing}"
    assert set(CONTAINER_PORTS) == set(names), "update CONTAINER_PORTS for the launcher's stack"
    for extra in ("grafana", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor"):
        assert extra in services
    assert "version" not in yaml.safe_load(COMPOSE_FILE.read_text())


# ---- 2. the client environment matches the launcher's exports -------------------------


def test_client_env_names_equal_launcher_exports(
    client_env: dict[str, str], launcher_exports: dict[str, str]
) -> None:
    assert "EDGEFLEET_PG_URL" in launcher_exports  # the fixture really ran the services
    assert not LAUNCHER_ONLY & set(launcher_exports)
    assert not LAUNCHER_ONLY & set(client_env)
    expected = set(launcher_exports) - set(EXCLUDED_EXPORTS)
    assert set(client_env) == expected, (
        f"only in compose: {sorted(set(client_env) - expected)}; "
        f"only in the launcher: {sorted(expected - set(client_env))}"
    )
    assert set(EXCLUDED_EXPORTS) <= set(launcher_exports), "stale exclusion"


def test_client_env_values_have_the_launchers_shape(
    client_env: dict[str, str], launcher_exports: dict[str, str]
) -> None:
    for name, value in client_env.items():
        launcher_value = launcher_exports[name]
        if _is_address(launcher_value):
            assert _is_address(value), f"{name}={value!r} is not an address"
            ours, theirs = _as_url(value), urlsplit(launcher_value)
            if "://" in launcher_value:
                assert ours.scheme == theirs.scheme, name
                assert ours.username == theirs.username, name
                assert ours.path == theirs.path, name
                assert (ours.password is None) == (theirs.password is None), name
        elif name.startswith("EDGEFLEET_S3_BUCKET_"):
            assert value == launcher_value, f"{name}: compose and launcher use other buckets"
    assert client_env["EDGEFLEET_S3_BUCKET_MLFLOW"] == BUCKETS[0]
    assert client_env["EDGEFLEET_S3_BUCKET_MODELS"] == BUCKETS[1]
    # The timescale/timescaledb image always has the extension.
    assert client_env["EDGEFLEET_PG_TIMESCALEDB"] == "1"


# ---- 3. addresses name a service and a port it listens on ----------------------------


def test_addresses_point_at_services_and_their_container_ports(
    client_env: dict[str, str], services: dict[str, dict[str, Any]]
) -> None:
    checked = 0
    for name, value in client_env.items():
        if not _is_address(value):
            continue
        url = _as_url(value)
        host, port = url.hostname, url.port
        assert host in services, f"{name} points at {host!r}, which is not a compose service"
        assert host in CONTAINER_PORTS, f"{name} points at {host!r}, not a launcher service"
        assert port in CONTAINER_PORTS[host], f"{name}: {host} listens on {CONTAINER_PORTS[host]}"
        checked += 1
    assert checked >= 7  # PG, MQTT, MQTTS, Kafka, S3, MLflow, Prometheus
    for service_name, ports in CONTAINER_PORTS.items():
        evidence = _listen_evidence(services[service_name])
        missing = ports - evidence
        assert not missing, f"{service_name} shows no sign of listening on {sorted(missing)}"


def test_service_configs_listen_where_the_table_says(services: dict[str, dict[str, Any]]) -> None:
    conf = (DEPLOY / "compose/mosquitto/mosquitto.conf").read_text()
    listeners = {int(p) for p in re.findall(r"^listener (\d+)", conf, re.MULTILINE)}
    assert listeners == CONTAINER_PORTS["mosquitto"]
    mlflow_cmd = [str(arg) for arg in services["mlflow"]["command"]]
    assert mlflow_cmd[mlflow_cmd.index("--port") + 1] == "5000"
    assert "--web.listen-address=:9090" in services["prometheus"]["command"]
    assert services["s3"]["command"][services["s3"]["command"].index("--address") + 1] == ":9000"
    kafka_env = _environment(services["kafka"])
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    # Every port published to the host goes to a port the container listens on.
    for name, ports in CONTAINER_PORTS.items():
        assert _container_ports(services[name]) >= ports, name


# ---- 4. no plaintext secrets ---------------------------------------------------------


def test_no_plaintext_secret(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    envs = {f"service {name}": _environment(s) for name, s in services.items()}
    envs[ENV_ANCHOR] = {str(k): str(v) for k, v in compose[ENV_ANCHOR].items()}
    secret_keys = urls_with_password = 0
    for where, env in envs.items():
        for key, value in env.items():
            if SECRET_KEY_NAME.search(key):
                secret_keys += 1
                assert REQUIRED_REF.fullmatch(value), f"{where}: {key} is not a ${{VAR:?…}}"
            userinfo = USERINFO.match(value)
            if userinfo and ":" in userinfo["userinfo"]:
                password = userinfo["userinfo"].split(":", 1)[1]
                assert REQUIRED_REF.fullmatch(password), f"{where}: {key} embeds a password"
                urls_with_password += 1
    assert secret_keys >= 15
    assert urls_with_password >= 6  # PG and MQTT(S) URLs, Airflow's and MLflow's DB URLs


def test_every_reference_is_required_and_says_how_to_fix_it() -> None:
    text = COMPOSE_FILE.read_text()
    refs = list(ANY_REF.finditer(text))
    assert refs
    for ref in refs:
        if ref["name"] in NON_SECRET_DEFAULTS:
            continue
        required = REQUIRED_REF.fullmatch(ref.group(0))
        assert required, f"{ref.group(0)} must be ${{{ref['name']}:?…}} (no defaults)"
        assert "compose-secrets.sh" in required["message"], ref.group(0)
    # `$$` escapes reach the container's shell; a lone `$NAME` would be a silent default.
    assert not re.search(r"(?<!\$)\$[A-Za-z_]", text)


def test_grafana_and_airflow_share_their_secrets_from_env(
    services: dict[str, dict[str, Any]],
) -> None:
    datasource = (DEPLOY / "compose/grafana/provisioning/datasources/edgefleet.yaml").read_text()
    assert "${EDGEFLEET_PG_PASSWORD}" in datasource
    assert "EDGEFLEET_PG_PASSWORD" in _environment(services["grafana"])
    airflow = [name for name in services if name.startswith("airflow-")]
    assert len(airflow) >= 4
    secrets = {_environment(services[n]).get("AIRFLOW__API_AUTH__JWT_SECRET") for n in airflow}
    assert len(secrets) == 1 and None not in secrets, "Airflow components need one JWT secret"
    for name in airflow:
        volumes = services[name]["volumes"]
        assert "../cloud/dags:/opt/airflow/dags:ro" in volumes


# ---- 5. start order is gated on health -----------------------------------------------


def test_dependencies_wait_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    edges = 0
    for name, service in services.items():
        for target, spec in _depends_on(service).items():
            edges += 1
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
                assert services[target]["healthcheck"].get("test"), target
            elif condition == "service_completed_successfully":
                assert _is_one_shot(services[target]), f"{target} is not a one-shot job"
            else:
                pytest.fail(f"{name} -> {target}: condition {condition!r} does not wait")
    assert edges >= 10


def test_launcher_requirements_are_compose_dependencies(
    services: dict[str, dict[str, Any]],
) -> None:
    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        pending = list(_depends_on(services[start]))
        while pending:
            current = pending.pop()
            if current not in seen:
                seen.add(current)
                pending.extend(_depends_on(services[current]))
        return seen

    for service in STACK:
        missing = set(service.requires) - reaches(service.name)
        assert not missing, f"{service.name} does not wait for {sorted(missing)}"
    assert "s3-init" in _depends_on(services["mlflow"]), "MLflow must wait for its bucket"


def test_init_jobs_create_what_the_launcher_creates(services: dict[str, dict[str, Any]]) -> None:
    init_sql = (DEPLOY / "compose/postgres/10-edgefleet.sql").read_text()
    owner_db = _environment(services["postgres"])["POSTGRES_DB"]
    for database in DATABASES:
        assert database == owner_db or f"CREATE DATABASE {database};" in init_sql, database
    bucket_job = "\n".join(services["s3-init"]["command"])
    for bucket in BUCKETS:
        assert f"stack/{bucket}" in bucket_job, bucket
    acl = (DEPLOY / "compose/mosquitto/acl").read_text()
    assert f"user {SERVICE_ACCOUNT}\ntopic readwrite #" in acl
    assert f"pattern readwrite {DEVICE_TOPIC_ROOT}/%u/#" in acl
    conf = (DEPLOY / "compose/mosquitto/mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "password_file " in conf
    cmd = [str(arg) for arg in services["mlflow"]["command"]]
    assert cmd[cmd.index("--artifacts-destination") + 1] == f"s3://{BUCKETS[0]}/artifacts"
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert "mlflow:5000" in allowed and "localhost:5000" in allowed
    # S3 credentials for MLflow live in the server's environment only.
    for name, service in services.items():
        if name != "mlflow":
            assert "AWS_SECRET_ACCESS_KEY" not in _environment(service), name


def test_mounted_config_files_exist(services: dict[str, dict[str, Any]]) -> None:
    generated = {"./compose/pki", "./compose/pki/ca.pem"}  # by compose-secrets.sh
    other_owners = {"../cloud/dags"}  # the DAGs, next to the cloud package
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if not source.startswith("."):
                continue  # a named volume
            if source in generated or source in other_owners:
                continue
            assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        build = service.get("build")
        if build:
            context = DEPLOY / build["context"]
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: no {dockerfile}"


# ---- 6. pinned images, loopback-only ports -------------------------------------------


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name} has no image"
        reference = str(image).split("@", 1)[0]
        last = reference.rsplit("/", 1)[-1]
        assert ":" in last, f"{name}: image {image} is untagged"
        tag = last.split(":", 1)[1]
        assert tag and tag != "latest" and "$" not in tag, f"{name}: image {image} is not pinned"


def test_ports_bind_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = 0
    for name, service in services.items():
        for entry in service.get("ports", []):
            published += 1
            if isinstance(entry, dict):
                assert entry.get("host_ip") == "127.0.0.1", f"{name}: {entry}"
            else:
                assert str(entry).startswith("127.0.0.1:"), f"{name}: {entry} is not loopback"
                assert str(entry).count(":") == 2, f"{name}: {entry} needs host:port:port"
    assert published >= 8


# ---- 7. the secrets script -----------------------------------------------------------


def _read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def _run_secrets(env_file: Path, pki_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "EDGEFLEET_COMPOSE_ENV_FILE": str(env_file),
        "EDGEFLEET_COMPOSE_PKI_DIR": str(pki_dir),
    }
    bash = shutil.which("bash") or "/bin/bash"
    result = subprocess.run(
        [bash, str(SECRETS_SCRIPT)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_secrets_script_writes_every_required_variable(tmp_path: Path) -> None:
    env_file, pki = tmp_path / ".env", tmp_path / "pki"
    _run_secrets(env_file, pki)
    values = _read_env(env_file)
    required = _required_vars(COMPOSE_FILE.read_text())
    assert required, "compose.yaml references no secrets"
    missing = required - set(values)
    assert not missing, f"compose-secrets.sh does not write {sorted(missing)}"
    for name in required:
        assert len(values[name]) >= 16, f"{name} is too short to be a secret"
        assert re.fullmatch(r"[A-Za-z0-9_=-]+", values[name]), f"{name} needs quoting"
    secret_values = [v for k, v in values.items() if SECRET_KEY_NAME.search(k)]
    assert len(set(secret_values)) == len(secret_values), "secrets must differ"
    assert _mode(env_file) == 0o600
    # The CA that EDGEFLEET_CA_FILE names in containers, and Mosquitto's TLS certificate.
    assert _mode(pki / "ca.key") == 0o600 and _mode(pki / "server.key") == 0o600
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki / "ca.pem"), str(pki / "server.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", str(pki / "server.pem"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:mosquitto" in san


def test_secrets_script_never_changes_existing_values(tmp_path: Path) -> None:
    env_file, pki = tmp_path / ".env", tmp_path / "pki"
    _run_secrets(env_file, pki)
    first, ca = env_file.read_text(), (pki / "ca.pem").read_bytes()
    second = _run_secrets(env_file, pki)
    assert env_file.read_text() == first
    assert (pki / "ca.pem").read_bytes() == ca
    assert "nothing changed" in second.stdout
    # A variable added to compose.yaml later is appended; the others stay as they were.
    values = _read_env(env_file)
    dropped = "GRAFANA_ADMIN_PASSWORD"
    env_file.write_text(
        "".join(line + "\n" for line in first.splitlines() if not line.startswith(f"{dropped}="))
    )
    os.chmod(env_file, 0o644)
    _run_secrets(env_file, pki)
    again = _read_env(env_file)
    assert {k: v for k, v in again.items() if k != dropped} == {
        k: v for k, v in values.items() if k != dropped
    }
    assert again[dropped] and again[dropped] != values[dropped]
    assert _mode(env_file) == 0o600
