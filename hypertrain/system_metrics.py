"""System metrics from MLflow's own monitors, delivered by the tracker.

MLflow's ``SystemMetricsMonitor`` collects CPU and memory, disk and network (and GPU through ``nvidia-ml-py`` when it
is installed), but logs on its own thread and stops at the first error reaching the server. This sampler uses the
same monitor classes on rank 0 and hands each sample to :class:`~hypertrain.tracking.Tracker` (``system/<name>``
keys, which the MLflow UI shows in its System metrics tab), so an unreachable server costs training nothing and the
samples go out when it is back, like every other metric.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def mlflow_monitors() -> list[Any]:
    """MLflow's CPU/memory, disk and network monitors, plus its GPU monitor where NVML answers."""
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception as err:  # no nvidia-ml-py, no driver, no GPU
        log.debug("system metrics: no GPU monitor (%s)", err)
    return monitors


class SystemMetrics:
    """Sample every ``interval`` seconds on a daemon thread (and once more at :meth:`stop`), at the training step
    ``step()`` returns."""

    def __init__(self, log_metrics: Callable[[dict[str, float], int], None], step: Callable[[], int],
                 interval: float = 10.0) -> None:
        self.log_metrics, self.step, self.interval = log_metrics, step, interval
        self.monitors = mlflow_monitors()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
                values.update({f"system/{k}": float(v) for k, v in monitor.aggregate_metrics().items()})
            except Exception as err:  # a monitor failing never stops training
                log.debug("system metrics: %s failed: %s", type(monitor).__name__, err)
            finally:
                monitor.clear_metrics()
        if values:
            self.log_metrics(values, self.step())
        return values

    def start(self) -> SystemMetrics:
        if self.interval > 0:
            self._thread = threading.Thread(target=self._run, name="hypertrain-system-metrics", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        """Stop the thread and take a last sample (a short run still gets one)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval + 5)
        self._thread = None
        self.sample()
