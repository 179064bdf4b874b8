"""S3 batch jobs end to end: the real command against a real S3-protocol server (moto on 127.0.0.1),
through boto3 exactly as production does, with dropped connections, 503s, kills and full quotas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (WDS_ENCODE, assert_exactly_once, read_folder_layout, run_cli, run_cli_process,
                      write_dataset_config)
from s3_support import TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, s3_env
from wds_encode.pipeline.manifest import RunManifest, done_name, journal_name
from wds_encode.storage import LocalPlace

pytestmark = pytest.mark.slow

SAMPLE_SIZE = 65536          # ~1.5 s at the demo model's 44.1 kHz: files of 1-3 s give 1-2 windows
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory):
    """5 input shards of unequal sizes (local files, uploaded to the bucket by each test)."""
    from wds_encode.synth import write_tar_shards
    folder = tmp_path_factory.mktemp("five")
    samples = []
    paths = []
    for i, n in enumerate([3, 5, 2, 4, 3]):
        p, s = write_tar_shards(folder, 1, n, seed=10 + i, name=f"s{i}", min_seconds=1.0, max_seconds=3.0)
        paths += p
        samples += s
    return paths, samples


def upload_inputs(s3, paths, bucket="audio") -> str:
    """The shards under s3://audio/train/, two of them one level deeper (the listing is recursive)."""
    s3.make_bucket(bucket)
    for i, path in enumerate(paths):
        key = f"train/{'deeper/' if i >= 3 else ''}{path.name}"
        s3.put(bucket, key, path.read_bytes())
    return f"s3://{bucket}/train/"


def s3_dataset_config(tmp_path: Path, s3_path: str, name: str = "dataset.json") -> Path:
    """stable-audio-tools' own S3 dataset config shape."""
    return write_dataset_config(tmp_path / name, "s3", [{"id": "set", "s3_path": s3_path}], random_crop=False)


def encode_args(demo_model, dataset, out, *extra) -> list[str]:
    config, ckpt = demo_model
    return ["--model-config", str(config), "--ckpt-path", str(ckpt), "--dataset-config", str(dataset),
            "--output-path", str(out), "--sample-size", str(SAMPLE_SIZE), "--chunking", "split",
            "--no-progress", *map(str, extra)]


def wds_encode(*args, env, timeout=300) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env, timeout=timeout)


def mirror(s3, bucket: str, prefix: str, dest: Path) -> dict[str, bytes]:
    """Copy every object under the prefix to `dest` (to read it with the local readers); returns them."""
    objects = {}
    for key in s3.keys(bucket, prefix):
        data = s3.get(bucket, key)
        objects[key[len(prefix):]] = data
        path = dest / key[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return objects


def unit_records(out: Path) -> list[dict]:
    """Every committed unit record of a local output (or a local mirror of a bucket's)."""
    return RunManifest(LocalPlace(str(out))).records()


def owned_objects(out: Path) -> set[str]:
    """What a finished run owns: details, errors log, silence latents, filelist, one record per unit, the
    journal entry its writer noted it in, and what the records list; the index, and the released leases.
    A journal entry is no commit: one whose attempt died before its record was created stays, but it
    names a committed unit."""
    owned = {"details.json", "silence.npy", "filelist.txt", "manifest/units.json.gz"}
    if (out / "errors.jsonl").exists():
        owned.add("errors.jsonl")
    records = unit_records(out)
    committed = {record["shard"] for record in records}
    assert len(committed) == len(records)
    for record in records:
        owned.add(done_name(record["shard"]))
        owned.add(journal_name(record["writer"], record["seq"]))
        owned.update(f"{record['rank']}/{i}.{ext}" for i in record["folder_ids"] for ext in ("npy", "json"))
        owned.update(record["latent_shards"])
    for path in (out / "manifest" / "journal").glob("*/*.json"):
        if json.loads(path.read_text())["shard"] in committed:
            owned.add(path.relative_to(out).as_posix())
    owned.update(p.relative_to(out).as_posix() for p in (out / "manifest" / "index").glob("*.json.gz"))
    for path in (out / "manifest" / "parts").glob("*.lease"):
        assert json.loads(path.read_text())["released"] is True, path   # let go when the run finished
        owned.add(path.relative_to(out).as_posix())
    return owned


def check_bucket_output(s3, out_url: str, tmp_path: Path, samples) -> tuple[dict, dict[str, bytes]]:
    """The output prefix holds exactly what the run owns (no orphan, no open upload), every sample once."""
    bucket, _, prefix = out_url[len("s3://"):].partition("/")
    local = tmp_path / f"mirror-{time.monotonic_ns()}"
    objects = mirror(s3, bucket, prefix, local)
    details = assert_exactly_once(local, samples)
    assert set(objects) == owned_objects(local)
    records = unit_records(local)
    assert (local / "filelist.txt").read_text().splitlines() == sorted(
        f"{r['rank']}/{i}.npy" for r in records for i in r["folder_ids"])  # exactly the committed windows
    assert s3.multipart_uploads(bucket) == []
    return details, objects


def status_of(out: str, env) -> dict:
    result = wds_encode("status", out, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_no_credentials(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        assert TEST_ACCESS_KEY_ID.encode() not in data and TEST_SECRET_ACCESS_KEY.encode() not in data


def test_s3_in_s3_out_five_shards_two_workers(s3, five_shards, demo_model, tmp_path):
    paths, samples = five_shards
    source = upload_inputs(s3, paths)
    s3.make_bucket("latents")
    env = s3_env(s3.endpoint)
    out = "s3://latents/runs/first/"
    result = wds_encode(*encode_args(demo_model, s3_dataset_config(tmp_path, source), out,
                                     "--num-workers", 2, "--batch-size", 3, "--cpus", 4), env=env)
    assert result.returncode == 0, result.stderr
    assert "5 encoded, 0 already done" in result.stdout and "2 decode workers" in result.stdout and "output     s3://latents/runs/first/" in result.stdout
    details, objects = check_bucket_output(s3, out, tmp_path, samples)
    assert details["stats"]["units_done"] == 5
    records = [json.loads(v) for k, v in objects.items() if k.startswith("manifest/done/")]
    assert sorted(r["url"] for r in records) == sorted(f"{source}{'deeper/' if i >= 3 else ''}{p.name}"
                                                       for i, p in enumerate(paths))
    assert {r["worker"] for r in records} == {0, 1}

    # plain webdataset reads the latent shards straight from the bucket, over presigned URLs
    import webdataset as wds
    client = s3.client()
    urls = [client.generate_presigned_url("get_object", Params={"Bucket": "latents", "Key": f"runs/first/{k}"})
            for k in sorted(objects) if k.endswith(".tar")]
    streamed = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(streamed) == details["stats"]["windows"] and all(s["npy"].ndim == 2 for s in streamed)

    status = status_of(out, env)
    assert status["state"] == "complete"
    assert status["units"] == {"total": 5, "done": 5, "failed": 0, "remaining": 0}
    assert status["windows"] == details["stats"]["windows"] and status["samples"] == len(samples)
    assert status["audio_hours"] == pytest.approx(details["stats"]["audio_hours"])

    # verify decodes windows read from the output bucket against sources streamed from the input bucket
    verified = wds_encode("verify", out, "-n", 4, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK: 4 windows match this model" in verified.stdout

    # nothing the run wrote or printed holds a credential
    assert_no_credentials(result.stdout, result.stderr, *objects.values())

    again = wds_encode(*encode_args(demo_model, s3_dataset_config(tmp_path, source), out), env=env)
    assert again.returncode == 0, again.stderr
    assert "nothing to do: all 5 units were already done" in again.stdout


@pytest.mark.parametrize("direction", ["s3-in-local-out", "local-in-s3-out"])
def test_s3_on_one_side_only(direction, s3, five_shards, demo_model, tmp_path):
    paths, samples = five_shards
    env = s3_env(s3.endpoint)
    if direction == "s3-in-local-out":
        dataset = s3_dataset_config(tmp_path, upload_inputs(s3, paths))
        out = tmp_path / "out"
    else:
        dataset = write_dataset_config(tmp_path / "d.json", "wds", [{"id": "set", "path": str(paths[0].parent)}],
                                       random_crop=False)
        s3.make_bucket("latents")
        out = "s3://latents/run"
    result = wds_encode(*encode_args(demo_model, dataset, out, "--num-workers", 2, "--batch-size", 4), env=env)
    assert result.returncode == 0, result.stderr
    if direction == "s3-in-local-out":
        assert_exactly_once(out, samples)
        assert set(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == owned_objects(out)
        assert status_of(str(out), env)["units"]["done"] == 5
    else:
        check_bucket_output(s3, out + "/", tmp_path, samples)


def test_dropped_connections_and_503s_are_survived_and_counted(s3, fault_proxy, five_shards, demo_model, tmp_path):
    """Every third object read is cut mid-body, every seventh request answered 503 SlowDown (the first 6)."""
    paths, samples = five_shards
    source = upload_inputs(s3, paths)
    s3.make_bucket("latents")
    fault_proxy.cut_get_every = 3
    fault_proxy.fail_503_every = 7
    fault_proxy.fail_503_at_most = 6
    env = s3_env(fault_proxy.endpoint)
    out = "s3://latents/flaky/"
    result = wds_encode(*encode_args(demo_model, s3_dataset_config(tmp_path, source), out,
                                     "--num-workers", 2, "--batch-size", 3), env=env)
    assert result.returncode == 0, result.stderr
    assert fault_proxy.counts["cuts"] >= 2 and fault_proxy.counts["errors_503"] >= 5, fault_proxy.counts
    details, _ = check_bucket_output(s3, out, tmp_path, samples)
    stats = details["stats"]
    assert stats["resumes"] >= 1 and stats["retries"] >= 1, stats
    assert stats["units_failed"] == 0 and stats["errors"] == 0
    assert f"{stats['retries']} requests retried, {stats['resumes']} broken streams resumed" in result.stdout


def _record_put_seen():
    """A stall predicate: hold every request after the first unit record has gone through."""
    seen = []

    def predicate(method, path, headers):
        if seen:
            return True
        if method == "PUT" and "/manifest/done/" in path:
            seen.append(path)
        return False
    return predicate


def _nth_input_read(n: int):
    """A stall predicate: hold the nth read of an input shard (a worker finished a unit, another is mid-way)."""
    reads = []

    def predicate(method, path, headers):
        if method == "GET" and path.startswith("/audio/") and path.split("?")[0].endswith(".tar"):
            reads.append(path)
        return len(reads) >= n
    return predicate


KILL_POINTS = {
    # a worker starts its second unit while the other's windows are being encoded
    "while-encoding": lambda: _nth_input_read(3),
    # a latent tar's multipart upload in flight
    "while-uploading": lambda: (lambda method, path, headers: "uploadId=" in path and "partNumber=" in path),
    # right after the first unit's record was written
    "after-a-commit": _record_put_seen,
}


def sigkill_at(fault_proxy, predicate, args, env, what: str) -> None:
    """Run `wds-encode` until the proxy holds a request matching `predicate`, then SIGKILL its whole
    process group (as a lost machine would stop it), and let the proxy go."""
    held = fault_proxy.stall(predicate)
    process = subprocess.Popen([WDS_ENCODE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        assert held.wait(120), f"the run never reached {what}"
        time.sleep(0.3)  # let the other threads run into the stall too
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    fault_proxy.release()


def kill_test_run(s3, fault_proxy, five_shards, demo_model, tmp_path, out: str) -> tuple[list, list, dict]:
    """The five shards in the bucket, and (samples, the encode arguments into `out`, an env through the proxy)."""
    paths, samples = five_shards
    source = upload_inputs(s3, paths)
    s3.make_bucket("latents")
    args = encode_args(demo_model, s3_dataset_config(tmp_path, source), out, "--num-workers", 2, "--batch-size", 2)
    return samples, args, s3_env(fault_proxy.endpoint)


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_then_rerun_gives_exactly_the_full_output(point, s3, fault_proxy, five_shards, demo_model,
                                                          tmp_path):
    out = "s3://latents/killed/"
    samples, args, env = kill_test_run(s3, fault_proxy, five_shards, demo_model, tmp_path, out)
    sigkill_at(fault_proxy, KILL_POINTS[point](), args, env, point)
    if point == "while-uploading":
        assert s3.multipart_uploads("latents"), "the kill left an upload open (what the rerun must abort)"

    result = wds_encode(*args, env=env)
    assert result.returncode == 0, result.stderr
    details, _ = check_bucket_output(s3, out, tmp_path, samples)
    status = status_of(out, env)
    assert status["state"] == "complete" and status["units"]["done"] == 5 and status["units"]["remaining"] == 0
    assert status["windows"] == sum(1 for _ in read_folder_layout_from(s3, out, tmp_path))
    if point == "after-a-commit":
        assert details["stats"]["units_skipped"] >= 1


def read_folder_layout_from(s3, out_url: str, tmp_path: Path):
    bucket, _, prefix = out_url[len("s3://"):].partition("/")
    local = tmp_path / f"layout-{time.monotonic_ns()}"
    mirror(s3, bucket, prefix, local)
    return read_folder_layout(local).values()


def test_another_model_config_is_refused_and_overwrite_redoes_it(s3, five_shards, demo_model, tmp_path):
    paths, samples = five_shards
    dataset = s3_dataset_config(tmp_path, upload_inputs(s3, paths))
    s3.make_bucket("latents")
    env = s3_env(s3.endpoint)
    out = "s3://latents/run/"
    assert wds_encode(*encode_args(demo_model, dataset, out, "--num-workers", 2), env=env).returncode == 0
    first = {k: s3.get("latents", k) for k in s3.keys("latents")}

    config = json.loads(Path(demo_model[0]).read_text())
    config["notes"] = "the same weights, another model config file"
    other = tmp_path / "other_model.json"
    other.write_text(json.dumps(config))
    args = encode_args((other, demo_model[1]), dataset, out, "--num-workers", 2)
    refused = wds_encode(*args, env=env)
    assert refused.returncode == 2
    assert "holds the output of a different run (changed: model_config_sha256)" in refused.stderr
    after = {k: s3.get("latents", k) for k in s3.keys("latents")}
    # untouched, but for the job's lease: every run holds it while it runs (this one, to find it must stop)
    lease = "run/manifest/parts/job.lease"
    assert {k: v for k, v in after.items() if k != lease} == {k: v for k, v in first.items() if k != lease}
    before_lease, after_lease = json.loads(first[lease]), json.loads(after[lease])
    assert after_lease["released"] is True and after_lease["generation"] == before_lease["generation"] + 1

    redone = wds_encode(*args, "--overwrite", env=env)
    assert redone.returncode == 0, redone.stderr
    assert "5 encoded, 0 already done" in redone.stdout
    details, objects = check_bucket_output(s3, out, tmp_path, samples)
    assert details["model_config"]["notes"].startswith("the same weights")
    first_records = [json.loads(v) for k, v in first.items() if k.startswith("run/manifest/done/")]
    redone_records = [json.loads(v) for k, v in objects.items() if k.startswith("manifest/done/")]
    assert len(first_records) == len(redone_records) == 5
    first_finished = max(r["finished_at"] for r in first_records)
    assert all(r["finished_at"] > first_finished for r in redone_records)


def test_unreadable_inputs_and_unwritable_outputs_fail_fast(s3, fault_proxy, five_shards, demo_model, tmp_path):
    paths, _ = five_shards
    dataset = s3_dataset_config(tmp_path, upload_inputs(s3, paths))
    s3.make_bucket("latents")
    env = s3_env(fault_proxy.endpoint)
    missing_bucket = wds_encode(*encode_args(demo_model, dataset, "s3://no-such-bucket/out/"), env=env)
    assert missing_bucket.returncode == 2
    assert "--output-path s3://no-such-bucket/out/" in missing_bucket.stderr
    assert "NoSuchBucket" in missing_bucket.stderr

    fault_proxy.reject(lambda method, path, headers: method == "PUT" and path.startswith("/latents/"))
    denied = wds_encode(*encode_args(demo_model, dataset, "s3://latents/out/"), env=env)
    assert denied.returncode == 2 and "AccessDenied" in denied.stderr and "s3://latents/out/" in denied.stderr
    fault_proxy.reject(None)

    nothing = s3_dataset_config(tmp_path, "s3://nothing-here/train/", "none.json")
    no_input = wds_encode(*encode_args(demo_model, nothing, "s3://latents/out/"), env=env)
    assert no_input.returncode == 2
    assert "dataset 'set'" in no_input.stderr and "NoSuchBucket" in no_input.stderr
    fault_proxy.reject(lambda method, path, headers: method == "GET" and path.startswith("/audio"))
    unlisted = wds_encode(*encode_args(demo_model, dataset, "s3://latents/out/"), env=env)
    assert unlisted.returncode == 2 and "cannot list" in unlisted.stderr and "AccessDenied" in unlisted.stderr
    for result in (missing_bucket, denied, no_input, unlisted):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert_no_credentials(result.stdout, result.stderr)
    assert s3.keys("latents") == {}


def test_a_full_bucket_quota_stops_with_one_line_and_a_rerun_finishes(s3, fault_proxy, five_shards, demo_model,
                                                                       tmp_path):
    paths, samples = five_shards
    dataset = s3_dataset_config(tmp_path, upload_inputs(s3, paths))
    s3.make_bucket("latents")
    env = s3_env(fault_proxy.endpoint)
    out = "s3://latents/quota/"
    fault_proxy.reject(_record_put_seen_then(lambda method, path: method in ("PUT", "POST")
                                             and path.startswith("/latents/")), status=507, code="XMinioStorageFull")
    # a process of its own: the job lease it cannot release (every PUT refused) is then a dead process's,
    # which the rerun takes over at once; a lease of this live process would be waited out
    full = run_cli_process(*encode_args(demo_model, dataset, out, "--num-workers", 1, "--batch-size", 2), env=env)
    assert full.returncode == 1
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "output full" in lines[0] and "XMinioStorageFull" in lines[0], full.stderr
    committed = status_of(out, s3_env(s3.endpoint))["units"]["done"]
    assert 1 <= committed < 5

    fault_proxy.reject(None)
    again = wds_encode(*encode_args(demo_model, dataset, out, "--num-workers", 1, "--batch-size", 2), env=env)
    assert again.returncode == 0, again.stderr
    assert f"{5 - committed} encoded, {committed} already done" in again.stdout
    check_bucket_output(s3, out, tmp_path, samples)


def _record_put_seen_then(refuse):
    """A reject predicate: `refuse(method, path)` applies once the first unit record went through."""
    seen = []

    def predicate(method, path, headers):
        if seen:
            return refuse(method, path)
        if method == "PUT" and "/manifest/done/" in path:
            seen.append(path)
        return False
    return predicate


def test_torchrun_two_ranks_s3_in_s3_out(s3, five_shards, demo_model, tmp_path):
    paths, samples = five_shards
    dataset = s3_dataset_config(tmp_path, upload_inputs(s3, paths))
    s3.make_bucket("latents")
    out = "s3://latents/ranks/"
    result = subprocess.run([TORCHRUN, "--nproc-per-node", "2", "-m", "wds_encode", "run",
                             *encode_args(demo_model, dataset, out, "--num-workers", 1, "--batch-size", 2)],
                            capture_output=True, text=True, timeout=300, env=s3_env(s3.endpoint))
    assert result.returncode == 0, result.stderr
    details, objects = check_bucket_output(s3, out, tmp_path, samples)
    assert details["launch"]["world_size"] == 2
    records = [json.loads(v) for k, v in objects.items() if k.startswith("manifest/done/")]
    assert len(records) == 5 and {r["rank"] for r in records} == {0, 1}
    assert {k.split("/")[0] for k in objects if k[0].isdigit()} == {"0", "1"}


def _lists_uploads(method, path, headers):
    """ListMultipartUploads: GET /bucket?uploads (not a part listing, which has an uploadId)."""
    import urllib.parse
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query, keep_blank_values=True)
    return method == "GET" and "uploads" in query and "uploadId" not in query


def test_a_store_that_cannot_list_uploads_gets_a_warning_and_exactly_once(s3, fault_proxy, five_shards,
                                                                           demo_model, tmp_path):
    """s3rver answers NotImplemented to ListMultipartUploads: after a SIGKILL mid-upload the rerun could not
    abort the open upload, and stopped. An open upload is invisible to readers, so the rerun warns once,
    naming the lifecycle rule that cleans such uploads up, and finishes exactly once."""
    out = "s3://latents/no-listing/"
    samples, args, env = kill_test_run(s3, fault_proxy, five_shards, demo_model, tmp_path, out)
    fault_proxy.reject(_lists_uploads, status=501, code="NotImplemented")
    sigkill_at(fault_proxy, KILL_POINTS["while-uploading"](), args, env, "an upload")
    left_open = s3.multipart_uploads("latents")
    assert left_open, "the kill left an upload open"

    result = wds_encode(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert fault_proxy.counts["rejected"] >= 1                     # the rerun did ask, and was refused
    warnings = [line for line in result.stderr.splitlines() if "cannot list multipart uploads" in line]
    assert len(warnings) == 1 and "NotImplemented" in warnings[0]
    assert "AbortIncompleteMultipartUpload" in warnings[0]
    local = tmp_path / "mirror"
    objects = mirror(s3, "latents", "no-listing/", local)
    assert_exactly_once(local, samples)
    assert set(objects) == owned_objects(local)                    # readers see no trace of the open upload
    assert set(left_open) <= set(s3.multipart_uploads("latents"))  # not aborted: the store could not list it
    assert status_of(out, env)["state"] == "complete"


def test_other_listing_errors_still_stop_the_clean_up(s3_in_process, fault_proxy):
    """Only 'not implemented' is skipped: an AccessDenied on the same call is an error, as before."""
    from wds_encode.storage import S3Options, Storage, StorageError
    s3_in_process.make_bucket("latents")
    storage = Storage(S3Options(endpoint_url=fault_proxy.endpoint))
    place = storage.place("s3://latents/denied/")
    fault_proxy.reject(_lists_uploads, status=403, code="AccessDenied")
    with pytest.raises(StorageError, match=r"cannot list multipart uploads: .*AccessDenied"):
        place.remove_unfinished()
    fault_proxy.reject(_lists_uploads, status=501, code="NotImplemented")
    assert place.remove_unfinished() == 0
