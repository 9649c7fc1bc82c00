"""``capsa-serve --help`` lists every setting with its environment variable, including those that have no
command-line option (tokens, limits, timeouts, the cache dir)."""

from __future__ import annotations

import pytest

from service import cli
from service.settings import Settings


def test_help_lists_every_setting_with_its_variable_and_description(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name, field in Settings.model_fields.items():
        variable = f"CAPSA_{name.upper()}"
        assert variable in out, f"--help does not mention {variable}"
        assert field.description and field.description.split(".")[0][:40] in " ".join(out.split()), variable
    # Secrets are never shown, only whether they are set by default (they are not).
    assert "CAPSA_ADMIN_TOKEN  (default unset)" in out
