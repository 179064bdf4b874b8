"""What this code needs of torch and torchaudio, checked once at start.

A cluster whose CUDA driver pins an older torch would otherwise fail after the model loaded (the
DataLoader's `in_order=` is torch 2.6), or in ways that hide the cause. `TORCH_NEEDS` names each
feature that sets the floor and the release that brought it; `TORCH_FLOOR` is the newest of them
and is what pyproject.toml declares (a test keeps the three in agreement and scans the package for
the features). torchaudio is released in step with torch: only its sinc resampler and mel
spectrogram are used, and its floor is the matching release.
"""

from __future__ import annotations

import re

from .config import ConfigError

# feature -> (torch release that brought it, a regular expression that finds its use in the package)
TORCH_NEEDS = {
    "DataLoader(in_order=...)": ("2.6", r"\bin_order\s*="),
    "torch.load(mmap=...)": ("2.1", r"torch\.load\([^)]*\bmmap\s*="),
    "torch.compile": ("2.0", r"\btorch\.compile\("),
    "scaled_dot_product_attention": ("2.0", r"\bscaled_dot_product_attention\("),
}
TORCH_FLOOR = "2.6"
TORCHAUDIO_FLOOR = "2.6"


def release(version: str) -> tuple[int, int]:
    """`2.6.0+cu124` -> (2, 6): the release a version string names (local and pre-release tags ignored)."""
    match = re.match(r"\s*(\d+)\.(\d+)", version)
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_versions(torch_version: str, torchaudio_version: str | None) -> None:
    """Raise ConfigError (exit 2) when torch or torchaudio is older than what the code needs."""
    problems = []
    if release(torch_version) < release(TORCH_FLOOR):
        needs = ", ".join(f for f, (v, _) in TORCH_NEEDS.items() if release(torch_version) < release(v))
        problems.append(f"torch {torch_version} is older than {TORCH_FLOOR} (needed for {needs})")
    if torchaudio_version is not None and release(torchaudio_version) < release(TORCHAUDIO_FLOOR):
        problems.append(f"torchaudio {torchaudio_version} is older than {TORCHAUDIO_FLOOR}")
    if problems:
        raise ConfigError("; ".join(problems) + f": install torch>={TORCH_FLOOR} with the matching torchaudio "
                          f"(pip install 'torch>={TORCH_FLOOR}' 'torchaudio>={TORCHAUDIO_FLOOR}', for your CUDA)")


def check_installed() -> None:
    """The check, for the torch and torchaudio this process imports."""
    import torch
    try:
        import torchaudio
        audio_version = torchaudio.__version__
    except Exception:  # a broken torchaudio fails later where it is used, with its own message
        audio_version = None
    check_versions(torch.__version__, audio_version)
