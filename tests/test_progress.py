"""Progress on long work (mlsys.progress): a log (stderr not a terminal) gets one plain line
per step instead of bar redraws; inner loops stay silent there; MLSYS_PROGRESS=0 silences all."""
from __future__ import annotations

from mlsys.progress import Lines, bar


def test_a_log_gets_one_line_per_step(capsys):
    with bar(10, "method2", "img") as b:  # pytest's captured stderr is not a terminal
        assert isinstance(b, Lines)
        b.update(4)
        b.update(0)  # nothing done: no line
        b.set_postfix(loss="0.1")
        b.update(6)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["method2: 4/10 img", "method2: 10/10 img"]
    assert "\r" not in "".join(lines)


def test_inner_loops_and_disabled_bars_print_nothing(capsys):
    for b in (bar(5, "epoch 1/2", "batch", lines=False), bar(5, "prepare", "img", enabled=False)):
        b.update(5)
        b.close()
    assert capsys.readouterr().err == ""
