"""wds_encode/loader.py on outputs written by wds-encode: every window once per epoch in both forms
with 2 workers, crops inside the unpadded region, two ranks disjoint and covering, params sampled
afresh per epoch yet reproducibly, tokens as integers, only committed units, s3:// outputs; and the
metadata contract as plain webdataset / numpy / json readers see it (no project code)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import golden_model, read_folder_layout, write_dataset_config
from wds_encode.config import EncodeConfig
from wds_encode.loader import (LatentFolder, LatentReading, LatentSourceError, collate_latents, latent_dataset,
                               latent_loader, latent_shard_urls)
from wds_encode.pipeline.manifest import RunManifest, done_name
from wds_encode.runner import run
from wds_encode.storage import LocalPlace

SAMPLE_SIZE = 8192       # 128 latent frames with the demo model
CROP = 32
FORMS = ["shards", "folder"]


def encode(demo_model, dataset_config: Path, out: str | Path, **options) -> None:
    model_config, ckpt = options.pop("model", demo_model)
    stats = run(EncodeConfig(model_config=model_config, ckpt_path=ckpt, dataset_config=dataset_config,
                             output_path=str(out), sample_size=options.pop("sample_size", SAMPLE_SIZE),
                             num_workers=0, progress=False, devices="1", **{"batch_size": 8, **options}))
    assert stats.windows > 0 and stats.errors == 0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """4 units x 5 files of 0.3-1.2 s: split into 1-6 windows of 8192 samples, the last one padded."""
    from wds_encode.synth import write_tar_shards
    folder = tmp_path_factory.mktemp("loader-in")
    write_tar_shards(folder / "in", 4, 5, seed=11, name="ld", min_seconds=0.3, max_seconds=1.2,
                     formats=("flac", "wav"))
    return write_dataset_config(folder / "d.json", "wds", [{"id": "ld", "path": str(folder / "in")}],
                                random_crop=False)


@pytest.fixture(scope="module")
def sampled(inputs, demo_model, tmp_path_factory):
    """A `sample` output, split windows, latent tars of at most 3 windows (many shards to deal out)."""
    out = tmp_path_factory.mktemp("loader-out") / "out"
    encode(demo_model, inputs, out, chunking="split", shard_maxcount=3)
    return out


@pytest.fixture(scope="module")
def params_out(inputs, demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("loader-params") / "out"
    encode(demo_model, inputs, out, latent_mode="params")
    return out


def stored(out: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """Every committed window by its name (unit/output key), read with numpy and json."""
    return {f"{md['source_shard']}/{md['key']}": (latent, md) for latent, md in read_folder_layout(out).values()}


def unit_records(out: Path) -> list[dict]:
    """Every committed unit record, by unit."""
    return sorted(RunManifest(LocalPlace(str(out))).records(), key=lambda r: r["shard"])


def name_of(md: dict) -> str:
    return f"{md['source_shard']}/{md['key']}"


def read_epoch(loader) -> list[tuple[torch.Tensor, dict]]:
    """One epoch of a latent_loader, as (latent, metadata) per window, checking each batch's shape."""
    windows = []
    for latents, metadata in loader:
        assert latents.dim() == 3 and latents.shape[0] == len(metadata)
        windows.extend(zip(latents, metadata))
    return windows


@pytest.mark.parametrize("form", FORMS)
def test_every_window_once_per_epoch_with_two_workers(sampled, form):
    truth = stored(sampled)
    loader = latent_loader(str(sampled), 4, form=form, num_workers=2, latent_crop_length=CROP, random_crop=True)
    orders = []
    for epoch in range(2):
        assert loader.epoch == epoch
        windows = read_epoch(loader)
        names = [name_of(md) for _, md in windows]
        assert sorted(names) == sorted(truth), "every committed window exactly once"
        orders.append(names)
        for latent, md in windows:
            channels = truth[name_of(md)][0].shape[0]
            assert latent.shape == (channels, CROP) and latent.dtype == torch.float32
            assert md["padding_mask"].dtype == torch.bool and md["padding_mask"].shape == (CROP,)
    assert orders[0] != orders[1], "a new epoch is shuffled anew"


@pytest.mark.parametrize("form", FORMS)
def test_crops_lie_inside_the_unpadded_region_and_are_the_stored_frames(sampled, form):
    truth = stored(sampled)
    loader = latent_loader(str(sampled), 8, form=form, num_workers=0, latent_crop_length=CROP, random_crop=True)
    starts = set()
    for latent, md in read_epoch(loader):
        array, original = truth[name_of(md)]
        mask = original["padding_mask"]
        last = len(mask) - 1 - mask[::-1].index(1)          # the last unpadded frame
        start = md["latent_crop_start"]
        starts.add(start)
        if last > CROP:
            assert 0 <= start and start + CROP <= last
            assert bool(md["padding_mask"].all())
        else:
            assert start == 0
        expected = array[:, start:start + CROP]
        np.testing.assert_array_equal(latent[:, :expected.shape[1]].numpy(), expected)
        assert md["padding_mask"].tolist()[:expected.shape[1]] == [bool(v) for v in mask[start:start + CROP]]
    assert len(starts) > 3, "random crops start at different frames"


@pytest.mark.parametrize("form", FORMS)
def test_two_ranks_see_disjoint_parts_that_cover_the_epoch(sampled, form):
    truth = stored(sampled)
    seen = []
    for rank in (0, 1):
        loader = latent_loader(str(sampled), 3, form=form, num_workers=2, rank=rank, world_size=2, seed=5)
        seen.append([name_of(md) for _, md in read_epoch(loader)])
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(truth)


def test_the_same_seed_and_epoch_read_the_same_way(sampled):
    def epoch_of(seed, epoch):
        dataset = latent_dataset(str(sampled), latent_crop_length=CROP, random_crop=True, seed=seed)
        dataset.set_epoch(epoch)
        return [(name_of(md), md["latent_crop_start"]) for _, md in dataset]
    assert epoch_of(1, 3) == epoch_of(1, 3)
    assert epoch_of(1, 3) != epoch_of(1, 4)
    assert sorted(epoch_of(1, 3)) != sorted(epoch_of(2, 3)), "another seed crops elsewhere"


def test_params_are_sampled_afresh_every_epoch_reproducibly_around_the_stored_mean(params_out):
    truth = stored(params_out)
    folder = LatentFolder(str(params_out), seed=3)
    index = 0
    name = name_of(folder[index][1])
    array, md = truth[name]
    assert md["latent_mode"] == "params" and md["params_layout"] == "mean,std"
    mean, std = np.split(array, 2, axis=0)
    assert (std > 0).all()
    first, again = folder[index][0], folder[index][0]
    torch.testing.assert_close(first, again, rtol=0, atol=0)          # same epoch and seed: same sample
    folder.set_epoch(1)
    second = folder[index][0]
    assert first.shape == mean.shape and not torch.equal(first, second)   # the next epoch: another one
    reads = 400
    total = np.zeros(mean.shape, dtype=np.float64)
    for epoch in range(reads):
        folder.set_epoch(epoch)
        total += folder[index][0].numpy()
    error = np.abs(total / reads - mean)
    assert (error <= 5 * std / math.sqrt(reads) + 1e-6).all()          # the sample mean approaches the mean
    mean_reader = LatentFolder(str(params_out), params="mean")
    np.testing.assert_array_equal(mean_reader[index][0].numpy(), mean)
    # the latent shards give the same sample of the same window in the same epoch
    shards = latent_dataset(str(params_out), seed=3, shuffle=False)
    shards.set_epoch(1)
    from_shards = {name_of(m): latent for latent, m in shards}
    torch.testing.assert_close(from_shards[name], second, rtol=0, atol=0)


def test_tokens_come_back_as_integers(inputs, tmp_path):
    model = golden_model("oobleck_rvq")
    encode(None, inputs, tmp_path / "out", model=model, is_discrete=True, sample_size=1024)
    truth = stored(tmp_path / "out")
    for form in FORMS:
        windows = read_epoch(latent_loader(str(tmp_path / "out"), 4, form=form, num_workers=0))
        assert len(windows) == len(truth)
        for tokens, md in windows:
            array = truth[name_of(md)][0]
            assert tokens.dtype == torch.int64 and tokens.shape == array.shape
            assert np.array_equal(tokens.numpy(), array.astype(np.int64))


def test_only_committed_units_are_read(sampled, tmp_path):
    import shutil
    out = tmp_path / "out"
    shutil.copytree(sampled, out)
    dropped = unit_records(out)[0]
    (out / done_name(dropped["shard"])).unlink()   # as if that unit had not committed (its journal entry is no commit)
    shutil.rmtree(out / "manifest" / "index")      # (an index lists only committed records)
    assert dropped["shard"] not in {r["shard"] for r in unit_records(out)}
    (out / "shards" / "ld" / f"stray.{dropped['writer']}-000.tar").write_bytes(
        (out / dropped["latent_shards"][0]).read_bytes())
    expected = {n for n, (_, md) in stored(sampled).items() if md["source_shard"] != dropped["shard"]}
    for form in FORMS:
        names = {name_of(md) for _, md in read_epoch(latent_loader(str(out), 4, form=form, num_workers=0))}
        assert names == expected
    assert not any("stray" in url for url in latent_shard_urls(str(out)))


def test_shard_urls_and_brace_patterns_are_read_as_given(sampled):
    urls = latent_shard_urls(str(sampled))
    first = Path(urls[0])
    pattern = str(first.parent / (first.name.rsplit("-", 1)[0] + "-{000..000}.tar"))
    assert latent_shard_urls(pattern) == [str(first)]
    listed = {name_of(md) for _, md in latent_dataset(urls[:2], shuffle=False)}
    from_tars = {name_of(md) for _, md in latent_dataset(str(first), shuffle=False)}
    assert from_tars <= listed and len(listed) > len(from_tars)


def test_sources_that_hold_no_latents_are_refused_with_what_to_pass(tmp_path, sampled):
    with pytest.raises(LatentSourceError, match="no details.json; pass the --output-path"):
        latent_dataset(str(tmp_path))
    with pytest.raises(LatentSourceError, match="form='folder' reads an output"):
        latent_loader(latent_shard_urls(str(sampled))[0], 2, form="folder")
    with pytest.raises(ValueError, match="params='noise'"):
        LatentReading(params="noise")
    with pytest.raises(ValueError, match="form='tars'"):
        latent_loader(str(sampled), 2, form="tars")


def test_collate_pads_to_the_longest_latent_with_a_mask():
    a = (torch.ones(2, 3), {"padding_mask": torch.ones(3, dtype=torch.bool)})
    b = (torch.full((2, 5), 2.0), {"padding_mask": torch.ones(5, dtype=torch.bool)})
    latents, metadata = collate_latents([a, b])
    assert latents.shape == (2, 2, 5)
    assert latents[0, :, 3:].abs().sum() == 0 and metadata[0]["padding_mask"].tolist() == [1, 1, 1, 0, 0]
    assert metadata[1]["padding_mask"].all()


def test_a_short_latent_is_padded_to_the_crop_length():
    reading = LatentReading(latent_crop_length=8)
    latent, md = reading(np.ones((2, 5), np.float32), {"padding_mask": [1, 1, 1, 0, 0]}, epoch=0, fallback_name="k")
    assert latent.shape == (2, 8) and latent[:, 5:].abs().sum() == 0
    assert md["padding_mask"].tolist() == [True] * 3 + [False] * 5


def test_an_s3_output_reads_like_a_local_one(inputs, demo_model, s3_in_process):
    s3_in_process.make_bucket("latents")
    encode(demo_model, inputs, "s3://latents/run/", chunking="split", shard_maxcount=3)
    for form in FORMS:
        windows = read_epoch(latent_loader("s3://latents/run/", 4, form=form, num_workers=2, latent_crop_length=CROP))
        names = [name_of(md) for _, md in windows]
        assert len(names) == len(set(names)) > 20
        assert all(latent.shape[-1] == CROP for latent, _ in windows)
    assert all(url.startswith("s3://latents/run/shards/") for url in latent_shard_urls("s3://latents/run/"))


# ----------------------------------------------------------------------------- the contract, no project code

def test_plain_readers_see_the_metadata_contract(sampled):
    """The latent tars through plain `webdataset.WebDataset(url).decode()` and the folder layout through
    numpy and json agree window by window, and every field means what the README says."""
    import webdataset as wds
    records = unit_records(sampled)
    details = json.loads((sampled / "details.json").read_text())
    ratio = details["model"]["downsampling_ratio"]
    folder = {}
    for record in records:
        for latent_id in record["folder_ids"]:
            rank = record["rank"]
            md = json.loads((sampled / str(rank) / f"{latent_id}.json").read_text())
            # the id names the file and carries the writer: `{writer}-{batch:06d}-{i:04d}`
            assert md["latent_id"] == latent_id and re.fullmatch(rf"{re.escape(record['writer'])}-\d{{6}}-\d{{4}}",
                                                                   latent_id)
            folder[(md["source_shard"], md["key"])] = (np.load(sampled / str(rank) / f"{latent_id}.npy"), md)
    from_tars = {}
    for record in records:
        for rel in record["latent_shards"]:
            for sample in wds.WebDataset(str(sampled / rel), shardshuffle=False).decode():
                md = sample["json"]
                from_tars[(md["source_shard"], md["key"])] = (sample["npy"], md, sample["__key__"])
    assert sorted(folder) == sorted(from_tars) and len(folder) == sum(r["windows"] for r in records)
    for name, (array, md) in folder.items():
        tar_array, tar_md, member_key = from_tars[name]
        assert np.array_equal(array, tar_array) and md == tar_md
        assert member_key == md["key"]
        assert array.dtype == np.float32 and array.ndim == 2
        assert md["latent_shape"] == list(array.shape) and md["latent_length"] == array.shape[1]
        assert md["latent_mode"] == "sample" and re.fullmatch(r"r\d+-g\d+-[0-9a-f]{6}-\d{6}-\d{4}",
                                                                         md["latent_id"])
        mask = md["padding_mask"]
        assert len(mask) == array.shape[1] and set(mask) <= {0, 1}
        assert mask == sorted(mask, reverse=True), "ones, then zeros"
        assert sum(mask) == math.ceil(md["valid_length"] / ratio)
        assert 0 < md["valid_length"] <= SAMPLE_SIZE and md["offset"] == md["chunk_index"] * SAMPLE_SIZE
        assert 0 <= md["chunk_index"] < md["num_chunks"] and md["total_length"] >= md["valid_length"]
        assert isinstance(md["seconds_start"], int) and isinstance(md["seconds_total"], int)
        assert md["seconds_start"] == int(md["offset"] // md["sample_rate"])
        assert math.isclose(md["end_time"] - md["start_time"], md["valid_length"] / md["sample_rate"])
        assert md["source_shard"] == f"{md['dataset_id']}/{md['source_shard'].split('/', 1)[1]}"
        assert md["key"] == (md["__key__"] if md["num_chunks"] == 1 else f"{md['__key__']}_{md['chunk_index']:04d}")
        assert md["sample_rate"] == details["model"]["sample_rate"]
        assert isinstance(md["prompt"], str) and md["prompt"]
        assert md["path"].split("#")[0].endswith(".tar") and md["__key__"] in md["path"]


def test_training_configs_find_exactly_the_written_files(sampled):
    """configs/training/*.json, pointed at a complete output, find what stable-audio-tools' readers
    look for there: every window's .npy with its .json (pre_encoded), every latent tar (wds)."""
    configs = Path(__file__).resolve().parents[1] / "configs" / "training"
    folder = json.loads((configs / "pre_encoded_folder.json").read_text())
    shards = json.loads((configs / "pre_encoded_wds.json").read_text())
    assert folder["dataset_type"] == "pre_encoded" and folder["datasets"][0]["path"].endswith("/")
    assert shards["dataset_type"] == "wds" and shards["pre_encoded"] is True
    assert shards["datasets"][0]["path"].endswith("/shards/")
    for config in (folder, shards):
        assert isinstance(config["latent_crop_length"], int) and config["random_crop"] is True
    records = unit_records(sampled)
    # what the pre_encoded reader lists under `path`: its filelist.txt (stable-audio-tools >= 0.0.17), else a glob
    npys = sorted(sampled / line.strip() for line in (sampled / "filelist.txt").read_text().splitlines())
    assert npys == sorted(sampled.glob("[0-9]*/*.npy"))  # every window, not silence.npy beside them
    assert len(npys) == sum(r["windows"] for r in records)
    for npy in npys:
        md = json.loads(npy.with_suffix(".json").read_text())
        assert {"padding_mask", "seconds_total", "seconds_start"} <= set(md)
    shards_root = sampled / shards["datasets"][0]["path"].rstrip("/").rsplit("/", 1)[1]
    tars = sorted(str(p.relative_to(sampled)) for p in shards_root.rglob("*.tar"))
    assert tars == sorted(rel for r in records for rel in r["latent_shards"])


@pytest.fixture(scope="module")
def full_out(inputs, demo_model, tmp_path_factory):
    """A `--chunking full` output: every file at its own length (latents of 1 to 41 frames here)."""
    out = tmp_path_factory.mktemp("loader-full") / "out"
    encode(demo_model, inputs, out, chunking="full", batch_size=2)
    return out


@pytest.mark.parametrize("bucket_width", [None, 8])
def test_variable_length_latents_are_padded_per_batch_with_a_mask(full_out, bucket_width):
    truth = stored(full_out)
    lengths = {name: array.shape[-1] for name, (array, _) in truth.items()}
    assert len(set(lengths.values())) > 5, "the output holds latents of many lengths"
    loader = latent_loader(str(full_out), 3, num_workers=2, bucket_width=bucket_width)
    seen = []
    for latents, metadata in loader:
        real = [lengths[name_of(md)] for md in metadata]
        assert latents.shape[-1] == max(real)                  # padded to the batch's longest only
        if bucket_width is not None:
            assert max(real) - min(real) < bucket_width
        for latent, md, n in zip(latents, metadata, real):
            assert md["padding_mask"].tolist() == [True] * n + [False] * (latents.shape[-1] - n)
            np.testing.assert_array_equal(latent[:, :n].numpy(), truth[name_of(md)][0])
            assert latent[:, n:].abs().sum() == 0
            seen.append(name_of(md))
    assert sorted(seen) == sorted(truth)
    with pytest.raises(ValueError, match="bucket_width works with form='shards'"):
        latent_loader(str(full_out), 3, form="folder", bucket_width=8)


def test_rank_and_world_size_come_from_the_launcher_environment(monkeypatch):
    from wds_encode.loader import distributed_position
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed_position() == (3, 4)                 # torchrun's variables, no process group
    assert distributed_position(1, 2) == (1, 2)             # given ones win
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="rank 4 is not in a world of 4"):
        distributed_position()
