"""``csi-wasm store list|gc|verify``: operator commands on a node's store, live or offline."""

from __future__ import annotations

import os
import pathlib
import signal
import time

from csi_wasm.config import NodeConfig, UsageError
from csi_wasm.gc import GarbageCollector, NoPublishes
from csi_wasm.metrics import Metrics
from csi_wasm.records import RecordStore
from csi_wasm.statedir import StateDirLock, holder_pid
from csi_wasm.store import ModuleStore


def run(command: str, state_dir: pathlib.Path, node: NodeConfig) -> int:
    # Checked before anything is opened: the store classes create their directories, and a
    # mistyped path must not grow a fresh, empty store that answers "nothing here".
    if not (state_dir / "store").is_dir():
        raise UsageError(
            f"--state-dir {state_dir}: no csi-wasm store there (no {state_dir / 'store'}); check the path "
            "(the DaemonSet's is /var/lib/csi-wasm)"
        )
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
    lock = StateDirLock(state_dir)
    if not lock.try_acquire():
        return _ask_running_driver(state_dir)
    try:
        report = GarbageCollector(store, records, NoPublishes(), node.store, Metrics(process=False)).collect()
        print(f"removed {len(report.removed)} modules, freed {report.freed_bytes} bytes; kept "
              f"{report.kept_referenced} referenced and {report.kept_in_grace} within the grace period")  # fmt: skip
        return 0
    finally:
        lock.release()


def _ask_running_driver(state_dir: pathlib.Path) -> int:
    pid = holder_pid(state_dir)
    if pid is None:
        raise UsageError(f"--state-dir {state_dir}: a driver holds this store but wrote no readable pid; retry")
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
