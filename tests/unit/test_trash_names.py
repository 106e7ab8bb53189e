"""The trash's names and settings: entry names within NAME_MAX, hour
directory names, and trash_days from the config, -o and the xattr."""

import calendar

import pytest

from dfsfuse import config
from dfsfuse.errors import InvalidArgument, UserError
from dfsfuse.metadata.base import NAME_MAX, check_name
from dfsfuse.metadata.trash import (
    DAY_NS,
    ELLIPSIS,
    HOUR_NS,
    PATH_SEPARATOR,
    entry_name,
    expiry_ns,
    hour_name,
    hour_start_ns,
    parse_days,
)
from dfsfuse.runtime import parse_mount_options


def test_an_entry_name_shows_the_path_and_ends_with_the_inode():
    assert entry_name(b"/home/ann/report.txt", 42) == PATH_SEPARATOR.join([b"home", b"ann", b"report.txt"]) + b"~42"
    check_name(entry_name(b"/home/ann/report.txt", 42))


@pytest.mark.parametrize("component", [b"x" * 200, "é".encode() * 100, "\u2215".encode() * 80])
def test_a_long_path_keeps_its_end_and_fits_a_name(component):
    path = b"/" + b"/".join([component] * 3)
    name = entry_name(path, 123456789)
    assert len(name) <= NAME_MAX and name.startswith(ELLIPSIS) and name.endswith(b"~123456789")
    name.decode()  # cut at a character boundary
    check_name(name)
    assert path.replace(b"/", PATH_SEPARATOR).endswith(name[len(ELLIPSIS):-len(b"~123456789")])


def test_hour_directories_are_named_by_the_utc_hour_of_expiry():
    deleted = calendar.timegm((2026, 12, 6, 5, 26, 40)) * 10**9
    expires = expiry_ns(deleted, 1)
    assert expires == deleted + DAY_NS
    assert hour_name(expires) == b"2026-12-07-05"
    start = hour_start_ns(b"2026-12-07-05")
    assert start is not None and start <= expires < start + HOUR_NS
    assert hour_start_ns(b"lost+found") is None
    assert hour_start_ns(b"2026-13-07-05") is None


@pytest.mark.parametrize("text, days", [("0", 0.0), ("1", 1.0), (" 2.5 ", 2.5), ("0.0001", 0.0001)])
def test_trash_days_are_a_number_of_days(text, days):
    assert parse_days(text, "trash_days") == days


@pytest.mark.parametrize("text", ["", "soon", "-1", "nan", "inf", "1e9"])
def test_bad_trash_days_are_refused(text):
    with pytest.raises(InvalidArgument, match="trash_days must be a number of days"):
        parse_days(text, "trash_days")


def test_trash_days_from_the_config_and_the_mount_options(tmp_path):
    assert config.load(str(tmp_path / "d")).trash_days == 1.0
    path = tmp_path / "c.toml"
    path.write_text("trash_days = 0.5\ntrash_sweep_interval = 2\n")
    settings = config.load(str(tmp_path / "d"), str(path))
    assert (settings.trash_days, settings.trash_sweep_interval) == (0.5, 2.0)
    for bad in ('trash_days = "a week"', "trash_days = -2", "trash_sweep_interval = 0"):
        path.write_text(bad + "\n")
        with pytest.raises(UserError, match="config: trash_"):
            config.load(str(tmp_path / "d"), str(path))
    options, settings_of_options = parse_mount_options(["noatime,trash_days=7", "metrics=127.0.0.1:9567"])
    assert options == ["noatime"]
    assert settings_of_options == {"trash_days": 7.0, "metrics_listen": "127.0.0.1:9567"}
    with pytest.raises(UserError, match="trash_days must be a number of days"):
        parse_mount_options(["trash_days=forever"])
