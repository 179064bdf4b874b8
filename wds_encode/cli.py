"""`wds-encode`: the command line. `run` is the default command and keeps pre_encode.py's names.

Options are generated from `EncodeConfig`, so the help, the defaults and the validation never
disagree. Exit codes: 0 done, 1 too many bad samples (--strict / --max-errors), a rank of the job
failed, or the output could not be written mid-run (disk full, quota, bucket gone), 2 bad
configuration or usage (including an unreadable input or unwritable output, found before the
model loads), 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import sys
import typing
from pathlib import Path
from typing import Optional

import click
from click.core import ParameterSource

from . import __version__
from .config import ConfigError, EncodeConfig, encode_config_from, read_config_file

EXIT_OK, EXIT_BAD_SAMPLES, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130


def _click_type(annotation):
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return _click_type(args[0])
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if annotation is int:
        return click.INT
    if annotation is float:
        return click.FLOAT
    if annotation is Path:
        return click.Path(path_type=Path)
    return click.STRING


# What an option left unset (None) means, where its description does not say it already
UNSET_DEFAULTS = {"limit_batches": "no limit", "max_chunks": "no limit", "max_errors": "no limit",
                  "min_duration": "none", "max_duration": "none", "skip_silent": "off",
                  "num_parts": "from --part K/N or the scheduler's variables"}


def default_text(name: str, field) -> Optional[str]:
    """The `[default: ...]` shown for an option, or None where there is nothing to show: a required option,
    or one whose description says its default itself. Booleans read on / off."""
    default = field.default
    if "default" in (field.description or "").lower():
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return UNSET_DEFAULTS.get(name)
    return str(default)


def encode_options(func):
    """Decorate `func` with one click option per EncodeConfig field (default shown, None passed)."""
    for name, field in reversed(list(EncodeConfig.model_fields.items())):
        cli_name = (field.alias or name).replace("_", "-")
        default = field.default
        shown = default_text(name, field)
        help_text = f"{field.description}" + (f" [default: {shown}]" if shown is not None else "")
        if field.annotation is bool or field.annotation == Optional[bool]:
            decl = f"--{cli_name}/--no-{cli_name}" if default is not False else f"--{cli_name}"
            func = click.option(decl, name, is_flag=True, default=None, help=help_text)(func)
        else:
            func = click.option(f"--{cli_name}", name, type=_click_type(field.annotation), default=None,
                                help=help_text)(func)
    func = click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                        default=None, help="YAML/JSON file of these options; flags given here override it")(func)
    return func


def build_config(ctx: click.Context, config_file: Path | None, values: dict) -> EncodeConfig:
    given = {name: value for name, value in values.items()
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    file_values = None
    source = "command line"
    if config_file is not None:
        file_values = read_config_file(config_file)
        if file_values is None:
            file_values = {}
        if not isinstance(file_values, dict):
            raise ConfigError(f"{config_file}: expected a mapping of option names to values")
        source = f"{config_file} + command line"
    return encode_config_from(file_values, given, source)


def format_summary(stats, output: Optional[str] = None) -> str:
    """The job's summary (rank 0 prints it); `output`: the output's URL (credentials redacted), last."""
    d = stats.as_dict()
    lines = ["wds-encode summary"]
    if d["units_total"] == d["units_skipped"] and not d["units_done"] and not d["units_refused"] \
            and not d["stopped_by"]:
        total = d["units_total"]
        lines.append("  nothing to do: " + ("no units to encode" if not total else
                                             "the 1 unit was already done" if total == 1 else
                                             f"all {total} units were already done")
                     + " (use --overwrite to encode again)")
        if output is not None:
            lines.append(f"  output     {output}")
        return "\n".join(lines)
    lines += [
        f"  units      {d['units_encoded']} encoded, {d['units_skipped']} already done, "
        f"{d['units_failed']} broken"
        + (f", {d['units_refused']} committed first by another attempt (its outputs stand)"
           if d.get("units_refused") else "")
        + (f", {d['units_left']} left" if d["units_left"] else "")
        + f" (of {d['units_total']})",
        f"  samples    {d['samples']}  windows written {d['windows']}  rejected {d['rejected']}"
        + (f"  filtered {d['filtered']} (files skipped by --min-duration, --max-duration or --skip-silent: "
           "errors.jsonl says why)" if d["filtered"] else ""),
        f"  audio      {d['audio_hours']:.4f} h in {d['elapsed_seconds']:.1f} s"
        + (f" (real-time factor {d['realtime_factor']:.1f}x)" if d["audio_seconds"] > 0 else ""),
        f"  problems   {d['errors']} errors, {d['warnings']} warnings"
        + ("  (see errors.jsonl)" if d['errors'] or d['warnings'] else ""),
    ]
    if d["retries"] or d["resumes"]:
        lines.append(f"  storage    {d['retries']} requests retried, {d['resumes']} broken streams resumed "
                     "(reconnects)")
    if d["padding_samples"]:
        lines.append(f"  padding    {100 * d['padding_overhead']:.2f}% (zeros encoded per real sample, "
                     "windows padded to their size)")
    if d["cpus"]:
        lines.append(f"  cpu        {d['cpus']}" + (" per rank" if len(d["units_per_rank"]) > 1 else ""))
    if d["oom_splits"]:
        lines.append(f"  memory     {d['oom_splits']} batch splits after running out of device memory")
    size = f"batch size {d['batch_size']}" + (" (auto)" if d["batch_probe"] else "")
    if d["batches"]:
        lines.append(f"  batches    {d['batches']}, {d['windows_per_batch']:.2f} windows per batch on average ({size})")
        if d["chunking"] == "full" and d["batch_size"] > 1 and d["windows_per_batch"] <= d["batch_size"] / 2:
            lines.append("  slower     --chunking full batches only windows of one length: each distinct length is its\n"
                         "             own batch, so these held few windows. Where exact per-file latents are not\n"
                         "             needed, --chunking split (or crop) pads windows to one size, fills every\n"
                         "             batch and runs faster")
    flags = [name for name, on in (("channels-last", d["channels_last"]), ("cuDNN autotuned", d["autotune"]),
                                   ("torch.compile", d["compiled"])) if on]
    if flags or (d["batch_probe"] and not d["batches"]):
        lines.append("  encoder    " + ", ".join(([] if d["batches"] else [size]) + flags))
    if d["precision_check"]:
        check = d["precision_check"]
        lines.append(f"  precision  {check['precision']} agrees with fp32 on {check['device']}: error "
                     f"{check['relative_error']:.2g} on a probe window (limit {check['limit']:g})")
    if d["fp32_retries"]:
        lines.append(f"  precision  {d['fp32_retries']} batches re-run in fp32 after non-finite latents")
    if len(d["units_per_rank"]) > 1:
        lines.append(f"  ranks      {len(d['units_per_rank'])}, units encoded per rank: "
                     + ", ".join(map(str, d["units_per_rank"])))
    if d["stopped_early"]:
        lines.append("  stopped    at --limit-batches; unfinished units are left for a rerun")
    if output is not None:
        lines.append(f"  output     {output}")
    return "\n".join(lines)


def exit_code_for(stats, config: EncodeConfig) -> int:
    if config.strict and stats.errors:
        return EXIT_BAD_SAMPLES
    if config.max_errors is not None and stats.errors > config.max_errors:
        return EXIT_BAD_SAMPLES
    return EXIT_OK


def run_encode(config: EncodeConfig) -> int:
    """Run this process's part of the job, print the summary (rank 0), and return the exit code.

    Under torchrun or srun this process is one rank. Started alone, it is the whole job, or, when
    `--devices` asks for more than one rank, it starts them and waits for them.
    """
    from .job.distributed import JobAborted, Launch, check_topology, detect_launch, local_process_count, \
        spawn_local_ranks
    from .compat import check_installed
    from .pipeline.manifest import ManifestError
    from .models import CheckpointError, ModelConfigError
    from .job.parts import LeaseLost
    from .job.preemption import Preempted
    from .plan import plan_inputs
    from .runner import run
    from .storage import StorageError, StorageFull, redact_url

    launch = None
    try:
        check_installed()
        launch = detect_launch(os.environ)
        if launch is None:
            nprocs = local_process_count(config)
            if nprocs > 1:
                check_topology(Launch(), config)
                plan_inputs(config)  # a bad input fails once, here, before any rank starts
                return spawn_local_ranks(config, nprocs)
            launch = Launch()
        stats = run(config, launch)
    except (ConfigError, ManifestError, CheckpointError, ModelConfigError) as exc:
        click.echo(f"wds-encode: {_rank_tag(launch)}error: {exc}", err=True)
        return EXIT_CONFIG
    except JobAborted as exc:
        click.echo(f"wds-encode: {_rank_tag(launch)}stopped: {exc}; committed units are kept, rerun the same "
                   "command to finish", err=True)
        return EXIT_BAD_SAMPLES
    except StorageFull as exc:
        click.echo(f"wds-encode: {_rank_tag(launch)}stopped: output full: {exc}; committed units are kept, free "
                   "space (or raise the quota) and rerun the same command to finish", err=True)
        return EXIT_BAD_SAMPLES
    except StorageError as exc:
        click.echo(f"wds-encode: {_rank_tag(launch)}stopped: {exc}; committed units are kept, fix this and rerun "
                   "the same command to finish", err=True)
        return EXIT_BAD_SAMPLES
    except LeaseLost as exc:
        click.echo(f"wds-encode: {_rank_tag(launch)}stopped: {exc}; committed units are kept, and the part's "
                   "new holder finishes it", err=True)
        return EXIT_BAD_SAMPLES
    except Preempted as exc:
        click.echo(f"wds-encode: {_rank_tag(launch)}{exc}; committed units are kept, rerun the same command to "
                   "finish", err=True)
        _note_stop_reported()
        return 128 + exc.signum
    except KeyboardInterrupt:
        click.echo("wds-encode: interrupted; committed units are kept, rerun to finish", err=True)
        return EXIT_INTERRUPTED
    if stats.stopped_by:   # a stop signal: what was in flight is committed, the rest is for the rerun
        code = 128 + int(getattr(signal, stats.stopped_by, signal.SIGTERM))
        if launch.rank == 0:   # rank 0 speaks for the job (and tells a --devices parent that it did)
            done = stats.units_skipped + stats.units_done + stats.units_refused
            click.echo(format_summary(stats, redact_url(config.output_path)))
            click.echo(f"wds-encode: stopped by {stats.stopped_by}: {stats.units_done} units committed by this run "
                       f"({done} of {stats.units_total} done), {stats.units_left} left; "
                       "rerun the same command to finish", err=True)
            _note_stop_reported()
        return code
    if launch.rank != 0:
        return EXIT_OK  # rank 0 speaks for the job
    click.echo(format_summary(stats, redact_url(config.output_path)))
    code = exit_code_for(stats, config)
    if code:
        click.echo(f"wds-encode: {stats.errors} bad samples (limit: "
                   f"{'0 with --strict' if config.strict else config.max_errors}); exiting with {code}", err=True)
    return code


def _note_stop_reported() -> None:
    """Under `--devices N` the parent says nothing more about the stop once a rank has said it (one
    `stopped by` line per job): it names a file in STOP_REPORTED_ENV, created here."""
    from .job.distributed import STOP_REPORTED_ENV
    path = os.environ.get(STOP_REPORTED_ENV)
    if path:
        try:
            Path(path).touch()
        except OSError:
            pass   # the parent then says it too


def _rank_tag(launch) -> str:
    return f"rank {launch.rank}: " if launch is not None and launch.world_size > 1 else ""


class DefaultRunGroup(click.Group):
    """`wds-encode --model-config ...` means `wds-encode run --model-config ...`, as pre_encode.py."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        super().format_help(ctx, formatter)
        run_cmd = self.commands["run"]
        with formatter.section("Options of `run` (the default command)"):
            formatter.write_dl([p.get_help_record(ctx) for p in run_cmd.get_params(ctx)
                                if p.get_help_record(ctx) is not None])


@click.group(cls=DefaultRunGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wds-encode")
def main():
    """Pre-encode audio datasets (WebDataset shards or folders) into autoencoder latents."""


@main.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@encode_options
@click.pass_context
def run_command(ctx: click.Context, config_file, **values):
    """Encode a dataset (the arguments of stable-audio-tools' pre_encode.py, plus more)."""
    try:
        config = build_config(ctx, config_file, values)
    except ConfigError as exc:
        click.echo(f"wds-encode: bad configuration:\n{exc}", err=True)
        ctx.exit(EXIT_CONFIG)
    ctx.exit(run_encode(config))


@main.command("demo")
@click.argument("directory", type=click.Path(path_type=Path), default=Path("demo-out"))
@click.option("--shards", "num_shards", type=click.IntRange(min=1), default=3, show_default=True,
              help="Input tar shards to generate in DIRECTORY/shards")
@click.option("--samples-per-shard", type=click.IntRange(min=1), default=20, show_default=True,
              help="Audio files per shard (FLAC, WAV, MP3 and OGG in turn; 0.3-3 s, 16-48 kHz, mono or stereo)")
@click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Decoding processes at most (as run's --num-workers)")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows per encoder batch (as run's --batch-size)")
@click.option("--progress/--no-progress", default=True,
              help="Show progress while encoding (as run's --progress)  [default: on]")
def demo_command(directory: Path, num_shards: int, samples_per_shard: int, num_workers: int, batch_size: int,
                 progress: bool):
    """Generate a small real-audio dataset in DIRECTORY (default: demo-out) and encode it with the
    bundled model into DIRECTORY/out, then print the equivalent `wds-encode run` command, to encode it
    again with other options."""
    from .demo import prepare_demo, run_command_line

    config = prepare_demo(directory, num_shards=num_shards, samples_per_shard=samples_per_shard,
                          num_workers=num_workers, batch_size=batch_size, progress=progress)
    click.echo(f"demo dataset: {config.dataset_config}")
    code = run_encode(config)
    click.echo(f"the same encode as a command, to rerun with other options (--overwrite replaces "
               f"{config.output_path}):\n  {run_command_line(config)}")
    sys.exit(code)


def _s3_options(profile, endpoint_url, region):
    from .storage import S3Options
    return S3Options(profile=profile, endpoint_url=endpoint_url, region=region)


def s3_access_options(func):
    """--s3-profile / --s3-endpoint-url / --s3-region for commands that read an output."""
    func = click.option("--s3-region", default=None, help="S3 region (default: AWS_REGION)")(func)
    func = click.option("--s3-endpoint-url", default=None,
                        help="S3-compatible endpoint (default: AWS_ENDPOINT_URL, else AWS)")(func)
    func = click.option("--s3-profile", default=None, help="AWS profile (default: AWS_PROFILE)")(func)
    return func


@main.command("status")
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text")
@s3_access_options
def status_command(output: str, as_json: bool, s3_profile, s3_endpoint_url, s3_region):
    """How far the run writing OUTPUT (a folder or s3://bucket/prefix/) has got: units done, failed
    and remaining, windows, audio hours, errors. Works while the run is going, and after it."""
    import json as json_module

    from .tools.status import NotAnOutput, format_status, output_status
    from .storage import Storage, StorageError
    try:
        status = output_status(Storage(_s3_options(s3_profile, s3_endpoint_url, s3_region)).place(output))
    except (NotAnOutput, StorageError) as exc:
        click.echo(f"wds-encode status: error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(json_module.dumps(status, indent=1) if as_json else format_status(status))


@main.command("inspect", short_help="Counts, latent statistics and scale factor of an output")
@click.argument("sources", nargs=-1, required=True, metavar="OUT|SHARD_URLS...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="FILE.png", help="Also draw per-channel distributions and a duration histogram into this PNG "
                   "(needs matplotlib: pip install 'wds-encode[plot]')")
@click.option("--max-windows", type=click.IntRange(min=1), default=None, metavar="N",
              help="Read at most N windows (a seeded random choice for an output) [default: all, exact]")
@click.option("--seed", type=int, default=0, show_default=True, help="Which windows --max-windows picks; the "
              "plot's sample")
@s3_access_options
def inspect_command(sources, as_json: bool, plot_path, max_windows, seed, s3_profile, s3_endpoint_url, s3_region):
    """What an encoded output holds, before training on it: units, files, windows and audio hours per
    dataset, latent shape, dtype and padding, errors by reason, per-channel latent statistics and the
    scale factor (1 / std), or token histograms and codebook usage for discrete outputs.

    OUT is an output folder or s3://bucket/prefix/ (read through its manifest); SHARD_URLS are latent
    shard tars (paths, s3:// URLs, brace patterns), inspected without a manifest. Statistics are over
    the unpadded frames (padding_mask 1).
    """
    import json as json_module

    from .config import ConfigError as DatasetPathError
    from .tools.inspect import InspectError, format_inspection, inspect_output, inspect_shards, is_shard_spec
    from .tools.status import NotAnOutput
    from .storage import Storage, StorageError

    if plot_path is not None:
        from .tools.inspect_plot import PlotUnavailable, load_pyplot
        try:
            load_pyplot()  # before a long read, not after it
        except PlotUnavailable as exc:
            click.echo(f"wds-encode inspect: error: {exc}", err=True)
            sys.exit(EXIT_CONFIG)
    storage = Storage(_s3_options(s3_profile, s3_endpoint_url, s3_region))
    try:
        if is_shard_spec(list(sources)):
            inspection = inspect_shards(storage, list(sources), max_windows=max_windows, seed=seed)
        else:
            try:
                inspection = inspect_output(storage.place(sources[0]), max_windows=max_windows, seed=seed)
            except NotAnOutput as exc:
                raise NotAnOutput(f"{exc} (to inspect latent shards without an output folder, pass their .tar "
                                  "paths or a brace pattern such as OUT/shards/DATASET/{a,b}-000.tar)") from None
        if plot_path is not None:
            from .tools.inspect_plot import write_plot
            write_plot(inspection, plot_path)
    except (NotAnOutput, StorageError, DatasetPathError, InspectError, OSError) as exc:
        click.echo(f"wds-encode inspect: error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(json_module.dumps(inspection.report, indent=1) if as_json else format_inspection(inspection.report))
    if plot_path is not None and not as_json:
        click.echo(f"  plot       {plot_path}")


@main.command("verify")
@click.argument("output")
@click.option("--model-config", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Model config (default: the one recorded in OUTPUT/details.json)")
@click.option("--ckpt-path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Checkpoint (default: the one recorded in OUTPUT/details.json)")
@click.option("--pretrained-name", default=None, help="Model folder instead of --model-config/--ckpt-path")
@click.option("-n", "num_windows", type=click.IntRange(min=1), default=8, show_default=True,
              help="Windows to check")
@click.option("--min-snr", type=float, default=None,
              help="Also flag the output when the median round-trip SNR (dB) is below this [default: off]")
@click.option("--device", default="auto", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Which windows are picked")
@s3_access_options
def verify_command(output: str, model_config, ckpt_path, pretrained_name, num_windows, min_snr, device, seed,
                   s3_profile, s3_endpoint_url, s3_region):
    """Decode N windows of OUTPUT and compare them with their source audio (SNR, mel distance, re-encode).

    Exits 1 when the output looks wrong for this model, 2 when it cannot be checked.
    """
    from .models import CheckpointError, ModelConfigError, load_autoencoder
    from .job.distributed import rank_device
    from .plan import resolve_model_source
    from .storage import Storage, StorageError
    from .tools import verify

    try:
        storage = Storage(_s3_options(s3_profile, s3_endpoint_url, s3_region))
        place = storage.place(output)
        details = verify.load_details(place)
        recorded = details.get("args", {})
        recorded_s3 = _s3_options(recorded.get("s3_profile"), recorded.get("s3_endpoint_url"), recorded.get("s3_region"))
        storage = Storage(_s3_options(s3_profile, s3_endpoint_url, s3_region).over(recorded_s3))
        values = {"model_config": model_config or (None if pretrained_name else recorded.get("model_config")),
                  "ckpt_path": ckpt_path or (None if pretrained_name else recorded.get("ckpt_path")),
                  "pretrained_name": pretrained_name or (None if (model_config or ckpt_path)
                                                         else recorded.get("pretrained_name")),
                  "dataset_config": "-", "output_path": str(output)}
        config = encode_config_from(None, values, "verify")
        model_cfg, ckpt = resolve_model_source(config)
        try:
            model = load_autoencoder(model_cfg, ckpt, with_decoder=True)
        except ModelConfigError as exc:
            click.echo(f"note: cannot build this model's decoder ({exc}); checking re-encoding only", err=True)
            model = load_autoencoder(model_cfg, ckpt)
        dev = rank_device(device)
        model = model.to(dev)
        checks = verify.verify_output(storage.place(output), model, details=details, n=num_windows, seed=seed,
                                      device=dev, storage=storage)
    except (ConfigError, FileNotFoundError, ModelConfigError, CheckpointError, StorageError) as exc:
        click.echo(f"wds-encode verify: error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    click.echo(verify.format_checks(checks))
    click.echo(verify.format_figures(checks, min_snr))   # what the verdict is taken from, every time
    reasons = verify.verdict(checks, min_snr)
    same_checkpoint = verify.checkpoint_matches(details, ckpt)
    click.echo(f"{'checkpoint':<28} " + {True: "the one details.json records (sha256)",
                                         False: "NOT the one details.json records (sha256)",
                                         None: "no sha256 in details.json to compare"}[same_checkpoint])
    if same_checkpoint is False:
        reasons.insert(0, f"{ckpt} is not the checkpoint this output was encoded with (details.json sha256)")
    if model.decoder is None:
        click.echo("no decoder: SNR and mel distance not computed")
    if reasons:
        for reason in reasons:
            click.echo(f"FLAGGED: {reason}")
        sys.exit(EXIT_BAD_SAMPLES)
    click.echo(f"OK: {len(checks)} windows match this model")
    note = verify.negative_snr_note(checks, min_snr)
    if note:
        click.echo(note)


if __name__ == "__main__":  # pragma: no cover
    main()
