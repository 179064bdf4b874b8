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

import io
import json
import pickle
import pickletools
import re
import tarfile
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


SNIFF_BYTES = 4096
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# What torch.load's weights-only reader says when it refuses a real pickle's object (not a damaged file):
# a global it does not allow, a class to allowlist, the legacy .tar format it never reads.
_UNSAFE_REFUSAL = re.compile(r"GLOBAL|add_safe_globals|allowlist|unrecognized function|legacy \.tar format|"
                             r"must be imported to load")


def sniff(path: Path) -> str:
    """What a file holds, from its first bytes: "empty", "zip", "pickle", "safetensors", "tar", "json",
    "text" or "binary" (none of these). Only "zip", "pickle" and "safetensors" can be checkpoints (and a
    "tar" in torch's legacy format)."""
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    size = path.stat().st_size
    if not head:
        return "empty"
    if head.startswith(_ZIP_MAGICS):
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:   # pickle's PROTO opcode (torch.save: protocol 2)
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"   # a u64 header length, then a JSON object
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if b"\x00" not in head:
        text = head.decode("utf-8", errors="ignore").lstrip("\ufeff \t\r\n")
        if head.decode("utf-8", errors="replace").count("\ufffd") <= 1:   # (a character cut at 4 KiB)
            return "json" if text[:1] in ("{", "[") else "text"
    return "binary"


def _looks_like_model_config(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "model" in data)


def _tar_names(path: Path) -> list[str]:
    try:
        with tarfile.open(path) as tar:
            return tar.getnames()
    except (OSError, tarfile.TarError):
        return []


def describe_non_checkpoint(path: Path, kind: str) -> str:
    """Why a file of `kind` (from `sniff`) is no checkpoint, in a few words."""
    if kind == "empty":
        return "the file is empty (an interrupted download or copy?)"
    if kind == "json":
        weights = "--ckpt-path takes the weights (.ckpt, .pt, .pth or .safetensors)"
        if _looks_like_model_config(path):
            return f"it is a JSON text file, a model config; were --model-config and --ckpt-path swapped? {weights}"
        return f"it is a JSON text file; {weights}"
    if kind == "text":
        first = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[:1]
        return f"it is a text file, starting {first[0][:60]!r}" if first else "it is a text file of blank lines"
    if kind == "tar":
        names = _tar_names(path)
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        return f"it is a tar archive ({len(names)} members: {shown}); a dataset shard?"
    with path.open("rb") as fh:
        head = fh.read(9)
    if head[8:9] == b"{":
        return (f"it looks like a safetensors file cut short: its header alone is "
                f"{int.from_bytes(head[:8], 'little')} bytes, the file {path.stat().st_size}")
    return f"it starts with the bytes {head[:8].hex(' ')}, which no checkpoint format does"


FORMAT_NAMES = {"zip": "a zip archive as torch.save writes", "pickle": "a pickle as torch.save writes",
                "safetensors": "a safetensors file"}


def not_a_checkpoint(path: Path, reason: str) -> CheckpointError:
    """The error for a file that is not a checkpoint at all (as opposed to one that does not fit the model)."""
    return CheckpointError(f"{path} is not a checkpoint (not a zip/pickle file torch can read, nor safetensors: "
                           f"{reason})")


def _short_reason(exc: BaseException) -> str:
    """torch.load's error in one line: the weights-only reader's own words, or the first sentence."""
    text = str(exc)
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|\s*Check the documentation|$)", text, re.S)
    if detail:
        text = detail.group(1)
    text = " ".join(text.split())
    for end in (". ", "; "):
        if end in text:
            text = text[:text.index(end)]
    if not text:
        return type(exc).__name__
    if text.startswith("Unsupported operand"):
        text = f"bytes that are no pickle torch reads ({text})"
    return text if len(text) <= 200 else text[:197] + "..."


def _well_formed_pickle(path: Path, kind: str) -> bool:
    """Whether the checkpoint's pickle parses to its end (read, never run: `pickletools.genops`): the
    `data.pkl` of a zip checkpoint, or the four pickles a legacy one starts with (magic number, protocol,
    system info, the object). Random or damaged bytes stop at an unknown opcode or run out."""
    try:
        if kind == "zip":
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
                streams, count = io.BytesIO(archive.read(name)), 1
        else:
            streams, count = path.open("rb"), 4
        with streams as fh:
            for _ in range(count):
                for _op in pickletools.genops(fh):
                    pass
        return True
    except Exception:
        return False


def _refused_by_weights_only(path: Path, kind: str, exc: BaseException) -> bool:
    """torch.load(weights_only=True) failed on a real checkpoint that only a full unpickler reads (a global it
    does not allow, pickle protocol 4's opcodes, torch's legacy .tar format), not on a damaged file."""
    text = str(exc)
    if "legacy .tar format" in text:
        return True
    if not isinstance(exc, pickle.UnpicklingError):
        return False   # a damaged zip, a stream that ends early...
    return bool(_UNSAFE_REFUSAL.search(text)) or _well_formed_pickle(path, kind)


class _TensorSource:
    """Uniform `keys()` / `get(key)` over a torch pickle or a lazily opened safetensors file.

    What the file holds is read from its first bytes (`sniff`), not from its name: a file that is no
    checkpoint at all (a JSON config, a text file, a truncated download, random bytes) is told apart from
    a real checkpoint that holds pickled objects (`--allow-unsafe-pickle`) before torch.load sees it."""

    def __init__(self, path: Path, *, allow_unsafe_pickle: bool = False):
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        self._st = None
        self._dict: Mapping[str, torch.Tensor] | None = None
        kind = sniff(path)
        if kind == "tar" and {"pickle", "storages", "tensors"} <= set(_tar_names(path)):
            kind = "pickle"   # torch's legacy .tar checkpoint format
        if kind == "safetensors":
            self._open_safetensors()
        elif kind in ("zip", "pickle"):
            self._dict = self._load_torch(kind, allow_unsafe_pickle)
        else:
            raise not_a_checkpoint(path, describe_non_checkpoint(path, kind))

    def _open_safetensors(self) -> None:
        try:
            from safetensors import safe_open
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise CheckpointError("reading .safetensors needs the 'safetensors' package") from exc
        try:
            self._st = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{self.path} is not a checkpoint safetensors can read ({exc}); a damaged or "
                                  "incomplete file?") from exc

    def _load_torch(self, kind: str, allow_unsafe_pickle: bool) -> Mapping[str, torch.Tensor]:
        if kind == "zip":
            if not zipfile.is_zipfile(self.path):
                raise not_a_checkpoint(self.path, "a zip file that ends early or is damaged (an interrupted "
                                                  "download or copy?)")
            with zipfile.ZipFile(self.path) as archive:
                names = archive.namelist()
            if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise not_a_checkpoint(self.path, f"a zip archive, but not one torch.save wrote: no data.pkl among "
                                                  f"its {len(names)} members ({shown})")
        # mmap keeps a multi-GB diffusion checkpoint out of RAM; only zip-format files support it.
        mmap = kind == "zip"
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as exc:
            reason = _short_reason(exc)
            if not _refused_by_weights_only(self.path, kind, exc):
                raise not_a_checkpoint(self.path, reason) from None
            if not allow_unsafe_pickle:
                why = ("it is in torch's legacy .tar format, which only the full unpickler reads"
                       if "legacy .tar format" in str(exc) else
                       "it holds pickled Python objects besides tensors" if _UNSAFE_REFUSAL.search(str(exc)) else
                       "it is a pickle torch's weights-only reader does not read (saved with pickle protocol 4 or 5?)")
                raise CheckpointError(
                    f"cannot load {self.path} with torch.load(weights_only=True): {why} ({reason}). "
                    "If you trust its source, pass --allow-unsafe-pickle "
                    "(allow_unsafe_pickle=True; this runs arbitrary code from the file), or convert it to "
                    ".safetensors.") from None
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=False, mmap=mmap)
            except Exception as exc2:
                raise not_a_checkpoint(self.path, _short_reason(exc2)) from None
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
