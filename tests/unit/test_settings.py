"""Settings: environment values parsed by type, and flags over environment over defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest

from shared.settings import Settings, split_list


@dataclass(frozen=True)
class ExtendedSettings(Settings):
    """Settings plus a boolean and a plain float field, types the product declares none of
    yet, so their parsing is tested through ``Settings.load`` like every other field."""

    verbose: bool = field(default=False, metadata={"env": "RT_TEST_VERBOSE", "help": ""})
    ratio: float = field(default=1.0, metadata={"env": "RT_TEST_RATIO", "help": ""})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        (" off ", False),
    ],
)
def test_a_boolean_reads_true_false_1_0_yes_no_on_off_in_any_case(
    text: str, expected: bool
) -> None:
    assert ExtendedSettings.load({"RT_TEST_VERBOSE": text}).verbose is expected


@pytest.mark.parametrize("text", ["maybe", "2", "tru", "y"])
def test_a_boolean_refuses_anything_else_naming_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=f"RT_TEST_VERBOSE={text!r}: expected a boolean"):
        ExtendedSettings.load({"RT_TEST_VERBOSE": text})


def test_an_integer_is_parsed_and_garbage_is_refused_naming_the_variable() -> None:
    assert Settings.load({"RT_PORT": " 9090 "}).port == 9090
    assert Settings.load({"RT_RETENTION_MAX_BYTES": "-1"}).retention_max_bytes == -1
    for garbage in ("80x", "1.5", "ten"):
        with pytest.raises(ValueError, match=f"RT_PORT={garbage!r}: expected an integer"):
            Settings.load({"RT_PORT": garbage})


def test_a_plain_float_is_a_finite_number_without_units() -> None:
    assert ExtendedSettings.load({"RT_TEST_RATIO": "0.25"}).ratio == 0.25
    assert ExtendedSettings.load({"RT_TEST_RATIO": "-2"}).ratio == -2.0
    for garbage in ("nan", "inf", "10s", "half"):
        with pytest.raises(ValueError, match=f"RT_TEST_RATIO={garbage!r}: expected a"):
            ExtendedSettings.load({"RT_TEST_RATIO": garbage})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2.5", 2.5),
        ("0", 0.0),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        (" 1.5h ", 5400.0),
        ("250 MS", 0.25),
    ],
)
def test_a_duration_takes_seconds_or_a_number_with_a_unit(text: str, seconds: float) -> None:
    assert Settings.load({"RT_AUTH_TIMEOUT_S": text}).auth_timeout_s == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10x", "5 minutes", "m", "-1", "-5s", "inf", "1.2.3s"])
def test_a_duration_refuses_garbage_and_negatives_naming_the_variable(text: str) -> None:
    with pytest.raises(ValueError, match=f"RT_AUTH_TIMEOUT_S={text!r}: expected a duration"):
        Settings.load({"RT_AUTH_TIMEOUT_S": text})


def test_every_seconds_field_is_a_float_so_it_parses_as_a_duration() -> None:
    names = [spec.name for spec in dataclasses.fields(Settings) if spec.name.endswith("_s")]
    assert "request_timeout_s" in names
    for name in names:
        assert isinstance(getattr(Settings(), name), float), name


def test_a_string_is_taken_as_written() -> None:
    settings = Settings.load({"RT_PRESENCE_BUCKET": "123", "RT_STREAM": "off"})
    assert settings.presence_bucket == "123"
    assert settings.stream_name == "off"


def test_the_log_format_is_text_or_json_and_anything_else_names_the_variable() -> None:
    assert Settings.load({}).log_format == "text"
    assert Settings.load({"RT_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ValueError, match="RT_LOG_FORMAT='xml'"):
        Settings.load({"RT_LOG_FORMAT": "xml"})


def test_the_list_helper_drops_whitespace_and_empty_items() -> None:
    assert split_list(" a , b,,c , ") == ["a", "b", "c"]
    assert split_list("") == []
    assert split_list(" , ") == []


def test_list_settings_stay_strings_and_parse_through_the_helper() -> None:
    settings = Settings.load(
        {
            "RT_NATS_URL": "nats://a:4222, nats://b:4222,",
            "RT_API_KEYS": " app1.main:one , ,app2.main:two",
        }
    )
    assert settings.nats_url == "nats://a:4222, nats://b:4222,"
    assert settings.nats_urls == ["nats://a:4222", "nats://b:4222"]
    api_keys = settings.keys()
    assert [api_key.name for api_key in api_keys] == ["app1.main", "app2.main"]
    assert Settings().nats_urls == ["nats://127.0.0.1:4222"]


def test_flags_override_the_environment_which_overrides_defaults() -> None:
    environ = {"RT_PORT": "9000", "RT_HOST": "0.0.0.0", "RT_REQUEST_TIMEOUT_S": "500ms"}
    defaults = Settings.load({})
    assert (defaults.port, defaults.host, defaults.request_timeout_s) == (8080, "127.0.0.1", 2.0)
    from_environment = Settings.load(environ)
    assert (from_environment.port, from_environment.host) == (9000, "0.0.0.0")
    assert from_environment.request_timeout_s == 0.5
    flagged = Settings.load(environ, port=7000, host=None)
    assert flagged.port == 7000  # the flag wins
    assert flagged.host == "0.0.0.0"  # an unset flag (None) falls through to the environment
    assert Settings.load({"RT_PORT": ""}).port == 8080  # an empty variable is unset


def test_channels_can_empty_only_with_an_age_limit_or_a_byte_cap() -> None:
    assert Settings().channels_can_empty  # one day by default
    assert not Settings(retention_max_age_s=0).channels_can_empty
    assert Settings(retention_max_age_s=0, retention_max_bytes=1 << 30).channels_can_empty
