"""Start-up reconciliation: make records, mounts and the store agree before serving.

A crash can stop the driver between any two steps of a publish. Each step is atomic on its own,
so the inconsistencies possible are the ones repaired here: temp files of interrupted downloads,
unreadable records, records whose mount is gone, and mounts of ours that have no record.

"Ours" is decided by the mount, not by where it was made: a bind of one of our view directories
(the mount's root is ``.../views/<hex>/<fileName>`` and the target shows that directory's inode).
In a cluster the driver restarts in a fresh mount namespace and sees the mounts a predecessor made
in its own namespace as the host's copies; those are adopted like any other. A mount that is not
ours (kubelet's secret tmpfs, another driver's volume) is never touched, whatever its flags.

A *writable* bind of ours can only come from a driver version that bound, then remounted read-only
(the host's copy stayed writable) or from a kill between those two steps. Unmounting it would take
the module away from every container that starts later in that pod (kubelet does not republish an
ephemeral volume), which is what a restart used to do to every volume on a node. So its module is
re-hashed once (a container may have written to it) and then:

* intact: a read-only bind of the same view is attached on top (kind ``writable_mount``): the host
  and every container started from now on see the read-only one; unpublish removes both;
* corrupt: the module is quarantined and the mounts of it are taken down (kind ``tampered_mount``),
  so no container ever starts on the tampered bytes; a new publish fetches the module again.

Each repair is logged and counted; none stops the driver from starting.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from dataclasses import dataclass

from csi_wasm.errors import DriverError
from csi_wasm.integrity import hashes_to
from csi_wasm.logs import event
from csi_wasm.metrics import Metrics
from csi_wasm.mounts import REQUIRED_OPTIONS, MountEntry, Mounter, top_mounts
from csi_wasm.records import RecordStore, VolumeRecord
from csi_wasm.store import ModuleStore, names_view
from csi_wasm.targets import Targets

log = logging.getLogger("csi_wasm.recovery")
MAX_STACKED_MOUNTS = 8


@dataclass(frozen=True)
class RecoveryReport:
    temp_files: int = 0
    unreadable_records: int = 0
    records_without_mount: int = 0
    adopted_mounts: int = 0
    writable_mounts: int = 0  # covered with a read-only bind
    tampered_mounts: int = 0  # writable, and their module no longer matched its digest: taken down
    volumes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class OurMount:
    target: str
    digest: str
    file_name: str
    read_only: bool


def recover(
    store: ModuleStore, records: RecordStore, mounter: Mounter, targets: Targets, metrics: Metrics
) -> RecoveryReport:
    started = time.monotonic()
    temp_files = store.sweep_temp_files()
    unreadable = records.load()
    for path in unreadable:
        event(log, "repair.unreadable_record", logging.WARNING, file=str(path))
        path.unlink(missing_ok=True)
    tops = {p: e for p, e in top_mounts(mounter.mounts()).items() if p.startswith(f"{targets.pods_dir}/")}
    ours = our_mounts(store, tops)
    covered, tampered = _secure_writable(store, records, mounter, targets, ours)
    dropped = _drop_records_without_mount(records, ours, tops)
    adopted = _adopt(records, ours)
    for kind, count in (("temp_file", temp_files), ("unreadable_record", len(unreadable)),
                        ("record_without_mount", dropped), ("adopted_mount", adopted),
                        ("writable_mount", covered), ("tampered_mount", tampered)):  # fmt: skip
        if count:
            metrics.repairs.labels(kind).inc(count)
    report = RecoveryReport(temp_files, len(unreadable), dropped, adopted, covered, tampered, len(records.all()),
                            time.monotonic() - started)  # fmt: skip
    event(log, "recovered", **vars(report))
    return report


def our_mounts(store: ModuleStore, tops: dict[str, MountEntry]) -> dict[str, OurMount]:
    """Target -> the mount of ours on top there (of the top mounts given)."""
    found = {}
    for point, entry in tops.items():
        view = store.view_of(entry.root, pathlib.Path(point))
        if view is not None:
            found[point] = OurMount(point, view[0], view[1], REQUIRED_OPTIONS <= entry.options)
    return found


def _secure_writable(
    store: ModuleStore, records: RecordStore, mounter: Mounter, targets: Targets, ours: dict[str, OurMount]
) -> tuple[int, int]:
    writable = [mount for mount in ours.values() if not mount.read_only]
    intact = {(m.digest, m.file_name): _view_intact(store, m) for m in writable}
    covered = tampered = 0
    for mount in writable:
        try:
            if intact[(mount.digest, mount.file_name)]:
                _cover(store, mounter, targets, mount)
                ours[mount.target] = OurMount(mount.target, mount.digest, mount.file_name, True)
                covered += 1
            else:
                _take_down(mounter, targets, mount)
                records.delete(mount.target)
                del ours[mount.target]
                tampered += 1
        except (DriverError, OSError) as exc:
            event(log, "repair.failed", logging.ERROR, target=mount.target, error=str(exc))
    for digest in {digest for (digest, _), ok in intact.items() if not ok and store.has(digest)}:
        moved = store.quarantine(digest)
        event(log, "store.corrupt_module", logging.ERROR, digest=digest, quarantined=str(moved))
    return covered, tampered


def _view_intact(store: ModuleStore, mount: OurMount) -> bool:
    """What the pods read is the view's hard link (the module file is the same inode): hash that."""
    try:
        return hashes_to(store.view(mount.digest, mount.file_name) / mount.file_name, mount.digest)
    except OSError:
        return False


def _cover(store: ModuleStore, mounter: Mounter, targets: Targets, mount: OurMount) -> None:
    with targets.open(mount.target) as target:
        mounter.bind_read_only(store.view(mount.digest, mount.file_name), target)
    event(log, "repair.writable_mount", logging.WARNING, target=mount.target, digest=mount.digest,
          action="covered with a read-only bind")  # fmt: skip


def _take_down(mounter: Mounter, targets: Targets, mount: OurMount) -> None:
    with targets.open(mount.target) as target:
        shown = target.lstat()
        for _ in range(MAX_STACKED_MOUNTS):
            info = target.lstat()
            if shown is None or info is None or not os.path.samestat(info, shown):
                break
            mounter.unmount(target)
        target.remove()
    event(log, "repair.tampered_mount", logging.ERROR, target=mount.target, digest=mount.digest,
          action="unmounted: its module failed the digest check and is quarantined")  # fmt: skip


def _drop_records_without_mount(records: RecordStore, ours: dict[str, OurMount], tops: dict[str, MountEntry]) -> int:
    """Keep a record while its mount is on top at its target: a bind of its view, even a view removed
    since (a quarantined module's pods keep their mount, and their unpublish needs the record)."""
    dropped = 0
    for record in records.all():
        mount, top = ours.get(record.target_path), tops.get(record.target_path)
        if mount is not None and (mount.digest, mount.file_name) == (record.module_digest, record.file_name):
            continue
        if mount is None and top is not None and names_view(top.root, record.module_digest, record.file_name):
            continue
        event(log, "repair.record_without_mount", logging.WARNING, volume_id=record.volume_id,
              target=record.target_path, image=record.image, digest=record.module_digest)  # fmt: skip
        records.delete(record.target_path)
        dropped += 1
    return dropped


def _adopt(records: RecordStore, ours: dict[str, OurMount]) -> int:
    adopted = 0
    for target, mount in ours.items():
        if records.get(target) is not None:
            continue
        records.put(VolumeRecord("", target, "", mount.digest, mount.file_name, time.time()))
        event(log, "repair.adopted_mount", logging.WARNING, target=target, digest=mount.digest)
        adopted += 1
    return adopted
