"""ModelConfig: defaults, Triton-style version policies, and errors naming the file and the field."""

from __future__ import annotations

import json

import pytest

from service.model_config import ConfigError, ModelConfig, VersionPolicy


def test_defaults() -> None:
    config = ModelConfig.from_json("{}", source="m/config.json")
    assert config == ModelConfig()
    assert (config.max_batch_size, config.max_batch_delay_ms, config.max_queue_size, config.instances) == (
        64,
        0.0,
        1024,
        1,
    )
    assert config.version_policy.to_json_dict() == {"latest": {"num_versions": 1}}
    assert config.risk_threshold is None and config.allowed_modules is None and config.allow_non_finite is False


def test_full_config() -> None:
    text = json.dumps(
        {
            "max_batch_size": 8,
            "max_batch_delay_ms": 2,
            "max_queue_size": 10,
            "instances": 3,
            "version_policy": {"specific": {"versions": [3, 1]}},
            "risk_threshold": 0.25,
            "allowed_modules": ["acme.models", "architecture"],
            "allow_non_finite": True,
        }
    )
    config = ModelConfig.from_json(text.encode(), source="m/config.json")
    assert config.max_batch_delay_ms == 2.0 and isinstance(config.max_batch_delay_ms, float)
    assert config.instances == 3 and config.risk_threshold == 0.25
    assert config.allowed_modules == ["acme.models", "architecture"]
    assert config.version_policy.specific is not None and config.version_policy.specific.versions == [1, 3]
    with pytest.raises(ValueError):
        config.instances = 2  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("policy", "available", "expected"),
    [
        ({"latest": {"num_versions": 1}}, [1, 2, 3], [3]),
        ({"latest": {"num_versions": 2}}, [3, 1, 2], [2, 3]),
        ({"latest": {}}, [4, 2], [4]),
        ({"latest": {"num_versions": 5}}, [1, 2], [1, 2]),
        ({"all": {}}, [2, 1, 7], [1, 2, 7]),
        ({"specific": {"versions": [1, 3, 9]}}, [1, 2, 3], [1, 3]),
        ({"all": {}}, [], []),
    ],
)
def test_version_policies(policy: dict, available: list[int], expected: list[int]) -> None:
    config = ModelConfig.from_json(json.dumps({"version_policy": policy}), source="c.json")
    assert config.select_versions(available) == expected


def test_policy_helpers() -> None:
    assert VersionPolicy.latest_n(2).describe() == "latest 2"
    assert VersionPolicy.latest_n(2).kind == "latest"
    assert VersionPolicy(all={}).describe() == "all"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"max_batch_size": 0}', "max_batch_size"),
        ('{"max_batch_size": "8"}', "max_batch_size"),
        ('{"max_batch_size": 1.5}', "max_batch_size"),
        ('{"max_batch_delay_ms": -1}', "max_batch_delay_ms"),
        ('{"max_batch_delay_ms": NaN}', "max_batch_delay_ms"),
        ('{"max_queue_size": 0}', "max_queue_size"),
        ('{"instances": 0}', "instances"),
        ('{"instances": true}', "instances"),
        ('{"risk_threshold": -0.1}', "risk_threshold"),
        ('{"risk_threshold": Infinity}', "risk_threshold"),
        ('{"allowed_modules": "acme"}', "allowed_modules"),
        ('{"allowed_modules": ["acme..x"]}', "allowed_modules"),
        ('{"allow_non_finite": "yes"}', "allow_non_finite"),
        ('{"max_batch": 8}', "max_batch"),
        ('{"version_policy": {}}', "version_policy"),
        ('{"version_policy": {"latest": {"num_versions": 1}, "all": {}}}', "version_policy"),
        ('{"version_policy": {"latest": {"num_versions": 0}}}', "version_policy.latest.num_versions"),
        ('{"version_policy": {"latest": {"n": 1}}}', "version_policy.latest.n"),
        ('{"version_policy": {"specific": {"versions": []}}}', "version_policy.specific.versions"),
        ('{"version_policy": {"specific": {"versions": [0]}}}', "version_policy.specific.versions"),
        ('{"version_policy": "latest"}', "version_policy"),
    ],
)
def test_bad_values_name_file_and_field(text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_json(text, source="/reg/m/config.json")
    message = str(info.value)
    assert message.startswith("/reg/m/config.json: ")
    assert f" {field}: " in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("text", "cause"), [("{bad", "invalid JSON"), ("[1]", "JSON object"), (b"\xff", "invalid JSON")]
)
def test_bad_json(text: str | bytes, cause: str) -> None:
    with pytest.raises(ConfigError, match=rf"^reg/m/config\.json: .*{cause}"):
        ModelConfig.from_json(text, source="reg/m/config.json")


# ---------------------------------------------------------------------------------------------- worker threads
def test_worker_threads_default_and_validation() -> None:
    config = ModelConfig.from_json('{"torch_threads": 4, "interop_threads": 2}', source="m/config.json")
    assert (config.torch_threads, config.interop_threads) == (4, 2)
    assert (ModelConfig().torch_threads, ModelConfig().interop_threads) == (None, 1)
    for bad, words in (({"torch_threads": 0}, "torch_threads: Input should be greater than or equal to 1"),
                       ({"torch_threads": "4"}, "torch_threads: Input should be a valid integer"),
                       ({"torch_threads": True}, "torch_threads: Input should be a valid integer"),
                       ({"interop_threads": 0}, "interop_threads: Input should be greater than or equal to 1"),
                       ({"torch_threads": 2.5}, "torch_threads: Input should be a valid integer")):
        with pytest.raises(ConfigError) as info:
            ModelConfig.from_json(json.dumps(bad), source="m/config.json")
        assert str(info.value).startswith("m/config.json: ") and words in str(info.value), str(info.value)


def test_worker_threads_precedence_and_default() -> None:
    from service.model_config import MAX_DEFAULT_TORCH_THREADS, worker_torch_threads

    assert worker_torch_threads(3, 5, cpu_workers=1, cores=64) == 3  # config.json first
    assert worker_torch_threads(None, 5, cpu_workers=1, cores=64) == 5  # then CAPSA_TORCH_THREADS
    # then the cores less one for the HTTP process, shared by the version's CPU workers, within [1, the cap]
    assert worker_torch_threads(None, None, cpu_workers=1, cores=2) == 1
    assert worker_torch_threads(None, None, cpu_workers=1, cores=1) == 1
    assert worker_torch_threads(None, None, cpu_workers=2, cores=9) == 4
    assert worker_torch_threads(None, None, cpu_workers=3, cores=4) == 1
    assert worker_torch_threads(None, None, cpu_workers=0, cores=5) == 4  # GPU-only versions: no CPU worker
    assert worker_torch_threads(None, None, cpu_workers=1, cores=128) == MAX_DEFAULT_TORCH_THREADS
