"""MLflow tracking for rank 0 that never stalls or kills a training run.

Every MLflow call runs on one background thread fed by in-memory queues: :meth:`Tracker.log_metrics` only
appends to a bounded buffer, so a dead or slow tracking server costs the training loop nothing. Failures
are retried with exponential backoff and reported as rate-limited warnings; when the metric buffer is full
the oldest rows are dropped and counted (:attr:`Tracker.dropped`). :meth:`Tracker.close` flushes what it
can within its timeout, ends the run and returns.

Tracking URI: the ``tracking_uri`` argument, else ``$MLFLOW_TRACKING_URI``, else an SQLite file in the run
directory (``sqlite:///<run_dir>/mlflow.db``; artifacts beside it in ``mlartifacts/``). SQLite allows one
writer: only rank 0 tracks, and a multi-node run whose run directory lives on NFS should use a tracking
server (``mlflow server``) instead, since SQLite's file locking is unreliable there.

Resume: pass the run id stored in the checkpoint; the run is reopened (status ``RUNNING``), metrics continue
at the steps the caller gives, params already logged are kept, and changed params are reported as a
warning plus a JSON artifact (MLflow params are immutable).

Only :class:`mlflow.MlflowClient` with explicit run ids is used; nothing touches MLflow's fluent global
run. See ``docs/tracking.md``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_prep.shards import write_json_atomic
from hypertrain.config import flatten

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "RUN_ID_FILE",
    "Tracker",
    "backfill_rows",
    "default_tags",
    "flatten_params",
    "model_flops_utilization",
    "open_client",
    "read_run_id",
    "redact",
]

log = logging.getLogger(__name__)

# Limits of MLflow 3.17 (mlflow/utils/validation.py).
MAX_PARAM_VALUE = 6000  # MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE = 8000  # MAX_TAG_VAL_LENGTH
MAX_KEY = 250  # MAX_ENTITY_KEY_LENGTH
MAX_METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
MAX_PARAMS_TAGS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH

# MLflow's HTTP client retries 7 times with a 120 s timeout by default (mlflow/environment_variables.py),
# i.e. minutes per call against a dead server. The tracker retries itself, so one MLflow call should fail
# fast. Set only where the user has not set them.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}

# MlflowException error codes that retrying cannot fix: the record is dropped with a warning.
_PERMANENT_ERRORS = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
        "INVALID_STATE",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
    }
)

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@]+@")
RUN_ID_FILE = "mlflow_run.json"
"""Written in the run directory as soon as the MLflow run exists: a restart continues that run even when no
checkpoint recorded its id (the tracking server was down when the last checkpoint was written)."""


def open_client(tracking_uri: str) -> MlflowClient:
    """An :class:`mlflow.MlflowClient` whose store is ready.

    A new SQLite store creates its tables on first open, and two jobs opening one file at once race in MLflow's
    migrations (``table _alembic_tmp_... already exists``, which leaves the file half-migrated). The first open of
    an SQLite store therefore holds an exclusive lock on ``<db>.lock`` beside it.
    """
    from mlflow import MlflowClient

    if not tracking_uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=tracking_uri)
    import fcntl

    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            client.search_experiments(max_results=1)  # builds the store: creates or checks the schema
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return client


def redact(text: str) -> str:
    """``text`` with the user information of every URL masked (``http://user:secret@host`` → ``http://***@host``)."""
    return _USERINFO.sub(r"\g<scheme>***@", str(text))


def _clean_key(key: str) -> str:
    """A metric/param name MLflow accepts: allowed characters, no empty/``.``/``..`` path parts."""
    parts = [p for p in _BAD_KEY_CHARS.sub("_", str(key)).split("/") if p not in ("", ".")]
    cleaned = "/".join("__" if p == ".." else p for p in parts) or "_"
    return cleaned[:MAX_KEY]


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple | dict):
        try:
            return json.dumps(value, default=str, separators=(",", ":"))
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping → ``{"a.b": "value"}`` with MLflow-safe keys and values cut to MLflow's limit."""
    return {
        _clean_key(key): _truncate(_param_value(value), MAX_PARAM_VALUE) for key, value in flatten(params, prefix).items()
    }


def _error_code(err: BaseException) -> str | None:
    code = getattr(err, "error_code", None)  # MlflowException and RestException carry the protocol's code
    return code if isinstance(code, str) else None


def _is_permanent(err: BaseException) -> bool:
    return _error_code(err) in _PERMANENT_ERRORS


class Tracker:
    """MLflow logging for one training run; every call is a no-op when ``enabled`` is false (ranks != 0).

    ``run_id`` is the resumed run's id from the start, or the new run's id once it exists (``None`` while
    the tracking backend is unreachable; the tracker keeps trying in the background). Once the run exists its
    id is written to ``<run_dir>/mlflow_run.json``.

    ``progress_metric`` is the metric every logged step carries (the trainer's ``train/loss``): on resume its last step
    in MLflow says which steps MLflow has. ``experiment_description`` becomes the experiment's ``mlflow.note.content``
    when it has none.

    ``backfill(after_step)`` returns the ``(step, metrics)`` rows of earlier attempts of this training run that
    MLflow lacks (steps after ``after_step``, the last step MLflow has): they are sent first. Rows for steps MLflow
    already has (logged before a crash, computed again after the resume) are not sent twice.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        experiment: str = "hypertrain",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        run_id: str | None = None,
        backfill: Callable[[int], list[tuple[int, dict[str, float]]]] | None = None,
        experiment_description: str | None = None,
        progress_metric: str = "loss",
        max_buffer: int = 100_000,
        flush_interval: float = 0.5,
        start_timeout: float = 30.0,
        max_backoff: float = 60.0,
        warn_interval: float = 60.0,
    ) -> None:
        self.enabled = bool(enabled)
        self.run_dir = Path(run_dir).resolve()
        self.experiment = experiment
        self.run_name = run_name
        self.tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (
            f"sqlite:///{self.run_dir / 'mlflow.db'}"
        )
        self.run_id: str | None = run_id
        self.experiment_id: str | None = None
        self.experiment_description = experiment_description
        self.progress_metric = progress_metric
        self.dropped = 0
        self.max_buffer = max(1, int(max_buffer))
        self.flush_interval = flush_interval
        self.start_timeout = start_timeout
        self.max_backoff = max_backoff
        self.warn_interval = warn_interval

        self._resume_id = run_id
        self._backfill = backfill
        self._logged_through = -1  # metric rows up to this step are in MLflow already (from an earlier attempt)
        self._created = False  # the run exists / was reopened on the backend
        self._cond = threading.Condition()
        self._metrics: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._inflight: list[tuple[str, float, int, int]] = []
        self._ops: collections.deque[tuple[str, Callable[[MlflowClient, str], None]]] = collections.deque()
        self._ops_dropped = 0
        self._closing = False
        self._closed = False
        self._status = "FINISHED"
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._first_attempt = threading.Event()
        self._client: MlflowClient | None = None
        self._tags: dict[str, str] = {}
        self._warned: dict[str, tuple[float, int]] = {}
        self._failures = 0
        self._staging = self.run_dir / ".mlflow_staging"
        self._staged = 0

    # ------------------------------------------------------------------ public API (training thread)

    def start(self, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        """Create (or reopen) the run and queue params and tags.

        Waits until the first attempt to reach the backend has succeeded or failed, at most ``start_timeout``
        seconds; returns the run id, or ``None`` while the backend is unreachable (retried in the background).
        """
        if not self.enabled or self._thread is not None or self._closed:
            return self.run_id
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        flat = flatten_params(params)
        self._tags = {_clean_key(k): _truncate(str(v), MAX_TAG_VALUE) for k, v in tags.items()}
        full_params = flatten_params_full(params)
        truncated = {k: v for k, v in full_params.items() if len(v) > MAX_PARAM_VALUE}
        with self._cond:
            self._ops.appendleft(("tags", self._tags_op(dict(self._tags))))
            self._ops.appendleft(("params", self._params_op(flat)))
        if truncated:
            self.log_dict(full_params, "params_full.json")
        self._thread = threading.Thread(target=self._worker, name="hypertrain-mlflow", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        self._first_attempt.wait(self.start_timeout)
        if not self._created:
            log.warning(
                "tracking: no MLflow run at %s yet (backend unreachable or slow); training goes on and the "
                "tracker keeps retrying in the background", redact(self.tracking_uri),
            )
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue one row per metric at ``step`` (values convertible to float; ``None`` is skipped)."""
        if not self.enabled or self._closed:
            return
        now = int(time.time() * 1000)
        rows = []
        for key, value in metrics.items():
            if value is None:
                continue
            try:
                rows.append((_clean_key(key), float(value), now, int(step)))
            except (TypeError, ValueError):
                self._warn(f"bad-metric:{key}", f"metric {key!r} is not a number ({type(value).__name__}); skipped")
        if not rows:
            return
        with self._cond:
            self._metrics.extend(rows)
            overflow = len(self._metrics) - self.max_buffer
            for _ in range(max(0, overflow)):
                self._metrics.popleft()
            if overflow > 0:
                self.dropped += overflow
            self._cond.notify()
        if overflow > 0:
            self._warn("overflow", f"metric buffer full ({self.max_buffer} rows): {self.dropped} oldest rows dropped")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue a file or directory for upload; it is copied now, so later changes do not matter."""
        if not self.enabled or self._closed:
            return
        source = Path(path)
        try:
            target = self._stage_dir() / source.name
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        except OSError as err:
            log.warning("tracking: cannot stage artifact %s: %s", source, err)
            return
        self._push_op(f"artifact {source.name}", self._artifact_op(target, artifact_path))

    def log_dict(self, data: Any, artifact_file: str) -> None:
        """Queue ``data`` as a JSON (or ``.yaml``/``.yml``: YAML) artifact at ``artifact_file``."""
        if not self.enabled or self._closed:
            return
        name = Path(artifact_file)
        try:
            if name.suffix in (".yaml", ".yml"):
                import yaml

                text = yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False)
            else:
                text = json.dumps(data, indent=2, default=str)
            target = self._stage_dir() / name.name
            target.write_text(text, encoding="utf-8")
        except (OSError, TypeError, ValueError) as err:
            log.warning("tracking: cannot write artifact %s: %s", artifact_file, err)
            return
        parent = name.parent.as_posix()
        self._push_op(f"artifact {artifact_file}", self._artifact_op(target, None if parent == "." else parent))

    def log_inputs(self, datasets: Sequence[Mapping[str, Any]]) -> None:
        """Queue datasets as the run's MLflow inputs: dicts with ``name``, ``digest``, ``source``, ``context`` and a
        ``profile`` dict (:func:`hypertrain.run_record.dataset_input`)."""
        if not self.enabled or self._closed or not datasets:
            return
        self._push_op("inputs", self._inputs_op([dict(d) for d in datasets]))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Queue tags (values cut to MLflow's limit)."""
        if not self.enabled or self._closed:
            return
        clean = {_clean_key(k): _truncate(str(v), MAX_TAG_VALUE) for k, v in tags.items()}
        self._push_op("tags", self._tags_op(clean))

    def close(self, status: str = "FINISHED", timeout: float = 30.0) -> None:
        """Flush what can be flushed within ``timeout`` seconds, end the run with ``status``, report losses."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self._atexit)
        if self._thread is None:  # never started: nothing can be sent
            with self._cond:
                self.dropped += len(self._metrics)
                self._metrics.clear()
                self._ops_dropped += len(self._ops)
                self._ops.clear()
            shutil.rmtree(self._staging, ignore_errors=True)
            self._report_losses(finished=True)
            return
        with self._cond:
            self._status = status
            self._closing = True
            self._deadline = time.monotonic() + max(0.0, timeout)
            self._cond.notify_all()
        self._thread.join(max(0.0, timeout) + 1.0)
        finished = not self._thread.is_alive()
        with self._cond:
            unsent = len(self._metrics) + len(self._inflight)
            self.dropped += unsent
            self._metrics.clear()
            self._inflight = []
            self._ops_dropped += len(self._ops)
            self._ops.clear()
        if finished:
            shutil.rmtree(self._staging, ignore_errors=True)
        self._report_losses(finished)

    # ------------------------------------------------------------------ helpers (training thread)

    def _push_op(self, what: str, op: Callable[[MlflowClient, str], None]) -> None:
        with self._cond:
            self._ops.append((what, op))
            if len(self._ops) > self.max_buffer:
                self._ops.popleft()
                self._ops_dropped += 1
            self._cond.notify()

    def _stage_dir(self) -> Path:
        self._staged += 1
        path = self._staging / f"{os.getpid()}-{self._staged}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _report_losses(self, finished: bool) -> None:
        if not finished:
            log.warning(
                "tracking: close() gave up after its timeout; run %s may stay RUNNING in MLflow", self.run_id
            )
        if self.dropped or self._ops_dropped:
            log.warning(
                "tracking: %d metric rows and %d other records were not logged to %s (run %s)",
                self.dropped, self._ops_dropped, redact(self.tracking_uri), self.run_id,
            )

    def _atexit(self) -> None:  # the process exits without close(): flush briefly, mark the run FAILED
        self.close(status="FAILED", timeout=5.0)

    def _warn(self, key: str, message: str) -> None:
        """Log ``message`` at most once per ``warn_interval`` seconds per ``key``."""
        now = time.monotonic()
        last, suppressed = self._warned.get(key, (-float("inf"), 0))
        if now - last >= self.warn_interval:
            extra = f" ({suppressed} similar warnings suppressed)" if suppressed else ""
            log.warning("tracking: %s%s", redact(message), extra)
            self._warned[key] = (now, 0)
        else:
            self._warned[key] = (last, suppressed + 1)

    # ------------------------------------------------------------------ background thread

    def _worker(self) -> None:
        delay = 0.0
        while True:
            with self._cond:
                if delay > 0:  # back off; the switch to closing ends the wait, the close deadline bounds it
                    was_closing = self._closing
                    until = time.monotonic() + delay
                    while self._closing == was_closing and (left := min(until, self._deadline) - time.monotonic()) > 0:
                        self._cond.wait(left)
                elif not self._closing:
                    while self._created and not (self._metrics or self._ops or self._closing):
                        self._cond.wait()
                closing, deadline = self._closing, self._deadline
            try:
                self._drain()
                if closing:
                    self._terminate()
                    return
            except Exception as err:  # anything: tracking must never end training
                self._failed(err)
                self._first_attempt.set()  # start() stops waiting: the backend is unreachable for now
                delay = min(max(2 * delay, 1.0), self.max_backoff)
                if closing:
                    if deadline - time.monotonic() <= 0.1:
                        return
                    delay = 1.0
                continue
            if self._failures:
                log.warning(
                    "tracking: %s reachable again after %d failed attempts", redact(self.tracking_uri), self._failures
                )
                self._failures = 0
            delay = 0.0
            if self.flush_interval > 0:
                with self._cond:  # let rows accumulate into one batch; close() wakes us early
                    if not self._closing:
                        self._cond.wait(self.flush_interval)

    def _failed(self, err: BaseException) -> None:
        self._failures += 1
        self._warn("backend", f"MLflow call to {self.tracking_uri} failed ({type(err).__name__}: {err}); will retry")

    def _get_client(self) -> MlflowClient:
        if self._client is None:
            self._client = open_client(self.tracking_uri)
        return self._client

    def _drain(self) -> None:
        client = self._get_client()
        if not self._created:
            self._create_run(client)
        assert self.run_id is not None
        while True:
            with self._cond:
                if not self._ops:
                    break
                what, op = self._ops[0]
            try:
                op(client, self.run_id)
            except Exception as err:
                if not _is_permanent(err):
                    raise
                self._warn(f"op:{what}", f"MLflow rejected {what} ({err}); dropped")  # _warn redacts
                with self._cond:
                    self._ops_dropped += 1
            with self._cond:
                if self._ops and self._ops[0][1] is op:
                    self._ops.popleft()
        self._send_metrics(client)

    def _send_metrics(self, client: MlflowClient) -> None:
        from mlflow.entities import Metric

        while True:
            with self._cond:
                if not self._inflight:
                    n = min(len(self._metrics), MAX_METRICS_PER_BATCH)
                    rows = [self._metrics.popleft() for _ in range(n)]
                    self._inflight = [row for row in rows if row[3] > self._logged_through]
                    if not self._inflight and self._metrics:
                        continue
                batch = self._inflight
            if not batch:
                return
            metrics = [Metric(key=k, value=v, timestamp=ts, step=s) for k, v, ts, s in batch]
            try:
                client.log_batch(self.run_id, metrics=metrics, synchronous=True)
            except Exception as err:
                if not _is_permanent(err):
                    raise  # kept in flight; retried first next time
                self._warn("metrics-rejected", f"MLflow rejected {len(batch)} metric rows ({err}); dropped")
                with self._cond:
                    self.dropped += len(batch)
            with self._cond:
                self._inflight = []

    def _create_run(self, client: MlflowClient) -> None:
        if self._resume_id is not None:
            try:
                self.experiment_id = client.get_run(self._resume_id).info.experiment_id
                client.update_run(self._resume_id, status="RUNNING")
            except Exception as err:
                if not _is_permanent(err):
                    raise
                log.warning(
                    "tracking: cannot resume run %s at %s (%s); starting a new run",
                    self._resume_id, redact(self.tracking_uri), redact(str(err)),
                )
                self._tags["hypertrain.resumed_from_missing_run"] = self._resume_id
                self._resume_id = None
            else:
                self._opened(client, self._resume_id, reopened=True)
                return
        experiment_id = self._experiment_id(client)
        run = client.create_run(experiment_id, tags=dict(self._tags), run_name=self.run_name)
        self._opened(client, run.info.run_id, reopened=False)

    def _opened(self, client: MlflowClient, run_id: str, reopened: bool) -> None:
        """The run exists: remember its id on disk, queue what earlier attempts did not log."""
        self.run_id = run_id
        self._resume_id = run_id  # should a call below fail, the retry reopens this run instead of making another
        try:
            write_json_atomic(
                self.run_dir / RUN_ID_FILE,
                {"run_id": run_id, "experiment": self.experiment, "tracking_uri": redact(self.tracking_uri)},
            )
        except OSError as err:
            log.warning("tracking: cannot write %s: %s", self.run_dir / RUN_ID_FILE, err)
        # the last step MLflow has: of the metric every logged step carries (a new run holds nothing)
        history = client.get_metric_history(run_id, self.progress_metric) if reopened else []
        self._logged_through = max((m.step for m in history), default=-1)
        if self._backfill is not None:
            rows = self._backfill(self._logged_through)
            with self._cond:
                for step, metrics in reversed(rows):  # before anything queued by this attempt
                    now = int(time.time() * 1000)
                    for key, value in reversed(list(metrics.items())):
                        self._metrics.appendleft((_clean_key(key), float(value), now, int(step)))
            if rows:
                log.info("tracking: sending %d logged steps that run %s lacks (up to step %d)", len(rows), run_id,
                         rows[-1][0])
        self._created = True
        self._first_attempt.set()

    def _experiment_id(self, client: MlflowClient) -> str:
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                created = client.create_experiment(self.experiment, artifact_location=self._artifact_location())
                self.experiment_id = created
                if self.experiment_description:
                    client.set_experiment_tag(created, "mlflow.note.content", self.experiment_description)
                return created
            except Exception as err:
                if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(self.experiment)
                assert exp is not None
        if exp.lifecycle_stage == "deleted":
            log.warning("tracking: experiment %r was deleted; restoring it", self.experiment)
            client.restore_experiment(exp.experiment_id)
        self.experiment_id = exp.experiment_id
        if self.experiment_description and "mlflow.note.content" not in exp.tags:  # never over a user's own note
            client.set_experiment_tag(exp.experiment_id, "mlflow.note.content", self.experiment_description)
        return exp.experiment_id

    def _artifact_location(self) -> str | None:
        """SQLite backends keep artifacts beside the database (MLflow's default is ``./mlruns`` in the cwd)."""
        if self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri[len("sqlite:///"):]).resolve()
            return (db.parent / "mlartifacts").as_uri()
        return None

    def _terminate(self) -> None:
        if self.run_id is not None and self._created:
            self._get_client().set_terminated(self.run_id, status=self._status)

    # ------------------------------------------------------------------ operations (run on the thread)

    def _params_op(self, params: dict[str, str]) -> Callable[[MlflowClient, str], None]:
        def op(client: MlflowClient, run_id: str) -> None:
            from mlflow.entities import Param

            logged = client.get_run(run_id).data.params
            new = {k: v for k, v in params.items() if k not in logged}
            changed = {k: {"logged": logged[k], "now": v} for k, v in params.items() if k in logged and logged[k] != v}
            items = sorted(new.items())
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                chunk = [Param(k, v) for k, v in items[i : i + MAX_PARAMS_TAGS_PER_BATCH]]
                client.log_batch(run_id, params=chunk, synchronous=True)
            if changed:
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
                name = f"param_changes/resume-{stamp}.json"
                log.warning(
                    "tracking: %d params differ from those logged for run %s (MLflow params are immutable; "
                    "recorded in artifact %s): %s",
                    len(changed), run_id, name, ", ".join(sorted(changed)[:10]),
                )
                with self._cond:
                    self._ops.append((f"artifact {name}", self._dict_op(changed, name)))

        return op

    def _tags_op(self, tags: dict[str, str]) -> Callable[[MlflowClient, str], None]:
        def op(client: MlflowClient, run_id: str) -> None:
            from mlflow.entities import RunTag

            items = sorted(tags.items())
            for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                chunk = [RunTag(k, v) for k, v in items[i : i + MAX_PARAMS_TAGS_PER_BATCH]]
                client.log_batch(run_id, tags=chunk, synchronous=True)

        return op

    def _artifact_op(self, local: Path, artifact_path: str | None) -> Callable[[MlflowClient, str], None]:
        def op(client: MlflowClient, run_id: str) -> None:
            if local.is_dir():
                client.log_artifacts(run_id, str(local), artifact_path=f"{artifact_path}/{local.name}"
                                     if artifact_path else local.name)
            else:
                client.log_artifact(run_id, str(local), artifact_path=artifact_path)
            shutil.rmtree(local.parent, ignore_errors=True)

        return op

    def _inputs_op(self, datasets: list[dict[str, Any]]) -> Callable[[MlflowClient, str], None]:
        def op(client: MlflowClient, run_id: str) -> None:
            from mlflow.entities import Dataset, DatasetInput, InputTag

            inputs = [
                DatasetInput(
                    Dataset(name=d["name"], digest=d["digest"], source_type="local", source=json.dumps({"uri": d["source"]}),
                            profile=json.dumps(d.get("profile") or {})),
                    tags=[InputTag(key="mlflow.data.context", value=d["context"])],
                )
                for d in datasets
            ]
            client.log_inputs(run_id, datasets=inputs)

        return op

    def _dict_op(self, data: Any, artifact_file: str) -> Callable[[MlflowClient, str], None]:
        def op(client: MlflowClient, run_id: str) -> None:
            client.log_dict(run_id, data, artifact_file)

        return op


def flatten_params_full(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Like :func:`flatten_params` without cutting values (for the ``params_full.json`` artifact)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params_full(value, full))
        else:
            flat[_clean_key(full)] = _param_value(value)
    return flat


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_NAME",
    "SLURM_JOB_PARTITION",
    "SLURM_JOB_NUM_NODES",
    "SLURM_CLUSTER_NAME",
    "SLURM_RESTART_COUNT",
)


def default_tags(*, method: str, model: str, datasets: Sequence[str], world_size: int) -> dict[str, str]:
    """Run tags: method, model, datasets, world size, hostname, git commit (when the code is a git
    checkout; ``git_dirty`` when it has uncommitted changes) and the Slurm job variables that are set."""
    tags = {
        "method": method,
        "model": model,
        "datasets": ",".join(datasets),
        "world_size": str(world_size),
        "hostname": socket.gethostname(),
    }
    src = Path(__file__).resolve().parent
    commit = _git(["rev-parse", "HEAD"], src)
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
        status = _git(["status", "--porcelain", "--untracked-files=no"], src)
        if status is not None:
            tags["git_dirty"] = str(bool(status)).lower()
    for var in _SLURM_VARS:
        value = os.environ.get(var)
        if value:
            tags[var.lower()] = value
    return tags


def model_flops_utilization(
    flops_per_step: float, step_time: float, world_size: int, peak_flops_per_device: float
) -> float:
    """MFU: achieved model FLOP/s over all devices divided by their peak (e.g. 312e12 for an A100 in bf16)."""
    if step_time <= 0 or world_size < 1 or peak_flops_per_device <= 0:
        return 0.0
    return flops_per_step / step_time / (world_size * peak_flops_per_device)


def read_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id a tracker recorded in ``run_dir`` (None if none was, or the file is unreadable)."""
    try:
        value = json.loads((Path(run_dir) / RUN_ID_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


CUMULATIVE_METRICS = ("samples_total", "train_time_s")
"""Running totals since step 0 (resumes included): a logging window reports their last value, not their mean;
throughput is ``samples_total / train_time_s``."""


def window_metrics(rows: list[dict[str, float]]) -> dict[str, float]:
    """One logged row for a window of per-step rows: each metric's mean, a running total's last value."""
    return {k: rows[-1][k] if k in CUMULATIVE_METRICS else sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def backfill_rows(
    metrics_file: str | Path, after: int, through: int, log_every: int, last_step: int
) -> list[tuple[int, dict[str, float]]]:
    """The rows a training run sent to MLflow for steps ``after < step <= through``, rebuilt from its per-step
    ``metrics.jsonl``: the mean of each window of ``log_every`` steps (and of the last step's window), logged at the
    window's last step, as the trainer logs them."""
    per_step: dict[int, dict[str, float]] = {}
    try:
        lines = Path(metrics_file).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
            step = int(row.pop("step"))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        per_step[step] = row
    windows: dict[int, list[dict[str, float]]] = {}
    for step in sorted(per_step):
        end = min(-(-step // log_every) * log_every, last_step)
        windows.setdefault(end, []).append(per_step[step])
    out = []
    for end, rows in sorted(windows.items()):
        if after < end <= through and all(r.keys() == rows[0].keys() for r in rows):
            out.append((end, window_metrics(rows)))
    return out
