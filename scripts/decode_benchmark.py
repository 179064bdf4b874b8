#!/usr/bin/env python
"""How fast the data path reads each format, against the bare decoder, per CPU second, in one process.

For each format (FLAC, WAV, MP3, Ogg Vorbis, Opus in WebM, AAC in M4A) it writes one tar of `--files`
stereo files of `--seconds` (synthetic music, `wds_encode.synth`), then measures, each on its own:

- decoder: the decoder alone on the tar's members, already in memory: libsndfile's `sf.read` for what
  it reads, PyAV's decode loop with each frame as a NumPy array for the rest (what `decoders/pyav.py`
  runs); no tar, no windows.
- reader:  `Reader.read_shard` on the tar: the tar stream, the decode, channel conform, resampling
  where the rates differ, every window of the file (`--chunking split`) with its metadata.

Two settings: files at the model's rate (44.1 kHz; Opus is always 48 kHz), and files at 48 kHz resampled
to the model's 44.1 kHz. Figures are seconds of audio per CPU second (real-time factor per core), and
reader / decoder. Writes JSON (`--out`) and prints a table.

    python scripts/decode_benchmark.py --out benchmarks/decode-cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from wds_encode.pipeline.reader import Reader, ReaderOptions, ShardEnd, WindowItem
from wds_encode.pipeline.sources import Shard
from wds_encode.synth import encode_audio_bytes, synth_waveform

FORMATS = {"flac": "flac", "wav": "wav", "mp3": "mp3", "ogg": "ogg", "webm": "webm", "m4a": "m4a"}
MODEL_RATE = 44100
SAMPLE_SIZE = 1 << 17   # about 3 s at 44.1 kHz: Stable Audio-sized windows are longer, fewer per file
KINDS = ("chord", "pluck", "sweep", "noise")


def make_tar(folder: Path, ext: str, files: int, seconds: float, rate: int) -> tuple[Path, list[bytes]]:
    rate = 48000 if ext == "webm" else rate
    members = []
    for i in range(files):
        audio = synth_waveform(KINDS[i % len(KINDS)], seconds, rate, 2, np.random.default_rng(i))
        members.append((f"s{i:04d}.{ext}", encode_audio_bytes(audio, rate, ext)))
    path = folder / f"{ext}-{rate}.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, [data for _, data in members]


def decode_alone(ext: str, data: bytes) -> int:
    """Frames decoded by the bare decoder."""
    if ext in ("webm", "m4a"):
        import av
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.audio[0]
            stream.codec_context.thread_count = 1
            return sum(frame.to_ndarray().shape[-1] for frame in container.decode(stream))
    import soundfile as sf
    return len(sf.read(io.BytesIO(data), dtype="float32", always_2d=True)[0])


def cpu_timed(functions: list, repeats: int) -> list[float]:
    """CPU seconds of this process per call of each function, the best of `repeats`; the functions take
    turns, so a machine that speeds up or slows down part-way weighs on each alike."""
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.process_time()
            function()
            best[index] = min(best[index], time.process_time() - start)
    return best


def measure(ext: str, tar: Path, members: list[bytes], seconds_of_audio: float, repeats: int) -> dict:
    shard = Shard(url=str(tar), dataset_id="bench", name=tar.stem, size=tar.stat().st_size)
    options = ReaderOptions(sample_rate=MODEL_RATE, channels=2, sample_size=SAMPLE_SIZE, chunking="split")
    windows = []

    def read() -> None:
        items = list(Reader([shard], options).read_shard(shard))
        assert isinstance(items[-1], ShardEnd) and not items[-1].errors, items[-1].errors
        windows.append(sum(isinstance(i, WindowItem) for i in items))

    decoder, reader = cpu_timed([lambda: [decode_alone(ext, data) for data in members], read], repeats)
    return {"format": ext, "audio_seconds": seconds_of_audio, "windows": windows[-1],
            "decoder_x": seconds_of_audio / decoder, "reader_x": seconds_of_audio / reader,
            "reader_over_decoder": decoder / reader}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each measurement")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wds-decode-benchmark"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)   # as in a decode worker
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting, rate in (("model rate", MODEL_RATE), ("resampled", 48000)):
        for ext in args.formats.split(","):
            tar, members = make_tar(args.workdir, ext, args.files, args.seconds, rate)
            row = measure(ext, tar, members, args.files * args.seconds, args.repeats)
            row["setting"] = setting if ext != "webm" or rate != MODEL_RATE else "resampled (Opus: 48 kHz)"
            row["source_rate"] = 48000 if ext == "webm" else rate
            rows.append(row)
            print(f"{row['setting']:>24}  {ext:>5}  decoder {row['decoder_x']:8.0f}x  reader {row['reader_x']:8.0f}x"
                  f"  reader/decoder {row['reader_over_decoder']:.2f}", flush=True)
    result = {"benchmark": "decode", "files": args.files, "seconds_per_file": args.seconds, "channels": 2,
              "sample_size": SAMPLE_SIZE, "model_rate": MODEL_RATE, "cpu": platform.processor() or platform.machine(),
              "python": sys.version.split()[0], "torch": torch.__version__, "rows": rows,
              "unit": "seconds of audio per CPU second of one process (real-time factor per core)"}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
