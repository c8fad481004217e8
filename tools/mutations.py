"""The catalogue of the mutation pass (``python -m tools.mutants``): one guard disabled per entry.

Each mutation replaces an exact piece of ``csi_wasm/`` (it must occur exactly once:
``tests/test_mutants.py`` fails when a refactor moves it, and then this catalogue is
updated) with a version that no longer guards: a check that never fires, a limit
that is never reached, a key that forgets what keeps tenants apart. ``tests`` are
the tests that should notice (files or node ids, as narrow as is honest); the pass
runs them on a copy of the repository with the mutation applied and expects a
failure.

``harmless`` is set only for a mutation that survives and was judged not to be a
gap (an equivalent mutation, or defence in depth behind another guard that is
itself killed): the text says why. The pass reports such a survivor with its
judgement; any other survivor fails the pass.

Groups follow docs/reliability.md and issue 14: registry integrity and bounds, SSRF,
the shared-store access rule, the mount path, recovery, readiness, the node's own
resources, and the parsing bounds of hostile input.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    id: str  # lower-case words joined by "-", unique
    file: str  # relative to the repository root, under csi_wasm/
    old: str  # exact text, present exactly once in ``file``
    new: str  # what the guard becomes
    guard: str  # one line: what the original text guards
    tests: tuple[str, ...]  # test files or node ids that should fail with the mutation applied
    harmless: str | None = None  # set only for a survivor judged harmless: why


MUTATIONS: tuple[Mutation, ...] = (
    # -- integrity of what a registry serves --------------------------------------------------------------
    Mutation(
        id="manifest-digest-check",
        file="csi_wasm/registry/client.py",
        old='if key.startswith("sha256:") and digest != key:',
        new="if False:",
        guard="a manifest fetched by @sha256 digest must hash to that digest",
        tests=("tests/test_faults.py::test_a_manifest_fetched_by_digest_must_have_that_digest",),
    ),
    Mutation(
        id="compat-layer-digest-check",
        file="csi_wasm/layerfetch.py",
        old="            if reader.digest != layer.digest:",
        new="            if False:",
        guard="a compat (tar+gzip) layer must hash to its descriptor's digest",
        tests=("tests/test_faults.py::test_a_compat_layer_must_match_its_digest",),
    ),
    Mutation(
        id="raw-layer-digest-check",
        file="csi_wasm/store.py",
        old="        if expected_digest is not None and digest != expected_digest:",
        new="        if False:",
        guard="a raw layer's bytes must hash to its descriptor's digest before they enter the store",
        tests=("tests/test_layouts.py::test_a_tampered_blob_is_refused_and_nothing_is_stored",
               "tests/test_faults.py::test_fault[wrong bytes (blob)]"),  # fmt: skip
    ),
    Mutation(
        id="signature-payload-digest-check",
        file="csi_wasm/registry/client.py",
        old='if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:',
        new="if False:",
        guard="a small blob read whole (a cosign signature payload) must hash to its digest",
        tests=("tests/test_signatures.py::test_a_malformed_signature_layer_is_refused_for_its_reason",),
    ),
    Mutation(
        id="module-digest-attribute",
        file="csi_wasm/pull.py",
        old="        if request.module_digest and module.digest != request.module_digest:",
        new="        if False:",
        guard="the pod's moduleDigest attribute must match the module's digest",
        tests=("tests/test_layouts.py::test_module_digest_attribute_is_checked",),
    ),
    Mutation(
        id="blob-past-declared-size",
        file="csi_wasm/registry/transport.py",
        old="            if self._limit is not None and received > self._limit:",
        new="            if False:",
        guard="BlobStream cuts a blob that keeps sending past its declared size",
        tests=("tests/test_faults.py::test_a_blob_that_keeps_sending_past_its_declared_size_is_cut_there",),
    ),
    Mutation(
        id="blob-announced-over-declared-size",
        file="csi_wasm/registry/transport.py",
        old="        if limit is not None and self.content_length is not None and self.content_length > limit:",
        new="        if False:",
        guard="a blob whose Content-Length exceeds its declared size is refused unread",
        tests=("tests/test_faults.py::test_a_blob_that_announces_more_than_its_declared_size_is_refused_unread",),
    ),
    Mutation(
        id="store-streaming-size-cap",
        file="csi_wasm/store.py",
        old="        if self._size > self._max_bytes:",
        new="        if False:",
        guard="the store stops writing a module past the node's max_module_bytes",
        tests=("tests/test_faults.py::test_the_stores_streaming_cap_refuses_a_module_over_the_limit",),
    ),
    Mutation(
        id="layer-size-cap",
        file="csi_wasm/pull.py",
        old="        if layer.size > self._layers.cap(layer):",
        new="        if False:",
        guard="a layer declared larger than pull.max_module_bytes is refused before it is downloaded",
        tests=("tests/test_guard_size_limits.py::test_a_layer_declared_over_the_cap_is_refused_before_it_is_downloaded",
               "tests/test_registries.py::test_size_caps_are_enforced"),  # fmt: skip
    ),
    Mutation(
        id="manifest-streaming-size-cap",
        file="csi_wasm/registry/transport.py",
        old="                if len(data) > limit:",
        new="                if False:",
        guard="a body read whole without a Content-Length stops at pull.max_manifest_bytes",
        tests=("tests/test_faults.py::test_fault[endless chunked body (manifest)]",),
    ),
    Mutation(
        id="manifest-announced-size-cap",
        file="csi_wasm/registry/transport.py",
        old="        if announced is not None and announced > limit:",
        new="        if False:",
        guard="a body announced larger than pull.max_manifest_bytes is refused unread",
        tests=("tests/test_registries.py::test_size_caps_are_enforced",
               "tests/test_faults.py::test_fault[oversized manifest (5 MiB)]"),  # fmt: skip
        harmless=(
            "defence in depth: the streaming cap (manifest-streaming-size-cap, killed) stops the same body at the"
            " same limit; this check only spares reading up to max_manifest_bytes of it"
        ),
    ),
    Mutation(
        id="wasm-magic-while-streaming",
        file="csi_wasm/store.py",
        old="            if len(self._header) == wasm.HEADER_LENGTH and wasm.header_kind(self._header) is None:",
        new="            if False:",
        guard="a layer whose first bytes are not a Wasm header is refused as soon as they arrive",
        tests=("tests/test_layouts.py::test_a_non_wasm_layer_is_refused_and_nothing_is_stored",
               "tests/test_faults.py::test_fault[endless chunked body (blob)]"),  # fmt: skip
        harmless=(
            "defence in depth: the same header check runs at commit (wasm-magic-at-commit, killed) and the body "
            "is cut at its declared size (blob-past-declared-size, killed); this one only stops reading a non-"
            "Wasm body early"
        ),
    ),
    Mutation(
        id="wasm-magic-at-commit",
        file="csi_wasm/store.py",
        old="        if wasm.header_kind(self._header) is None:",
        new="        if False:",
        guard="a layer shorter than a Wasm header is refused at commit",
        tests=("tests/test_hostile_input.py::test_compat_layers_never_write_outside_the_store",
               "tests/test_hostile_input.py::test_hostile_compat_layers_through_grpc"),  # fmt: skip
    ),
    # -- compat layers: gzip and tar bounds -------------------------------------------------------------
    Mutation(
        id="gzip-inflate-cap",
        file="csi_wasm/layerfetch.py",
        old="        if self._inflated > self._max_inflated:",
        new="        if False:",
        guard="a compat layer may not inflate past INFLATE_FACTOR times the module cap (gzip bomb)",
        tests=("tests/test_guard_compat_layers.py::test_a_layer_that_inflates_past_the_cap_before_its_module_is_refused",
               "tests/test_hostile_input.py::test_a_gzip_bomb_is_refused_early"),  # fmt: skip
    ),
    Mutation(
        id="compat-entry-size-cap",
        file="csi_wasm/layerfetch.py",
        old="            if member.size > self._config.max_module_bytes:",
        new="            if False:",
        guard="a compat layer's plugin.wasm entry declared over the module cap is refused before it is read",
        tests=("tests/test_hostile_input.py::test_a_gzip_bomb_is_refused_early",),
        harmless=(
            "defence in depth: the store's streaming cap (store-streaming-size-cap, killed) refuses the same "
            "entry at the same limit; this check only spares reading up to max_module_bytes of it"
        ),
    ),
    Mutation(
        id="compat-entry-name",
        file="csi_wasm/layerfetch.py",
        old='            if member.name.startswith("/") or ".." in member.name.split("/"):',
        new="            if False:",
        guard="a compat layer's plugin.wasm entry with an absolute or '..' name is refused",
        tests=("tests/test_hostile_input.py::test_hostile_compat_layers_through_grpc",
               "tests/test_hostile_input.py::test_compat_layers_never_write_outside_the_store"),  # fmt: skip
    ),
    Mutation(
        id="compat-entry-regular-file",
        file="csi_wasm/layerfetch.py",
        old='            if member.kind != "file":',
        new="            if False:",
        guard="a compat layer's plugin.wasm entry must be a regular file (not a link, device, sparse or other)",
        tests=("tests/test_guard_compat_layers.py::test_a_plugin_wasm_that_is_not_a_regular_file_is_refused_even_holding_a_module",
               "tests/test_hostile_input.py::test_hostile_compat_layers_through_grpc",
               "tests/test_hostile_input.py::test_compat_layers_never_write_outside_the_store"),  # fmt: skip
    ),
    Mutation(
        id="tar-metadata-cap",
        file="csi_wasm/tarstream.py",
        old="        if size > MAX_METADATA_BYTES:",
        new="        if False:",
        guard="a pax header or GNU long name over 64 KiB is refused unread",
        tests=("tests/test_tarstream.py::test_a_huge_metadata_entry_is_refused_before_it_is_read",),
    ),
    Mutation(
        id="tar-header-checksum",
        file="csi_wasm/tarstream.py",
        old="    if stored not in (unsigned, signed):",
        new="    if False:",
        guard="a tar header block with a wrong checksum is refused",
        tests=("tests/test_tarstream.py::test_a_damaged_archive_is_refused",),
    ),
    Mutation(
        id="tar-negative-size",
        file="csi_wasm/tarstream.py",
        old="        if value < 0:",
        new="        if False:",
        guard="a tar header with a negative (base-256) size is refused",
        tests=("tests/test_guard_compat_layers.py::test_a_negative_size_in_a_tar_header_is_refused",
               "tests/test_tarstream.py::test_a_damaged_archive_is_refused"),  # fmt: skip
    ),
    Mutation(
        id="tar-pax-record-bounds",
        file="csi_wasm/tarstream.py",
        old="        if space < 0 or not length.isdigit() or not space - position + 3 <= int(length) <= len(data) - position:",
        new="        if space < 0 or not length.isdigit():",
        guard="a pax record must fit inside its header (its length field is bounded)",
        tests=("tests/test_tarstream.py::test_a_malformed_pax_record_is_refused",),
    ),
    # -- bodies, budgets, deadlines ---------------------------------------------------------------------
    Mutation(
        id="memory-budget",
        file="csi_wasm/registry/bodies.py",
        old="            while self._used + amount > self.total:",
        new="            while False:",
        guard="bodies read whole reserve their worst case from pull.max_buffered_bytes before they are read",
        tests=("tests/test_memory.py::test_concurrent_large_manifests_stay_within_the_limit",),
    ),
    Mutation(
        id="json-value-count",
        file="csi_wasm/registry/bodies.py",
        old="    if values > MAX_JSON_VALUES:",
        new="    if False:",
        guard="JSON with more than 20,000 values is refused before it is parsed",
        tests=("tests/test_hostile_registries.py::test_hostile_manifests_are_refused_precisely",),
    ),
    Mutation(
        id="error-body-cap",
        file="csi_wasm/registry/transport.py",
        old="                if len(data) >= ERROR_BODY_BYTES:\n                    break",
        new="                if False:\n                    break",
        guard="an error answer's body is read only up to 4 KiB",
        tests=("tests/test_availability.py::test_an_endless_error_body_is_not_read",),
    ),
    Mutation(
        id="watchdog-shuts-sockets",
        file="csi_wasm/registry/watchdog.py",
        old="        for sock in self._sockets.values():\n            _shut(sock)",
        new="        for sock in self._sockets.values():\n            pass",
        guard="at an exchange's deadline the watchdog shuts its sockets (dripped headers cannot outlast it)",
        tests=("tests/test_availability.py::test_dripped_manifest_headers_end_at_the_exchanges_deadline",),
    ),
    Mutation(
        id="expired-exchange-is-a-timeout",
        file="csi_wasm/registry/transport.py",
        old="        if self.watch.expired:  # cut off mid-headers",
        new="        if False:  # cut off mid-headers",
        guard="headers cut off by the deadline's shutdown never parse as an answer",
        tests=("tests/test_hostile_registries.py::test_hostile_token_service_answers",),
    ),
    Mutation(
        id="manifest-call-deadline",
        file="csi_wasm/registry/client.py",
        old="        return own if deadline is None else min(own, deadline)",
        new="        return own",
        guard="a manifest or token exchange ends at the calling gRPC request's deadline",
        tests=("tests/test_guard_availability.py::test_a_manifest_exchange_ends_at_the_calls_deadline_before_its_own",
               "tests/test_faults.py::test_a_manifest_call_never_outlives_its_deadline"),  # fmt: skip
    ),
    Mutation(
        id="max-wait-for-download",
        file="csi_wasm/pull.py",
        old="min(deadline - time.monotonic(), self._config.max_wait_seconds)",
        new="deadline - time.monotonic()",
        guard="a publish waits for a download at most pull.max_wait_seconds, then UNAVAILABLE (the download goes on)",
        tests=("tests/test_faults.py::test_a_download_outlives_the_call_and_the_retry_joins_it",
               "tests/test_faults.py::test_a_publish_never_waits_longer_than_max_wait_for_a_download"),  # fmt: skip
    ),
    # -- SSRF and where credentials go ------------------------------------------------------------------
    Mutation(
        id="ssrf-metadata-networks",
        file="csi_wasm/registry/ssrf.py",
        old="        if any(ip in network for network in FORBIDDEN_NETWORKS):",
        new="        if False:",
        guard="link-local and cloud-metadata addresses are never contacted",
        tests=("tests/test_hostile_registries.py::test_the_ssrf_rule",
               "tests/test_hostile_registries.py::test_the_registry_itself_on_a_metadata_address_is_refused"),  # fmt: skip
    ),
    Mutation(
        id="ssrf-private-block",
        file="csi_wasm/registry/ssrf.py",
        old="        if block is not None and not any(o.version == ip.version and o in block for o in origin):",
        new="        if False:",
        guard="a redirect or token realm into a private block the registry is not in is refused",
        tests=("tests/test_hostile_registries.py::test_the_ssrf_rule",),
    ),
    Mutation(
        id="ssrf-embedded-ipv4",
        file="csi_wasm/registry/ssrf.py",
        old="    return [ip, *embedded_ipv4(ip)]",
        new="    return [ip]",
        guard="an IPv6 address carrying an IPv4 one (NAT64, 6to4, Teredo, ...) must pass as that IPv4 address",
        tests=("tests/test_hostile_registries.py::test_the_ssrf_rule",),
    ),
    Mutation(
        id="ssrf-names-resolved",
        file="csi_wasm/registry/ssrf.py",
        old="        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)",
        new="        infos = []",
        guard="host names are resolved and their addresses checked (not only IP literals)",
        tests=("tests/test_hostile_registries.py::test_a_registry_named_by_a_name_that_resolves_to_metadata_is_refused",
               "tests/test_hostile_registries.py::test_a_token_realm_or_redirect_by_name_is_resolved_and_refused",
               "tests/test_hostile_registries.py::test_a_pod_cannot_name_the_nodes_loopback_by_a_name"),  # fmt: skip
    ),
    Mutation(
        id="ssrf-every-resolved-address",
        file="csi_wasm/registry/ssrf.py",
        old="    for info in infos:",
        new="    for info in infos[:1]:",
        guard="every address a name resolves to must pass, not just the first",
        tests=("tests/test_hostile_registries.py::test_a_registry_named_by_a_name_that_resolves_to_metadata_is_refused",),
    ),
    Mutation(
        id="ssrf-loopback-registry",
        file="csi_wasm/registry/ssrf.py",
        old="        if any(ip in n for n in LOCAL_NETWORKS) and not any(ip in n for n in allowed if n.version == ip.version):",
        new="        if False:",
        guard="a pod may not name the node's loopback as its registry (unless the node config lists it)",
        tests=("tests/test_registries.py::test_a_pod_cannot_point_the_driver_at_an_undeclared_loopback_registry",
               "tests/test_hostile_registries.py::test_a_pod_cannot_name_the_nodes_loopback_by_a_name"),  # fmt: skip
    ),
    Mutation(
        id="ssrf-registry-itself",
        file="csi_wasm/registry/transport.py",
        old='        refuse_forbidden_host(origin.hostname or "", f"image {ref}: registry", allowed=transport.allowed_networks)\n',
        new="",
        guard="the registry a pod names is itself checked against the SSRF rule",
        tests=("tests/test_hostile_registries.py::test_the_registry_itself_on_a_metadata_address_is_refused",),
    ),
    Mutation(
        id="ssrf-redirect-target",
        file="csi_wasm/registry/transport.py",
        old='''        refuse_forbidden_host(
            new.hostname or "",
            f"image {ref}: redirect",
            origin=endpoint.hostname,
            allowed=self._transport.allowed_networks,
        )
''',
        new="",
        guard="a redirect target is checked against the SSRF rule",
        tests=("tests/test_hostile_registries.py::test_a_redirect_to_a_forbidden_address_is_refused_before_connecting",),
    ),
    Mutation(
        id="ssrf-token-realm",
        file="csi_wasm/registry/auth.py",
        old='''        refuse_forbidden_host(
            hostname, f"image {ref}: token realm", origin=endpoint.hostname, allowed=self._allowed_networks
        )
''',
        new="",
        guard="a token realm is checked against the SSRF rule",
        tests=("tests/test_hostile_registries.py::test_a_token_realm_on_a_forbidden_address_is_refused_before_connecting",),
    ),
    Mutation(
        id="redirect-no-downgrade",
        file="csi_wasm/registry/transport.py",
        old='        if new.scheme not in ("http", "https") or (old.scheme == "https" and new.scheme == "http"):',
        new='        if new.scheme not in ("http", "https"):',
        guard="a redirect from https to http is refused",
        tests=("tests/test_hostile_registries.py::test_https_is_never_downgraded_to_http_by_a_redirect",),
    ),
    Mutation(
        id="token-realm-no-plain-http",
        file="csi_wasm/registry/auth.py",
        old='        if parsed.scheme == "http" and (endpoint.scheme == "https" or hostname != endpoint.hostname):',
        new="        if False:",
        guard="a token realm is never plain http on another host, nor a downgrade from https",
        tests=("tests/test_hostile_registries.py::test_a_plain_http_token_realm_on_another_host_is_refused",
               "tests/test_hostile_registries.py::test_an_https_registry_may_not_send_the_password_to_a_plain_http_realm"),  # fmt: skip
    ),
    Mutation(
        id="auth-header-same-host-only",
        file="csi_wasm/registry/transport.py",
        old="            if auth and same_host:",
        new="            if auth:",
        guard="the Authorization header is dropped when a redirect changes the host",
        tests=("tests/test_hostile_registries.py::test_credentials_are_not_sent_to_the_host_a_blob_redirects_to",),
    ),
    Mutation(
        id="no-credentials-after-redirect",
        file="csi_wasm/registry/client.py",
        old="            if moved:",
        new="            if False:",
        guard="a redirected host that asks for credentials never gets the pod's",
        tests=("tests/test_hostile_registries.py::test_a_redirected_host_that_asks_for_credentials_gets_none",),
    ),
    Mutation(
        id="allowed-images",
        file="csi_wasm/publish.py",
        old="            policy.check(ref)  # the node's allowed_images",
        new="            pass  # the node's allowed_images",
        guard="the node's allowed_images is checked before the store or the network is touched",
        tests=("tests/test_hostile_registries.py::test_a_denied_image_is_refused_before_any_network_call",
               "tests/test_hostile_registries.py::test_a_denied_image_is_refused_even_when_its_module_is_stored"),  # fmt: skip
    ),
    Mutation(
        id="signature-required-for-stored-module",
        file="csi_wasm/pull.py",
        old="        if not self._signatures.is_verified(ref, entry.manifest_digest):",
        new="        if False:",
        guard="a stored module is served only once its signature was verified, where signatures are required",
        tests=("tests/test_signatures.py::test_a_stored_unsigned_module_is_not_served_once_signatures_are_required",),
    ),
    # -- the shared store's access rule (csi_wasm/access.py) ---------------------------------------------
    Mutation(
        id="access-private-elsewhere",
        file="csi_wasm/access.py",
        old="        if origin not in record.private_at:\n            return Decision.PROVE_POSSESSION",
        new="        if origin not in record.private_at:\n            return Decision.SHARE",
        guard="a module private at another origin is not shared through the pod's reference alone",
        tests=("tests/test_isolation.py",),
    ),
    Mutation(
        id="access-unknown-record",
        file="csi_wasm/access.py",
        old="        if record is None:\n            return Decision.PROVE_POSSESSION",
        new="        if record is None:\n            return Decision.SHARE",
        guard="a module without an access record is treated as private elsewhere (rule 3)",
        tests=("tests/test_guard_access.py::test_a_module_without_an_access_record_is_not_shared",
               "tests/test_isolation.py"),  # fmt: skip
    ),
    Mutation(
        id="access-after-fetch-origin",
        file="csi_wasm/access.py",
        old="        if Origin.of(ref) not in record.private_at:\n            return False",
        new="        if Origin.of(ref) not in record.private_at:\n            return True",
        guard="a manifest from the pod's registry naming a stored private module does not hand it over",
        tests=("tests/test_isolation.py",),
    ),
    Mutation(
        id="access-download-records-privacy",
        file="csi_wasm/access.py",
        old="        self._records.record(digest, Origin.of(ref), private=creds is not None)",
        new="        self._records.record(digest, Origin.of(ref), private=False)",
        guard="a module downloaded with credentials is recorded private, not public",
        tests=("tests/test_isolation.py", "tests/test_registries.py::test_a_cached_private_module_is_not_served_to_a_pod_without_access"),
    ),
    Mutation(
        id="access-proof-expiry",
        file="csi_wasm/access.py",
        old="        return until is not None and self._clock() < until",
        new="        return until is not None",
        guard="a private module's authorization check is cached for auth_cache_seconds only",
        tests=("tests/test_isolation.py::test_the_private_module_access_cache_expires",),
    ),
    Mutation(
        id="access-proof-per-credentials",
        file="csi_wasm/access.py",
        old='    return (creds.fingerprint if creds is not None else "", origin, digest)',
        new='    return ("", origin, digest)',
        guard="a cached authorization belongs to one credential: other credentials are checked at the registry",
        tests=("tests/test_isolation.py::test_a_second_pod_with_other_valid_credentials_is_checked_and_shares_the_copy",
               "tests/test_registries.py::test_a_cached_private_module_is_not_served_to_a_pod_without_access"),  # fmt: skip
    ),
    Mutation(
        id="access-never-asks-no-registry",
        file="csi_wasm/pull.py",
        old="        if never:\n            raise AccessDenied(",
        new="        if False:\n            raise AccessDenied(",
        guard="a private module with pullPolicy Never is served only from a fresh check (Never asks no registry)",
        tests=("tests/test_isolation.py::test_private_and_never_is_served_only_from_a_fresh_check",
               "tests/test_isolation.py::test_the_private_module_access_cache_expires"),  # fmt: skip
    ),
    Mutation(
        id="access-registry-error-not-ok",
        file="csi_wasm/pull.py",
        old="            return False  # the origin no longer has that manifest: resolve the reference afresh\n",
        new="            return False  # the origin no longer has that manifest: resolve the reference afresh\n"
            "        except RegistryError:\n            pass\n",
        guard="a registry error while checking a pod's access is UNAVAILABLE, never a reason to hand the module over",
        tests=("tests/test_isolation.py::test_a_registry_error_during_the_check_is_unavailable_not_ok",),
    ),
    Mutation(
        id="flights-per-origin",
        file="csi_wasm/pull.py",
        old='        key = f"{layer.digest} {ref.registry}/{ref.repository}"',
        new="        key = layer.digest",
        guard="a download in flight is joined only from the same origin",
        tests=("tests/test_isolation.py::test_a_download_in_flight_is_never_joined_from_another_origin",),
    ),
    Mutation(
        id="resolutions-per-credentials",
        file="csi_wasm/resolutions.py",
        old='        return cls(ref.registry, ref.repository, request, creds.fingerprint if creds else "")',
        new='        return cls(ref.registry, ref.repository, request, "")',
        guard="a shared manifest resolution is reused only by publishes with the same credentials",
        tests=("tests/test_scale.py::test_a_pod_without_credentials_never_shares_another_pods_authenticated_resolution",),
    ),
    Mutation(
        id="tag-cache-expiry",
        file="csi_wasm/pull.py",
        old="        return self._clock() - entry.resolved_at <= self._config.tag_cache_seconds",
        new="        return True",
        guard="a resolved tag is served from the store for tag_cache_seconds only, then resolved again",
        tests=("tests/test_isolation.py::test_the_tag_cache_expires",),
    ),
    # -- the mount path (csi_wasm/publish.py, targets.py, mounts.py) ---------------------------------------
    Mutation(
        id="already-exists-other-volume-id",
        file="csi_wasm/publish.py",
        old='                if existing is not None and existing.volume_id not in (request.volume_id, ""):',
        new="                if False:",
        guard="a published target asked for by another volume id is ALREADY_EXISTS",
        tests=("tests/test_foreign_mounts.py::test_another_volume_id_on_a_published_target_is_already_exists",),
    ),
    Mutation(
        id="already-exists-other-module",
        file="csi_wasm/publish.py",
        old="        if ours != wanted:",
        new="        if False:",
        guard="a target that shows another module (or a mount not ours) is ALREADY_EXISTS, never published over",
        tests=("tests/test_conformance.py::test_same_target_with_a_different_module_is_already_exists",
               "tests/test_foreign_mounts.py::test_a_publish_covers_a_writable_bind_of_our_view_instead_of_trusting_it"),  # fmt: skip
    ),
    Mutation(
        id="failed-mount-removes-target",
        file="csi_wasm/publish.py",
        old="            if created:\n                with contextlib.suppress(DriverError, OSError):",
        new="            if False:\n                with contextlib.suppress(DriverError, OSError):",
        guard="a failed mount leaves no target directory behind",
        tests=("tests/test_foreign_mounts.py::test_a_failed_mount_leaves_no_target_directory_behind",),
    ),
    Mutation(
        id="unpublish-only-our-mounts",
        file="csi_wasm/publish.py",
        old="            if mounted is None or not self._ours(mounted, target, record):",
        new="            if mounted is None:",
        guard="unpublish never unmounts a mount the driver did not make",
        tests=("tests/test_foreign_mounts.py::test_unpublish_leaves_a_mount_it_did_not_make_alone",),
    ),
    Mutation(
        id="unpublish-busy-lazy-detach",
        file="csi_wasm/mounts.py",
        old='            if getattr(exc.__cause__, "errno", None) != errno.EBUSY:',
        new="            if True:",
        guard="an unpublish of a module held open (EBUSY) detaches it lazily and succeeds",
        tests=("tests/test_foreign_mounts.py::test_an_unpublish_of_a_module_held_open_still_succeeds",),
    ),
    Mutation(
        id="publish-covers-writable-bind",
        file="csi_wasm/publish.py",
        old="        return REQUIRED_OPTIONS <= mounted.options",
        new="        return True",
        guard="a writable bind of our view at the target is covered read-only, not taken as published",
        tests=("tests/test_foreign_mounts.py::test_a_publish_covers_a_writable_bind_of_our_view_instead_of_trusting_it",),
    ),
    Mutation(
        id="one-call-per-target",
        file="csi_wasm/publish.py",
        old="            if key in self._busy:",
        new="            if False:",
        guard="a second call for a target already being worked on is ABORTED",
        tests=("tests/test_lifecycle.py::test_a_second_call_for_a_busy_target_is_aborted",),
    ),
    Mutation(
        id="mount-flag-noexec",
        file="csi_wasm/mounts.py",
        old="syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC",
        new="syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV",
        guard="module mounts are noexec (new mount API)",
        tests=("tests/test_conformance.py::test_publish_creates_a_read_only_target_and_unpublish_removes_it",),
    ),
    Mutation(
        id="mount-flag-readonly",
        file="csi_wasm/mounts.py",
        old="syscalls.MOUNT_ATTR_RDONLY | syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC",
        new="syscalls.MOUNT_ATTR_NOSUID | syscalls.MOUNT_ATTR_NODEV | syscalls.MOUNT_ATTR_NOEXEC",
        guard="module mounts are read-only (new mount API)",
        tests=("tests/test_conformance.py::test_publish_creates_a_read_only_target_and_unpublish_removes_it",),
    ),
    Mutation(
        id="staged-mount-flags",
        file="csi_wasm/mounts.py",
        old="READ_ONLY_FLAGS = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC",
        new="READ_ONLY_FLAGS = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV",
        guard="module mounts are noexec (staging fallback, kernels without the new mount API)",
        tests=("tests/test_mounts.py::test_both_ways_attach_a_read_only_bind_and_leave_nothing_staged",),
    ),
    Mutation(
        id="read-only-before-attach",
        file="csi_wasm/mounts.py",
        old="    if flags & ST_READ_ONLY != ST_READ_ONLY or not same_file:",
        new="    if False:",
        guard="a bind that is not ro,nosuid,nodev,noexec (or not of the view) is never attached",
        tests=("tests/test_guard_mounts.py::test_a_kernel_that_ignores_mount_setattr_gets_nothing_attached",
               "tests/test_guard_mounts.py::test_a_read_only_remount_that_is_not_applied_gets_nothing_attached",
               "tests/test_mounts.py",
               "tests/test_conformance.py"),  # fmt: skip
    ),
    Mutation(
        id="mount-shows-the-view",
        file="csi_wasm/mounts.py",
        old="            if not _same_file(os.stat(source), os.lstat(target.at)):",
        new="            if False:",
        guard="after attaching, the target must show the view, or the mount is undone",
        tests=("tests/test_guard_mounts.py::test_a_target_swapped_during_the_attach_is_not_reported_as_published_and_leaves_no_mount",
               "tests/test_mounts.py",
               "tests/test_conformance.py"),  # fmt: skip
    ),
    Mutation(
        id="mount-undone-through-its-descriptor",
        file="csi_wasm/mounts.py",
        old='            _umount(f"/proc/self/fd/{attached}", MNT_DETACH, target.path)',
        new="            _umount(target.at, UMOUNT_NOFOLLOW | MNT_DETACH, target.path)",
        guard="a mount that does not show the view is undone where it landed, not at a path that may name another directory",
        tests=("tests/test_guard_mounts.py::test_a_target_swapped_during_the_attach_is_not_reported_as_published_and_leaves_no_mount",),
    ),
    Mutation(
        id="target-walk-no-symlinks",
        file="csi_wasm/targets.py",
        old="RESOLVE_SAFELY = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS",
        new="RESOLVE_SAFELY = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_MAGICLINKS",
        guard="the openat2 walk to a target refuses every symlink on the way",
        tests=("tests/test_mounts.py::test_the_walk_refuses_symlinks_files_and_long_names",
               "tests/test_mounts.py::test_a_volume_dir_swapped_for_a_symlink_during_a_slow_pull_gets_nothing_mounted"),  # fmt: skip
    ),
    Mutation(
        id="target-walk-beneath",
        file="csi_wasm/targets.py",
        old="RESOLVE_SAFELY = syscalls.RESOLVE_BENEATH | syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS",
        new="RESOLVE_SAFELY = syscalls.RESOLVE_NO_SYMLINKS | syscalls.RESOLVE_NO_MAGICLINKS",
        guard="the openat2 walk to a target stays beneath kubelet's pods dir",
        tests=("tests/test_mounts.py", "tests/test_hostile_input.py::test_target_paths_stay_in_the_pods_tree",
               "tests/test_conformance.py"),  # fmt: skip
        harmless=(
            "equivalent here: the walk gets a normalized relative path (no '..', never absolute, "
            "targets.canonical) and RESOLVE_NO_SYMLINKS (target-walk-no-symlinks, killed) refuses every link, so "
            "it cannot leave the pods dir"
        ),
    ),
    Mutation(
        id="target-walk-nofollow-fallback",
        file="csi_wasm/targets.py",
        old="                step = os.open(part, OPEN_DIR | os.O_NOFOLLOW, dir_fd=current)",
        new="                step = os.open(part, OPEN_DIR, dir_fd=current)",
        guard="where openat2 is missing, the walk opens one O_NOFOLLOW directory at a time",
        tests=("tests/test_mounts.py::test_the_walk_refuses_symlinks_files_and_long_names",),
    ),
    Mutation(
        id="target-parent-still-in-place",
        file="csi_wasm/targets.py",
        old="        if moved:",
        new="        if False:",
        guard="a target parent replaced during a slow pull gets nothing mounted",
        tests=("tests/test_guard_mounts.py::test_a_volume_dir_replaced_by_another_directory_during_a_slow_pull_gets_nothing_mounted",
               "tests/test_mounts.py::test_a_volume_dir_swapped_for_a_symlink_during_a_slow_pull_gets_nothing_mounted"),  # fmt: skip
    ),
    Mutation(
        id="target-of-another-pod",
        file="csi_wasm/targets.py",
        old="        if pod_uid and layout and layout.group(1) != pod_uid:",
        new="        if False:",
        guard="a target path inside another pod's directory is refused",
        tests=("tests/test_conformance.py::test_publish_refuses_a_target_of_another_pod",),
    ),
    Mutation(
        id="target-is-a-symlink",
        file="csi_wasm/targets.py",
        old="            if info is not None and stat.S_ISLNK(info.st_mode):",
        new="            if False:",
        guard="a target that is itself a symlink is refused",
        tests=("tests/test_conformance.py", "tests/test_mounts.py", "tests/test_hostile_input.py::test_target_paths_stay_in_the_pods_tree"),
    ),
    # -- recovery and the crash loop --------------------------------------------------------------------
    Mutation(
        id="recovery-only-our-mounts",
        file="csi_wasm/recovery.py",
        old="        view = store.view_of(entry.root, pathlib.Path(point))\n",
        new='        view = store.view_of(entry.root, pathlib.Path(point)) or ("sha256:" + "0" * 64, "plugin.wasm")\n',
        guard="recovery treats only binds of our views as ours: a foreign mount under pods/ is left alone",
        tests=("tests/test_foreign_mounts.py::test_recovery_leaves_mounts_that_are_not_ours_alone",),
    ),
    Mutation(
        id="recovery-adopts-mounts",
        file="csi_wasm/recovery.py",
        old='        records.put(VolumeRecord("", target, "", mount.digest, mount.file_name, time.time()))',
        new="        pass",
        guard="recovery records a mount of ours that has no record (kill -9 between mount and record)",
        tests=("tests/test_faults.py::test_kill_9_mid_publish_leaves_a_clean_store_and_a_retry_that_works",),
    ),
    Mutation(
        id="recovery-drops-stale-records",
        file="csi_wasm/recovery.py",
        old='        event(log, "repair.record_without_mount", logging.WARNING, volume_id=record.volume_id,',
        new='        continue\n        event(log, "repair.record_without_mount", logging.WARNING, volume_id=record.volume_id,',
        guard="recovery drops a record whose mount is gone",
        tests=("tests/test_lifecycle.py::test_restart_repairs_records_mounts_and_temp_files",),
    ),
    Mutation(
        id="recovery-covers-writable-binds",
        file="csi_wasm/recovery.py",
        old="                _cover(store, mounter, targets, mount)",
        new="                pass",
        guard="recovery covers an intact writable bind of ours with a read-only one",
        tests=("tests/test_topology.py::test_an_upgrade_covers_the_writable_binds_an_older_driver_left",),
    ),
    Mutation(
        id="recovery-rehashes-writable-binds",
        file="csi_wasm/recovery.py",
        old="        return hashes_to(store.view(mount.digest, mount.file_name) / mount.file_name, mount.digest)",
        new="        return True",
        guard="recovery re-hashes a module shown writable and takes down its mounts if it was tampered with",
        tests=("tests/test_topology.py::test_an_upgrade_covers_the_writable_binds_an_older_driver_left",),
    ),
    # -- seals (csi_wasm/integrity.py) --------------------------------------------------------------------
    Mutation(
        id="seal-checked-on-publish",
        file="csi_wasm/integrity.py",
        old="            return seal.matches(os.lstat(self._store.module_path(digest))) and seal.matches(os.lstat(link))",
        new="            return True",
        guard="a publish from the store compares the module and its view with the seal",
        tests=("tests/test_integrity.py",),
    ),
    Mutation(
        id="seal-covers-the-view-link",
        file="csi_wasm/integrity.py",
        old="            return seal.matches(os.lstat(self._store.module_path(digest))) and seal.matches(os.lstat(link))",
        new="            return seal.matches(os.lstat(self._store.module_path(digest)))",
        guard="a view linked to another file than the module breaks the seal",
        tests=("tests/test_guard_integrity.py::test_a_view_linked_to_another_file_is_linked_to_the_module_again",
               "tests/test_integrity.py"),  # fmt: skip
    ),
    Mutation(
        id="seal-covers-the-mode",
        file="csi_wasm/integrity.py",
        old="        return cls(info.st_size, info.st_mode, info.st_uid, info.st_gid, info.st_ino)",
        new="        return cls(info.st_size, 0, info.st_uid, info.st_gid, info.st_ino)",
        guard="a module made setuid (mode changed) breaks the seal and is put back",
        tests=("tests/test_integrity.py::test_a_module_made_setuid_with_its_bytes_intact_is_resealed_not_fetched_again",),
    ),
    Mutation(
        id="seal-break-rehashes",
        file="csi_wasm/integrity.py",
        old="        if not stat.S_ISREG(info.st_mode) or not self._store.verify(digest):",
        new="        if not stat.S_ISREG(info.st_mode):",
        guard="a broken seal makes the publish re-hash the module and quarantine it if the bytes changed",
        tests=("tests/test_integrity.py::test_a_tampered_module_is_quarantined_and_fetched_again",),
    ),
    Mutation(
        id="unsealed-module-is-hashed",
        file="csi_wasm/integrity.py",
        old="        if seal is None:\n            return False  # stored by a driver version without seals",
        new="        if seal is None:\n            return True  # stored by a driver version without seals",
        guard="a module without a seal (an older store) is hashed once before it is served",
        tests=("tests/test_integrity.py::test_a_module_stored_without_a_seal_is_hashed_once_and_sealed",),
    ),
    # -- readiness, one driver per node, the socket -------------------------------------------------------
    Mutation(
        id="probe-not-ready",
        file="csi_wasm/servicers.py",
        old="ready=wrappers_pb2.BoolValue(value=self._is_ready())",
        new="ready=wrappers_pb2.BoolValue(value=True)",
        guard="Probe says ready=false until start-up recovery has finished",
        tests=("tests/test_availability.py::test_not_ready_until_start_up_recovery_has_finished",),
    ),
    Mutation(
        id="publish-unavailable-until-ready",
        file="csi_wasm/servicers.py",
        old="        if not self._is_ready():",
        new="        if False:",
        guard="publish and unpublish are UNAVAILABLE until start-up recovery has finished",
        tests=("tests/test_availability.py::test_not_ready_until_start_up_recovery_has_finished",),
    ),
    Mutation(
        id="healthz-503-until-ready",
        file="csi_wasm/http.py",
        old="                healthy = is_healthy()",
        new="                healthy = True",
        guard="/healthz answers 503 until start-up recovery has finished",
        tests=("tests/test_availability.py::test_not_ready_until_start_up_recovery_has_finished",),
    ),
    Mutation(
        id="state-dir-exclusive-lock",
        file="csi_wasm/statedir.py",
        old="            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        new="            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)",
        guard="one driver per state dir: a second one waits for the exclusive lock",
        tests=("tests/test_cli.py::test_a_second_driver_waits_for_the_first_and_takes_over_when_it_exits",),
    ),
    Mutation(
        id="endpoint-live-socket",
        file="csi_wasm/endpoint.py",
        old="    check_endpoint(path)\n    refuse_live_socket(path)\n",
        new="    check_endpoint(path)\n",
        guard="a socket something answers on is never taken over (only a stale one is replaced)",
        tests=("tests/test_cli.py::test_a_socket_something_answers_on_is_not_taken_over",
               "tests/test_cli.py::test_a_live_socket_of_a_driver_on_another_state_dir_is_not_taken_over"),  # fmt: skip
    ),
    Mutation(
        id="endpoint-not-a-socket",
        file="csi_wasm/endpoint.py",
        old="    if not stat.S_ISSOCK(mode):",
        new="    if False:",
        guard="an endpoint path holding something other than a socket is refused and left alone",
        tests=("tests/test_cli.py::test_an_endpoint_naming_a_regular_file_leaves_the_file_alone",),
    ),
    Mutation(
        id="endpoint-removed-only-if-ours",
        file="csi_wasm/endpoint.py",
        old="                if (info.st_dev, info.st_ino) == self._identity:",
        new="                if True:",
        guard="at exit a driver removes the socket only if it is still the one it bound",
        tests=("tests/test_cli.py::test_a_driver_never_removes_a_socket_it_no_longer_owns",),
    ),
    Mutation(
        id="shared-pods-dir",
        file="csi_wasm/topology.py",
        old="    if holder is None or holder.shared:",
        new="    if True:",
        guard="the driver refuses to start when kubelet's pods dir is not a shared mount",
        tests=("tests/test_mounts.py::test_only_a_shared_pods_dir_passes_the_start_up_check",),
    ),
    # -- garbage collection (csi_wasm/gc.py) ---------------------------------------------------------------
    Mutation(
        id="gc-honours-pins",
        file="csi_wasm/gc.py",
        old="                if self.records.references()[module.digest] or module.digest in pinned:",
        new="                if self.records.references()[module.digest]:",
        guard="a module pinned by a publish in flight (no record yet) is never collected",
        tests=("tests/test_lifecycle.py::test_gc_never_takes_a_module_a_publish_in_flight_has_pinned",),
    ),
    Mutation(
        id="gc-grace-period",
        file="csi_wasm/gc.py",
        old="            if now - module.last_used < self.config.gc_grace_seconds and excess <= 0:",
        new="            if False:",
        guard="an unreferenced module under the store cap is kept for gc_grace_seconds after its last use",
        tests=("tests/test_lifecycle.py::test_gc_keeps_referenced_modules_and_unused_ones_until_the_grace_period_ends",),
    ),
    Mutation(
        id="gc-protected",
        file="csi_wasm/gc.py",
        old="            if references[module.digest] or module.digest in protected:",
        new="            if references[module.digest]:",
        guard="pre-pulled modules and fresh downloads are never collected",
        tests=("tests/test_lifecycle.py",),
    ),
    Mutation(
        id="gc-shield-before-the-module-appears",
        file="csi_wasm/store.py",
        old="            if landing is not None:\n                landing(digest)\n",
        new="",
        guard="a download is shielded from the collector before its module appears in the store",
        tests=("tests/test_lifecycle.py::test_a_download_is_shielded_from_the_collector_before_it_appears_in_the_store",),
    ),
    # -- the node's own resources: disk, workers, configuration --------------------------------------------
    Mutation(
        id="free-space-floor",
        file="csi_wasm/store.py",
        old="        if free - incoming_bytes < self._min_free_bytes:",
        new="        if False:",
        guard="a download that would take the filesystem under store.min_free_bytes is RESOURCE_EXHAUSTED",
        tests=("tests/test_availability.py::test_the_free_space_floor_holds_while_a_module_is_written",
               "tests/test_lifecycle.py::test_a_download_that_would_cross_the_free_space_floor_is_resource_exhausted"),  # fmt: skip
    ),
    Mutation(
        id="free-space-floor-while-writing",
        file="csi_wasm/store.py",
        old="        if self._unchecked >= FREE_SPACE_CHECK_BYTES:",
        new="        if False:",
        guard="the free-space floor is checked again every MiB written (a small layer can inflate)",
        tests=("tests/test_availability.py::test_the_free_space_floor_holds_while_a_module_is_written",),
    ),
    Mutation(
        id="full-disk-is-resource-exhausted",
        file="csi_wasm/store.py",
        old="        if exc.errno in _FULL:",
        new="        if False:",
        guard="ENOSPC/EDQUOT while writing is RESOURCE_EXHAUSTED, never INTERNAL",
        tests=("tests/test_availability.py::test_a_full_disk_is_resource_exhausted_and_leaves_nothing",),
    ),
    Mutation(
        id="admission-per-registry",
        file="csi_wasm/admission.py",
        old="            if self._pulling[registry] >= self.per_registry:",
        new="            if False:",
        guard="at most pull.max_pulling_publishes_per_registry publishes wait on one registry",
        tests=("tests/test_availability.py::test_a_dripping_registry_next_to_a_healthy_one",),
    ),
    Mutation(
        id="admission-total",
        file="csi_wasm/admission.py",
        old="            if sum(self._pulling.values()) >= self.total:",
        new="            if False:",
        guard="at most pull.max_pulling_publishes publishes wait on registries in all",
        tests=("tests/test_guard_availability.py::test_the_nodes_total_admission_holds_across_registries",
               "tests/test_availability.py::test_a_dripping_registry_next_to_a_healthy_one"),  # fmt: skip
    ),
    Mutation(
        id="config-negative-values",
        file="csi_wasm/config.py",
        old="        if value < 0:",
        new="        if False:",
        guard="a negative size, count or time in the node config is a configuration error",
        tests=("tests/test_config.py",),
    ),
    Mutation(
        id="config-no-metadata-allowed",
        file="csi_wasm/config.py",
        old="        if any(network.overlaps(never) for never in _NEVER_ALLOWED if never.version == network.version):",
        new="        if False:",
        guard="allowed_private_networks may not open link-local/metadata addresses",
        tests=("tests/test_hostile_registries.py::test_allowed_private_networks_are_validated",),
    ),
    Mutation(
        id="attribute-size-limit",
        file="csi_wasm/publish.py",
        old="        if len(key) + len(value) > MAX_ATTRIBUTE_BYTES:",
        new="        if False:",
        guard="a volume attribute longer than 4 KiB is INVALID_ARGUMENT",
        tests=("tests/test_guard_size_limits.py::test_an_attribute_over_4_kib_is_invalid_even_one_the_driver_ignores",
               "tests/test_pod_input.py::test_a_huge_image_attribute_makes_a_bounded_log_line",
               "tests/test_hostile_input.py::test_known_bad_attributes_are_invalid"),  # fmt: skip
    ),
    Mutation(
        id="attribute-count-limit",
        file="csi_wasm/publish.py",
        old="    if len(context) > MAX_ATTRIBUTES:",
        new="    if False:",
        guard="more than 64 volume attributes is INVALID_ARGUMENT",
        tests=("tests/test_guard_size_limits.py::test_more_than_64_attributes_are_invalid_even_ones_the_driver_ignores",
               "tests/test_hostile_input.py::test_known_bad_attributes_are_invalid",
               "tests/test_hostile_input.py::test_volume_attributes_are_parsed_or_refused_precisely"),  # fmt: skip
    ),
)
