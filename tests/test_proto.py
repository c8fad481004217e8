"""The committed stubs match proto/csi.proto, and the proto keeps CSI v1's wire numbers."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from csi_wasm._gen import csi_pb2

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_stubs_match_the_proto(tmp_path: pathlib.Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    committed = ROOT / "csi_wasm" / "_gen"
    generated = {p.name for p in tmp_path.iterdir()}
    expected = {"csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py", "csi_pb2_grpc.pyi"}
    assert generated == expected, f"gen_proto.py produced {sorted(generated)}"
    assert generated <= {p.name for p in committed.iterdir()}
    for produced in sorted(tmp_path.iterdir()):
        assert produced.read_text() == (committed / produced.name).read_text(), (
            f"{produced.name} drifted from proto/csi.proto: run python scripts/gen_proto.py"
        )


# Field numbers from the CSI specification v1 (csi.proto, package csi.v1).
CSI_V1_FIELDS = {
    "GetPluginInfoResponse": {"name": 1, "vendor_version": 2, "manifest": 3},
    "GetPluginCapabilitiesResponse": {"capabilities": 1},
    "PluginCapability": {"service": 1, "volume_expansion": 2},
    "ProbeResponse": {"ready": 1},
    "VolumeCapability": {"block": 1, "mount": 2, "access_mode": 3},
    "NodePublishVolumeRequest": {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4,
        "volume_capability": 5, "readonly": 6, "secrets": 7, "volume_context": 8,
    },
    "NodeUnpublishVolumeRequest": {"volume_id": 1, "target_path": 2},
    "NodeGetCapabilitiesResponse": {"capabilities": 1},
    "NodeServiceCapability": {"rpc": 1},
    "NodeGetInfoResponse": {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3},
    "NodeStageVolumeRequest": {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "volume_capability": 4,
        "secrets": 5, "volume_context": 6,
    },
}  # fmt: skip


def test_wire_format_is_csi_v1() -> None:
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    for message, expected in CSI_V1_FIELDS.items():
        fields = csi_pb2.DESCRIPTOR.message_types_by_name[message].fields_by_name
        assert {name: fields[name].number for name in expected} == expected, message


def test_services_and_methods_are_csi_v1() -> None:
    services = csi_pb2.DESCRIPTOR.services_by_name
    assert [m.name for m in services["Identity"].methods] == ["GetPluginInfo", "GetPluginCapabilities", "Probe"]
    assert [m.name for m in services["Node"].methods] == [
        "NodeStageVolume", "NodeUnstageVolume", "NodePublishVolume", "NodeUnpublishVolume",
        "NodeGetVolumeStats", "NodeExpandVolume", "NodeGetCapabilities", "NodeGetInfo",
    ]  # fmt: skip
    assert csi_pb2.DESCRIPTOR.services_by_name["Node"].full_name == "csi.v1.Node"


def test_secrets_are_marked_sensitive() -> None:
    field = csi_pb2.NodePublishVolumeRequest.DESCRIPTOR.fields_by_name["secrets"]
    assert field.GetOptions().Extensions[csi_pb2.csi_secret] is True
