"""Which moments of a long video become the M clips, and which sentence goes with each clip.

Strategies (DataConfig.clip_sampling):
- "sentences" (LF-VILA, the default): M consecutive sentences, one clip spanning each sentence.
  Train: a random run of M; eval: the first M.
- "uniform": the whole video cut into M equal clips.
- "window": M consecutive clips of `clip_seconds` each (the window is cut to the video if longer).
  Train: a random start; eval: the start of the video.
For "uniform" and "window" each clip gets the sentence that overlaps it most (else the nearest),
so two clips can share a sentence. Each clip contributes F frame times: train draws one random
point in each of F equal parts (stratified), eval takes their centres.

Letters: M clips, F frames per clip.
"""

from dataclasses import dataclass

import numpy as np

Span = tuple[str, float, float]  # (text, start, end) in seconds


@dataclass
class ClipPlan:
    times: np.ndarray  # (M*F,) seconds from the first frame, clip by clip
    texts: list[str]  # (M,)


def spans_in_video(sentences: list[dict], duration: float) -> list[Span]:
    """Sentence spans clipped into [0, duration]; those left empty (outside the video, reversed, NaN) dropped."""
    spans = [(s["text"], max(float(s["start"]), 0.0), min(float(s["end"]), duration)) for s in sentences]
    return [s for s in spans if s[2] > s[1]]


def plan_clips(strategy: str, spans: list[Span], duration: float, fps: float, num_frames: int, M: int, F: int,
               clip_seconds: float, rng: np.random.Generator | None) -> ClipPlan:
    """The frame times and texts of one sample; rng None = the deterministic eval plan.
    Needs len(spans) >= M for "sentences", >= 1 otherwise."""
    if strategy == "sentences":
        first = 0 if rng is None else int(rng.integers(len(spans) - M + 1))
        chosen = spans[first : first + M]
        segments, texts = [(a, b) for _, a, b in chosen], [t for t, _, _ in chosen]
    else:
        if strategy == "uniform":
            start, length = 0.0, duration
        elif strategy == "window":
            length = min(M * clip_seconds, duration)
            start = 0.0 if rng is None else float(rng.uniform(0.0, duration - length))
        else:
            raise ValueError(f"unknown clip_sampling {strategy!r}; allowed: sentences, uniform, window")
        edges = start + np.arange(M + 1) * length / M
        segments = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
        texts = [best_sentence(spans, a, b) for a, b in segments]
    last = max(num_frames - 1, 0) / fps  # the last frame's time
    times = [clip_times(a, b, F, rng) for a, b in segments]
    return ClipPlan(times=np.clip(np.concatenate(times), 0.0, last), texts=texts)


def clip_times(start: float, end: float, F: int, rng: np.random.Generator | None) -> np.ndarray:
    offsets = np.full(F, 0.5) if rng is None else rng.random(F)
    return start + (np.arange(F) + offsets) * (end - start) / F  # (F,)


def best_sentence(spans: list[Span], start: float, end: float) -> str:
    """The sentence overlapping [start, end] most; with no overlap, the one whose middle is nearest."""
    overlaps = [min(b, end) - max(a, start) for _, a, b in spans]
    i = int(np.argmax(overlaps))
    if overlaps[i] <= 0:
        middle = (start + end) / 2
        i = int(np.argmin([abs((a + b) / 2 - middle) for _, a, b in spans]))
    return spans[i][0]
