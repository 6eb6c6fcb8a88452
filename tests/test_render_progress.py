"""The render job's live counts (``rayimg.run.render_progress.Progress``, a plain class the job wraps as a
Ray actor): batches stamped with the time their PNGs were written, whatever order they arrive in."""

from rayimg.run.render_progress import Progress, format_progress, steady_rate


def test_steady_rate_counts_from_the_first_batch_written_even_when_it_reports_late():
    progress = Progress(64, "job")
    # a batch is handed over only once the next is queued: the first arrives with the second's stamp
    # near, the last right after its own write
    progress.report("a", 16, 0, at=112.0)
    progress.report("a", 16, 0, at=100.0)  # written first, reported second
    progress.report("a", 16, 0, at=124.0)
    progress.report("a", 16, 0, at=136.0)
    snap = progress.snapshot()
    assert snap["first"] == 100.0 and snap["last"] == 136.0 and snap["rendered_at_first"] == 16
    assert steady_rate(snap) == 48 / 36  # 16 images every 12 s, not 48 in the 24 s after the first report


def test_rows_found_written_are_not_the_first_image():
    progress = Progress(32, "job")
    progress.report("a", 0, 16)  # a resumed catalog: these were already there
    snap = progress.snapshot()
    assert snap["first"] is None and steady_rate(snap) is None
    assert format_progress(snap, snap["now"] - 5).startswith("[render] 16/32 rows done (0 rendered, 16 already there)")
    progress.report("a", 16, 0, at=200.0)
    snap = progress.snapshot()
    assert snap["first"] == 200.0 and snap["rendered_at_first"] == 16 and snap["per_actor"] == {"a": 32}
