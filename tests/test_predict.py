"""--predict: a person's own pictures of digits, prepared the way MNIST was, and read by a trained model."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import digit_forms, write_digit_forms
from PIL import Image
from pytorch_lightning.accelerators import CPUAccelerator, CUDAAccelerator
from torchvision.datasets import MNIST

from lightning_mnist import LitNeuralNet, main, newest_best_checkpoint, prepare_digit
from mnist_kit.data import MNIST_MEAN, MNIST_STD
from mnist_kit.digits import LARGEST_SIDE

PREDICTION = re.compile(r"^(.+): (\d) \((\d+\.\d)%; next (\d) at (\d+\.\d)%\)(?:; unsure: [^:]+)?$")
FORMS = tuple(digit_forms(torch.zeros(28, 28, dtype=torch.uint8)))


def predictions(out: str) -> list[tuple[str, int, float, int, float]]:
    """The lines --predict printed, each as (path, digit, its percentage, next digit, its percentage)."""
    lines = out.splitlines()
    found = [PREDICTION.match(line) for line in lines]
    assert all(found), lines
    return [(path, int(digit), float(first), int(runner_up), float(second)) for path, digit, first, runner_up, second in
            (match.groups() for match in found)]  # fmt: skip


def as_tensors(images: torch.Tensor) -> torch.Tensor:
    """MNIST-style uint8 images normalised as in training: the digits fed as tensors, no picture involved."""
    return ((images.float() / 255 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)


@pytest.fixture
def in_drawn_run(drawn_run, tmp_path, monkeypatch) -> Path:
    """Work in a copy of the folder of the run trained on drawn digits, so that names can be relative."""
    shutil.copytree(drawn_run / "lightning_logs", tmp_path / "lightning_logs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def drawn_test_digits(drawn_mnist) -> tuple[torch.Tensor, torch.Tensor]:
    """The 200 test images of the drawn MNIST, and their labels."""
    mnist = MNIST(str(drawn_mnist), train=False)
    return mnist.data, mnist.targets


def run_predict(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """main() with --predict and argv: its exit status, its stdout, and its lines on stderr."""
    status = main(["--predict", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err.splitlines()


## The model's side


def test_predict_step_gives_each_images_probability_of_being_each_digit():
    model = LitNeuralNet(hidden_size=32)
    images = torch.randn(3, 1, 28, 28)
    probabilities = model.predict_step(images, batch_idx=0)
    assert probabilities.shape == (3, 10)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(3))
    assert torch.equal(probabilities.argmax(dim=1), model(images).argmax(dim=1))


## Pictures prepared the way MNIST was


def test_an_mnist_style_digit_saved_as_a_picture_comes_back_as_it_was(drawn_test_digits, tmp_path):
    images, _ = drawn_test_digits
    images = images[:100].float() / 255
    prepared = []
    for index, image in enumerate(images):
        path = tmp_path / f"{index}.png"
        Image.fromarray((255 * image).byte().numpy()).save(path)
        digit = prepare_digit(path)
        assert digit.shape == (1, 28, 28) and digit.dtype == torch.float32
        prepared.append(digit[0] * MNIST_STD + MNIST_MEAN)  # back to 0-1
    prepared = torch.stack(prepared)
    # The strokes are redrawn with MNIST's pen, so their edges change (the font's weights vary more
    # than MNIST's pens); the digit stays where it was, itself: its ink mostly covers the same pixels.
    overlap = torch.minimum(prepared, images).sum(dim=(1, 2)) / torch.maximum(prepared, images).sum(dim=(1, 2))
    assert overlap.min() >= 0.4 and overlap.median() >= 0.6, overlap


def test_each_form_of_a_digit_is_read_as_the_digit_fed_as_a_tensor(drawn_test_digits, in_drawn_run, capsys):
    images, labels = drawn_test_digits
    model = LitNeuralNet.load_from_checkpoint(newest_best_checkpoint(Path("lightning_logs")))
    with torch.no_grad():
        as_tensor = model.predict_step(as_tensors(images))
    # The model reads the drawn digits: the predictions below mean something.
    assert (as_tensor.argmax(dim=1) == labels).float().mean() >= 0.95
    paths = {form: [] for form in FORMS}
    for index, image in enumerate(images):
        for form, path in write_digit_forms(image, in_drawn_run, f"digit{index}").items():
            paths[form].append(path.name)

    for form in FORMS:
        status, out, _ = run_predict(capsys, *paths[form])
        assert status == 0
        printed = predictions(out)
        assert [path for path, *_ in printed] == paths[form]
        digits = torch.tensor([digit for _, digit, *_ in printed])
        top = torch.tensor([first for _, _, first, *_ in printed]) / 100
        expected_digits = as_tensor.argmax(dim=1)
        expected_top = as_tensor.gather(1, digits[:, None])[:, 0]
        # Every digit that the model reads with confidence as a tensor is read the same from its picture;
        # the few it hesitates over may tip the other way after resampling and JPEG.
        confident = as_tensor.amax(dim=1) >= 0.9
        assert confident.sum() >= 150
        assert torch.equal(digits[confident], expected_digits[confident]), form
        assert (digits == expected_digits).float().mean() >= 0.98, form
        assert (top - expected_top).abs().median() < 0.03, form


def test_the_python_way_gives_what_the_command_line_prints(drawn_test_digits, in_drawn_run, capsys):
    images, _ = drawn_test_digits
    paths = [write_digit_forms(image, in_drawn_run, f"digit{index}")["dark_on_white_off_centre.jpg"]
             for index, image in enumerate(images[:5])]  # fmt: skip
    status, out, _ = run_predict(capsys, *map(str, paths))
    assert status == 0
    # As in the README: a checkpoint, prepare_digit on files or Pillow pictures, predict_step.
    model = LitNeuralNet.load_from_checkpoint(newest_best_checkpoint(Path("lightning_logs")))
    pictures = [str(paths[0]), paths[1], *(Image.open(path) for path in paths[2:])]
    with torch.no_grad():
        probabilities = model.predict_step(torch.stack([prepare_digit(picture) for picture in pictures]))
    for (path, digit, first, runner_up, second), expected in zip(predictions(out), probabilities, strict=True):
        top, best = expected.topk(2)
        assert (digit, runner_up) == tuple(best.tolist()), path
        assert (first, second) == pytest.approx((100 * top).tolist(), abs=0.051), path


def test_pictures_in_other_formats_and_stored_sideways_are_read_alike(drawn_test_digits, drawn_run, tmp_path):
    images, labels = drawn_test_digits
    forms = digit_forms(images[0])
    page, strokes = forms["dark_on_white_off_centre.jpg"], forms["strokes_on_transparent.png"]
    page.save(tmp_path / "page.png")
    strokes.save(tmp_path / "strokes.png")
    expected = {"page": prepare_digit(tmp_path / "page.png"), "strokes": prepare_digit(tmp_path / "strokes.png")}
    # Lossless formats give exactly what the PNG gives.
    page.save(tmp_path / "page.bmp")
    page.convert("L").save(tmp_path / "page.tiff")
    page.save(tmp_path / "page_lossless.webp", lossless=True)
    strokes.save(tmp_path / "strokes.webp", lossless=True)
    for name in ("page.bmp", "page.tiff", "page_lossless.webp", "strokes.webp"):
        assert torch.equal(prepare_digit(tmp_path / name), expected[name.split(".")[0].split("_")[0]]), name
    # A GIF has a palette, one colour of which may be transparent: no half-transparent edges. Those of
    # the strokes cut at half, it is read as the PNG of those strokes is.
    binary = strokes.copy()
    binary.putalpha(strokes.getchannel("A").point(lambda alpha: 255 if alpha >= 128 else 0))
    binary.save(tmp_path / "binary.png")
    binary.save(tmp_path / "binary.gif")
    assert Image.open(tmp_path / "binary.gif").info.get("transparency") is not None
    assert torch.equal(prepare_digit(tmp_path / "binary.gif"), prepare_digit(tmp_path / "binary.png"))
    # Lossy WebP changes pixels a little: the digit read is the same. The strokes' edges are cut at half
    # the strongest before they are redrawn, so a changed pixel can move an edge, and a probability.
    page.save(tmp_path / "page.webp")
    model = LitNeuralNet.load_from_checkpoint(newest_best_checkpoint(drawn_run / "lightning_logs"))
    with torch.no_grad():
        read = model.predict_step(torch.stack([prepare_digit(tmp_path / "page.webp"), expected["page"]]))
    assert read.argmax(dim=1).tolist() == [labels[0], labels[0]] and (read[0] - read[1]).abs().max() < 0.25
    # A camera stores a photo taken sideways as it lies, with an EXIF tag that says how to turn it.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    page.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    assert torch.equal(prepare_digit(tmp_path / "sideways.png"), expected["page"])


def test_16_bit_grey_is_scaled_and_large_pictures_shrunk_first(drawn_test_digits, tmp_path):
    image = drawn_test_digits[0][0].numpy()
    expected = prepare_digit(Image.fromarray(255 - image))
    # 16-bit grey (scanners write it) holds 0-65535: the same shades, 257 times the numbers.
    sixteen_bit = Image.fromarray((255 - image).astype(np.uint16) * 257)
    sixteen_bit.save(tmp_path / "sixteen_bit.png")
    assert Image.open(tmp_path / "sixteen_bit.png").mode == "I;16"
    assert torch.equal(prepare_digit(tmp_path / "sixteen_bit.png"), expected)
    # A picture larger than LARGEST_SIDE is first shrunk to it, as Pillow's thumbnail does.
    page = Image.new("L", (4 * LARGEST_SIDE, 3 * LARGEST_SIDE), 255)
    page.paste(Image.fromarray(255 - image).resize((600, 600)), (2000, 500))
    shrunk = page.copy()
    shrunk.thumbnail((LARGEST_SIDE, LARGEST_SIDE))
    assert max(shrunk.size) == LARGEST_SIDE
    assert torch.equal(prepare_digit(page), prepare_digit(shrunk))


def test_colour_is_read_as_grey_and_any_light_paper_as_background(drawn_test_digits, tmp_path):
    images, _ = drawn_test_digits
    light = Image.fromarray(images[1].numpy())
    expected = prepare_digit(light)
    # Blue ink on cream paper, and dim grey paper with dark grey ink: a photo in poor light.
    blue_on_cream = Image.composite(
        Image.new("RGB", light.size, (20, 30, 140)), Image.new("RGB", light.size, (250, 240, 200)), light
    )
    dim = Image.composite(Image.new("L", light.size, 40), Image.new("L", light.size, 110), light)
    # White chalk strokes on transparent white pixels: the paper behind them must be dark.
    chalk = Image.new("RGBA", light.size, (255, 255, 255, 0))
    chalk.putalpha(light)
    for picture in (blue_on_cream, chalk):
        assert (prepare_digit(picture) - expected).abs().mean() < 0.05
    # The dim one holds 70 shades of ink, not 255: the cut at half the strongest stroke can fall a shade
    # apart, and the redrawn pen a pixel of the fine frame wider.
    assert (prepare_digit(dim) - expected).abs().mean() < 0.2


## The command line


def test_one_line_per_picture_in_the_order_given_and_nothing_written(
    drawn_test_digits, in_drawn_run, capsys, monkeypatch
):
    images, _ = drawn_test_digits
    names = ["zeta.png", "alpha.png", "with spaces.png", "mid.png"]
    for name, image in zip(names, images, strict=False):
        Image.fromarray(image.numpy()).save(name)
    # The checkpoint of a default run names ./data as MNIST's folder, where there is none here. No
    # MNIST is read, nor downloaded: a proxy on a closed port would make a download fail.
    (checkpoint,) = list(Path("lightning_logs").glob("version_0/checkpoints/epoch=*.ckpt"))
    default = torch.load(checkpoint, weights_only=True)
    default["hyper_parameters"]["data_dir"] = "./data"
    torch.save(default, checkpoint)
    before = sorted(path.relative_to(in_drawn_run) for path in in_drawn_run.rglob("*"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    status, out, err = run_predict(capsys, "zeta.png", "alpha.png", "with spaces.png", "zeta.png", "mid.png")
    assert status == 0
    assert [path for path, *_ in predictions(out)] == [
        "zeta.png",
        "alpha.png",
        "with spaces.png",
        "zeta.png",
        "mid.png",
    ]
    printed = predictions(out)
    assert printed[0] == printed[3]  # the same file twice, the same line twice
    for _, digit, first, runner_up, second in printed:
        assert digit != runner_up and 100 >= first >= second >= 0
    assert err == [f"Checkpoint: {checkpoint}"]
    assert sorted(path.relative_to(in_drawn_run) for path in in_drawn_run.rglob("*")) == before


def test_bad_pictures_are_named_and_the_others_still_predicted(drawn_test_digits, in_drawn_run, capsys):
    images, _ = drawn_test_digits
    Image.fromarray(images[0].numpy()).save("good.png")
    Image.fromarray(images[1].numpy()).save("also good.png")
    Path("notes.png").write_text("not a picture")
    Path("empty.png").write_bytes(b"")
    Path("folder.png").mkdir()
    whole = (in_drawn_run / "good.png").read_bytes()
    Path("truncated.png").write_bytes(whole[: len(whole) // 2])
    Image.new("L", (40, 30), 255).save("white.png")
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save("transparent.png")
    Image.new("L", (1, 1), 0).save("dot.png")
    speck = Image.new("L", (40, 30), 255)
    speck.putpixel((20, 10), 235)  # dust: too faint to be ink
    speck.save("speck.png")
    bad = {
        "missing.png": "no such file",
        "notes.png": "not a picture, or in a format Pillow cannot read",
        "empty.png": "not a picture, or in a format Pillow cannot read",
        "folder.png": "a folder, not a picture",
        "truncated.png": "the picture is damaged or cut short",
        "white.png": "nothing but background: no digit found",
        "transparent.png": "nothing but background: no digit found",
        "dot.png": "nothing but background: no digit found",
        "speck.png": "nothing but background: no digit found",
    }
    status, out, err = run_predict(capsys, "good.png", *bad, "also good.png")
    assert status == 1
    assert [path for path, *_ in predictions(out)] == ["good.png", "also good.png"]
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == len(bad)
    for line, (name, reason) in zip(errors, bad.items(), strict=True):
        assert line.startswith(f"error: {name}: {reason}"), line


def test_no_checkpoint_says_how_to_train_one_or_pass_ckpt_path(tmp_path, monkeypatch, capsys, drawn_test_digits):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(drawn_test_digits[0][0].numpy()).save("seven.png")
    expected = (
        "error: no checkpoint in ./lightning_logs to predict with: train one first (python lightning_mnist.py), "
        "or pass --ckpt-path"
    )
    assert run_predict(capsys, "seven.png") == (1, "", [expected])
    # Runs, but none that saved a best checkpoint: one stopped early, one without validation.
    Path("lightning_logs/version_0").mkdir(parents=True)
    Path("lightning_logs/version_1/checkpoints").mkdir(parents=True)
    Path("lightning_logs/version_1/checkpoints/last.ckpt").write_bytes(b"")
    assert run_predict(capsys, "seven.png") == (1, "", [expected])
    assert sorted(path.name for path in Path("lightning_logs").iterdir()) == ["version_0", "version_1"]


def test_ckpt_path_chooses_the_weights(drawn_test_digits, in_drawn_run, capsys):
    Image.fromarray(drawn_test_digits[0][0].numpy()).save("digit.png")
    (checkpoint,) = list(Path("lightning_logs").glob("version_0/checkpoints/epoch=*.ckpt"))
    shutil.copy(checkpoint, "mine.ckpt")
    status, out, _ = run_predict(capsys, "digit.png")
    assert status == 0 and predictions(out)[0][1] != 9
    assert run_predict(capsys, "digit.png", "--ckpt-path", "mine.ckpt") == (0, out, ["Checkpoint: mine.ckpt"])
    # Other weights, another answer: the checkpoint named is the one used.
    nines = torch.load("mine.ckpt", weights_only=True)
    nines["state_dict"]["l2.bias"][9] += 100  # whatever the picture, a 9
    torch.save(nines, "nines.ckpt")
    status, out, err = run_predict(capsys, "digit.png", "--ckpt-path", "nines.ckpt")
    assert predictions(out) == [("digit.png", 9, 100.0, predictions(out)[0][3], 0.0)]
    assert err == ["Checkpoint: nines.ckpt"]


def checkpoint_of_another_model(path: Path, source: Path) -> None:
    """A Lightning checkpoint whose weights have other names and shapes than LitNeuralNet's."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["state_dict"] = {"encoder.weight": torch.zeros(3, 4)}
    torch.save(checkpoint, path)


def checkpoint_with_a_python_object(path: Path, source: Path) -> None:
    """A checkpoint that holds a Python object besides weights, which torch.load refuses by default."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["callback"] = Path("a")  # any class that torch.load has not been told is safe
    torch.save(checkpoint, path)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda path, source: path.write_text("not a checkpoint"), "is not a PyTorch checkpoint"),
        (lambda path, source: path.write_bytes(b""), "is empty"),
        (lambda path, source: path.write_bytes(source.read_bytes()[:5000]), "is cut short or damaged"),
        (lambda path, source: torch.save({"weights": torch.zeros(3)}, path), "is not a checkpoint of this script"),
        (checkpoint_with_a_python_object, "holds Python objects besides tensors and plain values"),
        (checkpoint_of_another_model, "holds weights that do not fit its own hyperparameters"),
    ],
    ids=["text", "empty", "truncated", "plain-dict", "python-object", "another-model"],
)
def test_a_bad_checkpoint_is_one_error_line(make, reason, drawn_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (source,) = list(drawn_run.glob("lightning_logs/version_0/checkpoints/epoch=*.ckpt"))
    make(Path("bad.ckpt"), source)
    Image.new("L", (28, 28)).save("blank.png")
    status, out, err = run_predict(capsys, "blank.png", "--ckpt-path", "bad.ckpt")
    assert (status, out) == (1, "")
    (error,) = err
    assert error.startswith(f"error: bad.ckpt {reason}") and "weights_only" not in error


def test_trainer_flags_reach_the_predictions(drawn_test_digits, in_drawn_run, capsys, monkeypatch):
    images, _ = drawn_test_digits
    names = [f"{index}.png" for index in range(5)]
    for name, image in zip(names, images, strict=False):
        Image.fromarray(image.numpy()).save(name)
    status, out_32, _ = run_predict(capsys, *names)
    predicted = pl.Trainer.predict
    calls = []

    def spy(trainer, model, dataloaders, **kwargs):
        calls.append((trainer, dataloaders))
        return predicted(trainer, model, dataloaders, **kwargs)

    monkeypatch.setattr(pl.Trainer, "predict", spy)
    flags = ["--accelerator", "cpu", "--devices", "1", "--precision", "bf16-mixed", "--batch-size", "2"]
    status, out, _ = run_predict(capsys, *names, *flags)
    assert status == 0
    ((trainer, loader),) = calls
    assert isinstance(trainer.accelerator, CPUAccelerator) and trainer.num_devices == 1
    assert trainer.precision == "bf16-mixed" and loader.batch_size == 2 and len(loader) == 3
    assert trainer.logger is None and trainer.checkpoint_callback is None  # nothing trained, nothing written
    # In bfloat16 the percentages move a little; the digits stay.
    assert [line[:2] for line in predictions(out)] == [line[:2] for line in predictions(out_32)]


def test_predict_takes_one_gpu_where_auto_would_take_them_all(in_drawn_run, capsys, monkeypatch, four_gpus):
    Image.fromarray(torch.eye(28, dtype=torch.uint8).mul(255).numpy()).save("stroke.png")
    calls = []

    def spy(trainer, model, dataloaders, **kwargs):  # records the Trainer; these GPUs cannot compute
        calls.append(trainer)
        return [torch.tensor([[0.06, 0, 0, 0.9, 0, 0, 0, 0, 0, 0.04]])]

    monkeypatch.setattr(pl.Trainer, "predict", spy)
    status, out, _ = run_predict(capsys, "stroke.png", "--accelerator", "gpu")
    assert (status, out) == (0, "stroke.png: 3 (90.0%; next 0 at 6.0%)\n")
    assert isinstance(calls[0].accelerator, CUDAAccelerator) and calls[0].device_ids == [0]
    status, out, err = run_predict(capsys, "stroke.png", "--gpus", "2")
    assert (status, out, len(calls)) == (1, "", 1)
    assert err[-1] == "error: --predict runs on one device: ask for one (--devices 1, or --gpus 1)"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--accelerator", "cpu", "--devices", "2"],
            "--predict runs on one device: ask for one (--devices 1, or --gpus 1)",
        ),
        (["--precision", "banana"], "the Trainer cannot be set up as asked: Precision 'banana' is invalid"),
        (
            ["--accelerator", "banana"],
            "the Trainer cannot be set up as asked: You selected an invalid accelerator name",
        ),
    ],
)
def test_trainer_values_that_cannot_work_for_predict_are_one_error_line(flags, message, in_drawn_run, capsys):
    Image.new("L", (28, 28)).save("blank.png")
    status, out, err = run_predict(capsys, "blank.png", *flags)
    assert (status, out) == (1, "")
    assert len(err) == 2 and err[0].startswith("Checkpoint: ")
    assert err[1].startswith("error: ") and message in err[1]


## Real data


def test_real_mnist_test_digits_as_pictures_are_read_at_95_percent_in_each_form(
    real_default_run, real_mnist, capsys, monkeypatch, tmp_path
):
    cwd, result = real_default_run
    assert result.returncode == 0, result.stderr
    mnist = MNIST(str(real_mnist), train=False)
    # 1,000 of the 10,000 test digits, drawn at random: the first 5,000 are the cleaner, easier ones.
    sample = torch.randperm(len(mnist.targets), generator=torch.Generator().manual_seed(0))[:1000]
    images, labels = mnist.data[sample], mnist.targets[sample]
    paths = {form: [] for form in FORMS}
    for index, image in zip(sample.tolist(), images, strict=True):
        for form, path in write_digit_forms(image, tmp_path, f"test{index}").items():
            paths[form].append(str(path))
    monkeypatch.chdir(cwd)  # predict with the default run's best checkpoint
    model = LitNeuralNet.load_from_checkpoint(newest_best_checkpoint(Path("lightning_logs")))
    with torch.no_grad():
        as_tensor = (model.predict_step(as_tensors(images)).argmax(dim=1) == labels).float().mean().item()
    with capsys.disabled():
        print(f"real MNIST, {len(labels)} test digits as tensors: {100 * as_tensor:.1f}%")
    for form in FORMS:
        status, out, _ = run_predict(capsys, *paths[form])
        assert status == 0
        printed = predictions(out)
        assert [path for path, *_ in printed] == paths[form]
        accuracy = (torch.tensor([digit for _, digit, *_ in printed]) == labels).float().mean().item()
        with capsys.disabled():
            print(f"real MNIST, {len(labels)} test digits as {form}: {100 * accuracy:.1f}%")
        assert accuracy >= 0.95, form
