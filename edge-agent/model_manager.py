"""The agent's model manager: verified installs, atomic activation, offline rollback, and
shadow runs of a candidate model on live windows.

```
manifest + bytes ─► ModelStore.install ─► verify signature, hash, schema ─► stage on disk
                    ─► ModelBundle.load ─► NaN probe ─► rename into place ─► ModelBundle
unsigned manifest + bytes ─► ModelStore.install_checksummed ─► (no signature) hash, schema …
candidate ─► ShadowRun.feed (every cycle, beside the current model) ─► ShadowReport.passes
          ─► ModelStore.activate (atomic)            … later: ModelStore.rollback (offline)
```

Contracts
---------
* **Layout.** `root/<name>/<version>/{model.onnx,manifest.json}` (names are manifest safe
  names, so nothing escapes `root`), plus `root/active.json` =
  `{"current": "name/version" | null, "previous": "name/version" | null}`. Staging folders
  (`root/<name>/.staging-*`) and the temp file `root/.active.json.tmp` are never read; a
  crash leaves at most those behind, and the next `ModelStore` removes stale staging.
* **Nothing unverified is installed.** `install` refuses (`ModelRefused`, with a `reason`
  from `REFUSAL_REASONS`) an unsigned manifest, a signature by no fleet key, bytes that
  are not the manifest's artifact, a feature schema that is not the fleet's, a file
  `ModelBundle.load` rejects, and a model whose scores on a fixed probe batch are not
  finite. The checks run on a staging folder; only a model that passed them all is
  renamed to `root/<name>/<version>`. A refusal leaves no folder behind and never touches
  `active.json`: the agent keeps running the model it had.
* **Checksum-only installs are a separate, explicit call.** `install_checksummed` is for
  a manifest the agent built itself from a checksum it trusts (standalone mode: the
  `onnx_sha256` a model registry recorded, fetched from the tracking server the user
  configured; edge-agent/standalone.py). It takes only unsigned manifests and runs every
  check of `install` but the signature; `install` itself is unchanged, so the fleet's
  signed path never accepts an unsigned model. A store may have no public keys at all:
  its `install` then refuses every model (`bad_signature`).
* **Atomic state.** `active.json` is replaced with temp file + fsync + `os.replace` +
  directory fsync; a reader sees the old or the new state, never a mix.
* **Offline rollback.** `previous` is kept on disk (pruning never deletes `current` or
  `previous`), so `rollback` needs no network.
* **Bounded.** At most `keep` versions stay on disk (oldest installs pruned first), except
  that `current`, `previous` and the version just installed are never pruned (with
  `keep=2` and both set, a third version stays until the next activation);
  `ShadowRun` keeps a bounded window of latencies and constant-size counters.
* One process owns a store's `root` (the agent); concurrent writers are not supported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from edgefleet.protocols.manifest import (
    ManifestError,
    ModelManifest,
    is_safe_name,
    parse_manifest,
    verify_artifact,
    verify_manifest,
)

from .inference import ModelBundle, ModelLoadError, OnnxScorer, ScoringError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from edgefleet.protocols.features import FeatureSpec

__all__ = [
    "ACTIVE_FILE",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "REFUSAL_REASONS",
    "ModelRefused",
    "ModelStore",
    "ModelStoreError",
    "ShadowReport",
    "ShadowRun",
    "probe_batch",
]

log = logging.getLogger(__name__)

MODEL_FILE: Final = "model.onnx"
MANIFEST_FILE: Final = "manifest.json"
ACTIVE_FILE: Final = "active.json"
_ACTIVE_TMP: Final = ".active.json.tmp"
_STAGING_PREFIX: Final = ".staging-"
_TRASH_PREFIX: Final = ".trash-"
PROBE_ROWS: Final = 64
PROBE_SEED: Final = 20_240_601
SHADOW_LATENCY_WINDOW: Final = 4096  # candidate batches whose latencies p99 is taken over
REFUSAL_REASONS: Final = frozenset(
    {"unsigned", "bad_signature", "hash_mismatch", "wrong_schema", "unloadable", "bad_output"}
)

FloatArray = npt.NDArray[np.float64]


class ModelRefused(Exception):
    """`install` refused a model; `reason` is one of `REFUSAL_REASONS`, the message says
    which model and why."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REFUSAL_REASONS:
            raise ValueError(f"unknown refusal reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


class ModelStoreError(Exception):
    """The store cannot do what was asked (unknown version, no previous model, a
    conflicting re-install, unreadable or damaged files on disk)."""


def probe_batch(width: int) -> FloatArray:
    """The fixed NaN-probe batch: `PROBE_ROWS` rows of `width` features — a row of zeros,
    a row of ones, then seeded standard-normal rows. The same on every device."""
    rows = np.random.default_rng(PROBE_SEED).standard_normal((PROBE_ROWS, width))
    rows[0] = 0.0
    rows[1] = 1.0
    return rows


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _split_ref(ref: object, where: str) -> tuple[str, str]:
    if not isinstance(ref, str) or ref.count("/") != 1:
        raise ModelStoreError(f"{where}: {ref!r} is not a 'name/version' reference")
    name, version = ref.split("/")
    if not (is_safe_name(name) and is_safe_name(version)):
        raise ModelStoreError(f"{where}: {ref!r} is not a safe 'name/version' reference")
    return name, version


class ModelStore:
    """Installed model versions under `root` and which one is active (module contracts).

    `public_keys` are the fleet's verification keys (several during a rotation; none for
    a standalone agent's store, which installs through `install_checksummed` only);
    `features`, when given, is the fleet's feature spec every model must be trained for.
    """

    def __init__(
        self,
        root: Path,
        public_keys: Sequence[Ed25519PublicKey],
        features: FeatureSpec | None = None,
        *,
        keep: int = 3,
    ) -> None:
        if keep < 2:
            raise ValueError("keep must be at least 2 (the current and the previous model)")
        self.root = Path(root)
        self.public_keys = tuple(public_keys)
        self.features = features
        self.keep = keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()

    # --- state -------------------------------------------------------------------------

    def state(self) -> tuple[str | None, str | None]:
        """`(current, previous)` from `active.json`; `(None, None)` when there is none.
        A damaged file raises ModelStoreError (it is only ever replaced whole)."""
        path = self.root / ACTIVE_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelStoreError(f"{path}: unreadable ({err})") from err
        if not isinstance(raw, dict) or set(raw) != {"current", "previous"}:
            raise ModelStoreError(f"{path}: expected {{'current', 'previous'}}, got {raw!r}")
        refs: list[str | None] = []
        for key in ("current", "previous"):
            value = raw[key]
            if value is not None:
                _split_ref(value, f"{path}: {key}")
            refs.append(value)
        return refs[0], refs[1]

    @property
    def current(self) -> str | None:
        return self.state()[0]

    @property
    def previous(self) -> str | None:
        return self.state()[1]

    def _write_state(self, current: str | None, previous: str | None) -> None:
        text = json.dumps({"current": current, "previous": previous}, sort_keys=True) + "\n"
        tmp = self.root / _ACTIVE_TMP
        _write_synced(tmp, text.encode("utf-8"))
        os.replace(tmp, self.root / ACTIVE_FILE)
        _fsync_dir(self.root)

    # --- what is on disk ---------------------------------------------------------------

    def path_of(self, name: str, version: str) -> Path:
        """The folder of `name/version` (which may not exist)."""
        if not (is_safe_name(name) and is_safe_name(version)):
            raise ModelStoreError(f"{name!r}/{version!r} is not a safe model reference")
        return self.root / name / version

    def installed(self) -> list[str]:
        """Every installed `name/version`, oldest install first."""
        found: list[tuple[int, str]] = []
        for name_dir in self.root.iterdir():
            if not (name_dir.is_dir() and is_safe_name(name_dir.name)):
                continue
            for version_dir in name_dir.iterdir():
                manifest = version_dir / MANIFEST_FILE
                if is_safe_name(version_dir.name) and manifest.is_file():
                    found.append((manifest.stat().st_mtime_ns,
                                  f"{name_dir.name}/{version_dir.name}"))
        return [ref for _, ref in sorted(found)]

    def manifest_of(self, ref: str) -> ModelManifest:
        """The stored manifest of an installed `name/version`."""
        name, version = _split_ref(ref, "model reference")
        path = self.path_of(name, version) / MANIFEST_FILE
        try:
            return parse_manifest(path.read_bytes())
        except FileNotFoundError as err:
            raise ModelStoreError(f"model {ref} is not installed (no {path})") from err
        except (OSError, ManifestError) as err:
            raise ModelStoreError(f"model {ref}: cannot read {path} ({err})") from err

    def _check_files(self, ref: str) -> Path:
        """The model file of `ref`, after checking its bytes against the stored manifest
        (a damaged file is caught before it is activated or served)."""
        manifest = self.manifest_of(ref)
        model = self.path_of(manifest.model_name, manifest.version) / MODEL_FILE
        try:
            verify_artifact(manifest, model.read_bytes())
        except OSError as err:
            raise ModelStoreError(f"model {ref}: cannot read {model} ({err})") from err
        except ManifestError as err:
            raise ModelStoreError(f"model {ref}: file on disk damaged: {err}") from err
        return model

    # --- install -----------------------------------------------------------------------

    def install(self, manifest: ModelManifest, data: bytes) -> ModelBundle:
        """Verify and install one model version; return it loaded (see module contracts).

        Raises ModelRefused (nothing installed, `active.json` untouched) or, for a version
        already installed with a different manifest, ModelStoreError. Re-installing the
        identical version is idempotent (and repairs a damaged model file)."""
        ref = manifest.ref
        if not manifest.signature:
            raise ModelRefused("unsigned", f"model {ref} is not signed; refused")
        try:
            verify_manifest(manifest, self.public_keys)
        except ManifestError as err:
            raise ModelRefused("bad_signature", f"{err}; refused") from err
        return self._install_verified(manifest, data)

    def install_checksummed(self, manifest: ModelManifest, data: bytes) -> ModelBundle:
        """Install a model vouched for by its checksum alone: `manifest` is unsigned, built
        by the agent from a sha256 it trusts (see the module contracts). Every check of
        `install` but the signature runs: size and sha256 of `data`, the feature schema,
        `ModelBundle.load`, the probe batch. Raises ValueError for a signed manifest
        (that one goes through `install`), otherwise as `install`."""
        if manifest.signature or manifest.key_id:
            raise ValueError(f"model {manifest.ref}: a signed manifest is installed with "
                             "install(), which checks its signature")
        return self._install_verified(manifest, data)

    def _install_verified(self, manifest: ModelManifest, data: bytes) -> ModelBundle:
        """The checks and the install after the manifest itself is trusted."""
        ref = manifest.ref
        try:
            verify_artifact(manifest, data)
        except ManifestError as err:
            raise ModelRefused("hash_mismatch", f"{err}; refused") from err
        if self.features is not None:
            fleet_hash = self.features.schema_hash()
            if manifest.feature_schema_hash != fleet_hash:
                raise ModelRefused(
                    "wrong_schema",
                    f"model {ref} was trained for feature schema "
                    f"{manifest.feature_schema_hash[:16]}…, this fleet uses "
                    f"{fleet_hash[:16]}…; refused",
                )

        final = self.path_of(manifest.model_name, manifest.version)
        manifest_text = manifest.to_json().encode("utf-8")
        if (final / MANIFEST_FILE).is_file():
            if (final / MANIFEST_FILE).read_bytes() != manifest_text:
                raise ModelStoreError(
                    f"model {ref} is already installed with a different manifest; a "
                    "published version never changes (publish a new version)"
                )
            with contextlib.suppress(ModelStoreError):
                self._check_files(ref)
                return self._load_checked(manifest, final)

        final.parent.mkdir(parents=True, exist_ok=True)
        staging = final.parent / f"{_STAGING_PREFIX}{manifest.version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir()
            _write_synced(staging / MODEL_FILE, data)
            _write_synced(staging / MANIFEST_FILE, manifest_text)
            _fsync_dir(staging)
            bundle = self._load_checked(manifest, staging)
            self._move_into_place(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                final.parent.rmdir()  # only when this was the name's first version
            raise
        log.info("model store: installed %s (sha256 %s…)", ref, manifest.sha256[:16])
        self._prune(protect={ref})
        return replace(bundle, path=final / MODEL_FILE)

    def _load_checked(self, manifest: ModelManifest, folder: Path) -> ModelBundle:
        """ModelBundle.load plus the schema and NaN-probe checks; ModelRefused on failure."""
        ref = manifest.ref
        try:
            bundle = ModelBundle.load(folder / MODEL_FILE)
        except ModelLoadError as err:
            raise ModelRefused("unloadable", f"model {ref}: {err}; refused") from err
        bundle_hash = bundle.features.schema_hash()
        if bundle_hash != manifest.feature_schema_hash:
            raise ModelRefused(
                "wrong_schema",
                f"model {ref}: the model's own feature spec (schema {bundle_hash[:16]}…) is "
                f"not the manifest's ({manifest.feature_schema_hash[:16]}…); refused",
            )
        try:
            scorer = OnnxScorer(bundle)
        except ModelLoadError as err:
            raise ModelRefused("unloadable", f"model {ref}: {err}; refused") from err
        try:
            scorer.score(probe_batch(len(bundle.features.feature_names())))
        except (ScoringError, ValueError) as err:
            raise ModelRefused(
                "bad_output",
                f"model {ref}: fails the probe batch of {PROBE_ROWS} rows ({err}); refused",
            ) from err
        return bundle

    def _move_into_place(self, staging: Path, final: Path) -> None:
        trash: Path | None = None
        if final.exists():  # an identical version whose files were damaged: replace it
            trash = final.parent / f"{_TRASH_PREFIX}{final.name}-{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
        os.replace(staging, final)
        _fsync_dir(final.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    # --- activation --------------------------------------------------------------------

    def activate(self, name: str, version: str) -> None:
        """Make an installed `name/version` current; the old current becomes previous.
        Activating the current model again changes nothing."""
        ref = f"{name}/{version}"
        self.path_of(name, version)
        self._check_files(ref)
        current = self.current
        if ref == current:
            return
        self._write_state(ref, current)
        log.info("model store: activated %s (previous: %s)", ref, current)
        self._prune(protect=set())

    def rollback(self) -> str:
        """Swap back to the previous model, from files already on disk (no network);
        return its reference. ModelStoreError when there is no previous model."""
        current, previous = self.state()
        if previous is None:
            raise ModelStoreError("no previous model to roll back to")
        self._check_files(previous)
        self._write_state(previous, current)
        log.warning("model store: rolled back from %s to %s", current, previous)
        return previous

    def current_bundle(self) -> ModelBundle | None:
        """The current model, loaded (None when none is active). ModelStoreError when its
        files are missing or damaged, ModelLoadError when it no longer loads."""
        current = self.current
        if current is None:
            return None
        return ModelBundle.load(self._check_files(current))

    # --- housekeeping ------------------------------------------------------------------

    def _prune(self, protect: set[str]) -> None:
        current, previous = self.state()
        keep = protect | {ref for ref in (current, previous) if ref is not None}
        installed = self.installed()
        excess = len(installed) - self.keep
        for ref in installed:
            if excess <= 0:
                break
            if ref in keep:
                continue
            name, version = _split_ref(ref, "installed model")
            shutil.rmtree(self.path_of(name, version), ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.root / name).rmdir()  # only when it was the name's last version
            log.info("model store: pruned %s (keeping %d versions)", ref, self.keep)
            excess -= 1

    def _remove_stale(self) -> None:
        for name_dir in self.root.iterdir():
            if not (name_dir.is_dir() and is_safe_name(name_dir.name)):
                continue
            for child in name_dir.iterdir():
                if child.name.startswith((_STAGING_PREFIX, _TRASH_PREFIX)):
                    shutil.rmtree(child, ignore_errors=True)


# --- shadow runs ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShadowReport:
    """What a candidate did beside the current model.

    `errors` counts candidate scoring calls that failed (a call fails as a whole), so
    `error_rate` = errors / batches. Anomaly rates are over `compared_rows`: the rows both
    models scored (every candidate-scored row when there is no current model, in which case
    `anomaly_rate_current` and `anomaly_rate_shift` are None).
    """

    rows: int
    batches: int
    errors: int
    error_rate: float
    latency_p99_us: float | None
    compared_rows: int
    anomaly_rate_current: float | None
    anomaly_rate_candidate: float | None
    anomaly_rate_shift: float | None
    elapsed_s: float

    def passes(
        self,
        max_error_rate: float,
        max_latency_p99_us: float,
        max_anomaly_rate_shift: float,
        *,
        min_rows: int = 1,
    ) -> tuple[bool, list[str]]:
        """`(True, [])` when every gate holds, else `(False, reasons)`."""
        reasons: list[str] = []
        if self.rows < min_rows:
            reasons.append(f"only {self.rows} rows scored in shadow; at least {min_rows} needed")
        if self.error_rate > max_error_rate:
            reasons.append(f"candidate error rate {self.error_rate:.4f} ({self.errors} of "
                           f"{self.batches} batches) exceeds {max_error_rate}")
        if self.latency_p99_us is None:
            if self.batches:
                reasons.append("candidate latency unknown: no batch scored successfully")
        elif self.latency_p99_us > max_latency_p99_us:
            reasons.append(f"candidate p99 latency {self.latency_p99_us:.0f} µs exceeds "
                           f"{max_latency_p99_us:.0f} µs")
        if self.anomaly_rate_shift is not None and \
                self.anomaly_rate_shift > max_anomaly_rate_shift:
            reasons.append(
                f"anomaly rate shift {self.anomaly_rate_shift:.4f} (current "
                f"{self.anomaly_rate_current:.4f}, candidate {self.anomaly_rate_candidate:.4f}) "
                f"exceeds {max_anomaly_rate_shift}"
            )
        return not reasons, reasons


class ShadowRun:
    """Score every window batch with the current model and, only to measure it, with a
    candidate. `feed` returns the current model's scores — the only ones the agent uses;
    a failing candidate is counted, never raised. Thresholds default to each model's own.
    """

    def __init__(
        self,
        current: OnnxScorer | None,
        candidate: OnnxScorer,
        *,
        current_threshold: float | None = None,
        candidate_threshold: float | None = None,
        latency_window: int = SHADOW_LATENCY_WINDOW,
    ) -> None:
        if latency_window < 1:
            raise ValueError("latency_window must be at least 1")
        if current is not None and current.bundle.features != candidate.bundle.features:
            raise ValueError("the candidate's feature spec is not the current model's")
        self.current = current
        self.candidate = candidate
        self.current_threshold = (
            current_threshold if current_threshold is not None
            else (current.threshold if current is not None else math.nan)
        )
        self.candidate_threshold = (
            candidate_threshold if candidate_threshold is not None else candidate.threshold
        )
        self.rows = 0
        self.batches = 0
        self.errors = 0
        self.compared_rows = 0
        self.anomalies_current = 0
        self.anomalies_candidate = 0
        self.last_error: str | None = None
        self._latencies_ns: deque[int] = deque(maxlen=latency_window)
        self._started = time.monotonic()

    def feed(self, features: npt.ArrayLike) -> FloatArray | None:
        """Score one `[n, F]` batch with both models; return the current model's scores
        (None without a current model). The current model's ScoringError is re-raised
        after the candidate was measured, so the agent handles it as it always does."""
        matrix = np.asarray(features, dtype=np.float64)
        if matrix.ndim != 2:
            raise ValueError(f"expected a [n, F] feature matrix, got shape {matrix.shape}")
        rows = matrix.shape[0]
        if rows == 0:
            return np.empty(0, dtype=np.float64) if self.current is not None else None
        current_scores: FloatArray | None = None
        current_error: ScoringError | None = None
        if self.current is not None:
            try:
                current_scores = self.current.score(matrix)
            except ScoringError as err:
                current_error = err
        self.rows += rows
        self.batches += 1
        started = time.perf_counter_ns()
        try:
            candidate_scores: FloatArray | None = self.candidate.score(matrix)
        except (ScoringError, ValueError) as err:
            candidate_scores = None
            self.errors += 1
            self.last_error = str(err)
        else:
            self._latencies_ns.append(time.perf_counter_ns() - started)
        if candidate_scores is not None and (self.current is None or current_scores is not None):
            self.compared_rows += rows
            self.anomalies_candidate += int((candidate_scores > self.candidate_threshold).sum())
            if current_scores is not None:
                self.anomalies_current += int((current_scores > self.current_threshold).sum())
        if current_error is not None:
            raise current_error
        return current_scores

    def report(self) -> ShadowReport:
        """The counters so far (see `ShadowReport`)."""
        latency = (float(np.percentile(np.fromiter(self._latencies_ns, dtype=np.float64), 99))
                   / 1000.0 if self._latencies_ns else None)
        compared = self.compared_rows
        rate_candidate = self.anomalies_candidate / compared if compared else None
        rate_current = (self.anomalies_current / compared
                        if compared and self.current is not None else None)
        shift = (abs(rate_candidate - rate_current)
                 if rate_candidate is not None and rate_current is not None else None)
        return ShadowReport(
            rows=self.rows,
            batches=self.batches,
            errors=self.errors,
            error_rate=self.errors / self.batches if self.batches else 0.0,
            latency_p99_us=latency,
            compared_rows=compared,
            anomaly_rate_current=rate_current,
            anomaly_rate_candidate=rate_candidate,
            anomaly_rate_shift=shift,
            elapsed_s=time.monotonic() - self._started,
        )
