"""storage/local.py: files written under a temporary name, renamed into place; OSErrors as StorageErrors."""

import pytest

from wds_encode.storage import PARTIAL, PROBE_DIR, LocalPlace, Storage, StorageError


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
    assert sorted(place.list()) == ["0/a.npy" + PARTIAL, "0/b.npy", "shards/x.tar" + PARTIAL]
    assert place.remove_unfinished() == 2
    assert place.list() == {"0/b.npy": 1}


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
    assert str(failed.value).startswith(str(tmp_path / "file.txt" / "out" / PROBE_DIR))
    assert "Not a directory" in str(failed.value)


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
