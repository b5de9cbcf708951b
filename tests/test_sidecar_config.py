"""Sidecar settings: defaults < YAML file < ERASER_* environment < flags, validated on creation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sidecar.config import ConfigError, load_config


def test_precedence(tmp_path):
    cfg_file = tmp_path / "sidecar.yaml"
    cfg_file.write_text("store: /from/file\ngrpc_port: 1111\nmetrics_port: 2222\nkeep_versions: 5\n"
                        "erase:\n  solver: sqm\n  damping: 0.1\nbase_models:\n  smol: /models/smol\n")
    env = {"ERASER_GRPC_PORT": "3333", "ERASER_MERGE_QUEUED": "false"}
    config = load_config({"grpc_port": 4444, "device": None}, cfg_file, environ=env)
    assert str(config.store) == "/from/file"
    assert (config.grpc_port, config.metrics_port, config.keep_versions) == (4444, 2222, 5)  # flag > env > file
    assert config.merge_queued is False  # env > default
    assert (config.erase.solver, config.erase.damping) == ("sqm", 0.1)
    assert config.base_models == {"smol": "/models/smol"}
    assert (config.max_watches, config.max_watches_per_client, config.max_health_watches) == (1000, 100, 100)
    assert load_config({}, cfg_file, environ=env).grpc_port == 3333  # env > file
    with pytest.raises(Exception):
        config.grpc_port = 1  # frozen


def test_token_from_file_never_printed(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    config = load_config({"store": tmp_path, "token_file": token}, environ={})
    assert config.token == "s3cret-token" and "s3cret" not in repr(config)


@pytest.mark.parametrize("overrides, message", [
    ({}, "no store directory"),
    ({"store": "/s", "grpc_port": 70000}, "grpc_port"),
    ({"store": "/s", "grpc_port": "abc"}, "grpc_port: expected int"),
    ({"store": "/s", "keep_versions": 0}, "keep_versions"),
    ({"store": "/s", "device": "tpu"}, "device"),
    ({"store": "/s", "tls_cert": "/nope.pem"}, "tls_cert and tls_key"),
    ({"store": "/s", "token_file": "/nope"}, "token_file: no such file"),
    ({"store": "/s", "merge_queued": "maybe"}, "merge_queued: expected bool"),
    ({"store": "/s", "erase": {"solver": "magic"}}, "erase.solver"),
    ({"store": "/s", "erase": {"speed": 1}}, "unknown setting(s): erase.speed"),
    ({"store": "/s", "colour": "blue"}, "unknown setting(s): colour"),
    ({"store": "/s", "erase": {"max_iterations": 200_000}}, "erase.max_iterations must be in"),
    ({"store": "/s", "erase": {"tolerance": 1e-20}}, "erase.tolerance must be >= erase.min_tolerance"),
    ({"store": "/s", "erase": {"min_tolerance": 0}}, "erase.min_tolerance in"),
    ({"store": "/s", "erase": {"verify_max_steps": 10**9}}, "erase.verify_max_steps must be in"),
    ({"store": "/s", "erase": {"verify_max_seconds": 1e9}}, "erase.verify_max_seconds must be in"),
    ({"store": "/s", "max_watches_per_client": 0}, "max_watches_per_client must be an integer in"),
    ({"store": "/s", "max_health_watches": "many"}, "max_health_watches: expected int"),
    ({"store": "/s", "max_watches": 10, "max_watches_per_client": 20}, "max_watches_per_client cannot exceed"),
])
def test_bad_settings(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(overrides, environ={})


def test_bad_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config({}, bad, environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config({}, tmp_path / "missing.yaml", environ={})


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ERASER_")}
    out = subprocess.run([sys.executable, "-m", "sidecar.cli", "--store", str(tmp_path), "--device", "tpu"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["eraser-sidecar: error: device must be cpu, cuda or cuda:N, not 'tpu'"]
    assert not any(tmp_path.iterdir()), "nothing was created"


def test_import_roots(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    env = {"ERASER_IMPORT_ROOTS": f"{a}:{b}"}
    assert load_config({"store": tmp_path / "store"}, environ=env).import_roots == (a.resolve(), b.resolve())
    assert load_config({"store": tmp_path / "store", "import_roots": [str(b)]}, environ=env).import_roots == (b.resolve(),)
    assert load_config({"store": tmp_path / "store"}, environ={}).import_roots == ()
    (tmp_path / "store" / "x").mkdir(parents=True)
    for roots, message in [([tmp_path], "overlaps the store"), ([tmp_path / "store"], "overlaps the store"),
                           ([tmp_path / "store" / "x"], "overlaps the store"), ([tmp_path / "nope"], "not a directory")]:
        with pytest.raises(ConfigError, match=message):
            load_config({"store": tmp_path / "store", "import_roots": roots}, environ={})
