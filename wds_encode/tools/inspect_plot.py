"""`wds-encode inspect --plot FILE.png`: the inspection as a picture.

Two panels: the per-channel latent distributions (continuous outputs: violins of the reservoir
sample of unpadded frames; discrete outputs: each quantizer's token frequencies) and the file
durations. matplotlib is an optional extra (`pip install 'wds-encode[plot]'`), imported only here
and only when a plot is asked for, with the Agg backend (no display needed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .inspect import Inspection

MAX_LEGEND_QUANTIZERS = 8


class PlotUnavailable(ImportError):
    """matplotlib is not installed."""


def load_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: pip install 'wds-encode[plot]'"
                              ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_plot(inspection: Inspection, path: str | Path) -> Path:
    """Draw the inspection into a PNG at `path` (its folder must exist); returns the path."""
    plt = load_pyplot()
    report = inspection.report
    channels = report["latent"]["channels"] or 0
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8.0, min(24.0, 0.4 * channels + 3)), 8),
                                      gridspec_kw={"height_ratios": [3, 2]})
    try:
        if report["latent"]["mode"] == "tokens":
            _tokens(top, report)
        else:
            _channels(top, inspection)
        _durations(bottom, inspection)
        where = report.get("output") or f"{len(report['shards'])} latent shards"
        fig.suptitle(f"wds-encode inspect: {where}\n{report['sampling']['text']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(str(path), format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def _channels(ax, inspection: Inspection) -> None:
    frames = inspection.frames
    report = inspection.report
    if frames is None or frames.ndim != 2 or not len(frames):
        ax.text(0.5, 0.5, "no unpadded frames", ha="center", va="center", transform=ax.transAxes)
        return
    positions = np.arange(frames.shape[1])
    parts = ax.violinplot([frames[:, c] for c in positions], positions=positions, showextrema=False, widths=0.8)
    for body in parts["bodies"]:
        body.set_alpha(0.6)
    rows = report["channels"]
    means = [r["mean"] if r["mean"] is not None else np.nan for r in rows]
    stds = [r["std"] if r["std"] is not None else np.nan for r in rows]
    ax.errorbar(positions, means, yerr=stds, fmt="o", color="black", markersize=3, linewidth=1,
                label="mean ± std (all read frames)")
    ax.set_xticks(positions)
    ax.tick_params(axis="x", labelsize=7 if len(positions) > 32 else 9)
    ax.set_xlabel("channel")
    g = report["global"]
    what = "posterior means" if report["latent"]["mode"] == "params" else f"{report['latent']['mode']} latents"
    scale = "-" if g["scale_factor"] is None else f"{g['scale_factor']:.4g}"
    ax.set_title(f"per-channel distributions of {what}: reservoir of {len(frames)} unpadded frames "
                 f"(seeded); global std {g['std']:.4g}, scale_factor {scale}", fontsize=9)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(loc="upper right", fontsize=8)


def _tokens(ax, report: dict) -> None:
    for t in report["tokens"]:
        counts = np.asarray(t["counts"], dtype=np.float64)
        if not counts.sum():
            continue
        label = (f"quantizer {t['quantizer']}: {t['used']}/{t['codebook_size']} codes, "
                 f"perplexity {t['perplexity']:.1f}") if t["quantizer"] < MAX_LEGEND_QUANTIZERS else None
        ax.plot(np.arange(len(counts)), counts / counts.sum(), drawstyle="steps-mid", linewidth=1, label=label)
    ax.set_xlabel("token id")
    ax.set_ylabel("frequency")
    ax.set_yscale("log")
    ax.set_title("token frequencies per quantizer (all read unpadded frames)", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)


def _durations(ax, inspection: Inspection) -> None:
    durations = inspection.durations
    if durations is None or not len(durations):
        ax.text(0.5, 0.5, "no file durations in the metadata", ha="center", va="center", transform=ax.transAxes)
        return
    bins = int(min(50, max(10, np.sqrt(len(durations)))))
    ax.hist(durations, bins=bins, color="tab:blue", alpha=0.8)
    ax.set_xlabel("file duration (s)")
    ax.set_ylabel("files")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"durations of {len(durations)} files (each file's first window)", fontsize=9)
