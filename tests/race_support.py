"""Processes racing conditional writes on one Place (tests of storage/local.py and storage/s3.py)."""

from __future__ import annotations

import multiprocessing


def open_place(url: str, endpoint: str | None = None):
    """A Place in a racing process: a local folder, or an S3 prefix on `endpoint` (test credentials from
    the environment); its client is made before the race, so that the requests go out together."""
    from wds_encode.storage import S3Options, Storage
    place = Storage(S3Options(endpoint_url=endpoint)).place(url)
    getattr(place, "client", None)
    return place


def _racer(url: str, endpoint: str | None, rounds: list[tuple[str, object]], n: int, start, results) -> None:
    """One racer: per round (name, tag), wait for every racer, then one conditional write, with bytes of
    its own (tag None: `create`; else `replace` from that tag); (round, n, outcome) to `results`."""
    place = open_place(url, endpoint)
    for round_, (name, tag) in enumerate(rounds):
        data = f"writer {n}".encode() * (n + 1)
        start.wait()
        outcome = place.create(name, data) if tag is None else place.replace(name, data, tag)
        results.put((round_, n, outcome))


def race(url: str, rounds: list[tuple[str, object]], racers: int, endpoint: str | None = None) -> list[dict]:
    """`racers` processes, made once, racing a conditional write per round, released together by a
    barrier; per round, racer -> its outcome."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(racers), context.Queue()
    processes = [context.Process(target=_racer, args=(url, endpoint, rounds, n, start, results))
                 for n in range(racers)]
    for process in processes:
        process.start()
    found: list[dict] = [{} for _ in rounds]
    for _ in range(len(rounds) * racers):
        round_, n, outcome = results.get(timeout=120)
        found[round_][n] = outcome
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    return found
