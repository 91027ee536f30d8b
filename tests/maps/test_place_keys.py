"""Place ids: the documented byte limit per path part (a file name with its temporary name must fit in 255 bytes)."""

from __future__ import annotations

import pytest

from vprkit.errors import ConfigError
from vprkit.maps.places import FILE_NAME_MAX_BYTES, MAX_KEY_PART_BYTES, TEMP_NAME_EXTRA_BYTES, check_key


def test_each_part_of_a_key_fits_a_file_name_with_its_temporary_name():
    assert MAX_KEY_PART_BYTES + TEMP_NAME_EXTRA_BYTES == FILE_NAME_MAX_BYTES
    fits = "图" * 79 + ".jpg"  # 3 bytes per character: 241 bytes
    assert len(fits.encode()) == MAX_KEY_PART_BYTES
    assert check_key(fits) == fits
    assert check_key(f"floor-2/{fits}") == f"floor-2/{fits}"


@pytest.mark.parametrize("key", ["图" * 80 + ".jpg", "a/" + "图" * 81 + ".jpg", "é" * 121 + ".png"])
def test_a_part_longer_than_the_file_system_allows_is_refused_in_one_line(key):
    with pytest.raises(ConfigError, match=f"{MAX_KEY_PART_BYTES} per '/'-separated part") as info:
        check_key(key)
    assert "\n" not in str(info.value)
