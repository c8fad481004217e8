#!/usr/bin/env bash
# Build the container image from ./Dockerfile and run the driver from it, on a Debian machine (as root)
# with no Docker engine and no container registry in reach:
#   1. a stand-in for python:3.11-slim: Debian bookworm minbase (debootstrap) with CPython 3.11 built
#      from source into /usr/local the way the official image builds it (see standin_interpreter_containerfile);
#      both cached in buildah's storage under a tag that hashes their recipe;
#   2. the image, built by buildah from ./Dockerfile with --build-arg PYTHON_IMAGE=<the stand-in>
#      (layers cached);
#   3. the image's ENTRYPOINT and CMD, chrooted into the image's root filesystem in a mount namespace
#      laid out as the DaemonSet lays it out (read-only root; socket, state and kubelet pods dirs bound
#      in, the pods dir shared with the "host" as mountPropagation: Bidirectional makes it), against a
#      local registry: one kubelet-shaped publish, checked from the host's side and the driver's, then
#      unpublished. The host's side is a private mount, network and PID namespace: nothing reaches the
#      machine, and everything in it dies with it.
# Prints one line per step; on any failure exits non-zero with one line saying what failed (and keeps
# the log it names). Usage: scripts/image.sh
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SCRIPT="$REPO/scripts/image.sh"
STANDIN=localhost/csi-wasm-standin          # repository prefix of the cached stand-in base images
CHECK_CONTAINER=csi-wasm-image-check        # the working container the check runs the driver from
MINBASE_CONTAINER=csi-wasm-standin-minbase  # the working container debootstrap fills
DEBIAN_MIRROR=http://deb.debian.org/debian
APT_LOCK_WAIT_SECONDS=120
DRIVER_SOCKET_DIR=/var/lib/kubelet/plugins/csi-wasm.dev  # the DaemonSet's plugin-dir hostPath

fail() {
  echo "image.sh: FAILED: $*" >&2
  exit 1
}

# step LABEL NAME COMMAND...: run COMMAND (errexit on) with its output in $LOGS/NAME.log; say how long
# it took, or fail with its last line.
step() {
  local label=$1 log="$LOGS/$2.log" start=$SECONDS rc
  shift 2
  set +e
  (set -e; "$@") >"$log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    fail "$label (exit $rc): $(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-400) [log: $log]"
  fi
  echo "image.sh: $label: $((SECONDS - start)) s"
}

install_packages() {
  local need=()
  command -v buildah >/dev/null || need+=(buildah)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v ip >/dev/null || need+=(iproute2)
  if [ "${#need[@]}" -gt 0 ]; then
    echo "installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_SECONDS" update -qq
    # no recommends: RUN steps use buildah's chroot isolation, so no OCI runtime is needed
    apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_SECONDS" install -y -qq --no-install-recommends "${need[@]}"
  fi
  # docker-registry and the package in .venv: the host side of the check (kubelet, registry, pusher)
  bash "$REPO/scripts/setup.sh"
}

image_exists() {
  buildah inspect --type image "$1" >/dev/null 2>&1
}

remove_container() {
  if buildah inspect --type container "$1" >/dev/null 2>&1; then
    buildah umount "$1" >/dev/null 2>&1 || true
    buildah rm "$1" >/dev/null
  fi
}

# What every `buildah bud` here shares: RUN steps in a chroot on the host's network (no OCI runtime, no
# CNI), never a registry pull, layers cached, no intermediate container left behind.
bud() {
  buildah bud --isolation chroot --network host --pull=never --layers --force-rm "$@"
}

# `bud` for builds whose RUN steps fetch from PyPI: they see the host's CA bundle in place of the
# image's own, bound over it for the build only. Machines like this one reach PyPI through a
# TLS-intercepting proxy whose CA only the host trusts; pip 24.2 and later verifies with the system's
# CAs. The bind leaves no trace in a layer because the file exists in the base (a bind onto a missing
# path leaves an empty file behind) and no RUN step rewrites it (ca-certificates' own postinst would
# fail on it: hence the stand-in's apt steps build without it).
bud_trusting_host_cas() {
  local trust=()
  [ ! -f /etc/ssl/certs/ca-certificates.crt ] ||
    trust=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  bud "${trust[@]}" "$@"
}

# Debian bookworm minbase, as an image, trimmed and configured the way debian:bookworm-slim is
# (debuerreotype's minimizing config and slimify): no docs, man pages or locales; apt keeps no caches and
# its autoremove does not keep what a package merely suggests (the python recipe's purge of its build
# dependencies relies on that); no service starts on install.
build_minbase() {
  local tag=$1 mnt
  remove_container "$MINBASE_CONTAINER"
  buildah from --name "$MINBASE_CONTAINER" scratch
  mnt=$(buildah mount "$MINBASE_CONTAINER")
  # debootstrap mounts /proc and /sys into the target: in a private namespace, so none outlives it
  unshare --mount --propagation private \
    debootstrap --variant=minbase bookworm "$mnt" "$DEBIAN_MIRROR"
  rm -rf "${mnt:?}"/var/cache/apt/archives/*.deb "${mnt:?}"/var/lib/apt/lists/* "${mnt:?}"/dev/* \
    "${mnt:?}"/etc/apt/sources.list
  slim_and_configure "$mnt"
  cat >"$mnt/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $DEBIAN_MIRROR
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${DEBIAN_MIRROR}-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  buildah umount "$MINBASE_CONTAINER"
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["bash"]' \
    "$MINBASE_CONTAINER"
  buildah commit --rm "$MINBASE_CONTAINER" "$tag"
}

slim_and_configure() {
  local root=${1:?} clean dir
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  printf 'force-unsafe-io\n' >"$root/etc/dpkg/dpkg.cfg.d/docker-apt-speedup"
  printf 'Apt::AutoRemove::SuggestsImportant "false";\n' >"$root/etc/apt/apt.conf.d/docker-autoremove-suggests"
  clean='"rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true";'
  printf 'DPkg::Post-Invoke { %s };\nAPT::Update::Post-Invoke { %s };\nDir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n' \
    "$clean" "$clean" >"$root/etc/apt/apt.conf.d/docker-clean"
  printf 'Acquire::GzipIndexes "true";\n' >"$root/etc/apt/apt.conf.d/docker-gzip-indexes"
  printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  : >"$root/etc/dpkg/dpkg.cfg.d/docker"
  for dir in doc groff info linda lintian/overrides locale man; do
    echo "path-exclude /usr/share/$dir/*" >>"$root/etc/dpkg/dpkg.cfg.d/docker"
  done
  echo 'path-include /usr/share/doc/*/copyright' >>"$root/etc/dpkg/dpkg.cfg.d/docker"
  find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "${root:?}"/usr/share/{groff,info,linda,locale,man}/* "${root:?}"/usr/share/lintian/overrides/*
}

# The stand-in for python:3.11-slim, following docker-library/python's 3.11/slim-bookworm recipe: the
# same runtime packages, build dependencies and configure flags, installed into /usr/local with a
# shared libpython, tests and .pyc files removed, build dependencies purged, setuptools and wheel
# from PyPI, the python/pip/pydoc symlinks, CMD python3. Different on purpose: the source is Debian's
# authenticated copy of the upstream tarball (apt verifies it against the signed archive; python.org is
# out of reach), so the version is bookworm's 3.11.2 without Debian's patches instead of the latest
# 3.11.x; the build skips PGO and LTO (--enable-optimizations --with-lto), which take many times
# longer: the interpreter is slower, not different; pip is upgraded from 3.11.2's bundled 22.3.1 to a
# current release, as CPython's later 3.11 releases bundle one (which one 3.11.17 bundles could not be
# checked here).
standin_interpreter_containerfile() {
  cat <<'EOF'
ARG MINBASE
FROM ${MINBASE}
ENV PATH=/usr/local/bin:$PATH LANG=C.UTF-8 PYTHON_VERSION=3.11.2
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates netbase tzdata; \
    rm -rf /var/lib/apt/lists/*
RUN set -eux; \
    savedAptMark="$(apt-mark showmanual)"; \
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      > /etc/apt/sources.list.d/python-source.sources; \
    apt-get update; \
    apt-get install -y --no-install-recommends dpkg-dev gcc libbluetooth-dev libbz2-dev libc6-dev \
      libdb-dev libffi-dev libgdbm-dev liblzma-dev libncursesw5-dev libreadline-dev libsqlite3-dev \
      libssl-dev make tk-dev uuid-dev xz-utils zlib1g-dev; \
    mkdir -p /usr/src/python; \
    cd /usr/src; \
    apt-get source --download-only --tar-only python3.11; \
    tar --extract --directory /usr/src/python --strip-components=1 --file python3.11_${PYTHON_VERSION}.orig.tar.*; \
    rm python3.11_*; \
    cd /usr/src/python; \
    ./configure --build="$(dpkg-architecture --query DEB_BUILD_GNU_TYPE)" --enable-loadable-sqlite-extensions \
      --enable-option-checking=fatal --enable-shared --with-ensurepip; \
    EXTRA_CFLAGS="$(dpkg-buildflags --get CFLAGS)"; \
    LDFLAGS="$(dpkg-buildflags --get LDFLAGS),--strip-all"; \
    make -j "$(nproc)" "EXTRA_CFLAGS=${EXTRA_CFLAGS}" "LDFLAGS=${LDFLAGS}"; \
    rm python; \
    make -j "$(nproc)" "EXTRA_CFLAGS=${EXTRA_CFLAGS}" "LDFLAGS=${LDFLAGS},-rpath='\$\$ORIGIN/../lib'" python; \
    make install; \
    cd /; \
    rm -rf /usr/src/python /etc/apt/sources.list.d/python-source.sources; \
    find /usr/local -depth \( \( -type d -a \( -name test -o -name tests -o -name idle_test \) \) \
      -o \( -type f -a \( -name '*.pyc' -o -name '*.pyo' -o -name 'libpython*.a' \) \) \) -exec rm -rf '{}' +; \
    ldconfig; \
    apt-mark auto '.*' > /dev/null; \
    apt-mark manual $savedAptMark; \
    find /usr/local -type f -executable -not \( -name '*tkinter*' \) -exec ldd '{}' ';' \
      | awk '/=>/ { so = $(NF-1); if (index(so, "/usr/local/") == 1) { next }; gsub("^/(usr/)?", "", so); printf "*%s\n", so }' \
      | sort -u | xargs -r dpkg-query --search | cut -d: -f1 | sort -u | xargs -r apt-mark manual; \
    apt-get purge -y --auto-remove -o APT::AutoRemove::RecommendsImportant=false; \
    rm -rf /var/lib/apt/lists/*; \
    python3 --version
RUN set -eux; \
    for src in idle3 pip3 pydoc3 python3 python3-config; do \
      dst="$(echo "$src" | tr -d 3)"; \
      [ -s "/usr/local/bin/$src" ]; \
      [ ! -e "/usr/local/bin/$dst" ]; \
      ln -svT "$src" "/usr/local/bin/$dst"; \
    done
EOF
}

# The stand-in's second half: what the official recipe installs from PyPI.
standin_tools_containerfile() {
  cat <<'EOF'
ARG INTERPRETER
FROM ${INTERPRETER}
RUN set -eux; \
    export PYTHONDONTWRITEBYTECODE=1; \
    pip3 install --disable-pip-version-check --no-cache-dir --no-compile --cert /etc/ssl/certs/ca-certificates.crt \
      'pip==25.3' 'setuptools==70.1.0' 'wheel==0.45.1'; \
    pip3 --version
CMD ["python3"]
EOF
}

standin_recipe() {
  standin_interpreter_containerfile
  standin_tools_containerfile
}

build_standin() {
  local minbase=$1 tag=$2
  mkdir -p "$LOGS/standin-interpreter" "$LOGS/standin-tools"
  standin_interpreter_containerfile >"$LOGS/standin-interpreter/Containerfile"
  standin_tools_containerfile >"$LOGS/standin-tools/Containerfile"
  bud --build-arg MINBASE="$minbase" -t "$tag-interpreter" "$LOGS/standin-interpreter"
  bud_trusting_host_cas --build-arg INTERPRETER="$tag-interpreter" -t "$tag" "$LOGS/standin-tools"
  buildah rmi "$tag-interpreter"  # its layers stay, under the stand-in
}

# Stand-in images of older recipes: nothing refers to them once the current ones exist.
remove_stale_standins() {
  local keep=("$@") name
  buildah images --format '{{.Name}}:{{.Tag}}' | { grep "^$STANDIN/" || true; } | while read -r name; do
    [[ " ${keep[*]} " == *" $name "* ]] || buildah rmi "$name" >/dev/null
  done
}

build_image() {
  bud_trusting_host_cas --build-arg PYTHON_IMAGE="$1" -t "$2" "$REPO"
}

# Layer caches of earlier sources: buildah keeps every build's images (about 50 MB per change of the
# package); those the last build neither made nor reused ("--> <id>" in its log) are dead weight.
# Removing a dangling image can leave its parent dangling, hence the rounds.
prune_superseded_layers() {
  local keep id removed=1
  keep=$(sed -n 's/^--> \([0-9a-f]\{11\}\)$/\1/p' "$LOGS/image.log")
  while [ "$removed" -gt 0 ]; do
    removed=0
    for id in $(buildah images --all --filter dangling=true --format '{{.ID}}'); do
      grep -qx "${id:0:11}" <<<"$keep" && continue
      if buildah rmi "$id" >/dev/null; then removed=$((removed + 1)); fi
    done
  done
}

# The check, from the machine's side: a working container of the image, its root filesystem mounted,
# and the node (kubelet, registry, driver) in fresh namespaces that end with this command.
run_check() {
  local image=$1 rootfs
  remove_container "$CHECK_CONTAINER"
  buildah from --pull=never --name "$CHECK_CONTAINER" "$image" >/dev/null
  rootfs=$(buildah mount "$CHECK_CONTAINER")
  buildah inspect --type image "$image" >"$LOGS/image.json"
  set +e
  unshare --mount --net --pid --fork --kill-child --mount-proc --propagation private -- \
    bash "$SCRIPT" __node "$rootfs" "$LOGS" 2>"$LOGS/check.err"
  local rc=$? last
  set -e
  remove_container "$CHECK_CONTAINER"
  if grep -qF " $rootfs " /proc/self/mountinfo; then
    fail "the image's root filesystem is still mounted at $rootfs"
  fi
  if [ "$rc" -ne 0 ]; then
    last=$(grep -v '^[[:space:]]*$' "$LOGS/check.err" | tail -n 1 | cut -c1-600)
    case "$last" in
      "image.sh: FAILED: "*) echo "$last" >&2; exit 1 ;;  # the node side said what failed
      *) fail "the check (exit $rc): $last [logs: $LOGS]" ;;  # it could not: a crash, a traceback
    esac
  fi
}

# Inside the node's namespaces: lay out the "host" the way a node is, then hand over to the Python
# side (kubelet, registry), which starts the driver through `__driver`.
node_main() {
  local image_root=$1 logs=$2
  local root="$logs/rootfs"
  # the set-up's own messages go to a log; a failure is one line on the real stderr
  exec 3>&2 2>"$logs/node.log"
  trap 'fail "laying out the node namespace (line $LINENO of $SCRIPT): $(tail -n 1 "$logs/node.log") [logs: $logs]" 2>&3' ERR
  ip link set lo up
  # the image's root filesystem, somewhere the tmpfs below does not hide it
  mkdir -p "$root"
  mount --bind "$image_root" "$root"
  # mount points of the DaemonSet's volumes, made in the container's own layer as a runtime makes them
  mkdir -p "$root/csi" "$root/var/lib/kubelet/pods" "$root/var/lib/csi-wasm"
  # the node's /var/lib: kubelet's dirs and the driver's state where the DaemonSet's hostPaths name them,
  # on a tmpfs private to this check; shared, as systemd makes a host's mounts
  mount -t tmpfs -o mode=0755 csi-wasm-image-check /var/lib
  mkdir -p /var/lib/kubelet/pods "$DRIVER_SOCKET_DIR" /var/lib/csi-wasm
  mount --make-rshared /var/lib
  cd "$REPO"
  exec 2>&3 3>&-
  exec "$REPO/.venv/bin/python" - "$SCRIPT" "$root" "$logs" <<'PY'
"""The node side of scripts/image.sh: a registry, kubelet, and the driver run from the image."""

import errno
import json
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request

from csi_wasm.demo.kubelet import InlineVolume, Kubelet, NodeDriverRegistrar, new_pod_uid
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.registry import LocalRegistry
from csi_wasm.demo.wasm_modules import make_module
from csi_wasm.mounts import REQUIRED_OPTIONS, LinuxMounter

SCRIPT, ROOT, LOGS = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
KUBELET_DIR = pathlib.Path("/var/lib/kubelet")
PODS_DIR = KUBELET_DIR / "pods"
SOCKET = KUBELET_DIR / "plugins/csi-wasm.dev/csi.sock"  # the socket dir's hostPath; /csi in the container
NODE = "image-check-node"
DRIVER_NAME = "csi-wasm.dev"
DAEMONSET_ENV = ["CSI_ENDPOINT=unix:///csi/csi.sock", f"NODE_ID={NODE}", "LOG_LEVEL=info"]
READY_SECONDS = 60.0
STOP_SECONDS = 45.0  # the DaemonSet's terminationGracePeriodSeconds plus a margin


class Failed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)


def last_line(path: pathlib.Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(no output)"


def driver_command(registry_host: str) -> tuple[list[str], list[str]]:
    """The image's environment and ENTRYPOINT + CMD as they ship, the DaemonSet's env, and one flag:
    the local registry speaks plain HTTP (the DaemonSet's ConfigMap would list it as insecure)."""
    config = json.loads((LOGS / "image.json").read_text())["OCIv1"]["config"]
    argv = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
    check(bool(argv), "the image has neither ENTRYPOINT nor CMD")
    return list(config.get("Env") or []) + DAEMONSET_ENV, argv + [f"--insecure-registry={registry_host}"]


def metrics_port(argv: list[str]) -> int:
    addresses = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--metrics-address=")]
    check(len(addresses) == 1, f"the image's CMD sets --metrics-address {len(addresses)} times, not once")
    return int(addresses[0].rsplit(":", 1)[1])


def start_driver(env: list[str], argv: list[str], log: pathlib.Path) -> subprocess.Popen[bytes]:
    # unshare and the script's __driver part exec into the driver: its pid is the driver's
    command = ["unshare", "--mount", "--propagation", "unchanged", "--",
               "bash", SCRIPT, "__driver", str(ROOT), *env, "--", *argv]  # fmt: skip
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_ready(driver: subprocess.Popen[bytes], port: int, log: pathlib.Path) -> None:
    """Ready as kubelet's readiness probe sees it: the driver's own /healthz answers 200."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if driver.poll() is not None:
            raise Failed(f"the driver exited ({driver.returncode}) before it was ready: {last_line(log)}")
        try:
            with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise Failed(f"the driver's /healthz did not answer 200 within {READY_SECONDS:.0f} s: {last_line(log)}")


def mount_fields(pid: int, mount_point: str) -> tuple[set[str], list[str]]:
    """Options and optional (propagation) fields of the mount on top at ``mount_point``, as ``pid`` sees it."""
    found: tuple[set[str], list[str]] = (set(), [])
    for line in pathlib.Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        parts = line.split(" ")
        if parts[4] == mount_point:
            found = (set(parts[5].split(",")), parts[6 : parts.index("-", 6)])
    return found


def check_driver_namespace(pid: int) -> None:
    """The layout the DaemonSet gives the driver, seen from inside: the root read-only, the pods dir a
    peer of the host's (so the driver's start-up propagation check passed on a real condition)."""
    root_options, _ = mount_fields(pid, "/")
    check("ro" in root_options, f"the driver's root filesystem is not read-only: {sorted(root_options)}")
    _, pods_propagation = mount_fields(pid, str(PODS_DIR))
    check(any(f.startswith("shared:") for f in pods_propagation), f"{PODS_DIR} is not shared in the driver's namespace")


def check_published(target: pathlib.Path, module: bytes, driver_pid: int) -> None:
    module_path = target / "plugin.wasm"
    check(module_path.read_bytes() == module, f"{module_path} does not hold the pushed module's bytes")
    # a pod container gets a bind of the host's copy: its flags are what a pod can do to the module
    host_view = LinuxMounter().mount_at(target)
    if host_view is None:
        raise Failed(f"no mount at {target} on the host's side: the pods dir does not propagate")
    missing = sorted(REQUIRED_OPTIONS - host_view.options)
    check(not missing, f"the host's copy of the module mount lacks {','.join(missing)} "
                       f"(options {','.join(sorted(host_view.options))})")  # fmt: skip
    try:
        with open(module_path, "ab"):
            pass
        raise Failed(f"{module_path} opened for writing from the host's side")
    except OSError as exc:
        check(exc.errno == errno.EROFS, f"writing {module_path}: {exc} (expected EROFS)")
    driver_view = LinuxMounter(pathlib.Path(f"/proc/{driver_pid}/mountinfo")).mount_at(target)
    check(driver_view is not None and REQUIRED_OPTIONS <= driver_view.options,
          f"the driver's own view of {target} is not ro,nosuid,nodev,noexec: {driver_view}")  # fmt: skip


def no_mounts_under(directory: pathlib.Path, mountinfo: pathlib.Path) -> list[str]:
    return [m.mount_point for m in LinuxMounter(mountinfo).mounts() if m.mount_point.startswith(f"{directory}/")]


def stop_driver(driver: subprocess.Popen[bytes], log: pathlib.Path) -> None:
    driver.send_signal(signal.SIGTERM)
    try:
        code = driver.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait()
        raise Failed(f"the driver did not stop within {STOP_SECONDS:.0f} s of SIGTERM: {last_line(log)}")
    check(code == 0, f"the driver exited {code} on SIGTERM: {last_line(log)}")
    check(not SOCKET.exists(), f"the driver left its socket {SOCKET} behind")


def run() -> str:
    registry = LocalRegistry(LOGS / "registry").start()
    driver = None
    try:
        module = make_module(64 * 1024, "image-check")
        pushed = Pusher(registry.host).wasm_artifact("image-check/filter", "v1", module)
        env, argv = driver_command(registry.host)
        log = LOGS / "driver.log"
        driver = start_driver(env, argv, log)
        wait_ready(driver, metrics_port(argv), log)
        check_driver_namespace(driver.pid)
        check(NodeDriverRegistrar(str(SOCKET)).driver_name() == DRIVER_NAME, "GetPluginInfo does not name csi-wasm.dev")
        kubelet = Kubelet(str(SOCKET), KUBELET_DIR, node_name=NODE)
        try:
            kubelet.register()
            volume = InlineVolume(new_pod_uid(), "envoy-0", "image-check", "wasm-filter", {"image": pushed.reference})
            target = kubelet.mount(volume)
            check_published(target, module, driver.pid)
            kubelet.unmount(volume)
            kubelet.delete_pod(volume.pod_uid)
        finally:
            kubelet.close()
        for view in (pathlib.Path("/proc/self/mountinfo"), pathlib.Path(f"/proc/{driver.pid}/mountinfo")):
            left = no_mounts_under(PODS_DIR, view)
            check(not left, f"mounts left under {PODS_DIR} after unpublish ({view}): {left}")
        stop_driver(driver, log)
        driver = None
        return f"{pushed.reference} published read-only ({len(module)} bytes, {pushed.module_digest[:19]}...) and unpublished"
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        registry.stop()


def main() -> int:
    try:
        print(f"image.sh: the driver from the image: {run()}")
    except Failed as exc:
        print(f"image.sh: FAILED: {exc} [logs: {LOGS}]", file=sys.stderr)
        return 1
    except Exception as exc:  # a gRPC error, a registry that would not start: one line all the same
        print(f"image.sh: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} [logs: {LOGS}]",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


sys.exit(main())
PY
}

# Inside the driver's own mount namespace (a copy of the node's; the pods dir's copy stays a peer of
# the node's): the DaemonSet's volumeMounts, a read-only root, then the image's command, chrooted.
driver_main() {
  local root=$1 env=()
  shift
  while [ "$1" != -- ]; do env+=("$1"); shift; done
  shift
  mount --bind "$DRIVER_SOCKET_DIR" "$root/csi"
  mount --rbind /var/lib/kubelet/pods "$root/var/lib/kubelet/pods"
  mount --make-rshared "$root/var/lib/kubelet/pods"  # mountPropagation: Bidirectional
  mount --bind /var/lib/csi-wasm "$root/var/lib/csi-wasm"
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount -o remount,bind,ro "$root"  # readOnlyRootFilesystem: true
  exec env -i "${env[@]}" /usr/sbin/chroot "$root" "$@"
}

main() {
  [ "$(id -u)" -eq 0 ] || fail "run as root (buildah, debootstrap and the mounts need it)"
  LOGS=$(mktemp -d /tmp/csi-wasm-image.XXXXXX)
  trap 'remove_container "$CHECK_CONTAINER" 2>/dev/null; remove_container "$MINBASE_CONTAINER" 2>/dev/null' EXIT
  local started=$SECONDS version minbase standin image
  step "installing buildah, debootstrap and the package" install install_packages
  version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$REPO/csi_wasm/__init__.py")
  minbase="$STANDIN/debian:bookworm-minbase-$(declare -f build_minbase slim_and_configure | sha256sum | cut -c1-12)"
  standin="$STANDIN/python:3.11-slim-bookworm-$( (echo "$minbase"; standin_recipe) | sha256sum | cut -c1-12)"
  image="localhost/csi-wasm:$version-standin"
  if image_exists "$minbase"; then
    echo "image.sh: Debian bookworm minbase: cached ($minbase)"
  else
    step "Debian bookworm minbase ($minbase)" minbase build_minbase "$minbase"
  fi
  if image_exists "$standin"; then
    echo "image.sh: stand-in python:3.11-slim: cached ($standin)"
  else
    step "stand-in python:3.11-slim ($standin)" standin build_standin "$minbase" "$standin"
  fi
  step "removing stand-ins of older recipes" prune remove_stale_standins "$minbase" "$standin"
  step "buildah bud ./Dockerfile ($image)" image build_image "$standin" "$image"
  step "removing layer caches of earlier sources" prune-layers prune_superseded_layers
  run_check "$image"
  rm -rf "$LOGS"
  echo "image.sh: OK in $((SECONDS - started)) s: the image builds from ./Dockerfile and its driver publishes a module"
}

case "${1:-}" in
  __node) shift; node_main "$@" ;;
  __driver) shift; driver_main "$@" ;;
  *) main "$@" ;;
esac
