#!/usr/bin/env bash
# CSI conformance in one command: csi-sanity (kubernetes-csi/csi-test) against the real driver, on this
# machine, as root. Starts the embedded registry with the demo module and the driver (python -m
# csi_wasm.demo.sanity), runs the csi-sanity found on PATH with the flags a node-only driver needs, and
# exits with csi-sanity's status; 2 when csi-sanity is not installed. Everything runs in a private mount
# namespace and is stopped and removed on exit. Extra arguments go to csi-sanity (e.g. --ginkgo.v).
set -euo pipefail

CSI_SANITY_VERSION=v5.5.0

# Before any setup work: without csi-sanity there is nothing to run, so start nothing and leave nothing.
if ! command -v csi-sanity >/dev/null 2>&1; then
  cat >&2 <<EOF
sanity: csi-sanity is not on PATH. Install it (needs Go >= 1.25 and the Go module proxy), then rerun:

    go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@${CSI_SANITY_VERSION}
    export PATH="\$(go env GOPATH)/bin:\$PATH"

or build it from a csi-test checkout at ${CSI_SANITY_VERSION}, whose Go modules are vendored:

    cd csi-test && GOFLAGS=-mod=vendor go build -o /usr/local/bin/csi-sanity ./cmd/csi-sanity

Releases before v5.5 fail every Node test for a driver without a controller service, like this one.
EOF
  exit 2
fi

cd "$(dirname "$0")/.."

if [ "${1:-}" != "--in-private-namespace" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "sanity: run as root (the driver bind-mounts modules; all mounts stay in a private namespace)" >&2
    exit 1
  fi
  bash scripts/setup.sh
  # The same script again, in a mount namespace of its own: no mount made below reaches the host.
  exec unshare -m --propagation private "$BASH" scripts/sanity.sh --in-private-namespace "$@"
fi
shift
if [ "$(readlink /proc/$$/ns/mnt)" = "$(readlink /proc/$PPID/ns/mnt)" ]; then
  echo "sanity: --in-private-namespace is internal; run scripts/sanity.sh without it" >&2
  exit 1
fi

workdir=$(mktemp -d "${TMPDIR:-/tmp}/csi-wasm-sanity.XXXXXX")
pods="$workdir/kubelet/pods"
helper=""
sanity=""

# shellcheck disable=SC2317  # reached through the traps below
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$sanity" ]; then
    kill -TERM -- "-$sanity" 2>/dev/null || true
    wait "$sanity" 2>/dev/null || true
  fi
  if [ -n "$helper" ]; then
    kill -TERM "$helper" 2>/dev/null || true
    wait "$helper" 2>/dev/null || true
    # The helper leads its own process group: anything it left (its registry, if it died hard) goes too.
    kill -KILL -- "-$helper" 2>/dev/null || true
  fi
  if [ "$status" != 0 ] && [ -s "$workdir/driver.log" ]; then
    echo "sanity: last lines of the driver's log:" >&2
    tail -n 30 "$workdir/driver.log" >&2
  fi
  umount -R "$pods" 2>/dev/null || true
  rm -rf "$workdir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The driver requires kubelet's pods dir to be a shared mount in its namespace, as the DaemonSet's
# Bidirectional propagation makes it; csi-sanity's mount dir is created under it for every test.
mkdir -p "$pods"
mount --bind "$pods" "$pods"
mount --make-shared "$pods"

setsid .venv/bin/python -m csi_wasm.demo.sanity "$workdir" 2>"$workdir/driver.log" &
helper=$!
for _ in $(seq 600); do
  [ -e "$workdir/ready" ] && break
  if ! kill -0 "$helper" 2>/dev/null; then
    echo "sanity: the registry/driver helper exited before it was ready" >&2
    exit 1
  fi
  sleep 0.05
done
if [ ! -e "$workdir/ready" ]; then
  echo "sanity: the driver was not ready within 30 s" >&2
  exit 1
fi
echo "sanity: driver csi-wasm.dev serving on $workdir/csi/csi.sock, demo module $(cat "$workdir/ready")"
echo "sanity: $(csi-sanity --version) (targeted: $CSI_SANITY_VERSION)"

# A node-only plugin for ephemeral inline volumes has no Controller service: skip csi-sanity's controller
# suites, and the one Node test that provisions its volume with CreateVolume before it publishes (the
# driver's own tests/test_conformance.py checks that unpublish removes the target it created). The
# GroupController suites skip themselves (no GROUP_CONTROLLER_SERVICE), but their AfterEach then
# dereferences a nil resource list and prints PANICKED for every spec: named here to keep the report clean.
# --csi.testvolumeparameters only reaches CreateVolume, so it names the demo module for the record.
# In the background (its own process group), waited for: a signal to this script then runs the clean-up
# at once instead of after csi-sanity has finished on its own.
setsid csi-sanity \
  --csi.endpoint "unix://$workdir/csi/csi.sock" \
  --csi.mountdir "$pods/csi-sanity-target" \
  --csi.stagingdir "$workdir/csi-sanity-staging" \
  --csi.testvolumeparameters "$workdir/volume-parameters.yaml" \
  --ginkgo.skip '\[Controller Server\]' \
  --ginkgo.skip 'Node Service NodeUnpublishVolume should remove target path' \
  --ginkgo.skip '\[GroupController ' \
  "$@" &
sanity=$!
status=0
wait "$sanity" || status=$?
sanity=""
exit "$status"
