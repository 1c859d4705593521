"""Progress in a log: one plain line per interval, never a carriage return (a tqdm bar redrawn thousands of
times is what a SLURM or nohup log would otherwise hold)."""
import io

from harness.train.progress import LineProgress, progress


def test_a_log_gets_one_line_per_interval_and_a_last_one():
    t = [0.0]
    out = io.StringIO()
    bar = LineProgress(total=1000, initial=100, desc="tf/tiny", every=30, stream=out, clock=lambda: t[0])
    for _ in range(900):  # 900 steps of 0.125 s: lines at 30, 60 and 90 s (steps 340, 580, 820), and at close
        t[0] += 0.125
        bar.update(1)
        bar.set_postfix(loss="2.000", tok_s="512", refresh=False)
    bar.close()
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 4
    # 240 steps in the first 30 s: 8 steps/s, 660 to go -> 82.5 s = 1.4 min
    assert lines[0] == "tf/tiny: step 340/1000 (34%), 8.00 steps/s, eta 1.4 min, loss=2.000, tok_s=512"
    assert [line.split(",")[0] for line in lines[1:3]] == ["tf/tiny: step 580/1000 (58%)", "tf/tiny: step 820/1000 (82%)"]
    assert lines[-1].startswith("tf/tiny: step 1000/1000 (100%)")


def test_a_non_terminal_stream_gets_lines_and_a_terminal_a_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert isinstance(progress(10, 0, "x", stream=io.StringIO()), LineProgress)
    bar = progress(10, 0, "x", stream=Tty())
    assert not isinstance(bar, LineProgress)
    bar.close()
