"""Phone videos: landscape pixels plus a display rotation. The reader shows them upright; a re-encode
bakes the rotation into the pixels (so depth from its frames is upright too); a copy keeps the matrix."""

import av
import numpy as np
import pytest

from shards.transcode import store
from shards.video import decode_at_times, rgb_to_yuv420p

H, W = 32, 48  # stored landscape


def rotated_mp4(path, degrees: int) -> np.ndarray:
    """4 frames, red block in the stored top-left corner, display rotation `degrees` (counter-clockwise,
    FFmpeg's convention). Returns the stored frame."""
    img = np.zeros((H, W, 3), np.uint8)
    img[:8, :12] = (255, 0, 0)
    with av.open(str(path), mode="w", format="mp4") as out:
        s = out.add_stream("libx264", rate=4)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.set_display_rotation(degrees)
        for _ in range(4):
            out.mux(s.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(img), format="yuv420p")))
        out.mux(s.encode())
    return img


def red_corner(frame: np.ndarray) -> str:
    h, w = frame.shape[:2]
    corners = {"top-left": frame[: h // 4, : w // 4], "top-right": frame[: h // 4, -w // 4:],
               "bottom-left": frame[-h // 4:, : w // 4], "bottom-right": frame[-h // 4:, -w // 4:]}
    return max(corners, key=lambda k: corners[k][..., 0].mean() - corners[k][..., 1].mean())


# Turning the picture counter-clockwise by 90 degrees brings its top-left corner to the bottom-left.
EXPECTED = {0: ((H, W), "top-left"), 90: ((W, H), "bottom-left"), 180: ((H, W), "bottom-right"),
            270: ((W, H), "top-right")}


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_reader_shows_rotated_video_upright(tmp_path, degrees):
    src = tmp_path / "phone.mp4"
    stored = rotated_mp4(src, degrees)
    frames = decode_at_times(src.read_bytes(), [0.0, 0.5])
    shape, corner = EXPECTED[degrees]
    assert frames.shape[1:3] == shape and red_corner(frames[0]) == corner
    np.testing.assert_allclose(frames[0].astype(float), np.rot90(stored, degrees // 90), atol=40)


@pytest.mark.parametrize("degrees", [90, 270])
def test_copy_keeps_the_rotation_and_reencode_bakes_it_into_the_pixels(tmp_path, degrees):
    src = tmp_path / "phone.mp4"
    rotated_mp4(src, degrees)
    shape, corner = EXPECTED[degrees]
    how, _ = store(str(src), str(tmp_path / "copy.mp4"))
    assert how == "copy" and red_corner(decode_at_times((tmp_path / "copy.mp4").read_bytes(), [0.0])[0]) == corner
    seen = []
    how, p = store(str(src), str(tmp_path / "small.mp4"), short_side=16, on_frame=seen.append)
    assert how == "reencode" and (p.width, p.height) == (16, 24)  # portrait as displayed, short side 16
    with av.open(str(tmp_path / "small.mp4")) as c:
        assert next(c.decode(video=0)).rotation == 0  # no matrix left: the pixels are upright
    frame = decode_at_times((tmp_path / "small.mp4").read_bytes(), [0.0])[0]
    assert frame.shape[:2] == (24, 16) and red_corner(frame) == corner
    assert seen[0].shape[:2] == (24, 16) and red_corner(seen[0]) == corner  # what a depth model is given
