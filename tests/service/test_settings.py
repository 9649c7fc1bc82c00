"""Settings: every field is a CAPSA_* environment variable; CLI options override them; devices are validated."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.cli import parse_args
from service.manager import resolve_devices
from service.settings import Settings


def test_every_field_is_an_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CAPSA_MODEL_REPOSITORY": "s3://bucket/models", "CAPSA_HOST": "0.0.0.0", "CAPSA_PORT": "9000",
        "CAPSA_DEVICES": "cuda:0,cuda:1", "CAPSA_WORKERS_PER_DEVICE": "2", "CAPSA_TORCH_THREADS": "4",
        "CAPSA_ADMIN_TOKEN": "adm-xyzzy", "CAPSA_INFER_TOKEN": "inf", "CAPSA_MAX_REQUEST_BYTES": "1024",
        "CAPSA_REQUEST_TIMEOUT_S": "2.5", "CAPSA_DRAIN_TIMEOUT_S": "7", "CAPSA_WORKER_START_TIMEOUT_S": "60",
        "CAPSA_RETRY_AFTER_S": "3", "CAPSA_CACHE_DIR": "/tmp/c", "CAPSA_STORAGE_OPTIONS": '{"anon": true}',
        "CAPSA_LOG_LEVEL": "DEBUG", "CAPSA_ACCESS_LOG": "false", "CAPSA_DEMO": "true",
        "CAPSA_MAX_JSON_REQUEST_BYTES": "512", "CAPSA_HEADER_TIMEOUT_S": "4", "CAPSA_BODY_TIMEOUT_S": "6",
        "CAPSA_KEEP_ALIVE_TIMEOUT_S": "9", "CAPSA_MAX_HEADER_BYTES": "2048", "CAPSA_MAX_CONNECTIONS": "100",
        "CAPSA_SHUTDOWN_GRACE_S": "0.5",
    }
    assert set(env) <= {f"CAPSA_{name.upper()}" for name in Settings.model_fields}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.model_repository == "s3://bucket/models" and s.port == 9000 and s.devices == "cuda:0,cuda:1"
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "adm-xyzzy"
    assert s.storage_options == {"anon": True} and s.log_level == "debug" and s.access_log is False and s.demo
    assert s.request_timeout_s == 2.5 and s.max_request_bytes == 1024 and s.workers_per_device == 2
    assert "xyzzy" not in repr(s)
    assert (s.max_json_request_bytes, s.header_timeout_s, s.body_timeout_s, s.keep_alive_timeout_s,
            s.max_header_bytes, s.max_connections, s.shutdown_grace_s) == (512, 4, 6, 9, 2048, 100, 0.5)


def test_invalid_settings_never_print_their_values(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped CAPSA_STORAGE_OPTIONS (it holds S3 keys) is reported by name, never by value."""
    from service.cli import main

    for value in ('["AKIA-SECRET-1"]', '{"secret": "AKIA-SECRET-1"', '"AKIA-SECRET-1"'):
        monkeypatch.setenv("CAPSA_STORAGE_OPTIONS", value)
        assert main(["--model-repository", "/nonexistent"]) == 2
        err = capsys.readouterr().err
        assert "storage_options" in err and "AKIA-SECRET-1" not in err, err
    monkeypatch.setenv("CAPSA_STORAGE_OPTIONS", '{"secret": "AKIA-SECRET-1"}')
    assert "AKIA-SECRET-1" not in repr(Settings())
    assert Settings().storage_options == {"secret": "AKIA-SECRET-1"}


def test_the_connection_cap_keeps_file_descriptors_for_the_workers() -> None:
    import resource

    from service.edge import EdgeLimits, fd_connection_cap, grpc_connection_cap

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = fd_connection_cap()
    assert 8 <= cap < soft and soft - cap >= min(64, soft // 2)
    # REST and gRPC share the budget: gRPC a quarter by default, at most half; REST the rest.
    grpc_cap = grpc_connection_cap(Settings())
    assert grpc_cap == cap // 4 and grpc_connection_cap(Settings(grpc_port=0)) == 0
    assert grpc_connection_cap(Settings(max_grpc_connections=soft * 2)) == cap // 2
    assert grpc_connection_cap(Settings(max_grpc_connections=3)) == 3
    assert EdgeLimits.from_settings(Settings()).max_connections == cap - grpc_cap
    assert EdgeLimits.from_settings(Settings(grpc_port=0)).max_connections == cap
    assert EdgeLimits.from_settings(Settings(max_connections=soft * 2)).max_connections == cap - grpc_cap
    assert EdgeLimits.from_settings(Settings(max_connections=soft * 2, max_grpc_connections=3)).max_connections == (
        cap - 3)
    assert EdgeLimits.from_settings(Settings(max_connections=5)).max_connections == 5


def test_defaults_and_cli_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.host, s.port, s.devices, s.max_request_bytes, s.admin_token) == ("127.0.0.1", 8000, "auto", 64 << 20,
                                                                              None)
    monkeypatch.setenv("CAPSA_PORT", "9000")
    monkeypatch.setenv("CAPSA_MODEL_REPOSITORY", "/from/env")
    s = Settings(**parse_args(["--port", "9100", "--devices", "cpu"]))
    assert s.port == 9100 and s.devices == "cpu" and s.model_repository == "/from/env"
    assert Settings(**parse_args(["--demo"])).demo is True


@pytest.mark.parametrize("devices", ["gpu", "cuda:x", "cuda:0,", "", "cpu,tpu:0"])
def test_bad_devices_are_refused(devices: str) -> None:
    if devices == "cuda:0,":  # a trailing comma is tolerated
        assert Settings(devices=devices).devices == devices
        return
    with pytest.raises(ValidationError, match="devices"):
        Settings(devices=devices)


def test_resolve_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_devices("cpu") == ["cpu"]
    assert resolve_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_devices("auto") == ["cpu"]
