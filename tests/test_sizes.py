"""mixtral.sizes: the one size parser behind --shard-size and --max-ram."""

from __future__ import annotations

import pytest

from mixtral.sizes import parse_size


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("3KB", 3000), ("2TB", 2 * 10**12),
    ("2GiB", 2 * 2**30), ("16GIB", 16 * 2**30), ("7MiB", 7 * 2**20), ("1TiB", 2**40),
    ("2.5G", 5 * 2**29), ("16g", 16 * 2**30), ("4K", 4096), ("3M", 3 * 2**20), ("1T", 2**40),
    ("5gb", 5 * 10**9), ("500 MB", 500 * 10**6), (" 2 GiB ", 2 * 2**30), ("0.3GB", 3 * 10**8),
    (".5GB", 5 * 10**8), ("1.GB", 10**9), ("123", 123), ("123B", 123), ("1.5B", 1), ("0", 0),
    (4096, 4096),
])
def test_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "lots", "", "GB", "1.5", "-1GB", "1 6GiB", "5GBB", "5KI", "5 G B", "inf", "nan", "1e9",
    "²GB", "0x10", -3, True, 1.5, None,
])
def test_not_a_size_is_one_line_naming_the_flag(text):
    with pytest.raises(ValueError) as e:
        parse_size(text, "--max-ram")
    message = str(e.value)
    assert message.startswith(f"--max-ram {text!r} is not a size; write e.g. 5GB")
    assert "\n" not in message


def test_a_huge_input_is_not_echoed():
    with pytest.raises(ValueError) as e:
        parse_size("x" * 10**6)
    assert len(str(e.value)) < 200 and str(e.value).startswith("'xxx")
