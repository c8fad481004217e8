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
