"""Helpers shared by the CLI and the passes: `moeconv.units.parse_size` and
`moeconv.cli.common.format_of`."""
import json

import pytest

from moeconv.cli.common import format_of
from moeconv.errors import InputError
from moeconv.units import parse_size


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                        ("1.5 KiB", 1536), ("40kb", 40_000), ("7", 7), (" 3M ", 3 * 10**6),
                                        (123, 123)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, why", [("lots", "use e.g."), ("5PB", "use e.g."), ("0MB", "must be positive"),
                                       ("0.1", "must be positive")])
def test_parse_size_refuses(text, why):
    with pytest.raises(InputError, match=why):
        parse_size(text)


def test_format_of(tmp_path):
    assert format_of("builtin:llama") == "auto"
    assert format_of(str(tmp_path / "missing")) == "auto"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert format_of(str(tmp_path)) == "auto"
    (tmp_path / "config.json").write_text(json.dumps({"moeconv": {"version": 1}}))
    assert format_of(str(tmp_path)) == "moeconv"
    (tmp_path / "config.json").write_text("{not json")
    assert format_of(str(tmp_path)) == "auto"
