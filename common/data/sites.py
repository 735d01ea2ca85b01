"""Simulated sites streamed on demand: frames of generated scenes (:func:`common.data.clips.clips.streamed_site_frame`)
or of a photo corpus's held-out photographs (:func:`common.data.clips.photovideo.photo_site_frame`), computed when a row
is read, never held."""

from __future__ import annotations

import numpy as np

from .clips import streamed_site_frame
from .photovideo import corpus_photos, photo_site_frame


class StreamedSite:
    """The rows of a simulated site of ``frames`` frames in clips of ``clip_frames``, generated when a row is
    read (:func:`streamed_site_frame`), never held: row ``i`` is a frame (``unit`` 1) or a segment of ``unit``
    consecutive frames of one clip. A sequence: ``len``, indexing, and slicing (a view)."""

    def __init__(
        self,
        site: int,
        frames: int,
        width: int,
        height: int,
        clip_frames: int,
        unit: int = 1,
        rows=None,
        photos: tuple | None = None,
    ):
        self.site, self.frames, self.width, self.height = site, frames, width, height
        self.clip_frames, self.unit, self.photos = clip_frames, unit, photos
        per_clip = clip_frames // unit
        total = (frames // clip_frames) * per_clip + (frames % clip_frames) // unit
        self._rows = range(total) if rows is None else rows
        self._per_clip = per_clip

    def __len__(self) -> int:
        return len(self._rows)

    def _frame(self, clip: int, t: int) -> np.ndarray:
        if self.photos:
            return photo_site_frame(self.photos, self.site, clip, t, self.width, self.height, self.clip_frames)
        return streamed_site_frame(self.site, clip, t, self.width, self.height, self.clip_frames)

    def clip(self, c: int):
        """The frames of clip ``c``, streamed (the final compression's input)."""
        length = min(self.clip_frames, self.frames - c * self.clip_frames)
        return (self._frame(c, t) for t in range(length))

    @property
    def clips(self) -> int:
        return -(-self.frames // self.clip_frames)

    def __getitem__(self, i):
        if isinstance(i, slice):
            args = (self.site, self.frames, self.width, self.height, self.clip_frames, self.unit)
            return StreamedSite(*args, rows=self._rows[i], photos=self.photos)
        row = self._rows[i]
        clip, k = divmod(row, self._per_clip)
        if self.unit == 1:
            return self._frame(clip, k)
        return [self._frame(clip, k * self.unit + j) for j in range(self.unit)]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def simulated_site(site: int, rc, unit: int = 1) -> StreamedSite | None:
    """A simulated site streamed on demand when the run asks for one (``rc``: a RunConfig): ``site-frames`` frames
    (else ``demo-clips`` × ``demo-frames``) of generated scenes, or of the held-out photographs of a photo corpus
    (``demo-photos``); None: the in-memory demo clips."""
    if not rc.streamed_sites:
        return None
    photos = None
    if rc.demo_photos:
        photos = tuple(corpus_photos(rc.demo_photos, held_out=True))
    frames = rc.site_frames or rc.demo_clips * rc.demo_frames
    return StreamedSite(site, frames, rc.demo_width, rc.demo_height, rc.demo_frames, unit, photos=photos)
