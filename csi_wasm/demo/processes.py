"""Stopping a driver process the way kubelet stops a container: SIGTERM, then SIGKILL after a grace period."""

from __future__ import annotations

import signal
import subprocess


def stop_gracefully(process: subprocess.Popen[bytes], grace_seconds: float) -> int:
    """SIGTERM ``process`` (if it still runs) and wait; SIGKILL it if it outlives ``grace_seconds``. Its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()
