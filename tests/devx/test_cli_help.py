"""``conveyor --help`` and every subcommand's ``--help`` say where settings come from."""

from __future__ import annotations

import pytest

from conveyor.cli import COMMANDS, build_parser


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_help_says_settings_come_from_the_environment(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(
            [command, *(["us"] if command in ("pause", "resume") else []), "--help"]
        )
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Settings are read from the environment" in text
    assert "DATABASE_URL" in text and "configuration table" in text
