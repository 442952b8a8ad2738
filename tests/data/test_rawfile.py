"""Box reads and writes of a contiguous on-disk array agree with numpy indexing."""

from __future__ import annotations

import numpy as np
import pytest

from bioflow.data.rawfile import RawArrayFile


@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 6, 5), (3, 4, 5, 6)])
def test_random_reads_and_writes_match_numpy(shape, tmp_path):
    rng = np.random.default_rng(len(shape))
    a = rng.integers(0, 1000, shape).astype(np.uint16)
    path = tmp_path / "data.bin"
    path.write_bytes(b"header-bytes!" + a.tobytes())
    reader = RawArrayFile(path, 13, shape, np.uint16)
    for _ in range(200):
        key = []
        for n in shape:
            if rng.integers(0, 3) == 0:
                key.append(int(rng.integers(-n, n)))
            else:
                lo, hi = sorted(rng.integers(0, n + 1, 2))
                key.append(slice(int(lo), int(hi), int(rng.integers(1, 3))))
        assert np.array_equal(reader[tuple(key)], a[tuple(key)]), key
    writer = RawArrayFile(path, 13, shape, np.uint16, writable=True)
    expected = a.copy()
    for _ in range(50):
        start = [int(rng.integers(0, n)) for n in shape]
        size = [int(rng.integers(1, n - s + 1)) for s, n in zip(start, shape)]
        block = rng.integers(0, 1000, size).astype(np.uint16)
        writer.write(start, block)
        expected[tuple(slice(s, s + z) for s, z in zip(start, size))] = block
    writer.close()
    assert np.array_equal(np.fromfile(path, np.uint16, offset=13).reshape(shape), expected)


def test_short_file_is_an_error(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(OSError, match="unexpected end of file"):
        RawArrayFile(path, 0, (100,), np.uint8)[:]
