import os

import numpy as np
import pytest

from jax_repvideo.video import VideoWriter, check_writable, read_frames, to_uint8


def _frames(n):
    return to_uint8(np.random.default_rng(0).uniform(-1, 1, (n, 32, 48, 3)))


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_round_trip_frame_count(tmp_path, suffix):
    path = tmp_path / f"v{suffix}"
    with VideoWriter(path, fps=8) as writer:
        writer.append(_frames(3))
        writer.append(_frames(1)[0])
    assert read_frames(path).shape == (4, 32, 48, 3)
    assert os.listdir(tmp_path) == [path.name]


def test_interrupted_run_leaves_valid_file_of_frames_so_far(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, fps=8) as writer:
            writer.append(_frames(5))
            raise KeyboardInterrupt
    assert read_frames(path).shape[0] == 5


def test_no_frames_leaves_no_file(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", fps=8):
        pass
    assert os.listdir(tmp_path) == []


def test_unwritable_output_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # running as root: permissions are not enforced
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(PermissionError, match="cannot create folder"):
            check_writable(blocker / "sub" / "v.mp4")
    else:
        with pytest.raises(PermissionError, match="not writable"):
            check_writable(locked / "v.mp4")
    with pytest.raises(ValueError, match="must end in"):
        check_writable(tmp_path / "v.avi")
