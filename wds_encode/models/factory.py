"""Model config JSON -> `AutoencoderModel`, and `load_autoencoder` (config + checkpoint).

Accepts the two config shapes stable-audio-tools and Stable Audio 3 use for a model that has an
autoencoder:
- `model_type: "autoencoder"`: the autoencoder is `model` itself (`stabilityai/SAME-L`'s too);
- a diffusion (or other) model whose `model.pretransform` is `{"type": "autoencoder",
  "config": {...}}` (e.g. Stable Audio Open's or Stable Audio 3's `model_config.json`; SA3 does not
  read that `type`, so a SAME autoencoder there is recognised by its structure).
Every error names the JSON field to fix, and cross-checks that upstream leaves to a runtime
crash (channel counts, latent_dim vs bottleneck, downsampling_ratio vs strides) are done here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .autoencoder import AutoencoderModel
from .bottlenecks import build_bottleneck
from .checkpoint import FORMAT_NAMES, describe_non_checkpoint, load_strict, not_a_checkpoint, read_checkpoint, sniff
from .dac import build_dac_decoder, build_dac_encoder
from .errors import ModelConfigError, UnsupportedModelError
from .oobleck import build_oobleck_decoder, build_oobleck_encoder
from .same import build_same_decoder, build_same_encoder, check_loaded as check_same_loaded, is_same_autoencoder
from .seanet import build_seanet_decoder, build_seanet_encoder

# type -> builder(config, field). Add new encoders/decoders here.
ENCODERS: dict[str, Callable[[Mapping[str, Any], str], nn.Module]] = {
    "oobleck": build_oobleck_encoder,
    "dac": build_dac_encoder,
    "seanet": build_seanet_encoder,
}
DECODERS: dict[str, Callable[[Mapping[str, Any], str], nn.Module]] = {
    "oobleck": build_oobleck_decoder,
    "dac": build_dac_decoder,
    "seanet": build_seanet_decoder,
}
# Types stable-audio-tools knows, named in errors to tell "not supported yet" from a typo.
KNOWN_UPSTREAM_CODECS = ("oobleck", "dac", "seanet", "local_attn", "taae")
# SAME autoencoders (Stable Audio 3) are recognised by structure, not by `type`: see `same.py`.


@dataclass(frozen=True)
class AutoencoderSpec:
    """Where the autoencoder lives inside a model config, plus the top-level metadata."""

    ae_config: Mapping[str, Any]  # the autoencoder's `model` object
    field: str                    # JSON path of ae_config ("model" or "model.pretransform.config")
    model_type: str
    sample_rate: int
    audio_channels: int
    sample_size: int | None
    pretransform_scale: float


def _require(obj: Mapping[str, Any], key: str, parent: str) -> Any:
    """obj[key], or an error naming the field's full JSON path (`parent` "" = top level)."""
    if key not in obj or obj[key] is None:
        path = f"{parent}.{key}" if parent else key
        raise ModelConfigError(f"model config: required field '{path}' is missing")
    return obj[key]


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelConfigError(f"model config: '{field}' must be a positive integer, "
                               f"got {value!r}")
    return value


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ModelConfigError(f"model config: '{field}' must be an object, "
                               f"got {type(value).__name__}")
    return value


def resolve_autoencoder_config(model_config: Mapping[str, Any]) -> AutoencoderSpec:
    """Locate the autoencoder section of a stable-audio-tools model config."""
    model_config = _mapping(model_config, "(top level)")
    model_type = model_config.get("model_type")
    if not isinstance(model_type, str):
        raise ModelConfigError("model config: 'model_type' is missing (expected 'autoencoder' "
                               "or a diffusion model type such as 'diffusion_cond')")
    model = _mapping(_require(model_config, "model", ""), "model")
    sample_rate = _positive_int(_require(model_config, "sample_rate", ""), "sample_rate")
    audio_channels = _positive_int(model_config.get("audio_channels", 2), "audio_channels")
    sample_size = model_config.get("sample_size")
    if sample_size is not None:
        sample_size = _positive_int(sample_size, "sample_size")

    if model_type == "autoencoder":
        return AutoencoderSpec(model, "model", model_type, sample_rate, audio_channels,
                               sample_size, 1.0)

    pretransform = model.get("pretransform")
    if pretransform is None:
        raise UnsupportedModelError(
            f"model config: model_type {model_type!r} has no 'model.pretransform'; wds-encode "
            "needs either an 'autoencoder' config or a model whose 'model.pretransform' is an "
            "autoencoder")
    pretransform = _mapping(pretransform, "model.pretransform")
    kind = pretransform.get("type")
    nested = pretransform.get("config")
    if kind != "autoencoder" and not (isinstance(nested, Mapping) and is_same_autoencoder(nested)):
        raise UnsupportedModelError(
            f"model config: 'model.pretransform.type' is {kind!r}; only 'autoencoder' "
            "pretransforms can be used to encode")
    ae = _mapping(_require(pretransform, "config", "model.pretransform"),
                  "model.pretransform.config")
    scale = pretransform.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ModelConfigError(f"model config: 'model.pretransform.scale' must be a positive "
                               f"number, got {scale!r}")
    return AutoencoderSpec(ae, "model.pretransform.config", model_type, sample_rate,
                           audio_channels, sample_size, float(scale))


def _build_codec(section: Mapping[str, Any], field: str, registry: Mapping[str, Callable],
                 what: str) -> nn.Module:
    section = _mapping(section, field)
    kind = section.get("type")
    if kind is None:
        raise ModelConfigError(f"model config: '{field}.type' is missing; supported {what} "
                               f"types: {sorted(registry)}")
    if kind not in registry:
        state = ("is a stable-audio-tools " + what + " type not supported yet"
                 if kind in KNOWN_UPSTREAM_CODECS else "is unknown")
        raise UnsupportedModelError(f"model config: '{field}.type' = {kind!r} {state}; "
                                    f"supported {what} types: {sorted(registry)}")
    return registry[kind](section.get("config", {}), f"{field}.config")


def build_autoencoder(model_config: Mapping[str, Any], *, with_decoder: bool = False
                      ) -> AutoencoderModel:
    """Build an (untrained) `AutoencoderModel` from a model config; no checkpoint involved."""
    spec = resolve_autoencoder_config(model_config)
    ae, f = spec.ae_config, spec.field
    same = is_same_autoencoder(ae)
    if ae.get("pretransform") is not None and not same:
        raise UnsupportedModelError(f"model config: '{f}.pretransform' (a pretransform inside "
                                    "the autoencoder) is not supported")
    latent_dim = _positive_int(_require(ae, "latent_dim", f), f"{f}.latent_dim")
    ratio = _positive_int(_require(ae, "downsampling_ratio", f), f"{f}.downsampling_ratio")
    io_channels = _positive_int(_require(ae, "io_channels", f), f"{f}.io_channels")
    in_channels = _positive_int(ae.get("in_channels", io_channels), f"{f}.in_channels")

    if same:   # SA3 builds SAMEEncoder + SoftNormBottleneck whatever the `type` fields say
        encoder = build_same_encoder(ae, f)
        bottleneck = build_bottleneck({**_mapping(_require(ae, "bottleneck", f), f"{f}.bottleneck"),
                                       "type": "soft_norm"}, f"{f}.bottleneck")
    else:
        encoder = _build_codec(_require(ae, "encoder", f), f"{f}.encoder", ENCODERS, "encoder")
        bottleneck = build_bottleneck(ae.get("bottleneck"), f"{f}.bottleneck")

    enc_in = getattr(encoder, "in_channels", in_channels)
    if enc_in != in_channels:
        raise ModelConfigError(
            f"model config: '{f}.encoder.config.in_channels' ({enc_in}) differs from "
            f"'{f}.{'in_channels' if 'in_channels' in ae else 'io_channels'}' ({in_channels})")
    enc_out = getattr(encoder, "latent_dim", None)
    if enc_out is not None and bottleneck.latent_channels(enc_out) != latent_dim:
        raise ModelConfigError(
            f"model config: '{f}.encoder.config.latent_dim' = {enc_out} gives "
            f"{bottleneck.latent_channels(enc_out)} latent channels after the "
            f"'{bottleneck.type_name}' bottleneck, but '{f}.latent_dim' = {latent_dim}"
            + (" (a vae encoder outputs 2 * latent_dim: mean and scale)"
               if bottleneck.type_name == "vae" else ""))
    strides = getattr(encoder, "strides", None)
    if strides is not None and math.prod(strides) != ratio:
        raise ModelConfigError(
            f"model config: '{f}.downsampling_ratio' = {ratio} but the encoder strides "
            f"{list(strides)} downsample by {math.prod(strides)}")

    decoder = None
    if with_decoder:
        decoder = (build_same_decoder(ae, f) if same else
                   _build_codec(_require(ae, "decoder", f), f"{f}.decoder", DECODERS, "decoder"))
        expected = bottleneck.decoder_channels(latent_dim)  # + noise_augment_dim where configured
        dec_in = getattr(decoder, "latent_dim", expected)
        if dec_in != expected:
            raise ModelConfigError(f"model config: '{f}.decoder.config.latent_dim' = {dec_in} "
                                   f"but the bottleneck gives the decoder {expected} channels "
                                   f"('{f}.latent_dim' = {latent_dim})")
    soft_clip = bool(_mapping(ae.get("decoder", {}), f"{f}.decoder").get("soft_clip", False))

    return AutoencoderModel(
        encoder, bottleneck, decoder=decoder, sample_rate=spec.sample_rate,
        audio_channels=spec.audio_channels, io_channels=io_channels, in_channels=in_channels,
        latent_dim=latent_dim, downsampling_ratio=ratio, sample_size=spec.sample_size,
        pretransform_scale=spec.pretransform_scale, soft_clip=soft_clip,
        config=dict(model_config))


def load_autoencoder(model_config: Mapping[str, Any], ckpt_path: str | Path | None, *,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     with_decoder: bool = False, key_prefix: str | None = None,
                     allow_unsafe_pickle: bool = False) -> AutoencoderModel:
    """Build the autoencoder described by `model_config` and load its weights.

    `ckpt_path` None leaves the random init (tests / dry runs only). The checkpoint may be the
    autoencoder alone or a whole diffusion model; only `encoder.*`, `bottleneck.*` (and
    `decoder.*` with `with_decoder`) tensors are read, and they must match exactly.
    `key_prefix` overrides prefix auto-detection (e.g. "pretransform.model.").
    Returns the model in eval mode, requires_grad False, on `device` in `dtype`.
    """
    model = build_autoencoder(model_config, with_decoder=with_decoder)
    if ckpt_path is not None:
        sections = ("encoder.", "bottleneck.") + (("decoder.",) if with_decoder else ())
        tensors, prefix = read_checkpoint(ckpt_path, sections, key_prefix=key_prefix,
                                          allow_unsafe_pickle=allow_unsafe_pickle)
        load_strict(model, tensors, sections, Path(ckpt_path), prefix)
        check_loaded = getattr(model.bottleneck, "check_loaded", None)
        if check_loaded is not None:
            check_loaded()
        check_same_loaded(model)
    model.eval().requires_grad_(False)
    return model.to(device=device, dtype=dtype)


def check_model_files(model_config: str | Path, ckpt_path: str | Path | None = None) -> None:
    """Before either file is parsed: the model config must be text and the checkpoint must not be JSON.
    A checkpoint given as the model config (the two options swapped: `--model-config model.ckpt
    --ckpt-path model_config.json`) is a ModelConfigError that says so, not a decoding error of its
    bytes; a JSON text file given as the checkpoint is a CheckpointError. Files that are missing are
    left to the callers' own errors."""
    config_path = Path(model_config)
    ckpt = Path(ckpt_path) if ckpt_path is not None else None
    if config_path.is_file():
        kind = sniff(config_path)
        if kind in FORMAT_NAMES:
            swapped = ckpt is not None and ckpt.is_file() and sniff(ckpt) == "json"
            raise ModelConfigError(
                f"--model-config {config_path} is not a JSON text file: it looks like a checkpoint "
                f"({FORMAT_NAMES[kind]}); " + (f"were --model-config and --ckpt-path swapped? {ckpt} is the JSON "
                                               "file. " if swapped else "")
                + "--model-config takes the model's JSON config, --ckpt-path its weights")
        if kind in ("binary", "tar"):
            what = describe_non_checkpoint(config_path, kind) if kind == "tar" else "it is a binary file"
            raise ModelConfigError(f"--model-config {config_path} is not a JSON text file ({what}); --model-config "
                                   "takes the model's JSON config")
    if ckpt is not None and ckpt.is_file() and sniff(ckpt) in ("json", "text", "empty"):
        raise not_a_checkpoint(ckpt, describe_non_checkpoint(ckpt, sniff(ckpt)))
