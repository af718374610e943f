"""Per-frame depth at build time from a local `transformers` depth-estimation checkpoint folder.

The folder holds a model (e.g. DPT, Depth Anything) and its image processor, as written by
`save_pretrained`; nothing is downloaded. Models predict relative inverse depth (larger = nearer);
the shards store what the synthetic corpus stores, a distance-like map in [0, 1] where smaller is
nearer: 1 - (d - min) / (max - min), with min and max over the whole video so frames compare.
"""

import functools

import numpy as np
import torch
import torch.nn.functional as Fn


@functools.cache
def load(path: str):
    """(image processor, model) from a local folder, once per process."""
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(path, local_files_only=True).eval()
    return processor, model


class DepthMaps:
    """Feed frames one by one with `add`; `result()` gives (T, h, w) float16, h x w = the frame's
    aspect with short side `short_side`."""

    def __init__(self, model_path: str, short_side: int = 64, batch: int = 8):
        self.processor, self.model = load(model_path)
        self.short_side, self.batch = short_side, batch
        self.pending: list[np.ndarray] = []
        self.maps: list[torch.Tensor] = []  # (n, h, w) float32 inverse depth per batch

    def add(self, rgb: np.ndarray) -> None:
        self.pending.append(rgb)
        if len(self.pending) == self.batch:
            self._run()

    @torch.no_grad()
    def _run(self) -> None:
        H, W, _ = self.pending[0].shape
        s = self.short_side / min(H, W)
        size = (max(1, round(H * s)), max(1, round(W * s)))
        inputs = self.processor(images=self.pending, return_tensors="pt")
        pred = self.model(**inputs).predicted_depth  # (n, h', w')
        pred = Fn.interpolate(pred[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
        self.maps.append(pred)  # (n, h, w)
        self.pending = []

    def result(self) -> np.ndarray:
        if self.pending:
            self._run()
        inverse = torch.cat(self.maps)  # (T, h, w)
        lo, hi = inverse.min(), inverse.max()
        if hi - lo < 1e-12:
            return np.ones(inverse.shape, np.float16)
        return (1 - (inverse - lo) / (hi - lo)).numpy().astype(np.float16)
