"""Node configuration is validated at start, with errors that name the bad key."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from csi_wasm.config import ConfigError, DriverConfig, check_files, parse_node_config


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"pull": {"max_module_bytes": "lots"}}, "pull.max_module_bytes"),
        ({"pull": {"attempts": -1}}, "pull.attempts"),
        ({"pull": {"retries": 3}}, "pull.retries"),
        ({"registries": {"r.example": {"insecure": "yes"}}}, "registries.r.example.insecure"),
        ({"registries": {"r.example": {"mirrors": "m.example"}}}, "registries.r.example.mirrors"),
        ({"store": {"gc_grace": 1}}, "store.gc_grace"),
        ({"prepull": "r.example/a:v1"}, "prepull"),
        ({"typo": 1}, "config.typo"),
        ([], "config"),
    ],
)
def test_bad_keys_are_named(raw: object, key: str) -> None:
    with pytest.raises(ConfigError) as failure:
        parse_node_config(raw)
    assert key in str(failure.value)


def test_a_full_config_parses() -> None:
    config = parse_node_config({
        "registries": {"r.example": {"insecure": True, "mirrors": ["m.example:5000"]}},
        "pull": {"max_module_bytes": 1024, "tag_cache_seconds": 0},
        "store": {"gc_grace_seconds": 60},
        "prepull": ["r.example/a:v1"],
    })  # fmt: skip
    assert config.registry("r.example").mirrors == ("m.example:5000",)
    assert config.pull.max_module_bytes == 1024 and config.store.gc_grace_seconds == 60
    assert config.registry("other.example").insecure is False  # TLS unless an admin says otherwise


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"docker_config": "/nonexistent/config.json"}, "docker_config"),
        ({"registries": {"r.example": {"ca_bundle": "/nonexistent/ca.pem"}}}, "registries.r.example.ca_bundle"),
    ],
)
def test_files_the_config_names_must_be_readable(raw: object, key: str) -> None:
    with pytest.raises(ConfigError) as failure:
        check_files(parse_node_config(raw))
    assert key in str(failure.value) and "/nonexistent/" in str(failure.value)


def test_serve_refuses_a_missing_file_with_a_configuration_error(tmp_path: pathlib.Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("registries: {r.example: {ca_bundle: /nonexistent/ca.pem}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "csi_wasm", "serve", "--node-id", "n", "--endpoint", f"unix://{tmp_path}/s.sock",
         "--state-dir", str(tmp_path / "state"), "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "configuration error: registries.r.example.ca_bundle" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["", "-bad", "bad-", "a" * 64, "has space", "under_score_ok."])
def test_driver_names_follow_the_csi_rule(name: str) -> None:
    with pytest.raises(ConfigError):
        DriverConfig(name, "node", "/tmp/s.sock", pathlib.Path("/tmp"), pathlib.Path("/tmp"))


# -- every refusal of the parser: the key, and what is wrong with it ------------------------------------------

REFUSED = [
    ({"registries": "r.example"}, "registries: expected a mapping, got str"),
    ({"registries": {"r.example": "insecure"}}, "registries.r.example: expected a mapping, got str"),
    ({"registries": {"r.example": {"tls": False}}}, "registries.r.example.tls: unknown key"),
    ({"registries": {"not a host": {}}}, "registries.not a host: 'not a host' is not a registry host[:port]"),
    ({"registries": {"r.example:99999": {}}}, "registries.r.example:99999: 'r.example:99999': port 99999 is out of range"),
    ({"registries": {"r.example": {"ca_bundle": 5}}}, "registries.r.example.ca_bundle: expected a string, got 5"),
    ({"registries": {"r.example": {"cosign_public_key": ["/k"]}}},
     "registries.r.example.cosign_public_key: expected a string, got ['/k']"),
    ({"registries": {"r.example": {"require_signature": 1, "cosign_public_key": "/k"}}},
     "registries.r.example.require_signature: expected true or false, got 1"),
    ({"registries": {"r.example": {"mirrors": ["not a host"]}}}, "registries.r.example.mirrors: 'not a host' is not"),
    ({"registries": {"r.example": {"mirrors": ["docker.io"]}}}, "registries.r.example.mirrors: 'docker.io' is Docker Hub"),
    ({"pull": []}, "pull: expected a mapping, got list"),
    ({"pull": {"attempts": True}}, "pull.attempts: expected a number, got True"),
    ({"pull": {"read_timeout_seconds": None}}, "pull.read_timeout_seconds: expected a number, got None"),
    ({"pull": {"max_module_bytes": "256Mi"}}, "pull.max_module_bytes: expected a number, got '256Mi'"),
    ({"store": {"min_free_bytes": -1}}, "store.min_free_bytes: must not be negative, got -1"),
    ({"docker_config": 5}, "docker_config: expected a string, got 5"),
    ({"prepull": [5]}, "prepull: expected a list of strings, got [5]"),
    ({"prepull": ["r.example/a:v1", "Not A Reference"]}, "prepull[1]: image 'Not A Reference': invalid repository"),
    ({"prepull": ["r.example/a:v1\n"]}, "prepull[0]: image 'r.example/a:v1\\n' is not a valid OCI reference"),
    ({"allowed_images": "r.example/**"}, "allowed_images: expected a list of strings, got 'r.example/**'"),
    ({"allowed_images": ["r.example"]}, "allowed_images[0] 'r.example': "),
    ({"allowed_private_networks": ["10.0.0.0/33"]}, "allowed_private_networks[0] '10.0.0.0/33': not a CIDR block"),
    ({"allowed_private_networks": ["169.254.0.0/24"]},
     "allowed_private_networks[0] '169.254.0.0/24': link-local/metadata addresses cannot be allowed"),
    # where 0 would not switch something off but stop the driver working: a collector that never sleeps,
    # requests that time out before they start, limits nothing fits under, every cold publish refused
    ({"store": {"gc_interval_seconds": 0}}, "store.gc_interval_seconds: must be above 0, got 0"),
    ({"pull": {"connect_timeout_seconds": 0}}, "pull.connect_timeout_seconds: must be above 0, got 0"),
    ({"pull": {"read_timeout_seconds": 0.0}}, "pull.read_timeout_seconds: must be above 0, got 0.0"),
    ({"pull": {"download_timeout_seconds": 0}}, "pull.download_timeout_seconds: must be above 0, got 0"),
    ({"pull": {"max_manifest_bytes": 0}}, "pull.max_manifest_bytes: must be above 0, got 0"),
    ({"pull": {"max_module_bytes": 0}}, "pull.max_module_bytes: must be above 0, got 0"),
    ({"pull": {"max_buffered_bytes": 0}}, "pull.max_buffered_bytes: must be above 0, got 0"),
    ({"pull": {"max_pulling_publishes": 0}}, "pull.max_pulling_publishes: must be above 0, got 0"),
    ({"pull": {"max_pulling_publishes_per_registry": 0}},
     "pull.max_pulling_publishes_per_registry: must be above 0, got 0"),
]  # fmt: skip


@pytest.mark.parametrize("raw, message", REFUSED, ids=[m.split(":")[0] + f"-{n}" for n, (_, m) in enumerate(REFUSED)])
def test_each_refusal_names_the_key_and_the_problem(raw: object, message: str) -> None:
    with pytest.raises(ConfigError) as failure:
        parse_node_config(raw)
    assert str(failure.value).startswith(message), str(failure.value)


@pytest.mark.parametrize("raw", [{"pull": {"tag_cache_seconds": 0, "max_wait_seconds": 0, "attempts": 0,
                                           "max_concurrent_downloads": 0}},
                                 {"store": {"gc_grace_seconds": 0, "max_store_bytes": 0, "min_free_bytes": 0,
                                            "auth_cache_seconds": 0}}])  # fmt: skip
def test_zero_is_accepted_where_it_switches_something_off(raw: dict[str, dict[str, int]]) -> None:
    """No tag or access cache, no wait, no cap, no floor, collect at once; attempts and workers count at least 1."""
    config = parse_node_config(raw)
    for section, values in raw.items():
        assert all(getattr(getattr(config, section), key) == 0 for key in values)


# -- the same mistakes through the command: one line, exit 2, nothing created ------------------------------------

CLI_REFUSED = [
    ("a YAML syntax error", "pull: {attempts: 3\nstore: [\n", "cannot read node config CONFIG: line 2, column 6: "
     "expected ',' or '}', but got ':'"),
    ("a YAML list", "- pull\n", "config: expected a mapping, got list"),
    ("a bad prepull reference", "prepull: ['r.example/Team/a:v1']\n", "prepull[0]: image 'r.example/Team/a:v1': "),
    ("an interval of 0", "store: {gc_interval_seconds: 0}\n", "store.gc_interval_seconds: must be above 0, got 0"),
    ("a docker config that is not JSON", "docker_config: DOCKER\n", "docker_config: cannot read DOCKER: "
     "JSONDecodeError"),
    ("a docker config whose auths is a list", "docker_config: DOCKER\n", "docker_config: DOCKER: 'auths' must be "
     "a mapping"),
]  # fmt: skip
DOCKER_CONFIGS = {"a docker config that is not JSON": '{"auths": ', "a docker config whose auths is a list": '{"auths": []}'}


@pytest.mark.parametrize("text, message", [(t, m) for _, t, m in CLI_REFUSED], ids=[n for n, _, _ in CLI_REFUSED])
def test_serve_refuses_a_bad_config_file_in_one_line_and_creates_nothing(
    tmp_path: pathlib.Path, request: pytest.FixtureRequest, text: str, message: str
) -> None:
    config, docker = tmp_path / "node.yaml", tmp_path / "docker.json"
    docker.write_text(DOCKER_CONFIGS.get(request.node.callspec.id, "{}"))
    config.write_text(text.replace("DOCKER", str(docker)))
    result = subprocess.run(
        [sys.executable, "-m", "csi_wasm", "serve", "--node-id", "n", "--endpoint", f"unix://{tmp_path}/s.sock",
         "--state-dir", str(tmp_path / "state"), "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    expected = message.replace("CONFIG", str(config)).replace("DOCKER", str(docker))
    assert lines[0].startswith(f"csi-wasm: configuration error: {expected}"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docker.json", "node.yaml"]  # no state dir, no socket
