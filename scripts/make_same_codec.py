#!/usr/bin/env python3
"""Build (and optionally train) a tiny Stable Audio 3 SAME autoencoder that really reconstructs audio.

The SAME models in /work/shared/golden-sa3/ have random weights, so their decoders output noise
and `wds-encode verify` flags every output. This script builds a tiny SAME model with the same
structure as `same_tiny_shift` (44.1 kHz stereo, patched pretransform, SAME encoder/decoder with
chunked attention + `chunk_midpoint_shift`, `soft_norm` bottleneck with `auto_scale`) but less
compression (patch 8, stride 2, 16 latent channels: downsampling_ratio 16, 2x compression), and
writes SA3's layout: bare keys, the mapping convs weight-normed (`weight_g` / `weight_v`).

Its weights are constructed rather than learned (`construct_init`: PCA of the synthetic audio of
wds_encode/synth.py for the token maps, attention heads that copy tokens by rotary relative
position, one in the plain-chunk layer and one in the shifted-chunk layer): random-init training
with L1 + multi-resolution STFT loss (`--init random --steps N`) did not get past 0 dB SNR in the
minutes a CPU gives, and Adam fine-tuning of the constructed codec (`--steps N`) lowers its SNR
(its DyT pre-norms run at alpha 1e-3 and Adam moves every parameter by ~lr a step). The
bottleneck's `running_std` is set to the latents' std, so stored latents are near unit variance.
The committed tests/assets/same_codec/ came from

    .venv/bin/python scripts/make_same_codec.py --steps 0 --seed 0 --threads 1 --out-dir tests/assets/same_codec

(about a minute on one CPU core, mostly building the synthetic pool).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_encode.models import build_autoencoder, load_autoencoder  # noqa: E402
from wds_encode.models.checkpoint import unfold_weight_norm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo_model import make_pool, stft_loss  # noqa: E402  (the demo VAE's training pool and loss)

PATCH = 8
STRIDE = 2
LATENT_DIM = 16
_BLOCK = {
    "channels": 16,
    "c_mults": [2],          # width 32
    "strides": [STRIDE],
    "transformer_depths": [2],
    "latent_dim": LATENT_DIM,
    "dim_heads": 8,
    "chunk_size": 8,         # input tokens per attention chunk (+ 4 new tokens = 12)
    "chunk_midpoint_shift": True,
    "differential": True,
    "dyt": True,
    "ff_mult": 3,
}
SAME_TRAINED_CONFIG = {
    "model_type": "autoencoder",
    "sample_rate": 44100,
    "audio_channels": 2,
    "model": {
        "io_channels": 2,
        "latent_dim": LATENT_DIM,
        "downsampling_ratio": PATCH * STRIDE,
        "pretransform": {"type": "patched", "config": {"channels": 2, "patch_size": PATCH}},
        "encoder": {"type": "same", "config": {"in_channels": 2 * PATCH, **_BLOCK}},
        "decoder": {"type": "same", "config": {**_BLOCK, "out_channels": 2 * PATCH}, "soft_clip": False},
        "bottleneck": {"type": "soft_norm", "config": {"dim": LATENT_DIM, "auto_scale": True}},
    },
}


# --------------------------------------------------------------------------- constructed init
# Random-init training of this transformer codec needs far more steps than a CPU gives in minutes
# (the new tokens first have to learn, through attention alone, which tokens to read). So the
# default init writes the weights of a working codec directly, every part of it through SAME's own
# modules, and training only refines it:
# - encoder mapping conv: each patch token (2 ch x 8 samples) -> its 8 PCA coefficients (dims 0-7),
#   plus a marker in dim 8; the encoder's new token has a marker in dim 9;
# - encoder layer 0 (plain chunks): head 0 of each new token attends, by rotary relative position
#   (offset 2), to the first token of its group and writes its coefficients to dims 16-23;
#   layer 1 (chunks shifted by half a chunk) attends to offset 1, the second token, -> dims 24-31;
#   the projection reads dims 16-31: 16 latents per 16 samples;
# - decoder: the latent frame holds both tokens' coefficients (dims 0-7, 8-15) and a marker (16);
#   its first new token copies dims 0-7 in layer 0 (offset 1), the second copies dims 8-15 in the
#   shifted layer 1 (offset 2), both into dims 0-7; the mapping conv turns them back into samples.
# Differential attention: the second branch of an active head attends to new tokens, whose values
# are zero in the dims read; heads with zero queries in both branches cancel exactly.
# DyT pre-norms run in their linear range (alpha 1e-3); q/k norms (alpha 1) are inverted exactly.
QK_GAIN = 60.0       # q_norm / k_norm gamma
QK_SIZE = 48.0       # |q| = |k| of an active head: logits of QK_SIZE^2 / sqrt(8) ~ 800, the nearest
                     # wrong key (offset +-6 ~ 2 pi) is cos(6) lower: ~32 nats
PRE_ALPHA = 1e-3


def pca_basis(pool: torch.Tensor, k: int) -> torch.Tensor:
    """[16, k] top principal directions (uncentred) of the pool's patch tokens."""
    b, c, n = pool.shape
    n -= n % PATCH
    tokens = pool[..., :n].reshape(b, c, n // PATCH, PATCH).permute(0, 2, 1, 3).reshape(-1, c * PATCH).double()
    evals, evecs = torch.linalg.eigh(tokens.T @ tokens / tokens.shape[0])
    order = evals.argsort(descending=True)
    kept = evals[order[:k]].sum() / evals.sum()
    print(f"PCA: {k} of {c * PATCH} token components keep {kept.item():.6f} of the energy", flush=True)
    return evecs[:, order[:k]].float()


def _set_head(layer, *, query_from: list[int], key_from: int, zero_keys_from: list[int], offset: int,
              value_dims: range, out_dims: range, marker: float) -> None:
    """Head 0 of `layer`: queries of tokens marked in `query_from` attend to the key marked in
    `key_from` `offset` positions earlier (rotary pair 0/2 at 1 rad per token); the second branch
    attends to the tokens marked in `zero_keys_from`. Values: `value_dims`; output -> `out_dims`."""
    attn = layer.self_attn
    d = attn.dim_heads
    dim = attn.dim
    w = torch.zeros(5 * dim, dim)

    def pre(v: float) -> float:     # pre-activation giving exactly v after k/q DyT norm
        return math.atanh(v / QK_GAIN) / marker

    phase = -float(offset)
    q = {0: QK_SIZE * math.cos(phase), 2: QK_SIZE * math.sin(phase)}
    for m in query_from:
        for i, v in q.items():
            w[0 * dim + i, m] = pre(v)                 # q, branch 1
        w[3 * dim + 4, m] = pre(QK_SIZE)               # q, branch 2 (content: new tokens)
    w[1 * dim + 0, key_from] = pre(QK_SIZE)            # k, branch 1
    for m in zero_keys_from:
        w[4 * dim + 4, m] = pre(QK_SIZE)               # k, branch 2
    for i, src in enumerate(value_dims):
        w[2 * dim + i, src] = 1.0
    out = torch.zeros(dim, dim)
    for i, dst in enumerate(out_dims):
        out[dst, i] = 1.0
    assert len(value_dims) <= d and len(out_dims) == len(value_dims)
    with torch.no_grad():
        attn.to_qkv.weight.copy_(w)
        attn.to_out.weight.copy_(out)


def _linear_ranges(layer) -> None:
    with torch.no_grad():
        for norm in (layer.pre_norm, layer.ff_norm):
            norm.alpha.fill_(PRE_ALPHA)
            norm.gamma.fill_(1.0 / PRE_ALPHA)
            norm.beta.zero_()
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.alpha.fill_(1.0)
            norm.gamma.fill_(QK_GAIN)
            norm.beta.zero_()
        layer.ff.ff[2].weight.zero_()                  # feed-forward branches start as identity
        layer.ff.ff[2].bias.zero_()


def construct_init(model, pool: torch.Tensor) -> None:
    """Write a working codec into `model` (see above); parameters not mentioned keep their init."""
    half = PATCH * 2 // 2                              # PCA coefficients per token: 8
    basis = pca_basis(pool, half)                      # [16, 8]
    marker = (1.0 / PRE_ALPHA) * math.tanh(PRE_ALPHA)  # a marker of 1 after the pre-norm
    enc = model.encoder.layers[0]
    dec = model.decoder.layers[3]
    with torch.no_grad():
        # SA3 stores this conv weight-normed (weight = v * g / ||v||): no output row may be all zero.
        # Rows 10-31 land in dims no input-token read uses (random is harmless); the marker rows 8-9
        # get a negligible 1e-7.
        enc.mapping.weight.zero_()
        enc.mapping.weight[:half, :, 0] = basis.T
        enc.mapping.weight[8:10, 0, 0] = 1e-7
        enc.mapping.weight[10:, :, 0] = 0.1 * torch.randn(enc.mapping.weight.shape[0] - 10, 2 * PATCH)
        enc.mapping.bias.zero_()
        enc.mapping.bias[8] = 1.0                      # marker: input token
        enc.new_tokens.zero_()
        enc.new_tokens[0, 0, 9] = 1.0                  # marker: new token
        for i, layer in enumerate(enc.transformers):
            _linear_ranges(layer)
            _set_head(layer, query_from=[9], key_from=8, zero_keys_from=[9], offset=2 - i,
                      value_dims=range(0, half), out_dims=range(16 + half * i, 16 + half * (i + 1)),
                      marker=marker)
        proj = model.encoder.layers[2]
        proj.weight.zero_()
        proj.weight[:, 16:32] = torch.eye(16)
        proj.bias.zero_()

        lin = model.decoder.layers[1]
        lin.weight.copy_(torch.eye(32, 16))
        lin.bias.zero_()
        lin.bias[16] = 1.0                             # marker: latent frame
        dec.new_tokens.zero_()
        dec.new_tokens[0, 0, 17] = 1.0                 # marker: first new token
        dec.new_tokens[0, 1, 18] = 1.0                 # marker: second new token
        for i, layer in enumerate(dec.transformers):
            _linear_ranges(layer)
            _set_head(layer, query_from=[17 + i], key_from=16, zero_keys_from=[17, 18], offset=1 + i,
                      value_dims=range(half * i, half * (i + 1)), out_dims=range(0, half), marker=marker)
        dec.mapping.weight.zero_()
        dec.mapping.weight[:, :half, 0] = basis
        dec.mapping.bias.zero_()


def round_trip(model, x: torch.Tensor) -> torch.Tensor:
    """The training path: encoder -> SoftNorm encode/decode -> decoder, cropped to the input."""
    z = model.bottleneck.encode(model.encoder(x), mode="mean")
    return model.decoder(model.bottleneck.decode(z))[..., :x.shape[-1]]


def snr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return 10 * math.log10(x.pow(2).sum().item() / max((y - x).pow(2).sum().item(), 1e-20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=0, help="gradient steps after the init (0: none)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=8192, help="samples per training clip (a multiple of 64)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--init", choices=("constructed", "random"), default="constructed",
                        help="constructed: start from a hand-built working codec (see construct_init); random: "
                             "torch's default init (does not learn to reconstruct in CPU minutes)")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="stop early after this much training")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = copy.deepcopy(SAME_TRAINED_CONFIG)
    model = build_autoencoder(config, with_decoder=True).train().requires_grad_(True)
    model.bottleneck.running_std.requires_grad_(False)
    rate = config["sample_rate"]
    pool = make_pool(192, 1.0, rate, seed=args.seed + 1)
    if args.init == "constructed":
        construct_init(model, pool)
        with torch.no_grad():
            x = pool[:8, :, :8192]
            print(f"constructed init: pool SNR {snr_db(x, round_trip(model, x)):.2f} dB", flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"{sum(p.numel() for p in params)} trainable parameters, pool {tuple(pool.shape)}", flush=True)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.8, 0.99), weight_decay=0.0)
    trained = 0
    started = time.time()
    if args.steps > 0:
        warmup = max(1, min(100, args.steps // 10))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
        gen = torch.Generator().manual_seed(args.seed)
        for step in range(args.steps):
            idx = torch.randint(0, pool.shape[0], (args.batch_size,), generator=gen)
            start = int(torch.randint(0, pool.shape[2] - args.crop, (), generator=gen))
            x = pool[idx, :, start:start + args.crop]
            y = round_trip(model, x)
            loss = F.l1_loss(y, x) + stft_loss(y, x)
            trained = step + 1
            if not torch.isfinite(loss):
                raise SystemExit(f"non-finite loss at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if step % 100 == 0 or step == args.steps - 1:
                print(f"step {step} loss {loss.item():.3f} snr {snr_db(x, y.detach()):.2f} dB "
                      f"{time.time() - started:.0f}s", flush=True)
            if time.time() - started > args.max_seconds:
                print(f"stopping at step {step} (time budget)", flush=True)
                break
    print(f"trained {trained} steps in {time.time() - started:.0f}s", flush=True)

    # auto_scale: divide the latents by their std over the training pool (decode multiplies it back)
    model.eval()
    with torch.no_grad():
        pre = torch.cat([model.bottleneck.encode(model.encoder(pool[i:i + 32]), mode="mean")
                         for i in range(0, pool.shape[0], 32)])
        model.bottleneck.running_std.mul_(pre.std())
    print(f"running_std {model.bottleneck.running_std.item():.4f}", flush=True)

    from safetensors.torch import save_file
    state = unfold_weight_norm({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = args.out_dir / "model.safetensors"
    save_file(state, str(ckpt), metadata={"format": "pt"})
    ckpt.chmod(0o644)
    (args.out_dir / "model_config.json").write_text(json.dumps(config, indent=1) + "\n")

    # every saved key loads strictly, with nothing left over, and the loaded model is the trained one
    loaded = load_autoencoder(config, ckpt, with_decoder=True)
    from safetensors import safe_open
    with safe_open(str(ckpt), framework="pt") as fh:
        saved = set(fh.keys())
    wanted = set(unfold_weight_norm(loaded.state_dict()))
    if saved != wanted:
        raise SystemExit(f"saved keys differ from the model's: extra {sorted(saved - wanted)}, "
                         f"missing {sorted(wanted - saved)}")
    with torch.no_grad():
        x = pool[:4, :, :16384]
        a = round_trip(model, x)
        b = loaded.decode(loaded.encode(x, mode="mean"))[..., :x.shape[-1]]
    print(f"wrote {ckpt} ({ckpt.stat().st_size} bytes, {len(saved)} tensors); reload max diff "
          f"{(a - b).abs().max().item():.2e}, pool SNR {snr_db(x, b):.2f} dB", flush=True)


if __name__ == "__main__":
    main()
