"""Start-up reconciliation: make records, mounts and the store agree before serving.

A crash can stop the driver between any two steps of a publish. Each step is
atomic on its own, so the only inconsistencies possible are the ones repaired
here: temp files of interrupted downloads, unreadable records, records whose
mount is gone, our mounts that have no record, and our binds left writable by a
kill between the bind and the read-only remount. Each repair is logged and
counted; none stops the driver from starting.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import time
from dataclasses import dataclass

from csi_wasm.logs import event
from csi_wasm.metrics import Metrics
from csi_wasm.mounts import REQUIRED_OPTIONS, MountEntry, Mounter
from csi_wasm.records import RecordStore, VolumeRecord
from csi_wasm.store import ModuleStore

log = logging.getLogger("csi_wasm.recovery")


@dataclass(frozen=True)
class RecoveryReport:
    temp_files: int = 0
    unreadable_records: int = 0
    records_without_mount: int = 0
    adopted_mounts: int = 0
    writable_mounts: int = 0
    volumes: int = 0
    seconds: float = 0.0


def recover(
    store: ModuleStore, records: RecordStore, mounter: Mounter, pods_dir: pathlib.Path, metrics: Metrics
) -> RecoveryReport:
    started = time.monotonic()
    temp_files = store.sweep_temp_files()
    unreadable = records.load()
    for path in unreadable:
        event(log, "repair.unreadable_record", logging.WARNING, file=str(path))
        path.unlink(missing_ok=True)
    mounted = {entry.mount_point: entry for entry in mounter.mounts()}  # the last listed is the one on top
    writable = _take_down_writable(store, records, mounter, pods_dir, mounted)
    dropped = 0
    for record in records.all():
        if record.target_path not in mounted:
            event(log, "repair.record_without_mount", logging.WARNING, volume_id=record.volume_id,
                  target=record.target_path, image=record.image, digest=record.module_digest)  # fmt: skip
            records.delete(record.target_path)
            dropped += 1
    adopted = 0
    prefix = f"{pods_dir}/"
    for mount_point, entry in mounted.items():
        if not mount_point.startswith(prefix) or records.get(mount_point) is not None:
            continue
        view = store.view_of(entry.root, pathlib.Path(mount_point))
        if view is None:
            continue
        digest, file_name = view
        records.put(VolumeRecord("", mount_point, "", digest, file_name, time.time()))
        event(log, "repair.adopted_mount", logging.WARNING, target=mount_point, digest=digest)
        adopted += 1
    for kind, count in (("temp_file", temp_files), ("unreadable_record", len(unreadable)),
                        ("record_without_mount", dropped), ("adopted_mount", adopted),
                        ("writable_mount", writable)):  # fmt: skip
        if count:
            metrics.repairs.labels(kind).inc(count)
    volumes = len(records.all())
    report = RecoveryReport(
        temp_files, len(unreadable), dropped, adopted, writable, volumes, time.monotonic() - started
    )
    event(log, "recovered", **vars(report))
    return report


def _take_down_writable(
    store: ModuleStore, records: RecordStore, mounter: Mounter, pods_dir: pathlib.Path, mounted: dict[str, MountEntry]
) -> int:
    """A kill between the bind and the read-only remount leaves a writable bind of a shared module.

    Never adopt or keep it: unmount it, remove the target and drop its record, so the pod's next
    publish (kubelet retries) makes it again, read-only.
    """
    taken_down = 0
    prefix = f"{pods_dir}/"
    for mount_point, entry in list(mounted.items()):
        if not mount_point.startswith(prefix) or REQUIRED_OPTIONS <= entry.options:
            continue
        target = pathlib.Path(mount_point)
        if records.get(mount_point) is None and store.view_of(entry.root, target) is None:
            continue  # not ours
        mounter.unmount(target)
        with contextlib.suppress(OSError):
            target.rmdir()
        records.delete(mount_point)
        del mounted[mount_point]
        event(log, "repair.writable_mount", logging.WARNING, target=mount_point, options=",".join(sorted(entry.options)))
        taken_down += 1
    return taken_down
