"""Stable Audio 3's and stable-audio-tools' `PreEncodedDataset`, restated: how their training lists and
loads a folder output (for tests/test_sa3_outputs.py and tests/test_same_end_to_end.py), plus what the
run's records say is committed."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

SA3_COMMIT = "636f906fc0ee54b3f06edf974dc7d3aa99d6841b"   # Stability-AI/stable-audio-3
SAT_COMMIT = "50049e379e2fe8e35bffc99e57f23ade1c3471b7"   # Stability-AI/stable-audio-tools


# fast_scandir, identical in stable_audio_3/data/dataset.py at SA3_COMMIT and in
# stable_audio_tools/data/dataset.py at SAT_COMMIT (its blanket try/excepts left out: errors show here).

def fast_scandir(dir: str, ext: list):
    subfolders, files = [], []
    ext = ['.' + x if x[0] != '.' else x for x in ext]
    for f in os.scandir(dir):
        if f.is_dir():
            subfolders.append(f.path)
        elif f.is_file():
            file_ext = os.path.splitext(f.name)[1].lower()
            is_hidden = os.path.basename(f.path).startswith(".")
            if file_ext in ext and not is_hidden:
                files.append(f.path)
    for d in list(subfolders):
        sf, f = fast_scandir(d, ext)
        subfolders.extend(sf)
        files.extend(f)
    return subfolders, files


def sa3_latent_filenames(path: str, extension: str = "npy", filelist_path=None) -> list[tuple[str, str]]:
    """stable_audio_3/data/dataset.py at SA3_COMMIT, get_latent_filenames (what PreEncodedDataset.__init__
    lists, for one path): filelist.txt at the root if present, else a recursive scan; silence.npy
    dropped; each latent paired with `filename.replace(".npy", ".json")`."""
    filenames = []
    if filelist_path is None:
        filelist_path = os.path.join(path, "filelist.txt")
    if os.path.exists(filelist_path):
        with open(filelist_path, "r") as f:
            files = f.readlines()
            files = [os.path.join(path, file.strip()) for file in files]
            filenames.extend(files)
    else:
        _, files = fast_scandir(path, [extension])
        filenames.extend(files)
    filenames = [f for f in filenames if os.path.basename(f) != "silence.npy"]
    return [(filename, filename.replace(f".{extension}", ".json")) for filename in filenames]


def sat_latent_filenames(path: str, extensions=("npy",)) -> list[str]:
    """stable_audio_tools/data/dataset.py at SAT_COMMIT, get_latent_filenames: `path + "/filelist.txt"`
    if present, else a recursive scan (no silence.npy filter: without the filelist it would list it)."""
    filenames = []
    filelist_path = path + "/filelist.txt"
    if os.path.exists(filelist_path):
        with open(filelist_path, "r") as f:
            files = f.readlines()
            files = [os.path.join(path, file.strip()) for file in files]
            filenames.extend(files)
    else:
        _, files = fast_scandir(path, list(extensions))
        filenames.extend(files)
    return filenames


def sa3_silence(path: str):
    """PreEncodedDataset.__init__ at SA3_COMMIT: `np.load(silence.npy).squeeze(0)`, [C, N], when present."""
    silence_path = os.path.join(path, "silence.npy")
    return np.load(silence_path).squeeze(0) if os.path.exists(silence_path) else None


def sa3_getitem(latent_filename: str, md_filename: str, silence, latent_crop_length: int):
    """PreEncodedDataset.__getitem__ at SA3_COMMIT (random_crop=False), up to `info["audio"]`: crop a
    longer latent, pad a shorter one with the silence latent (sliced or tiled) and zeros in the mask.
    The original prints and returns another random item on any exception; here the exception shows."""
    latents = torch.from_numpy(np.load(latent_filename))
    with open(md_filename, "r") as f:
        info = json.load(f)
    info["latent_filename"] = latent_filename
    stored_length = latents.shape[1]
    if stored_length > latent_crop_length:
        last_ix = len(info["padding_mask"]) - 1 - info["padding_mask"][::-1].index(1)
        assert 0 <= last_ix < stored_length
        latents = latents[:, :latent_crop_length]
        info["padding_mask"] = info["padding_mask"][:latent_crop_length]
    elif stored_length < latent_crop_length:
        pad_needed = latent_crop_length - stored_length
        assert silence is not None, "wds-encode writes silence.npy: SA3 pads with it, not with zeros"
        if silence.shape[1] >= pad_needed:
            silence_pad = silence[:, :pad_needed]
        else:
            silence_pad = np.tile(silence, (1, (pad_needed // silence.shape[1]) + 1))[:, :pad_needed]
        latents = torch.cat([latents, torch.from_numpy(silence_pad)], dim=1)
        info["padding_mask"] = info["padding_mask"][:stored_length] + [0] * pad_needed
    info["padding_mask"] = [torch.tensor(info["padding_mask"])]
    assert isinstance(info["seconds_total"], int)
    return latents, info


def read_like_pre_encoded_datasets(out, latent_crop_length: int = 80) -> list[dict]:
    """Every window both readers list under OUT, loaded the way SA3's __getitem__ loads it; asserts the
    two readers list the same files. Returns the metadata of each listed window, in listing order."""
    path = str(out)
    sa3 = sa3_latent_filenames(path)
    assert [npy for npy, _ in sa3] == sat_latent_filenames(path)
    silence = sa3_silence(path)
    infos = []
    for npy, md in sa3:
        latents, info = sa3_getitem(npy, md, silence, latent_crop_length)
        assert latents.shape[1] == latent_crop_length == len(info["padding_mask"][0])
        infos.append(info)
    return infos



def records(out) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "manifest").glob("done/**/*.json")]


def committed_npys(out) -> set[str]:
    """The folder-layout windows the unit records list: what is committed."""
    return {f"{r['rank']}/{i}.npy" for r in records(out) for i in r.get("folder_ids", ())}


def filelist(out) -> list[str]:
    return (out / "filelist.txt").read_text().splitlines()
