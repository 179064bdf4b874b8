"""Reading stable-audio-tools checkpoints: only the tensors the encoder needs, strictly checked.

Why this exists instead of `model.load_state_dict(torch.load(...))`:
- checkpoints come as `.ckpt` (Lightning, `{"state_dict": ...}`), `.pt/.pth`, or `.safetensors`;
- the autoencoder may be nested under a prefix (`pretransform.model.` inside a diffusion model,
  `autoencoder.` in a training-wrapper checkpoint, ...);
- a diffusion checkpoint is mostly *not* the autoencoder, so safetensors are read lazily and only
  the wanted tensors are materialised;
- upstream convs are weight-normed (`weight_g` / `weight_v`, or the newer parametrizations
  naming); our model holds plain `weight`, so the pair is folded here, once.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from .errors import CheckpointError

# Tried in this order; the first one under which `encoder.*` keys exist wins.
KNOWN_PREFIXES = (
    "",
    "autoencoder.",             # AutoencoderTrainingWrapper Lightning checkpoint
    "pretransform.model.",      # diffusion model state dict (e.g. Stable Audio Open safetensors)
    "model.",
    "diffusion.pretransform.model.",  # DiffusionCondTrainingWrapper Lightning checkpoint
)

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)

# (suffix, role): weight-norm storage conventions -> "g" (magnitude) / "v" (direction)
_WEIGHT_NORM_SUFFIXES = (
    (".weight_g", "g"),
    (".weight_v", "v"),
    (".parametrizations.weight.original0", "g"),
    (".parametrizations.weight.original1", "v"),
)

_MAX_LISTED = 20


def _fmt_keys(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    if not keys:
        return "none"
    shown = ", ".join(keys[:_MAX_LISTED])
    if len(keys) > _MAX_LISTED:
        shown += f", ... and {len(keys) - _MAX_LISTED} more"
    return f"({len(keys)}) {shown}"


class _TensorSource:
    """Uniform `keys()` / `get(key)` over a torch pickle or a lazily opened safetensors file."""

    def __init__(self, path: Path, *, allow_unsafe_pickle: bool = False):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        self._st = None
        self._dict: Mapping[str, torch.Tensor] | None = None
        if self._is_safetensors(path):
            self._open_safetensors()
        else:
            self._dict = self._load_torch(allow_unsafe_pickle)

    @staticmethod
    def _is_safetensors(path: Path) -> bool:
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            return True
        if suffix in TORCH_SUFFIXES:
            return False
        # unknown extension: sniff. safetensors = u64 header length then a JSON object.
        with path.open("rb") as fh:
            head = fh.read(9)
        return len(head) == 9 and head[8:9] == b"{"

    def _open_safetensors(self) -> None:
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise CheckpointError("reading .safetensors needs the 'safetensors' package") from exc
        try:
            self._st = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read safetensors checkpoint {self.path}: {exc}") from exc

    def _load_torch(self, allow_unsafe_pickle: bool) -> Mapping[str, torch.Tensor]:
        # mmap keeps a multi-GB diffusion checkpoint out of RAM; only zip-format files support it.
        mmap = zipfile.is_zipfile(self.path)
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            if not allow_unsafe_pickle:
                raise CheckpointError(
                    f"cannot load {self.path} with torch.load(weights_only=True): "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n"
                    "The file is corrupt or holds pickled Python objects besides tensors. "
                    "If you trust its source, pass --allow-unsafe-pickle (allow_unsafe_pickle=True; this runs "
                    "arbitrary code from the file), or convert it to .safetensors."
                ) from exc
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=False, mmap=mmap)
            except Exception as exc2:
                raise CheckpointError(f"cannot load checkpoint {self.path}: {exc2}") from exc2
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{self.path} does not hold a state dict (got {type(obj).__name__}); expected "
                "a mapping of tensors or {'state_dict': {...}}")
        return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}

    def keys(self) -> list[str]:
        if self._st is not None:
            return list(self._st.keys())
        assert self._dict is not None
        return list(self._dict.keys())

    def get(self, key: str) -> torch.Tensor:
        if self._st is not None:
            return self._st.get_tensor(key)
        assert self._dict is not None
        return self._dict[key]


def _candidate_prefixes(keys: Iterable[str]) -> list[str]:
    """Prefixes (ending in '.') under which some `encoder.` key lives, for error hints."""
    found: set[str] = set()
    for key in keys:
        for m in re.finditer(r"(?:^|(?<=\.))encoder\.", key):
            found.add(key[: m.start()])
    return sorted(found)


def detect_prefix(keys: list[str], key_prefix: str | None, source: Path | str) -> str:
    """Return the prefix under which the autoencoder's `encoder.*` keys live."""
    tried = [key_prefix] if key_prefix is not None else list(KNOWN_PREFIXES)
    for prefix in tried:
        probe = prefix + "encoder."
        if any(k.startswith(probe) for k in keys):
            return prefix
    hints = [p for p in _candidate_prefixes(keys) if p not in tried]
    msg = (f"no autoencoder encoder weights found in {source}: tried key prefixes "
           f"{[p or '(none)' for p in tried]} (looking for '<prefix>encoder.*').")
    if hints:
        msg += f" Keys containing 'encoder.' exist under {hints[:10]}: pass key_prefix=... ."
    else:
        sample = sorted(keys)[:5]
        msg += (f" The file has {len(keys)} tensors, e.g. {sample}; is it an autoencoder or "
                "diffusion checkpoint from stable-audio-tools?")
    raise CheckpointError(msg)


def norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    """L2 norm over every dim except 0, shaped to broadcast against `v` (torch's weight_norm)."""
    return v.reshape(v.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (v.dim() - 1)))


def fold_weight_norm_pair(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight = v * (g / ||v||), computed in at least float32, returned in v's dtype."""
    compute = torch.promote_types(v.dtype, torch.float32)
    v32 = v.to(compute)
    g32 = g.to(compute).reshape(-1, *([1] * (v.dim() - 1)))
    return (v32 * (g32 / norm_except_dim0(v32))).to(v.dtype)


def fold_weight_norm(tensors: Mapping[str, torch.Tensor], source: Path | str = "checkpoint"
                     ) -> dict[str, torch.Tensor]:
    """Replace every weight-norm pair (`X.weight_g`+`X.weight_v`, or parametrizations
    `original0`/`original1`) by the plain `X.weight`; other tensors pass through."""
    out: dict[str, torch.Tensor] = {}
    pairs: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        for suffix, role in _WEIGHT_NORM_SUFFIXES:
            if key.endswith(suffix):
                pairs.setdefault(key[: -len(suffix)], {})[role] = (key, tensor)
                break
        else:
            out[key] = tensor
    for base, parts in pairs.items():
        if "g" not in parts or "v" not in parts:
            have = next(iter(parts.values()))[0]
            raise CheckpointError(
                f"{source}: weight-norm tensor {have!r} has no partner (need both the "
                f"magnitude and direction tensors of {base!r}.weight)")
        if base + ".weight" in out:
            raise CheckpointError(f"{source}: {base!r} has both a plain 'weight' and "
                                  "weight-norm tensors; cannot tell which one to use")
        (gk, g), (vk, v) = parts["g"], parts["v"]
        if g.numel() != v.shape[0]:
            raise CheckpointError(f"{source}: {gk} has shape {tuple(g.shape)}, expected "
                                  f"{v.shape[0]} values to match {vk} {tuple(v.shape)}")
        weight = fold_weight_norm_pair(g, v)
        if not bool(torch.isfinite(weight).all()):   # a direction row of zeros folds to 0/0
            raise CheckpointError(f"{source}: folding {gk} and {vk} into {base}.weight gives non-finite values "
                                  "(a row of the direction tensor is all zeros, or a tensor holds inf/nan); the "
                                  "checkpoint is damaged or was not saved by a weight-normed layer")
        out[base + ".weight"] = weight
    return out


def unfold_weight_norm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `fold_weight_norm` for oobleck models: every conv `X.weight` (3-D) becomes
    `X.weight_g` [out, 1, 1] + `X.weight_v`, the layout stable-audio-tools saves. Used to write
    upstream-compatible checkpoints (demo model, tests)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith(".weight") and tensor.dim() == 3:
            base = key[: -len(".weight")]
            out[base + ".weight_g"] = norm_except_dim0(tensor).clone()
            out[base + ".weight_v"] = tensor.clone()
        else:
            out[key] = tensor.clone()
    return out


def read_checkpoint(path: str | Path, sections: tuple[str, ...] = ("encoder.", "bottleneck."),
                    *, key_prefix: str | None = None, allow_unsafe_pickle: bool = False
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """Read the autoencoder tensors under `sections` (e.g. `encoder.`), prefix stripped and
    weight norm folded. Returns (tensors, prefix_used). Other tensors are never materialised
    for safetensors files."""
    path = Path(path)
    src = _TensorSource(path, allow_unsafe_pickle=allow_unsafe_pickle)
    keys = src.keys()
    prefix = detect_prefix(keys, key_prefix, path)
    wanted = tuple(prefix + s for s in sections)
    raw = {k[len(prefix):]: src.get(k) for k in keys if k.startswith(wanted)}
    return fold_weight_norm(raw, path), prefix


def load_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor],
                sections: tuple[str, ...], source: Path | str, prefix: str = "") -> None:
    """Copy `tensors` into `module`, requiring an exact key and shape match for `sections`."""
    expected = {k: v for k, v in module.state_dict().items() if k.startswith(sections)}
    given = {k: v for k, v in tensors.items() if k.startswith(sections)}
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    mismatched = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(given))
                  if tuple(given[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        where = f" (key prefix {prefix!r})" if prefix else ""
        lines = [
            f"checkpoint {source}{where} does not match the model built from the config:",
            f"  missing keys: {_fmt_keys(missing)}",
            f"  unexpected keys: {_fmt_keys(unexpected)}",
        ]
        if mismatched:
            lines.append(f"  shape mismatches: {'; '.join(mismatched[:_MAX_LISTED])}")
        if any(k.endswith(".weight") for k in missing):
            lines.append("  (conv weights may be stored as '<name>.weight_g' + '<name>.weight_v'"
                         "; both are needed)")
        lines.append("Check that the model config (channels, c_mults, strides, latent_dim, "
                     "use_snake, bottleneck) belongs to this checkpoint.")
        raise CheckpointError("\n".join(lines))
    with torch.no_grad():
        for key, target in module.state_dict(keep_vars=True).items():
            if key in given:
                target.copy_(given[key])
