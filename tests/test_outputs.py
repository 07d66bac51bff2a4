"""How outputs are written (``emocompress.outputs``): with the permissions of a plain write, and never over the
current directory or a folder above it."""

import os
import stat

import pytest

from emocompress.outputs import atomic_dir, atomic_file, atomic_write_text


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_a_plain_mkdir_or_open_would(tmp_path, umask):
    # A server running as another user must be able to read an export when the umask lets it (022), and
    # must not when the umask says private (077): whatever mkdir/open would do, outputs do.
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "a.txt").write_text("x")
        atomic_write_text(tmp_path / "file.txt", "x")
        with atomic_file(tmp_path / "file.bin", "wb") as f:
            f.write(b"x")
        (tmp_path / "plain").mkdir()
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "folder") == _mode(tmp_path / "plain") == 0o777 & ~umask
    assert _mode(tmp_path / "file.txt") == _mode(tmp_path / "file.bin") == _mode(tmp_path / "plain.txt") \
        == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin", "file.txt", "folder", "plain", "plain.txt"]
