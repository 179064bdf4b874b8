"""sources.py: every way of naming shards gives the same ordered, uniquely named work units."""

import pytest

from wds_encode.config import ConfigError, DatasetConfig
from wds_encode.pipeline.sources import (claim_order, group_files, list_shards, safe_name, sidecar_caption,
                                         unit_name)
from wds_encode.storage import S3Options, Storage


@pytest.fixture
def tree(tmp_path):
    for rel in ("a/x-000.tar", "a/x-001.tar", "a/x-002.tar", "b/x-000.tar", "b/notes.txt"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return tmp_path


def wds(path, **kw):
    return DatasetConfig(dataset_type="wds", datasets=[{"id": "d", "path": str(path)}], **kw)


def test_directory_is_recursive_and_names_are_unique(tree):
    shards = list_shards(wds(tree))
    assert [s.name for s in shards] == ["a__x-000", "a__x-001", "a__x-002", "b__x-000"]
    assert all(s.is_tar and s.shard_id == f"d/{s.name}" for s in shards)


def test_brace_glob_and_single_file(tree):
    brace = list_shards(wds(f"{tree}/a/x-{{000..002}}.tar"))
    glob = list_shards(wds(f"{tree}/a/x-*.tar"))
    one = list_shards(wds(f"{tree}/a/x-001.tar"))
    assert [s.url for s in brace] == [s.url for s in glob] == [str(tree / f"a/x-00{i}.tar") for i in range(3)]
    assert [s.name for s in brace] == ["x-000", "x-001", "x-002"]
    assert [s.name for s in one] == ["x-001"]


def test_missing_inputs_are_config_errors(tree):
    with pytest.raises(ConfigError, match=r"7 of 10 shards do not exist \(first: .*x-003.tar\)"):
        list_shards(wds(f"{tree}/a/x-{{000..009}}.tar"))
    with pytest.raises(ConfigError, match="no .tar shards"):
        list_shards(wds(f"{tree}/none-*.tar"))
    with pytest.raises(ConfigError, match="s3://"):
        list_shards(DatasetConfig(dataset_type="s3", datasets=[{"id": "d", "s3_path": "s3://b/p/"}]))


def test_several_datasets_and_seeded_shuffle(tree):
    config = DatasetConfig(dataset_type="wds", datasets=[{"id": "one", "path": str(tree / "a")},
                                                         {"id": "two", "path": str(tree / "b")}])
    units = list_shards(config)
    ordered = [s.shard_id for s in units]
    assert ordered == ["one/x-000", "one/x-001", "one/x-002", "two/x-000"]
    shuffled = [s.shard_id for s in claim_order(units, shuffle=True, seed=1)]
    assert sorted(shuffled) == sorted(ordered) and shuffled != ordered
    assert shuffled == [s.shard_id for s in claim_order(units, shuffle=True, seed=1)]


def test_units_know_their_size_and_are_claimed_largest_first(tmp_path):
    sizes = {"a.tar": 3000, "b.tar": 9000, "c.tar": 3000, "d.tar": 100}
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
    units = list_shards(wds(tmp_path))
    assert [(u.name, u.size) for u in units] == [(n[:-4], s) for n, s in sizes.items()]
    # largest first; equal sizes keep the listing order, so every rank computes the same order
    assert [u.name for u in claim_order(units)] == ["b", "a", "c", "d"]


def test_audio_dir_units(tmp_path):
    for i in range(5):
        (tmp_path / f"g{i % 2}").mkdir(exist_ok=True)
        (tmp_path / f"g{i % 2}" / f"f{i}.wav").write_bytes(b"")
    (tmp_path / "readme.txt").write_text("not audio")
    config = DatasetConfig(dataset_type="audio_dir", datasets=[{"id": "dir", "path": str(tmp_path),
                                                                 "custom_metadata_module": "/m.py"}])
    units = list_shards(config, files_per_unit=2)
    assert [u.name for u in units] == [unit_name(["g0/f0.wav", "g0/f2.wav"]), unit_name(["g0/f4.wav", "g1/f1.wav"]),
                                       unit_name(["g1/f3.wav"])]
    assert [u.size for u in units] == [0, 0, 0]
    assert [f for u in units for f in u.files] == ["g0/f0.wav", "g0/f2.wav", "g0/f4.wav", "g1/f1.wav", "g1/f3.wav"]
    assert all(not u.is_tar and u.custom_metadata_module == "/m.py" for u in units)
    with pytest.raises(ConfigError, match="does not exist"):
        list_shards(DatasetConfig(dataset_type="audio_dir", datasets=[{"id": "x", "path": str(tmp_path / "no")}]))
    assert all(u.captions == () for u in units)  # readme.txt is no audio file's caption


def test_audio_dir_units_carry_the_sidecar_captions_of_their_files(tmp_path):
    for rel in ("a/one.flac", "a/one.txt", "a/two.wav", "a/two.TXT", "b/three.mp3", "b/three.txt",
                "b/three.flac.txt", "b/four.ogg", "b/four.json", "notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    config = DatasetConfig(dataset_type="audio_dir", datasets=[{"id": "dir", "path": str(tmp_path)}])
    units = list_shards(config, files_per_unit=2)
    assert [(u.files, u.captions) for u in units] == [
        (("a/one.flac", "a/two.wav"), ("a/one.txt",)),       # same stem, lower-case .txt, same folder
        (("b/four.ogg", "b/three.mp3"), ("b/three.txt",)),  # each unit lists its own files' captions only
    ]
    assert sidecar_caption("x/song.v2.flac") == "x/song.v2.txt"


def _audio_folder(root, names):
    for rel in names:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * len(rel))
    return DatasetConfig(dataset_type="audio_dir", datasets=[{"id": "dir", "path": str(root)}])


def _each_file_once(units, root):
    files = [f for u in units for f in u.files]
    assert sorted(files) == sorted(str(p.relative_to(root)) for p in root.rglob("*.wav"))
    assert len(files) == len(set(files))
    assert len({u.shard_id for u in units}) == len(units)


def test_an_audio_dir_unit_is_named_by_its_files_whatever_the_call():
    assert unit_name(["b.wav", "a/c.wav"]) == unit_name(("a/c.wav", "b.wav")) == "files-" + __import__(
        "hashlib").sha256(b"a/c.wav\nb.wav").hexdigest()[:16]
    assert unit_name(["a/c.wav"]) != unit_name(["a/c.wav", "b.wav"]) != unit_name(["a/c.wav", "b.flac"])


def test_the_same_files_make_the_same_unit_ids_in_every_listing(tmp_path):
    config = _audio_folder(tmp_path, [f"s{i}.wav" for i in range(7)])
    first, again = list_shards(config, files_per_unit=3), list_shards(config, files_per_unit=3)
    assert first == again and [u.name for u in first] == [unit_name(u.files) for u in first]
    assert [u.files for u in first] == [("s0.wav", "s1.wav", "s2.wav"), ("s3.wav", "s4.wav", "s5.wav"), ("s6.wav",)]
    assert list_shards(config, files_per_unit=3, previous=first) == first   # nothing changed: the same units


def test_files_added_to_an_audio_dir_only_add_units(tmp_path):
    config = _audio_folder(tmp_path, [f"a/{i:02d}.wav" for i in range(0, 10, 2)])
    first = list_shards(config, files_per_unit=2)
    _audio_folder(tmp_path, [f"a/{i:02d}.wav" for i in range(1, 10, 2)] + ["0.wav", "z/9.wav"])   # before, between, after
    again = list_shards(config, files_per_unit=2, previous=first)
    kept = [u for u in again if u in first]
    assert kept == first                                          # every old unit: same id, same files, same size
    added = [u for u in again if u not in first]
    assert sorted(f for u in added for f in u.files) == ["0.wav"] + [f"a/{i:02d}.wav" for i in range(1, 10, 2)] + [
        "z/9.wav"]
    assert [u.files for u in added] == [("0.wav", "a/01.wav"), ("a/03.wav", "a/05.wav"), ("a/07.wav", "a/09.wav"),
                                        ("z/9.wav",)]
    _each_file_once(again, tmp_path)
    assert [min(u.files) for u in again] == sorted(min(u.files) for u in again)   # in path order
    assert list_shards(config, files_per_unit=2) != again          # (listed from nothing, other groups)


def test_a_new_files_per_unit_keeps_the_old_units_and_groups_only_new_files(tmp_path):
    config = _audio_folder(tmp_path, [f"{i:02d}.wav" for i in range(5)])
    first = list_shards(config, files_per_unit=2)
    _audio_folder(tmp_path, [f"{i:02d}.wav" for i in range(5, 12)])
    again = list_shards(config, files_per_unit=4, previous=first)
    assert [u for u in again if u in first] == first
    assert [u.files for u in again if u not in first] == [("05.wav", "06.wav", "07.wav", "08.wav"),
                                                          ("09.wav", "10.wav", "11.wav")]
    _each_file_once(again, tmp_path)


def test_a_vanished_file_drops_its_unit_and_regroups_the_rest(tmp_path, capsys):
    config = _audio_folder(tmp_path, [f"{i:02d}.wav" for i in range(6)])
    first = list_shards(config, files_per_unit=3)
    (tmp_path / "01.wav").unlink()
    _audio_folder(tmp_path, ["06.wav"])
    again = list_shards(config, files_per_unit=3, previous=first)
    assert [u for u in again if u in first] == [first[1]]
    assert [u.files for u in again if u not in first] == [("00.wav", "02.wav", "06.wav")]
    _each_file_once(again, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wds-encode: warning: unit dir/{first[0].name} dropped: 1 of its files gone (first: 01.wav); "
                   "its other files are grouped into new units"]


def test_regrouping_keeps_only_previous_units_of_the_same_folder_and_is_pure(tmp_path):
    config = _audio_folder(tmp_path / "one", ["a.wav", "b.wav"])
    other = list_shards(_audio_folder(tmp_path / "two", ["a.wav", "b.wav"]), files_per_unit=1)
    assert list_shards(config, files_per_unit=2, previous=other) == list_shards(config, files_per_unit=2)
    previous = [("files-000001", ("b.wav", "c.wav")), ("files-000000", ("a.wav",)), ("x", ("a.wav", "d.wav"))]
    units, dropped = group_files(["d.wav", "c.wav", "b.wav", "a.wav"], 10, previous)
    assert units == [("files-000000", ("a.wav",)), ("files-000001", ("b.wav", "c.wav")),
                     (unit_name(["d.wav"]), ("d.wav",))]                 # old positional names kept as they were
    assert dropped == [("x", ("a.wav",))]                               # a damaged listing: a file in two units
    assert previous[0] == ("files-000001", ("b.wav", "c.wav"))


@pytest.mark.parametrize("rel, name", [("a/b/c.tar", "a__b__c"), ("../x.tar", "x"), ("we ird.tar", "we_ird")])
def test_safe_name(rel, name):
    assert safe_name(rel) == name


@pytest.fixture
def bucket(s3_in_process):
    """s3://audio/ holding the same tree as `tree` (sizes 1..5), plus a non-tar and a tar elsewhere."""
    s3_in_process.make_bucket("audio")
    for size, rel in enumerate(("a/x-000.tar", "a/x-001.tar", "a/x-002.tar", "b/x-000.tar", "b/notes.txt"), 1):
        s3_in_process.put("audio", f"train/{rel}", b"x" * size)
    s3_in_process.put("audio", "other/y-000.tar", b"y")
    return s3_in_process


def s3_config(path, **entry):
    return DatasetConfig(dataset_type="s3", datasets=[{"id": "d", "s3_path": path, **entry}])


def test_s3_prefix_is_listed_recursively_tars_only_sorted_with_sizes(bucket):
    for spec in ("s3://audio/train/", "s3://audio/train"):
        shards = list_shards(s3_config(spec), Storage())
        assert [s.name for s in shards] == ["a__x-000", "a__x-001", "a__x-002", "b__x-000"]
        assert [s.url for s in shards] == [f"s3://audio/train/{r}" for r in
                                           ("a/x-000.tar", "a/x-001.tar", "a/x-002.tar", "b/x-000.tar")]
        assert [s.size for s in shards] == [1, 2, 3, 4]
    wds_entry = DatasetConfig(dataset_type="wds", datasets=[{"id": "d", "path": "s3://audio/train/a/"}])
    assert [s.name for s in list_shards(wds_entry, Storage())] == ["x-000", "x-001", "x-002"]


def test_s3_brace_patterns_globs_and_single_objects(bucket):
    brace = list_shards(s3_config("s3://audio/train/a/x-{000..002}.tar"), Storage())
    glob = list_shards(s3_config("s3://audio/train/*/x-00[0-1].tar"), Storage())
    single = list_shards(s3_config("s3://audio/train/b/x-000.tar"), Storage())
    assert [s.url.rsplit("/", 2)[-2:] for s in brace] == [["a", "x-000.tar"], ["a", "x-001.tar"], ["a", "x-002.tar"]]
    assert [s.name for s in glob] == ["a__x-000", "a__x-001", "b__x-000"]
    assert [(s.name, s.size) for s in single] == [("x-000", 4)]
    with pytest.raises(ConfigError, match=r"1 of 4 shards do not exist \(first: s3://audio/train/a/x-003.tar\)"):
        list_shards(s3_config("s3://audio/train/a/x-{000..003}.tar"), Storage())


def test_s3_listing_problems_are_config_errors_that_name_the_place(bucket):
    with pytest.raises(ConfigError, match=r"dataset 'd': s3://missing/train/: cannot list: NoSuchBucket"):
        list_shards(s3_config("s3://missing/train/"), Storage())
    with pytest.raises(ConfigError, match="no .tar shards found at 's3://audio/empty/'"):
        list_shards(s3_config("s3://audio/empty/"), Storage())
    with pytest.raises(ConfigError, match="AWS profile 'nobody'"):
        list_shards(s3_config("s3://audio/train/", profile="nobody"), Storage())
    with pytest.raises(ConfigError, match="audio_dir datasets are read from a local folder"):
        list_shards(DatasetConfig(dataset_type="audio_dir", datasets=[{"id": "d", "path": "s3://audio/x/"}]))


def test_a_datasets_profile_decides_where_its_shards_are_read(bucket, tmp_path, monkeypatch):
    """stable-audio-tools' per-dataset `profile`: its endpoint and keys come from the AWS config files."""
    from s3_support import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY
    (tmp_path / "config").write_text(f"[profile src]\nendpoint_url = {bucket.endpoint}\nregion = us-east-1\n")
    (tmp_path / "credentials").write_text(f"[src]\naws_access_key_id = {TEST_ACCESS_KEY_ID}\n"
                                          f"aws_secret_access_key = {TEST_SECRET_ACCESS_KEY}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    shards = list_shards(s3_config("s3://audio/train/b/", profile="src"), Storage())
    assert [(s.name, s.s3.profile) for s in shards] == [("x-000", "src")]
    with pytest.raises(ConfigError, match="dataset 'd'"):  # without the profile: no endpoint, no keys
        list_shards(s3_config("s3://audio/train/b/"), Storage(S3Options(endpoint_url="http://127.0.0.1:9")))


def test_a_kept_listing_gives_back_the_same_units_with_the_options_of_the_dataset_config():
    from wds_encode.config import DatasetConfig
    from wds_encode.pipeline.sources import Shard, listing_bytes, listing_fingerprint, units_from_listing
    from wds_encode.storage import S3Options
    config = DatasetConfig.model_validate({"dataset_type": "s3", "custom_metadata_module": "meta.py", "datasets": [
        {"id": "m", "s3_path": "s3://b/m/", "profile": "reader", "endpoint_url": "http://user:secret@host:9000"}]})
    options = S3Options(profile="reader", endpoint_url="http://user:secret@host:9000")
    units = [Shard(url=f"s3://b/m/{i}.tar", dataset_id="m", name=f"{i}", custom_metadata_module="meta.py",
                   size=100 + i, s3=options) for i in range(3)]
    fingerprint = listing_fingerprint(config, 64)
    data = listing_bytes(units, fingerprint)
    assert b"secret" not in __import__("gzip").decompress(data)       # credentials stay in the config
    assert units_from_listing(data, config, fingerprint) == units
    assert units_from_listing(data, config, listing_fingerprint(config, 32)) is None   # another unit size
    assert units_from_listing(data[:-5], config, fingerprint) is None                  # damaged


@pytest.mark.parametrize("first, second", [("a b.tar", "a_b.tar"), ("a/b.tar", "a__b.tar")])
def test_inputs_whose_unit_ids_collide_are_refused_naming_both(tmp_path, first, second):
    from conftest import write_tar
    for rel in (first, second, "c.tar"):
        write_tar(tmp_path / "in" / rel, [("k.txt", b"x")])
    with pytest.raises(ConfigError) as refused:
        list_shards(wds(tmp_path / "in"))
    message = str(refused.value)
    assert str(tmp_path / "in" / first) in message and str(tmp_path / "in" / second) in message
    assert "rename one of them" in message and "\n" not in message


def test_a_shard_named_twice_is_refused(tree):
    with pytest.raises(ConfigError, match=r"x-001.tar is listed twice; name each shard once"):
        list_shards(wds(f"{tree}/a/x-{{000,001,001}}.tar"))


def test_synthetic_shards_that_collide_are_refused(tmp_path):
    from wds_encode.synth import write_tar_shards
    write_tar_shards(tmp_path / "in", 1, 1, seed=1, name="x y", min_seconds=0.1, max_seconds=0.1)
    write_tar_shards(tmp_path / "in", 1, 1, seed=2, name="x_y", min_seconds=0.1, max_seconds=0.1)
    with pytest.raises(ConfigError, match="x y-000000.tar and .*x_y-000000.tar both make the unit 'd/x_y-000000'"):
        list_shards(wds(tmp_path / "in"))


def test_s3_inputs_whose_unit_ids_collide_are_refused(s3_in_process, storage):
    s3_in_process.make_bucket("clash")
    for key in ("p/a b.tar", "p/a_b.tar", "p/c.tar"):
        s3_in_process.put("clash", key, b"x")
    with pytest.raises(ConfigError, match=r"s3://clash/p/a b.tar and s3://clash/p/a_b.tar both make the unit "
                                          r"'d/a_b'.*rename one of them"):
        list_shards(s3_config("s3://clash/p/"), storage)
