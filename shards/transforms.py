"""Frame transforms: one crop box and one flip decision per video, applied to every frame and to depth.

Every box has the output's aspect ratio h/w (data.size: a square, or e.g. 192 x 320), up to the train jitter:
- eval (and train with crop_scale=1): the largest centred box of that aspect, resized to h x w.
- train: a random resized crop (area in [crop_scale, 1] of the frame, aspect within [3/4, 4/3] of the
  output's) and, with probability hflip, a left-right flip. A flip mirrors motion, so the sentences get
  "left" <-> "right" (and clockwise <-> counterclockwise) swapped; "right" meaning "correct"
  is swapped too, which is why flipping is off by default.

Letters: T frames, H x W the source frame, h x w the output (data.size).
"""

import math
import re

import numpy as np
import torch
import torch.nn.functional as Fn

Box = tuple[float, float, float, float]  # (top, left, bottom, right) as fractions of the frame

MIRROR = {"left": "right", "right": "left", "leftward": "rightward", "rightward": "leftward",
          "leftwards": "rightwards", "rightwards": "leftwards", "clockwise": "counterclockwise",
          "counterclockwise": "clockwise", "counter-clockwise": "clockwise", "anticlockwise": "clockwise",
          "anti-clockwise": "clockwise"}
_MIRROR_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, MIRROR), key=len, reverse=True)) + r")\b",
                        re.IGNORECASE)


def centre_crop(H: int, W: int, hw: tuple[int, int] = (1, 1)) -> Box:
    """The largest centred box with aspect h/w in an H x W frame (hw=(1, 1): the centre square)."""
    h, w = hw
    bh, bw = (W * h / w, W) if H * w >= W * h else (H, H * w / h)  # box height, width in pixels
    top, left = (H - bh) / 2 / H, (W - bw) / 2 / W
    return top, left, top + bh / H, left + bw / W


def random_crop(H: int, W: int, rng: np.random.Generator, scale_min: float, hw: tuple[int, int] = (1, 1),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """Area in [scale_min, 1] of the frame and aspect (box w/h) / (output w/h) log-uniform in `ratio`;
    the centre crop if 10 draws miss."""
    if scale_min >= 1.0:
        return centre_crop(H, W, hw)
    for _ in range(10):
        area = H * W * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]))) * (hw[1] / hw[0])  # box w/h
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= W and h <= H:
            top, left = rng.uniform(0, H - h), rng.uniform(0, W - w)
            return top / H, left / W, (top + h) / H, (left + w) / W
    return centre_crop(H, W, hw)


def crop_resize(x: torch.Tensor, box: Box, hw: tuple[int, int]) -> torch.Tensor:
    """(T, C, H, W) -> (T, C, h, w), same dtype; the box in fractions, rounded to pixels; antialiased bilinear."""
    H, W = x.shape[-2:]
    hw = tuple(hw)
    top, left = round(box[0] * H), round(box[1] * W)
    bottom, right = max(top + 1, round(box[2] * H)), max(left + 1, round(box[3] * W))
    x = x[..., top:bottom, left:right]  # (T, C, box height, box width)
    if tuple(x.shape[-2:]) == hw:
        return x.contiguous()
    if x.dtype == torch.uint8:  # torch's uint8 channels-last kernel: 4x faster than going through float
        y = Fn.interpolate(x.contiguous(memory_format=torch.channels_last), size=hw, mode="bilinear",
                           antialias=True, align_corners=False)
        return y.contiguous()  # (T, C, h, w)
    return Fn.interpolate(x.float(), size=hw, mode="bilinear", antialias=True, align_corners=False).to(x.dtype)


def mirror_text(text: str) -> str:
    """The sentence for the left-right mirrored video: "moves left" -> "moves right"."""
    def swap(m: re.Match) -> str:
        word = MIRROR[m.group(0).lower()]
        return word.upper() if m.group(0).isupper() else word.capitalize() if m.group(0)[0].isupper() else word

    return _MIRROR_RE.sub(swap, text)
