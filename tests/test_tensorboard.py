"""What a run shows in TensorBoard, read back from its event files and from a real TensorBoard server."""

import contextlib
import io
import itertools
import json
import math
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    VALIDATION_IMAGES,
    make_digits,
    read_events,
    reported_accuracy,
    run_script,
    trainers_with,
    write_mnist,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tensorboard.plugins.hparams import metadata as hparams_metadata
from torchvision.transforms.functional import pil_to_tensor

from lightning_mnist import LitNeuralNet, main, parse_args
from mnist_kit.data import MNIST_MEAN, MNIST_STD
from mnist_kit.pictures import (
    BLUE,
    CARD_WIDTH,
    CELL,
    EMPTY,
    FONT_SIZE,
    GRID_COLUMNS,
    GRID_IMAGES,
    GRID_PADDING,
    GRID_SCALE,
    RED,
    confusion_picture,
    loss_ticks,
    lr_find_picture,
    predictions_grid,
    tick_decimals,
)

# Rows and columns of images 28 * GRID_SCALE pixels a side, GRID_PADDING apart and around.
PREDICTIONS_SIZE = tuple(
    GRID_PADDING + count * (28 * GRID_SCALE + GRID_PADDING) for count in (GRID_COLUMNS, GRID_IMAGES // GRID_COLUMNS)
)
LR_FIND_SIZE = (CARD_WIDTH, 250)
CONFUSION_SIZE = (11 * CELL, 11 * CELL + CELL // 2)  # 10 x 10 cells, the digits and a caption


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = np.frombuffer(png[16:24], dtype=">u4")
    return int(width), int(height)


## The grid of guesses, drawn in process


def test_predictions_grid_frames_each_image_with_its_guess_green_if_right_red_if_wrong():
    white, black = (1 - MNIST_MEAN) / MNIST_STD, -MNIST_MEAN / MNIST_STD  # pixel values as the loader gives them
    images = torch.stack([torch.full((1, 28, 28), white if index % 2 else black) for index in range(GRID_IMAGES)])
    labels = torch.arange(GRID_IMAGES) % 10
    predictions = labels.clone()
    wrong = [3, 17, 30]
    predictions[wrong] = (labels[wrong] + 1) % 10
    grid = predictions_grid(images, predictions, labels).int()
    assert (grid.shape[2], grid.shape[1]) == PREDICTIONS_SIZE and grid.shape[0] == 3
    green, red = torch.tensor([0, 128, 0]), torch.tensor([255, 0, 0])
    side = 28 * GRID_SCALE
    for index in range(GRID_IMAGES):
        row, column = divmod(index, GRID_COLUMNS)
        left, top = GRID_PADDING + (side + GRID_PADDING) * column, GRID_PADDING + (side + GRID_PADDING) * row
        colour = red if index in wrong else green
        # The image itself, un-normalised, clear of its caption and its frame.
        image = grid[:, top + side // 2 : top + side - 3, left + 3 : left + side - 3]
        assert ((image - (255 if index % 2 else 0)).abs() <= 1).all(), index
        assert (grid[:, top + side // 2, left] == colour).all(), index  # the frame's left edge, below the caption
        # The caption in the top left corner: white text on the frame's colour, as tall as the font.
        caption = grid[:, top : top + side // 2, left : left + side].flatten(1).T
        background = (caption == colour).all(dim=1)
        text = caption.amin(dim=1) > 128  # white, or nearly where it is smoothed into the background
        assert background.sum() > 100 and text.sum() > 10, index
        # The caption's box, inside the 2-pixel frame: as tall as the font, and wider for "1, is 0" than for "1".
        rows = (grid[:, top : top + side, left + 2] == colour[:, None]).all(dim=0).nonzero()
        assert rows.max() - rows.min() >= FONT_SIZE, index
        columns = (grid[:, top + 2, left : left + side - 2] == colour[:, None]).all(dim=0).nonzero()
        assert (columns.max() > side // 2) == (index in wrong), index


def test_the_pictures_fit_tensorboards_card_and_their_text_is_not_shrunk_below_readable():
    # The card shrinks a picture wider than CARD_WIDTH to fit: text drawn at FONT_SIZE shows at size * scale.
    for width in (PREDICTIONS_SIZE[0], LR_FIND_SIZE[0]):
        assert FONT_SIZE * min(1, CARD_WIDTH / width) >= 13, width


@settings(max_examples=300, deadline=None)
@given(st.floats(-10, 100, allow_nan=False), st.floats(0, 50, allow_nan=False))
def test_the_loss_axis_has_a_few_round_ticks_around_any_curve(low, spread):
    high = low + spread
    ticks = loss_ticks(low, high)
    assert 3 <= len(ticks) <= 7, ticks
    assert ticks[0] <= low + 1e-9 and ticks[-1] >= high - 1e-9, ticks
    steps = [after - before for before, after in pairwise(ticks)]
    assert max(steps) - min(steps) < 1e-9 * max(1, abs(ticks[-1])), ticks
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert min(abs(mantissa - round_value) for round_value in (1, 2, 5, 10)) < 1e-6, ticks
    labels = [f"{tick:.{tick_decimals(ticks)}f}" for tick in ticks]
    assert len(set(labels)) == len(labels) and all(float(label) == pytest.approx(tick) for label, tick in
                                                   zip(labels, ticks, strict=True)), labels  # fmt: skip


def test_lr_find_picture_marks_each_loss_tick_on_its_axis():
    rates = [10 ** (-6 + index / 20) for index in range(101)]  # 1e-6 to 0.1, as the finder sweeps
    losses = [2.3 - 1.8 * math.exp(-(((index - 70) / 20) ** 2)) for index in range(101)]
    picture = lr_find_picture(rates, losses, suggestion=rates[60])
    assert (picture.shape[2], picture.shape[1]) == LR_FIND_SIZE
    ticks = loss_ticks(min(losses), max(losses))
    # The axis: the leftmost black column of pixels; a tick: a short black line just left of it.
    black = (picture < 60).all(dim=0)
    axis = int(black.sum(dim=0).argmax())
    marks = black[:, axis - 4 : axis].all(dim=1).nonzero().flatten().tolist()
    assert len(marks) >= len(ticks) >= 4, (marks, ticks)


def test_confusion_picture_tints_each_cell_by_its_share_of_the_true_digit_and_writes_its_count():
    counts = torch.zeros(10, 10, dtype=torch.int64)
    counts[3, 3], counts[3, 5] = 75, 25  # three quarters of the 3s right, a quarter taken for 5s
    counts[7, 7] = 100
    picture = confusion_picture(counts)
    assert (picture.shape[2], picture.shape[1]) == CONFUSION_SIZE and picture.dtype == torch.uint8

    def cell(true: int, guess: int) -> torch.Tensor:
        left, top = CELL * (guess + 1), CELL * (true + 1)
        return picture[:, top : top + CELL - 2, left : left + CELL - 2]

    def tint(colour, share: float) -> torch.Tensor:
        return torch.tensor([round(EMPTY + share**0.5 * (channel - EMPTY)) for channel in colour], dtype=torch.uint8)

    for (true, guess), colour, share in (
        ((3, 3), BLUE, 0.75), ((3, 5), RED, 0.25), ((7, 7), BLUE, 1.0), ((0, 0), BLUE, 0.0), ((5, 3), RED, 0.0),
    ):  # fmt: skip
        pixels = cell(true, guess).flatten(1).T
        background = (pixels == tint(colour, share)).all(dim=1)
        assert background.float().mean() > 0.8, (true, guess)  # the cell's colour, but where its count is written
        written = not background.all()
        assert written == bool(counts[true, guess]), (true, guess)


## A short run on the tiny MNIST: its event files


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist, tmp_path_factory):
    """Three epochs on the tiny MNIST, as a user runs it, then the same for two epochs (version_1);
    the folder and the output of the first."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    result = run_script("--data-dir", str(tiny_mnist), "--max-epochs", "3", cwd=cwd)
    assert result.returncode == 0, result.stderr
    second = run_script("--data-dir", str(tiny_mnist), "--max-epochs", "2", cwd=cwd)
    assert second.returncode == 0, second.stderr
    return cwd, result


def test_a_run_ends_with_its_folder_and_the_command_to_open_it(tiny_run):
    cwd, result = tiny_run
    lines = result.stdout.splitlines()
    run_folder = (cwd / "lightning_logs" / "version_0").resolve()
    assert lines[-2:] == [f"Run folder: {run_folder}", f"Open it in TensorBoard: tensorboard --logdir {run_folder}"]
    assert lines[-4].startswith("Test accuracy: ")
    assert list(run_folder.glob("events.out.tfevents.*"))


def test_event_files_hold_the_scalars_with_plausible_values(tiny_run):
    cwd, _ = tiny_run
    events = read_events(cwd / "lightning_logs" / "version_0")
    scalars = {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    for tag in ("val_loss", "val_acc", "avg_val_loss"):
        assert len(scalars[tag]) == 3, tag  # once per epoch
    assert len(scalars["test_acc"]) == len(scalars["test_loss"]) == 1
    assert [event.step for event in events.Scalars("train_loss")] == [9]  # every 10 of the 3 x 6 steps
    for tag in ("train_loss", "val_loss", "avg_val_loss", "test_loss"):
        assert all(math.isfinite(value) and value >= 0 for value in scalars[tag]), tag
    for tag in ("val_acc", "test_acc"):
        assert all(0 <= value <= 1 for value in scalars[tag]), tag
    assert scalars["test_acc"][0] >= 0.9  # the tiny digits are easy to tell apart
    assert "hp_metric" not in scalars  # Lightning's placeholder for the HParams tab is off


def test_event_files_hold_one_grid_and_one_confusion_matrix_per_epoch(tiny_run):
    cwd, _ = tiny_run
    events = read_events(cwd / "lightning_logs" / "version_0")
    assert set(events.Tags()["images"]) == {"val_predictions", "val_confusion_matrix"}
    for tag, size in (("val_predictions", PREDICTIONS_SIZE), ("val_confusion_matrix", CONFUSION_SIZE)):
        images = events.Images(tag)
        assert [image.step for image in images] == [0, 1, 2], tag  # the epochs; none for the sanity check
        for image in images:
            assert (image.width, image.height) == size == png_size(image.encoded_image_string), tag


def test_hparams_tab_shows_the_whole_configuration_and_the_accuracies_of_the_weights_tested(tiny_run):
    cwd, _ = tiny_run
    events = read_events(cwd / "lightning_logs" / "version_0")
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    session = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    values = {name: getattr(value, value.WhichOneof("kind")) for name, value in session.hparams.items()}
    # Every flag and every argument of the model, as the run used them.
    assert set(values) == set(vars(parse_args([]))) | set(LitNeuralNet().hparams)
    assert values["max_epochs"] == 3 and values["hidden_size"] == 500 and values["seed"] == 42
    assert values["learning_rate"] == pytest.approx(1e-3) and values["precision"] == "32-true"
    # The values the tab shows: the best epoch's validation accuracy (its weights were tested) and the test's.
    val_acc = [event.value for event in events.Scalars("val_acc")]
    assert [event.value for event in events.Scalars("hp/val_acc")] == [max(val_acc)]
    assert [event.value for event in events.Scalars("hp/test_acc")] == [events.Scalars("test_acc")[0].value]


def test_hparams_show_flags_as_true_or_false_and_leave_the_columns_to_tensorboard(tiny_run):
    cwd, _ = tiny_run
    content = read_events(cwd / "lightning_logs" / "version_0").PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    # With no run's "experiment" fixing the columns, TensorBoard puts first those that differ between runs.
    assert hparams_metadata.EXPERIMENT_TAG not in content
    session = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    values = {name: getattr(value, value.WhichOneof("kind")) for name, value in session.hparams.items()}
    flags = [name for name, value in vars(parse_args([])).items() if isinstance(value, bool)]
    assert flags and all(values[name] == "false" for name in flags), {name: values[name] for name in flags}
    assert values["max_epochs"] == 3  # numbers stay numbers: the table sorts and filters them as such
    assert values["gpus"] == "None"  # unset


## The same run, read back by the real TensorBoard


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Requests to the local server never go through a proxy, whatever the environment says
# (urllib's own opener keeps the proxies set when it first ran, in another test perhaps).
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(url: str, post: dict | None = None):
    """GET url, or POST it a JSON body, and return the JSON it answers."""
    body = None if post is None else json.dumps(post).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with LOCAL.open(request, timeout=5) as response:
        return json.load(response)


def test_tensorboard_serves_the_scalars_the_pictures_and_the_hparams(tiny_run, tmp_path):
    cwd, _ = tiny_run
    expected = read_events(cwd / "lightning_logs" / "version_0")
    port = free_port()
    base = f"http://127.0.0.1:{port}/data/plugin"
    log = tmp_path / "tensorboard.log"
    with log.open("w") as output:
        # --load_fast=false: TensorBoard reads the files itself rather than in a second server process.
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(cwd / "lightning_logs"),
             "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        # It answers once it has started, and lists the tags once it has read the files: wait for both.
        deadline = time.monotonic() + 120
        tags = {}
        while not all("test_acc" in tags.get(run, {}) for run in ("version_0", "version_1")):
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, ("TensorBoard did not serve the run in time", log.read_text())
            try:
                tags = get_json(f"{base}/scalars/tags")
            except OSError:  # not listening yet
                pass
            time.sleep(0.2)
        assert set(tags["version_0"]) >= {"val_loss", "val_acc", "avg_val_loss", "test_loss", "test_acc"}
        for tag in ("val_acc", "avg_val_loss", "test_acc"):
            query = urllib.parse.urlencode({"run": "version_0", "tag": tag})
            served = [(step, value) for _, step, value in get_json(f"{base}/scalars/scalars?{query}")]
            assert served == [(event.step, pytest.approx(event.value)) for event in expected.Scalars(tag)], tag

        assert set(get_json(f"{base}/images/tags")["version_0"]) == {"val_predictions", "val_confusion_matrix"}
        query = urllib.parse.urlencode({"run": "version_0", "tag": "val_predictions"})
        grids = get_json(f"{base}/images/images?{query}")
        assert [grid["step"] for grid in grids] == [0, 1, 2]
        with LOCAL.open(f"{base}/images/individualImage?{grids[-1]['query']}", timeout=5) as response:
            assert png_size(response.read()) == PREDICTIONS_SIZE

        # What the HParams tab asks for: one row per run, with its hyperparameters and metrics.
        metrics = [{"metric": {"tag": tag}} for tag in ("hp/val_acc", "hp/test_acc")]
        query = {"experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": metrics,
                 "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]}  # fmt: skip
        rows = {row["name"]: row for row in get_json(f"{base}/hparams/session_groups", post=query)["sessionGroups"]}
        assert set(rows) == {"version_0", "version_1"}  # the two runs, told apart by their max_epochs
        # The table's first columns, which it shows without scrolling: what differs between the runs.
        columns = get_json(f"{base}/hparams/experiment", post={"experimentName": ""})["hparamInfos"]
        assert columns[0]["name"] == "max_epochs" and columns[0]["differs"], columns[:2]
        assert not any(column.get("differs") for column in columns[1:]), columns
        assert (rows["version_0"]["hparams"]["max_epochs"], rows["version_1"]["hparams"]["max_epochs"]) == (3, 2)
        row = rows["version_0"]
        assert row["hparams"]["hidden_size"] == 500 and row["hparams"]["learning_rate"] == pytest.approx(1e-3)
        # TensorBoard offers every scalar of the run as a metric column; these two are the run's result.
        served = {value["name"]["tag"]: value["value"] for value in row["metricValues"]}
        assert {tag: served[tag] for tag in ("hp/val_acc", "hp/test_acc")} == {
            "hp/val_acc": pytest.approx(max(event.value for event in expected.Scalars("val_acc"))),
            "hp/test_acc": pytest.approx(expected.Scalars("test_acc")[0].value),
        }
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


## Real data: the loss falls


def test_losses_fall_over_a_few_hundred_steps_on_real_mnist(real_mnist, tmp_path):
    result = run_script(
        "--data-dir", str(real_mnist), "--max-epochs", "1", "--limit-train-batches", "300",
        "--limit-val-batches", "10", cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = read_events(tmp_path / "lightning_logs" / "version_0")
    train_loss = [event.value for event in events.Scalars("train_loss")]
    assert len(train_loss) == 300 // 10 and all(math.isfinite(value) for value in train_loss)
    assert train_loss[0] < math.log(10)  # below chance already at step 10
    first, last = np.mean(train_loss[:3]), np.mean(train_loss[-10:])
    print(f"real MNIST, 300 steps: mean train_loss {first:.3f} over steps 10-30, {last:.3f} over steps 210-300")
    assert last < 0.5 * first
    assert 0.9 <= events.Scalars("val_acc")[-1].value <= 1
    assert [image.step for image in events.Images("val_predictions")] == [0]


def mislabelled_test_digits(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny MNIST's digits; in the test set (seed 1) two in five carry a wrong label."""
    images, labels = make_digits(count, seed)
    if seed == 1:
        wrong = torch.arange(count) % 5 < 2
        labels[wrong] = (labels[wrong] + 1) % 10
    return images, labels


class CountConfusions(pl.Callback):
    """Counts each epoch's validation images by (true digit, the model's guess), apart from the script."""

    def __init__(self) -> None:
        self.counts = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.sanity_checking:
            return
        images, labels = batch
        guesses = pl_module(images).argmax(dim=1)
        counts = torch.bincount(labels * 10 + guesses, minlength=100).view(10, 10)
        self.counts[trainer.current_epoch] = self.counts.get(trainer.current_epoch, 0) + counts


@pytest.fixture(scope="module")
def skewed_run(tmp_path_factory):
    """Two epochs, in process, on the tiny MNIST whose test labels are partly wrong: the validation
    accuracy is high and the test accuracy far lower, so that the one taken for the other shows.
    The run's folder, what it printed, and the counts of CountConfusions."""
    data = write_mnist(tmp_path_factory.mktemp("skewed_mnist"), digits=mislabelled_test_digits)
    cwd = tmp_path_factory.mktemp("skewed_run")
    counter = CountConfusions()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(io.StringIO()) as out:
        monkeypatch.chdir(cwd)
        trainers = trainers_with(monkeypatch, counter)
        assert main(["--data-dir", str(data), "--max-epochs", "2"]) == 0
    # The sanity check ran before training (Lightning's default num_sanity_val_steps=2): its batch
    # must not count in epoch 0's confusion matrix.
    assert trainers[0].num_sanity_val_steps > 0
    return cwd / "lightning_logs" / "version_0", out.getvalue(), counter.counts


def test_hparams_tab_shows_the_test_accuracy_as_test_acc_and_the_best_validation_as_val_acc(skewed_run):
    folder, out, _ = skewed_run
    events = read_events(folder)
    hp_test_acc, hp_val_acc = (events.Scalars(tag)[0].value for tag in ("hp/test_acc", "hp/val_acc"))
    # The accuracy that the run printed, and logged as test_acc ...
    assert 100 * hp_test_acc == pytest.approx(reported_accuracy(out), abs=0.005)
    assert hp_test_acc == pytest.approx(events.Scalars("test_acc")[0].value)
    # ... and the validation accuracy of the checkpoint tested, as that checkpoint itself stores it.
    best = Path(re.search(r"^Best checkpoint: (.+\.ckpt)$", out, re.MULTILINE)[1])
    states = torch.load(best, map_location="cpu", weights_only=True)["callbacks"].values()
    scores = [state["best_model_score"] for state in states if Path(state.get("best_model_path", "")) == best]
    assert len(scores) == 1
    assert hp_val_acc == pytest.approx(scores[0].item())
    assert hp_val_acc - hp_test_acc > 0.2  # so the two cannot be mistaken for each other


def test_epoch_zeros_confusion_matrix_counts_each_validation_image_once(skewed_run):
    folder, _, counts = skewed_run
    assert sorted(counts) == [0, 1] and all(count.sum() == VALIDATION_IMAGES for count in counts.values())
    pictures = read_events(folder).Images("val_confusion_matrix")
    assert [picture.step for picture in pictures] == [0, 1]
    for picture in pictures:
        shown = pil_to_tensor(Image.open(io.BytesIO(picture.encoded_image_string)).convert("RGB"))
        # What the matrix of the epoch's own validation images looks like: the counts are written in
        # its cells, so one counted twice (the sanity check's) would show.
        assert torch.equal(shown, confusion_picture(counts[picture.step])), picture.step


def caption_text(picture: torch.Tensor) -> torch.Tensor:
    """Where a one-image grid of black pixels shows text: the white pixels inside its coloured frame."""
    pixels = picture.float() / 255 if picture.dtype == torch.uint8 else picture.float()
    coloured = pixels.amin(dim=0) < 0.5  # the frame, its label and the black image; the padding is white
    rows, columns = coloured.any(dim=1).nonzero()[:, 0], coloured.any(dim=0).nonzero()[:, 0]
    inside = pixels[:, rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    return inside.amin(dim=0) > 0.5


def test_a_mistakes_caption_starts_with_the_guess_then_names_the_true_digit():
    black = torch.full((1, 1, 28, 28), -MNIST_MEAN / MNIST_STD)  # as the validation loader gives it

    def text(guess: int, true: int) -> torch.Tensor:
        return caption_text(predictions_grid(black, torch.tensor([guess]), torch.tensor([true])))

    # A right guess is captioned with its digit alone; a mistake's caption starts at the same place,
    # with the guess, and goes on to name the true digit.
    right = torch.stack([text(digit, digit) for digit in range(10)])
    first_glyph = right.any(dim=(0, 1))  # the columns where any digit alone is written
    for guess in range(10):
        for true in set(range(10)) - {guess}:
            mistake = text(guess, true)
            assert mistake.shape == right.shape[1:]
            differences = (mistake[:, first_glyph] != right[:, :, first_glyph]).sum(dim=(1, 2))
            assert differences.argmin() == guess and differences[true] > 0, (guess, true, differences)
            assert mistake[:, ~first_glyph].sum() > right[true].sum()  # ", is 8" follows the 3


def test_the_confusion_matrix_has_the_true_digit_down_and_the_guess_across():
    counts = torch.zeros(10, 10, dtype=torch.int64)
    counts[3, 3], counts[3, 5] = 60, 40  # 40 images of 3s taken for 5s; no 5 taken for a 3
    counts[5, 5], counts[8, 8], counts[8, 1] = 100, 90, 10
    picture = confusion_picture(counts).int()
    cell = picture.shape[2] // 11  # a row and a column of digits, then 10 x 10 cells

    def colour(true: int, guess: int) -> str:
        # A pixel near the cell's top-left corner, clear of the count written in its middle.
        red, _, blue = picture[:, (true + 1) * cell + cell // 8, (guess + 1) * cell + cell // 8].tolist()
        return "red" if red - blue > 40 else "blue" if blue - red > 40 else "empty"

    assert [colour(3, 3), colour(3, 5), colour(5, 3), colour(5, 5)] == ["blue", "red", "empty", "blue"]
    assert [colour(8, 1), colour(1, 8), colour(8, 8), colour(0, 0)] == ["red", "empty", "blue", "empty"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=100, max_size=100))
def test_each_cell_of_the_confusion_matrix_is_tinted_by_its_own_count(cells):
    counts = torch.tensor(cells).view(10, 10)
    picture = confusion_picture(counts).int()
    cell = picture.shape[2] // 11
    corners = picture[:, cell + cell // 8 :: cell, cell + cell // 8 :: cell][:, :10, :10]  # (3, true, guess)
    redness = corners[0] - corners[2]
    empty = counts == 0
    if empty.any():  # every empty cell has one colour; a count makes a right guess bluer, a mistake redder
        blank = corners[:, empty][:, 0]
        assert (corners[:, empty] == blank[:, None]).all()
        blank_redness = blank[0] - blank[2]
        right, mistakes = ~empty & torch.eye(10, dtype=torch.bool), ~empty & ~torch.eye(10, dtype=torch.bool)
        assert (redness[right] < blank_redness).all() and (redness[mistakes] > blank_redness).all()
    # Within a row (one true digit), a larger count of mistakes is at least as red (each channel is
    # rounded on its own: give or take 1).
    for true in range(10):
        order = counts[true].argsort()
        guesses = [guess for guess in order.tolist() if guess != true]
        assert all(redness[true, a] <= redness[true, b] + 1 for a, b in itertools.pairwise(guesses))
