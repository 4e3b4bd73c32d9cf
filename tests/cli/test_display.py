"""What `sweep run` prints without a terminal (CI logs, nohup): the pre-flight scan as two lines
(start, and the end with its rate), trial and epoch lines; `--quiet` keeps only the results."""

from __future__ import annotations

import io
import itertools
import re

from rich.console import Console

from pipeline.cli._display import ProgressDisplay


def lines(quiet: bool) -> list[str]:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with ProgressDisplay(3, quiet=quiet, console=console) as display:
        for done in range(1, 501):
            display.images_scanned(done, 500)
        display.message("a study message")
    return buffer.getvalue().splitlines()


def test_the_scan_without_a_terminal_is_a_start_and_an_end_line():
    start, end, message = lines(quiet=False)
    assert start == "scanning 500 image files (each decoded once)"
    assert re.fullmatch(r"scanned 500 image files in \d+\.\d s \(\d+ files/s\)", end), end
    assert message == "a study message"


def test_quiet_keeps_the_messages_only():
    assert lines(quiet=True) == ["a study message"]


# ---- progress within a pass over images (in a terminal) -----------------------------------------


def test_an_epoch_announces_its_images_batch_by_batch():
    """A user's report: minutes-long epochs and the probe's feature pass printed nothing until they ended."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.core import listening
    from pipeline.training._train import evaluate, train_one_epoch

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(10, 3, 4, 4), torch.randint(0, 2, (10,)))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))
    heard: list[tuple[str, int, int]] = []
    with listening(lambda *event: heard.append(event)):
        loader = DataLoader(data, batch_size=4)
        train_one_epoch(
            model, loader, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), 0.1), torch.device("cpu")
        )
        evaluate(model, loader, torch.nn.CrossEntropyLoss(), torch.device("cpu"), what="test")
    assert heard == [("train", 0, 10), ("train", 4, 10), ("train", 8, 10), ("train", 10, 10)] + [
        ("test", 0, 10),
        ("test", 4, 10),
        ("test", 8, 10),
        ("test", 10, 10),
    ]
    heard.clear()
    train_one_epoch(
        model, loader, torch.nn.CrossEntropyLoss(), torch.optim.SGD(model.parameters(), 0.1), torch.device("cpu")
    )
    assert heard == []  # nobody listens outside `listening`


def test_a_live_run_shows_one_line_per_pass_with_rate_and_time_left(monkeypatch):
    from pipeline.core import image_pass

    clock = itertools.count(100.0, 2.0)  # the pass starts at 100 s; 40 images after 2 s, 80 after 4 s
    monkeypatch.setattr("pipeline.cli._display.time.monotonic", lambda: next(clock))
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    with ProgressDisplay(3, console=console) as display:
        with image_pass("probe features (train)", 200) as step:
            step.advance(40)
            (task,) = [t for t in display.progress.tasks if t.description == "  probe features (train)"]
            assert (task.completed, task.total, task.fields["info"]) == (40, 200, "20 img/s, 0:08 left")
            step.advance(40)
            assert task.fields["info"] == "20 img/s, 0:06 left"
        assert [t.description for t in display.progress.tasks] == ["trials"]  # the line is gone at the end


def test_without_a_terminal_passes_print_nothing():
    from pipeline.core import image_pass

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=200)
    with ProgressDisplay(3, console=console), image_pass("train", 100) as step:
        step.advance(100)
    assert buffer.getvalue() == ""
