"""Frame transforms: one crop box and one flip decision per video, applied to every frame and to depth.

- eval (and train with crop_scale=1): the centre square, resized to S x S.
- train: a random resized crop (area in [crop_scale, 1] of the frame, aspect in [3/4, 4/3]) and,
  with probability hflip, a left-right flip. A flip mirrors motion, so the sentences get
  "left" <-> "right" (and clockwise <-> counterclockwise) swapped; "right" meaning "correct"
  is swapped too, which is why flipping is off by default.

Letters: T frames, S size, H height, W width.
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


def centre_square(H: int, W: int) -> Box:
    side = min(H, W)
    top, left = (H - side) / 2 / H, (W - side) / 2 / W
    return top, left, top + side / H, left + side / W


def random_crop(H: int, W: int, rng: np.random.Generator, scale_min: float,
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Box:
    """Area in [scale_min, 1] of the frame and aspect w/h log-uniform in `ratio`; centre square if 10 draws miss."""
    if scale_min >= 1.0:
        return centre_square(H, W)
    for _ in range(10):
        area = H * W * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if w <= W and h <= H:
            top, left = rng.uniform(0, H - h), rng.uniform(0, W - w)
            return top / H, left / W, (top + h) / H, (left + w) / W
    return centre_square(H, W)


def crop_resize(x: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """(T, C, H, W) -> (T, C, S, S), same dtype; the box in fractions, rounded to pixels; antialiased bilinear."""
    H, W = x.shape[-2:]
    top, left = round(box[0] * H), round(box[1] * W)
    bottom, right = max(top + 1, round(box[2] * H)), max(left + 1, round(box[3] * W))
    x = x[..., top:bottom, left:right]  # (T, C, h, w)
    if tuple(x.shape[-2:]) == (size, size):
        return x.contiguous()
    if x.dtype == torch.uint8:  # torch's uint8 channels-last kernel: 4x faster than going through float
        y = Fn.interpolate(x.contiguous(memory_format=torch.channels_last), size=(size, size), mode="bilinear",
                           antialias=True, align_corners=False)
        return y.contiguous()  # (T, C, S, S)
    return Fn.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).to(x.dtype)


def mirror_text(text: str) -> str:
    """The sentence for the left-right mirrored video: "moves left" -> "moves right"."""
    def swap(m: re.Match) -> str:
        word = MIRROR[m.group(0).lower()]
        return word.upper() if m.group(0).isupper() else word.capitalize() if m.group(0)[0].isupper() else word

    return _MIRROR_RE.sub(swap, text)
