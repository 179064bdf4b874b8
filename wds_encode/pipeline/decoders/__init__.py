"""Encoded audio bytes -> a reader of source frames, through the decoder that reads the format best.

libsndfile (`sndfile.py`) for WAV, FLAC, AIFF, MP3 and Ogg: it seeks sample-exactly and decodes them
fastest. PyAV (`pyav.py`, FFmpeg) for the rest: AAC, Opus in WebM, WMA, AC-3, video containers. A file
libsndfile cannot open goes to PyAV too, so a mislabelled or unusual file still decodes.
"""

from __future__ import annotations

from . import pyav, sndfile
from .base import AudioDecodeError, AudioReader, LengthChanged

# Every suffix read as audio, in the order that picks a sample's audio when it has several members
# (`KEY.flac` before `KEY.mp3` before `KEY.m4a` before `KEY.mp4`): lossless first, then lossy audio
# files, then containers that usually hold video.
AUDIO_EXTENSIONS: tuple[str, ...] = ("flac", "wav", "aiff", "aif", "wv", "tta", "caf",
                                     "mp3", "ogg", "oga", "opus", "m4a", "m4b", "aac", "mp2", "mka", "webm", "wma",
                                     "ac3",
                                     "mp4", "mov", "m4v", "3gp", "mkv", "avi", "flv")

__all__ = ["AUDIO_EXTENSIONS", "AudioDecodeError", "AudioReader", "LengthChanged", "open_reader"]


def open_reader(data: bytes, ext: str, check_end: bool = True, whole: bool = False) -> AudioReader:
    """A reader over `data` (the bytes of a `.ext` file) with its length established; every failure is an
    AudioDecodeError saying what each decoder said. `check_end`: also verify a declared length by
    seeking to it where that is costly to trust (MP3). `whole`: every frame will be read (a split)."""
    if not data:
        raise AudioDecodeError(f"no audio frames: empty .{ext} data")
    if ext in sndfile.EXTENSIONS:
        try:
            reader = sndfile.open_sndfile(data, ext, check_end, whole)
        except AudioDecodeError:
            raise
        except Exception as sf_exc:  # libsndfile cannot open it: perhaps FFmpeg can
            said = str(getattr(sf_exc, "error_string", None) or sf_exc)
            try:
                reader = pyav.open_pyav(data, ext)
            except AudioDecodeError as av_exc:
                raise AudioDecodeError(f"cannot decode .{ext} audio (undecodable or unsupported format): "
                                       f"libsndfile says {said!r}; {av_exc}") from sf_exc
    else:
        reader = pyav.open_pyav(data, ext)
    if reader.frames <= 0:
        reader.close()
        raise AudioDecodeError(f"no audio frames in .{ext} data")
    if reader.sample_rate <= 0 or reader.channels <= 0:
        reader.close()
        raise AudioDecodeError(f"invalid .{ext} stream: {reader.sample_rate} Hz, {reader.channels} channels")
    return reader
