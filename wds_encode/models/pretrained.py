"""`--pretrained-name NAME` -> (model config file, checkpoint file), from disk first.

NAME is a folder (`is_local_path`: never looked up in the hub's cache), or a Hugging Face repo id
(`stabilityai/stable-audio-open-1.0`) looked up in the local Hugging Face cache (`$HF_HUB_CACHE`, else
`$HF_HOME/hub`, else `~/.cache/huggingface/hub`). Only with `allow_download` and `huggingface_hub`
installed is the network used. When a folder has both a VAE pair (`vae_config.json` + `vae_model.*`)
and a whole-model pair (`model_config.json` + `model.*`), the VAE pair wins: encoding needs only the
autoencoder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ModelConfigError

# (config name, checkpoint names in order of preference)
PAIRS = (
    ("vae_config.json", ("vae_model.safetensors", "vae_model.ckpt")),
    ("model_config.json", ("model.safetensors", "model.ckpt")),
)
WANTED_FILES = [name for config, ckpts in PAIRS for name in (config, *ckpts)]


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return home / "hub"


def model_files_in(folder: Path) -> tuple[Path, Path] | None:
    """The (config, checkpoint) pair in a model folder, or None."""
    for config_name, ckpt_names in PAIRS:
        config = folder / config_name
        if config.is_file():
            for ckpt_name in ckpt_names:
                if (folder / ckpt_name).is_file():
                    return config, folder / ckpt_name
    return None


def cached_snapshot(repo_id: str, cache: Path) -> Path | None:
    """The snapshot folder `refs/main` points to in the HF cache layout (else the newest one)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text().strip()
        if pinned.is_dir():
            return pinned
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


# A Hugging Face repo id: `name` or `org/name`, letters, digits, `-`, `_`, `.` (not first)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_local_path(name: str) -> bool:
    """NAME means a place on disk, not a Hugging Face repo id: it exists, starts with `/`, `.` or `~`, or has
    a path separator without the hub's `org/name` shape."""
    if os.path.exists(os.path.expanduser(name)) or name.startswith(("/", ".", "~")):
        return True
    if os.sep in name or (os.altsep is not None and os.altsep in name):
        return _HUB_ID.fullmatch(name) is None
    return False


def _expected_files() -> str:
    return " or ".join(f"{config} + {' / '.join(ckpts)}" for config, ckpts in PAIRS)


def resolve_pretrained(name: str, *, allow_download: bool = False) -> tuple[Path, Path]:
    """(config, checkpoint) for NAME; a ModelConfigError saying where it looked otherwise."""
    looked: list[str] = []
    folder = Path(name).expanduser()
    if is_local_path(name):   # a folder, never looked up in the Hugging Face cache
        if not folder.exists():
            raise ModelConfigError(f"--pretrained-name {name!r}: no model found: folder {folder} does not exist "
                                   "(a local path; a Hugging Face repo id looks like org/name)")
        if not folder.is_dir():
            raise ModelConfigError(f"--pretrained-name {name!r}: no model found: {folder} is a file, not a model "
                                   f"folder (expected a folder holding {_expected_files()}); for one config and "
                                   "checkpoint file use --model-config and --ckpt-path")
        found = model_files_in(folder)
        if found:
            return found
        present = sorted(p.name for p in folder.iterdir())
        have = (f"it holds {', '.join(present[:8])}{', ...' if len(present) > 8 else ''}" if present
                else "it is empty")
        raise ModelConfigError(f"--pretrained-name {name!r}: no model found: folder {folder} has no model config "
                               f"with its weights (expected files: {_expected_files()}; {have}); put them there, or "
                               "pass the files with --model-config and --ckpt-path")
    cache = hf_cache_dir()
    snapshot = cached_snapshot(name, cache)
    if snapshot is not None:
        found = model_files_in(snapshot)
        if found:
            return found
        looked.append(f"Hugging Face cache snapshot {snapshot} (incomplete)")
    else:
        looked.append(f"Hugging Face cache {cache} (no models--{name.replace('/', '--')})")
    if allow_download:
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            looked.append("download: huggingface_hub is not installed (pip install huggingface_hub)")
        else:
            path = Path(snapshot_download(name, allow_patterns=WANTED_FILES, cache_dir=str(cache)))
            found = model_files_in(path)
            if found:
                return found
            looked.append(f"downloaded snapshot {path} (has none of {WANTED_FILES})")
    raise ModelConfigError(
        f"--pretrained-name {name!r}: no model found. Looked in: " + "; ".join(looked) + ". Provide it with "
        f"`huggingface-cli download {name} model_config.json model.safetensors` (then rerun), by passing a "
        "folder holding model_config.json + model.safetensors, or with --model-config and --ckpt-path"
        + ("" if allow_download else "; or allow the download with --allow-download"))
