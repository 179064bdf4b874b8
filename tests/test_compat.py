"""compat.py: the declared torch floor is what the code needs, and an older torch is refused clearly."""

import re
from pathlib import Path

import pytest

from wds_encode import compat
from wds_encode.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def declared_floor(package: str) -> str:
    """The `>=` bound of `package` in pyproject.toml's dependencies (read as text: tomllib is Python 3.11+)."""
    return re.search(rf'"{package}\s*>=\s*([\d.]+)', (ROOT / "pyproject.toml").read_text()).group(1)


def package_source() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "wds_encode").rglob("*.py")) if p.name != "compat.py")


def test_pyproject_declares_the_floor_the_code_needs():
    assert declared_floor("torch") == compat.TORCH_FLOOR
    assert declared_floor("torchaudio") == compat.TORCHAUDIO_FLOOR
    source = package_source()
    used = {feature: version for feature, (version, pattern) in compat.TORCH_NEEDS.items()
            if re.search(pattern, source)}
    assert "DataLoader(in_order=...)" in used, "the runner's DataLoader takes in_order="
    # the floor is the newest release among the features the package uses: not lower (it would break),
    # not higher (it would turn away clusters that work)
    assert max(used.values(), key=compat.release) == compat.TORCH_FLOOR


def test_a_pattern_finds_what_it_names():
    assert re.search(compat.TORCH_NEEDS["DataLoader(in_order=...)"][1], "DataLoader(r, in_order=False)")
    assert re.search(compat.TORCH_NEEDS["torch.load(mmap=...)"][1], 'torch.load(p, map_location="cpu", mmap=m)')
    assert not re.search(compat.TORCH_NEEDS["DataLoader(in_order=...)"][1], "keep_in_order = True")


@pytest.mark.parametrize("torch_version, audio_version, ok", [
    ("2.6.0+cu124", "2.6.0+cu124", True),
    ("2.14.1+cu130", "2.11.0+cu130", True),
    ("2.5.1", "2.5.1", False),
    ("2.6.0", "2.5.0", False),
    ("1.13.1", None, False),
])
def test_an_older_torch_is_refused_with_what_to_install(torch_version, audio_version, ok):
    if ok:
        compat.check_versions(torch_version, audio_version)
        return
    with pytest.raises(ConfigError) as info:
        compat.check_versions(torch_version, audio_version)
    text = str(info.value)
    assert f"torch>={compat.TORCH_FLOOR}" in text and "older than" in text
    if compat.release(torch_version) < compat.release(compat.TORCH_FLOOR):
        assert "in_order" in text


def test_the_installed_versions_pass():
    compat.check_installed()


def test_release_reads_local_and_pre_release_versions():
    assert compat.release("2.6.0+cu124") == (2, 6)
    assert compat.release("2.10.0a0+git1234") == (2, 10)
    assert compat.release("2.10.0") > compat.release("2.9.1")
