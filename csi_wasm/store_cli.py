"""``csi-wasm store list|gc|verify``: operator commands on a node's store, live or offline."""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import signal
import time

from csi_wasm.config import NodeConfig
from csi_wasm.gc import GarbageCollector, NoPublishes
from csi_wasm.metrics import Metrics
from csi_wasm.records import RecordStore
from csi_wasm.server import DRIVER_LOCK, DRIVER_PID
from csi_wasm.store import ModuleStore


def run(command: str, state_dir: pathlib.Path, node: NodeConfig) -> int:
    store = ModuleStore(state_dir / "store")
    records = RecordStore(state_dir / "volumes")
    records.load()
    if command == "list":
        return _list(store, records)
    if command == "gc":
        return _gc(state_dir, store, records, node)
    if command == "verify":
        return _verify(store)
    raise AssertionError(command)


def _list(store: ModuleStore, records: RecordStore) -> int:
    references = records.references()
    print(f"{'DIGEST':71}  {'BYTES':>12}  {'REFS':>4}  LAST USED (UTC)")
    for module in sorted(store.modules(), key=lambda m: m.last_used, reverse=True):
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(module.last_used))
        print(f"{module.digest:71}  {module.size:>12}  {references[module.digest]:>4}  {used}")
    return 0


def _gc(state_dir: pathlib.Path, store: ModuleStore, records: RecordStore, node: NodeConfig) -> int:
    lock = os.open(state_dir / DRIVER_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            return _ask_running_driver(state_dir)
        report = GarbageCollector(store, records, NoPublishes(), node.store, Metrics(process=False)).collect()
        print(f"removed {len(report.removed)} modules, freed {report.freed_bytes} bytes; kept "
              f"{report.kept_referenced} referenced and {report.kept_in_grace} within the grace period")  # fmt: skip
        return 0
    finally:
        os.close(lock)


def _ask_running_driver(state_dir: pathlib.Path) -> int:
    pid = int((state_dir / DRIVER_PID).read_text())
    os.kill(pid, signal.SIGUSR1)
    print(f"the driver (pid {pid}) owns this store; asked it to collect now (see its log for the gc event)")
    return 0


def _verify(store: ModuleStore) -> int:
    corrupt = 0
    modules = store.modules()
    for module in modules:
        if store.verify(module.digest):
            continue
        corrupt += 1
        moved = store.quarantine(module.digest)
        print(f"CORRUPT {module.digest}: moved to {moved}; the next publish that needs it downloads it again")
    print(f"verified {len(modules)} modules: {len(modules) - corrupt} ok, {corrupt} corrupt")
    return 1 if corrupt else 0
