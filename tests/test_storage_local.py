"""storage/local.py: files written under a temporary name, renamed into place; OSErrors as StorageErrors;
conditional writes (create-if-absent, write-if-unchanged) that hold between processes."""


import pytest

from race_support import race
from wds_encode.storage import PARTIAL, LocalPlace, Storage, StorageError, Tagged


def test_local_files_are_read_through_the_same_call(tmp_path):
    path = tmp_path / "a.tar"
    path.write_bytes(b"local bytes")
    storage = Storage()
    assert storage.read_bytes(str(path)) == b"local bytes"
    with pytest.raises(StorageError) as failed:
        storage.open_read(str(tmp_path / "missing.tar"))
    assert str(failed.value) == f"{tmp_path / 'missing.tar'}: cannot read: No such file or directory"


def test_local_write_is_atomic_and_leaves_no_partial_file(tmp_path):
    place = LocalPlace(str(tmp_path / "out"))
    place.write("a/b/c.json", b"first")
    place.write("a/b/c.json", b"second")
    assert (tmp_path / "out" / "a" / "b" / "c.json").read_bytes() == b"second"
    assert sorted(p.name for p in (tmp_path / "out" / "a" / "b").iterdir()) == ["c.json"]
    assert place.delete(["a/b/c.json", "a/b/never.json"]) == 1
    assert place.list() == {}


def test_local_remove_unfinished_deletes_partial_files_only(tmp_path):
    place = LocalPlace(str(tmp_path))
    place.stage("0/a.npy", b"a")
    place.write("0/b.npy", b"b")
    writer = place.open_object("shards/x.tar")
    writer.write(b"half")
    writer.finish()  # an interrupted run: never committed nor aborted
    assert place.list() == {"0/b.npy": 1}   # temporary files are no data: never listed
    assert sorted(p.name for p in tmp_path.rglob("*.partial")) == ["a.npy" + PARTIAL, "x.tar" + PARTIAL]
    assert place.remove_unfinished() == 2
    assert place.list() == {"0/b.npy": 1}
    assert not list(tmp_path.rglob("*" + PARTIAL))


def test_local_errors_are_storage_errors(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    place = LocalPlace(str(tmp_path / "file.txt" / "out"))
    with pytest.raises(StorageError, match=r"file\.txt/out/.*cannot write"):
        place.write("a.json", b"{}")
    with pytest.raises(StorageError, match="Not a directory"):
        place.open_object("a.tar")
    with pytest.raises(StorageError, match=r"a\.json: cannot read: Not a directory"):
        place.read("a.json")  # not "missing": something is in the way
    assert place.list() == {}


def test_check_writable_local_folder_leaves_nothing_behind(tmp_path):
    place = LocalPlace(str(tmp_path / "out"))
    place.check_writable()
    assert (tmp_path / "out").is_dir()  # the output folder itself is made
    assert place.list() == {}
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == []  # not even an empty probe folder


def test_check_writable_local_path_under_a_file_fails(tmp_path):
    (tmp_path / "file.txt").write_text("not a folder")
    with pytest.raises(StorageError) as failed:
        LocalPlace(str(tmp_path / "file.txt" / "out")).check_writable()
    assert failed.value.place == str(tmp_path / "file.txt")   # named by the file in the way, not by an errno
    assert f"{tmp_path / 'file.txt'}, a folder above it, is a file" in str(failed.value)
    with pytest.raises(StorageError, match="is a file, not a folder") as failed:
        LocalPlace(str(tmp_path / "file.txt")).check_writable()
    assert failed.value.place == str(tmp_path / "file.txt")
    assert (tmp_path / "file.txt").read_text() == "not a folder"


def test_writers_of_one_object_at_once_never_fail_and_leave_one_whole_version(tmp_path):
    """Array parts share details.json and the listing, and two tasks of one part race for its lease."""
    import threading
    place = LocalPlace(str(tmp_path))
    errors = []

    def write(n):
        try:
            for i in range(200):
                place.write("manifest/parts/p.lease", f"writer {n} version {i}".encode() * 50)
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)
    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    text = place.read("manifest/parts/p.lease").decode()
    assert text == text[:len(text) // 50] * 50                      # one writer's whole version
    assert place.list() == {"manifest/parts/p.lease": len(text)}     # no temporary file left


def test_a_killed_writers_temporary_file_is_not_listed_but_is_removed_as_unfinished(tmp_path):
    """`write` and `create` stage under NAME.PID-RANDOM.partial: one left by a killed writer is no data."""
    place = LocalPlace(str(tmp_path))
    place.write("manifest/done/a.json", b"{}")
    left = tmp_path / "manifest" / "done" / ("b.json.12345-0123abcd" + PARTIAL)
    left.write_bytes(b"half a record")
    assert place.list() == {"manifest/done/a.json": 2}
    assert place.list("manifest/done") == {"manifest/done/a.json": 2}
    assert place.list("manifest/done", start_after="manifest/done/a.json") == {}
    assert place.read("manifest/done/b.json") is None
    assert place.remove_unfinished(owned=lambda rel: rel != "manifest/done/b.json") == 0   # not the caller's
    assert left.exists()
    assert place.remove_unfinished() == 1
    assert not left.exists() and place.list() == {"manifest/done/a.json": 2}


# ---------------------------------------------------------------------- conditional writes

def test_local_places_have_conditional_writes(tmp_path):
    assert LocalPlace(str(tmp_path / "out")).conditional_writes() is True


def test_local_create_twice_keeps_the_first_content(tmp_path):
    place = LocalPlace(str(tmp_path / "out"))
    assert place.create("manifest/done/a.json", b"first") is True
    assert place.create("manifest/done/a.json", b"second") is False
    assert place.read("manifest/done/a.json") == b"first"
    assert place.list() == {"manifest/done/a.json": 5}            # no temporary file left by either
    assert not list((tmp_path / "out").rglob("*" + PARTIAL))


def test_local_create_does_not_overwrite_a_plainly_written_object(tmp_path):
    place = LocalPlace(str(tmp_path))
    place.write("x.json", b"written")
    assert place.create("x.json", b"created") is False
    assert place.read("x.json") == b"written"


def test_local_read_tagged_gives_the_bytes_and_a_tag_that_changes_with_every_write(tmp_path):
    place = LocalPlace(str(tmp_path))
    assert place.read_tagged("missing.json") is None
    place.write("a.json", b"one")
    first = place.read_tagged("a.json")
    assert isinstance(first, Tagged) and first.data == b"one" and first.tag
    assert place.read_tagged("a.json") == first                   # unchanged: the same tag
    place.write("a.json", b"one")                                 # the same bytes again: a new version
    assert place.read_tagged("a.json").tag != first.tag


def test_local_replace_with_the_tag_read_succeeds_and_returns_the_new_tag(tmp_path):
    place = LocalPlace(str(tmp_path))
    place.write("lease", b"v1")
    tag = place.read_tagged("lease").tag
    new_tag = place.replace("lease", b"v2", tag)
    assert new_tag is not None and new_tag != tag
    assert place.read_tagged("lease") == Tagged(b"v2", new_tag)
    assert place.replace("lease", b"v3", new_tag) is not None    # the returned tag is good for the next one
    assert place.read("lease") == b"v3"
    assert place.list() == {"lease": 2}


def test_local_replace_with_a_stale_tag_is_refused_and_leaves_the_content(tmp_path):
    place = LocalPlace(str(tmp_path))
    place.write("lease", b"v1")
    stale = place.read_tagged("lease").tag
    assert place.replace("lease", b"v2", stale) is not None      # another writer came first
    assert place.replace("lease", b"mine", stale) is None
    assert place.read("lease") == b"v2"
    place.delete(["lease"])
    assert place.replace("lease", b"mine", stale) is None        # gone meanwhile: not recreated
    assert place.read("lease") is None
    assert place.list() == {} and not list(tmp_path.rglob("*" + PARTIAL))


def test_local_replace_without_a_tag_only_creates(tmp_path):
    place = LocalPlace(str(tmp_path))
    tag = place.replace("a/b.json", b"new", None)
    assert tag is not None and place.read_tagged("a/b.json") == Tagged(b"new", tag)
    assert place.replace("a/b.json", b"again", None) is None
    assert place.read("a/b.json") == b"new"


RACERS = 8
ROUNDS = 5


def test_local_processes_racing_create_on_one_name_one_wins(tmp_path):
    names = [f"manifest/done/unit-{r}.json" for r in range(ROUNDS)]
    place = LocalPlace(str(tmp_path))
    for name, won in zip(names, race(str(tmp_path), [(name, None) for name in names], RACERS)):
        winners = [n for n, created in won.items() if created]
        assert len(won) == RACERS and len(winners) == 1, won
        assert place.read(name) == f"writer {winners[0]}".encode() * (winners[0] + 1)
    assert not list(tmp_path.rglob("*" + PARTIAL))


def test_local_processes_racing_replace_from_one_tag_one_wins(tmp_path):
    place = LocalPlace(str(tmp_path))
    rounds = []
    for r in range(ROUNDS):
        name = f"manifest/parts/p-{r}.lease"
        place.write(name, b"the old holder")
        rounds.append((name, place.read_tagged(name).tag))
    for (name, _tag), won in zip(rounds, race(str(tmp_path), rounds, RACERS)):
        winners = [n for n, new_tag in won.items() if new_tag is not None]
        assert len(won) == RACERS and len(winners) == 1, won
        winner = winners[0]
        assert place.read_tagged(name) == Tagged(f"writer {winner}".encode() * (winner + 1), won[winner])
    assert not list(tmp_path.rglob("*" + PARTIAL))


LOCK_AND_PAUSE = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)   # paused inside a compare-and-rename
"""


def test_a_replace_behind_a_lock_holder_that_was_paused_says_so_instead_of_waiting_unseen(tmp_path, monkeypatch):
    import subprocess
    import sys
    import time

    from wds_encode.storage import local
    place = LocalPlace(str(tmp_path))
    place.write("lease", b"v1")
    tag = place.read_tagged("lease").tag
    monkeypatch.setattr(local, "FOLDER_LOCK_WAIT_SECONDS", 0.5)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_AND_PAUSE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(StorageError, match="held this folder.s lock for over 0.5 s .*paused or hung"):
            place.replace("lease", b"v2", tag)
        assert time.monotonic() - started < 10
        assert place.read("lease") == b"v1"
    finally:
        holder.kill()
        holder.wait()
    assert place.replace("lease", b"v2", tag) is not None   # the lock went with the process
