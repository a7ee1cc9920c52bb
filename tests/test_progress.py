"""Progress lines on stderr: when a line is written, and what it says."""
import pytest

from mpl_fast.progress import ProgressLines


def _lines(capsys):
    return capsys.readouterr().err.splitlines()


def test_a_line_every_interval_and_one_at_the_end(capsys, monkeypatch):
    clock = iter([0.0, 1.0, 7.0, 8.0, 20.0])  # began; then one reading a call
    monkeypatch.setattr("mpl_fast.progress.time.monotonic", lambda: next(clock))
    lines = ProgressLines("eval:", "test images", every=5.0)
    lines(10, 40)  # 1 s: too soon
    lines(20, 40)  # 7 s: a line
    lines(30, 40)  # 8 s: too soon
    lines(40, 40, "loss 0.5")  # the end: always
    assert _lines(capsys) == ["eval: 20/40 test images, 3/s, 7 s left",
                              "eval: 40/40 test images, 2/s, 0 s left, loss 0.5"]


@pytest.mark.parametrize("slow", [False, True])
def test_silent_if_quick_says_nothing_of_work_done_within_the_interval(capsys, monkeypatch, slow):
    """Indexing a 10-class tree takes an instant: no line; a 1000-class one, lines to its end."""
    clock = iter([0.0, 1.0, 6.0 if slow else 2.0, 7.0 if slow else 3.0])
    monkeypatch.setattr("mpl_fast.progress.time.monotonic", lambda: next(clock))
    lines = ProgressLines("indexing x:", "class folders", every=5.0, silent_if_quick=True)
    for done in (1, 2, 3):
        lines(done, 3)
    assert _lines(capsys) == (["indexing x: 2/3 class folders, 0/s, 3 s left",
                               "indexing x: 3/3 class folders, 0/s, 0 s left"] if slow else [])
