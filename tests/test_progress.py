"""progress.py: one display for the whole job, by input bytes, with an ETA; plain lines off a terminal."""

from __future__ import annotations

import io

from wds_encode.job.progress import (ProgressCounter, ProgressDisplay, ProgressTotals, format_duration, format_line,
                                 progress_fields)

TOTALS = ProgressTotals(bytes=4_000_000, units=10, units_before=2)


def test_percentage_eta_and_rates_come_from_bytes():
    counts = {"bytes": 1_000_000, "units": 3, "windows": 120, "audio_ms": 7_200_000, "errors": 0}
    f = progress_fields(counts, TOTALS, elapsed=60.0)
    assert f["percent"] == 25.0
    assert f["eta"] == 180.0                 # a quarter took a minute: three more to go
    assert f["units"] == 5                   # 2 done by an earlier run + 3 now
    assert f["audio_hours"] == 2.0 and f["rtf"] == 120.0
    line = format_line(counts, TOTALS, 60.0)
    assert line == ("wds-encode:  25.0% (1.0 MB of 4.0 MB) | units 5/10 | windows 120 | audio 2.000 h | "
                    "120x real time | elapsed 0:01:00, ETA 0:03:00")


def test_nothing_read_yet_has_no_eta_and_errors_are_shown():
    assert progress_fields({}, TOTALS, 5.0)["eta"] is None
    assert "ETA ?" in format_line({}, TOTALS, 5.0)
    assert "| 3 errors |" in format_line({"bytes": 10, "errors": 3}, TOTALS, 5.0)
    done = progress_fields({"bytes": 4_000_000}, TOTALS, 5.0)
    assert done["percent"] == 100.0 and done["eta"] == 0.0
    assert progress_fields({}, ProgressTotals(bytes=0, units=3, units_before=3), 1.0)["percent"] == 100.0


def test_format_duration():
    assert format_duration(3725.9) == "1:02:05"
    assert format_duration(-1) == "0:00:00"


def test_plain_lines_off_a_terminal():
    stream = io.StringIO()
    display = ProgressDisplay(TOTALS, interval=30.0, stream=stream)
    assert not display.tty and display.period == 30.0
    display.show({"bytes": 2_000_000, "units": 1})
    display.close({"bytes": 4_000_000, "units": 8})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and " 50.0%" in lines[0] and "100.0%" in lines[1] and "units 10/10" in lines[1]


def test_a_redrawn_bar_on_a_terminal():
    stream = io.StringIO()
    display = ProgressDisplay(TOTALS, interval=30.0, stream=stream, tty=True)
    assert display.period < 1
    display.show({"bytes": 1_000_000, "units": 1, "windows": 7})
    display.close({"bytes": 4_000_000, "units": 8, "windows": 30})
    text = stream.getvalue()
    assert "25%" in text and "100%" in text and "units 10/10, windows 30" in text
    assert "\r" in text  # redrawn in place, not one line per update


def test_counter_sums_and_throttles():
    sent = []
    counter = ProgressCounter(lambda counts: sent.append(dict(counts)))
    counter.add(windows=2, bytes=100)
    counter.add(windows=3)
    assert sent == []                        # within PUBLISH_SECONDS: kept
    counter.flush()
    assert sent == [{"windows": 5, "bytes": 100}]
    counter._sent -= 10                      # as if the last report was long ago
    counter.add(units=1)
    assert sent[-1] == {"units": 1}
    counter.flush()
    assert len(sent) == 2                    # nothing pending, nothing sent
