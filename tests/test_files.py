"""atomic_write: whole files only, and the permissions asked for."""

from __future__ import annotations

import stat

from spatial_entropy.files import atomic_write


def test_mode_sets_the_permissions_and_leaves_no_temporary_file(tmp_path):
    shared, private = tmp_path / "cache.npz", tmp_path / "step.pt"
    atomic_write(shared, b"data", mode=0o644)
    atomic_write(private, b"data")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600  # mkstemp's private default
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.npz", "step.pt"]
    assert shared.read_bytes() == b"data"
