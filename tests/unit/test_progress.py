"""Progress of long commands: a bar with rate and time left in a terminal, a plain line now and then elsewhere."""

import io

from dfsfuse.cluster.commands import TerminalOutput, progress_pace


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_pace_says_rate_and_time_left_once_it_is_known():
    assert progress_pace(10, 2.0, 30) == ", 5.0/s, 0:06 left"
    assert progress_pace(600, 60.0, 1200) == ", 10.0/s, 2:00 left"
    assert progress_pace(10, 2.0, 0) == ", 5.0/s"  # done: no time left to tell
    assert progress_pace(0, 10.0, 5) == ""  # nothing done yet
    assert progress_pace(3, 0.1, 5) == ""  # too soon to tell


def test_a_terminal_gets_one_bar_redrawn_in_place():
    stream = Terminal()
    output = TerminalOutput(stream)
    for done in range(4):
        output.progress(done, 3, "shards moved")
    text = stream.getvalue()
    assert text.count("\r[") == 4 and text.endswith("3/3 shards moved\x1b[K\n")
    assert "[" + "#" * 30 + "]" in text


def test_elsewhere_plain_lines_the_first_and_the_last():
    stream = io.StringIO()
    output = TerminalOutput(stream)
    for done in range(1, 101):
        output.progress(done, 100, "shards verified")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "1/100 shards verified" and lines[-1].startswith("100/100 shards verified")
    assert len(lines) == 2  # a fast run: nothing between them (one line every PLAIN_EVERY seconds)
    assert "\r" not in stream.getvalue()
