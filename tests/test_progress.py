"""gl_jax.data.progress: a bar on a terminal, a few whole lines in a file or a pipe."""
import io

from gl_jax.data import progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_in_a_file_each_update_is_a_whole_line_and_they_are_few(monkeypatch):
    monkeypatch.setattr(progress, "FILE_INTERVAL_S", 0.0)   # every update shows
    out = io.StringIO()
    with progress.bar(total=5, desc="epoch 1/1", file=out, leave=False, mininterval=0,
                      miniters=1) as bar:
        for _ in range(5):
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(line.startswith("epoch 1/1") for line in lines)
    assert "5/5" in lines[-1]


def test_in_a_file_updates_wait_for_the_interval():
    out = io.StringIO()
    with progress.bar(total=1000, desc="scan", file=out, leave=False) as bar:
        for _ in range(1000):
            bar.update(1)
    assert len(out.getvalue().splitlines()) <= 2          # the first draw, maybe the last


def test_on_a_terminal_the_bar_redraws_in_place():
    out = _Terminal()
    with progress.bar(total=3, desc="epoch", file=out, mininterval=0) as bar:
        for _ in range(3):
            bar.update(1)
    assert "\r" in out.getvalue()
