"""A module's seal covers the view's hard link too, not only the module file (found by the mutation pass).

What a pod's target binds is the view directory, whose entry is a hard link to the module. Root on the
node replacing that link with another file (same size, mode and owner; other bytes) leaves the module
file as sealed; the next publish must still see the change (the link is not the sealed inode), keep the
intact module and link the view to it afresh: the pod reads the module's bytes, and nothing is fetched
again.
"""

from __future__ import annotations

import os

import faultproxy as fp
from conftest import RunningDriver
from csi_wasm.demo.push import Pusher
from csi_wasm.demo.wasm_modules import make_module

MODULE = make_module(12 * 1024, "guard-integrity")
IMPOSTOR = make_module(12 * 1024, "guard-impostor")


def test_a_view_linked_to_another_file_is_linked_to_the_module_again(
    proxied_csi: RunningDriver, proxy: fp.FaultProxy, pusher: Pusher
) -> None:
    pushed = pusher.wasm_artifact("guard/integrity", "v1", MODULE)
    image = pushed.reference.replace(pushed.reference.split("/", 1)[0], proxy.host, 1)
    first = proxied_csi.volume(image)
    proxied_csi.kubelet.mount(first)
    proxied_csi.kubelet.unmount(first)
    store = proxied_csi.driver.store
    link = store.views_dir / pushed.module_digest.removeprefix("sha256:") / "plugin.wasm" / "plugin.wasm"
    impostor = link.with_name("impostor")
    impostor.write_bytes(IMPOSTOR)
    os.chmod(impostor, 0o444)
    os.replace(impostor, link)  # the module file itself is untouched and still matches its seal
    assert len(IMPOSTOR) == len(MODULE) and link.stat().st_ino != store.module_path(pushed.module_digest).stat().st_ino

    again = proxied_csi.volume(image)
    assert (proxied_csi.kubelet.mount(again) / "plugin.wasm").read_bytes() == MODULE
    assert os.path.samestat(link.stat(), store.module_path(pushed.module_digest).stat())
    assert proxy.count(rf"GET /v2/guard/integrity/blobs/{pushed.layer_digest}") == 1  # intact: not fetched again
    proxied_csi.kubelet.unmount(again)
