"""salt_of: the one builder of per-sample salts (named and numbered), pinned."""

import zlib

import pytest

from ue_lightning.ops.sample_rng import salt_of


def test_salt_of_named_and_numbered_salts_are_pinned():
    assert salt_of("step", 12, "eot", 3, 1) == zlib.crc32(b"step:12:eot:3:1")
    assert salt_of("em", 0, 1, 2) == zlib.crc32(b"em:0:1:2")
    assert salt_of(0x5C0E) == 0x5C0E and salt_of(2 * 3) == 6 and salt_of(1_000_003 * 2 + 4) == 2_000_010
    assert salt_of(True) == zlib.crc32(b"True")  # only a real int is numbered
    with pytest.raises(ValueError, match=">= 0"):
        salt_of(-1)
