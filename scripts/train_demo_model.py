#!/usr/bin/env python3
"""Train the bundled demo VAE so that decode(encode(x)) really reconstructs audio.

A random-weight demo would make `wds-encode verify` flag every output; a briefly trained one
shows what a healthy round trip looks like (and what a wrong checkpoint looks like). Starts from
the seeded init of wds_encode/models/demo_model.py, trains on the synthetic audio kinds of
wds_encode/synth.py (tones, chords, sweeps, plucks, noise) with L1 + multi-resolution STFT + a
small KL term, and writes the weights in stable-audio-tools' layout (weight_g / weight_v).

    python scripts/train_demo_model.py --steps 12000 --out wds_encode/assets/demo_model.safetensors

It took about 4 minutes on one H200; the result is committed, so nobody needs to rerun it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_encode.models import build_autoencoder  # noqa: E402
from wds_encode.models.checkpoint import fold_weight_norm, unfold_weight_norm  # noqa: E402
from wds_encode.models.demo_model import DEMO_MODEL_CONFIG, demo_state_dict  # noqa: E402
from wds_encode.synth import KINDS, synth_waveform  # noqa: E402


def make_pool(n: int, seconds: float, rate: int, seed: int) -> torch.Tensor:
    """[n, 2, N] clips of every synthetic kind, mono ones duplicated to stereo."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        wave = synth_waveform(kind, seconds, rate, 1 + i % 2, rng)
        if wave.shape[1] == 1:
            wave = np.repeat(wave, 2, axis=1)
        clips.append(torch.from_numpy(wave.T.copy()) * float(rng.uniform(0.3, 1.0)))
    length = min(c.shape[1] for c in clips)
    return torch.stack([c[:, :length] for c in clips])


def stft_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = x.new_zeros(())
    for n_fft in (256, 512, 1024, 2048):
        window = torch.hann_window(n_fft, device=x.device)
        X = torch.stft(x.flatten(0, 1), n_fft, n_fft // 4, window=window, return_complex=True).abs()
        Y = torch.stft(y.flatten(0, 1), n_fft, n_fft // 4, window=window, return_complex=True).abs()
        loss = loss + (torch.log(X + 1e-5) - torch.log(Y + 1e-5)).abs().mean()
        loss = loss + (X - Y).norm() / Y.norm().clamp_min(1e-5)
    return loss / 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop", type=int, default=16384)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-4)
    parser.add_argument("--max-seconds", type=float, default=240.0, help="stop early after this much training")
    parser.add_argument("--init", type=Path, default=None, help="continue from these weights (safetensors)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_autoencoder(DEMO_MODEL_CONFIG, with_decoder=True)
    if args.init is not None:
        from safetensors.torch import load_file
        model.load_state_dict(fold_weight_norm(load_file(str(args.init))))
    else:
        model.load_state_dict(fold_weight_norm(demo_state_dict()))
    model = model.to(device).train().requires_grad_(True)
    pool = make_pool(768, 2.0, DEMO_MODEL_CONFIG["sample_rate"], seed=1).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    started = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, pool.shape[0], (args.batch_size,), device=device)
        start = int(torch.randint(0, pool.shape[2] - args.crop, ()))
        x = pool[idx, :, start:start + args.crop]
        pre = model.encoder(x)
        mean, scale = pre.chunk(2, dim=1)
        std = F.softplus(scale) + 1e-4
        z = mean + std * torch.randn_like(mean)
        y = model.decoder(z)
        kl = (mean.pow(2) + std.pow(2) - 2 * torch.log(std) - 1).sum(1).mean()
        loss = F.l1_loss(y, x) + stft_loss(y, x) + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.steps - 1:
            with torch.no_grad():
                recon = model.decoder(mean)
                snr = 10 * torch.log10(x.pow(2).sum() / (recon - x).pow(2).sum())
            print(f"step {step} loss {loss.item():.3f} kl {kl.item():.1f} snr(mean) {snr.item():.2f} dB "
                  f"{time.time() - started:.0f}s", flush=True)
        if time.time() - started > args.max_seconds:
            print(f"stopping at step {step} (time budget)", flush=True)
            break
    from safetensors.torch import save_file
    state = unfold_weight_norm({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out), metadata={"format": "pt"})
    args.out.chmod(0o644)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
