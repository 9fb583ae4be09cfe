"""prepare_digit: pictures of digits as people write and photograph them (every Pillow mode, uneven
light, any pen, paper and its edges) prepared as MNIST's were, and the answers marked unsure."""

import io
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps
from torchvision.datasets import MNIST

from lightning_mnist import LitNeuralNet, main, newest_best_checkpoint, prepare_digit
from mnist_kit.data import MNIST_MEAN, MNIST_STD
from mnist_kit.digits import PictureError, stroke_width

## Digits written with other pens, and photographed


def pen(ink: torch.Tensor, radius: int) -> torch.Tensor:
    """Strokes (N, H, W) drawn with a pen `radius` pixels wider a side (an octagon, near a disk), or narrower."""
    grow = radius >= 0
    pixels = (ink if grow else 1 - ink)[:, None]
    for step in range(abs(radius)):
        if step % 2 == 0:
            pixels = F.max_pool2d(pixels, 3, stride=1, padding=1)
        else:
            pixels = torch.maximum(F.max_pool2d(pixels, (1, 3), 1, (0, 1)), F.max_pool2d(pixels, (3, 1), 1, (1, 0)))
    return pixels[:, 0] if grow else 1 - pixels[:, 0]


# MNIST's pen is about 7 pixels wide at 4 times the size; by stroke_width on 200 real test digits, these
# pens are 1, 2.2, 3.4 and 0.55 times as wide.
PENS = {"same pen": 0, "thicker pen": 5, "much thicker pen": 10, "thinner pen": -2}
PHOTO = "photo lit from one side, JPEG"


def pen_forms(images: torch.Tensor, seed: int = 0) -> dict[str, list[Image.Image]]:
    """MNIST-style digits (N, 28, 28) redrawn 4 times larger, dark on a white page, in each pen of PENS; and
    photographed on a page lit from one side (grey 140 to 225 across), with noise, as JPEG."""
    ink = F.interpolate(images[:, None].float() / 255, scale_factor=4, mode="bilinear")[:, 0]
    forms = {}
    for name, radius in PENS.items():
        page = F.pad(1 - pen(ink, radius), (40, 40, 24, 24), value=1.0)
        forms[name] = [Image.fromarray((255 * picture).round().byte().numpy()) for picture in page]
    ink = F.pad(ink, (40, 40, 24, 24))
    height, width = ink.shape[1:]
    light = torch.linspace(140, 225, width).expand(height, width)
    generator = torch.Generator().manual_seed(seed)
    forms[PHOTO] = []
    for strokes in ink:
        grey = light * (1 - 0.85 * strokes) + 6 * torch.randn(height, width, generator=generator)
        file = io.BytesIO()
        Image.fromarray(grey.clamp(0, 255).round().byte().numpy()).save(file, format="JPEG")
        forms[PHOTO].append(Image.open(file))
    return forms


def read_right(model: LitNeuralNet, pictures: list[Image.Image], labels: torch.Tensor) -> float:
    """The share of the pictures that the model reads as their labels."""
    with torch.no_grad():
        digits = model(torch.stack([prepare_digit(picture) for picture in pictures])).argmax(dim=1)
    return (digits == labels).float().mean().item()


def inked(prepared: torch.Tensor) -> torch.Tensor:
    """The pixels of a prepared digit that are more ink than paper."""
    return prepared[0] * MNIST_STD + MNIST_MEAN > 0.5


def box(inked: torch.Tensor) -> torch.Tensor:
    """The first and last rows and columns that hold ink."""
    rows, columns = inked.any(dim=1).nonzero(), inked.any(dim=0).nonzero()
    return torch.tensor([rows.min(), rows.max(), columns.min(), columns.max()])


def test_a_page_lit_from_one_side_gives_the_digit_of_an_evenly_lit_page(drawn_mnist):
    images = MNIST(str(drawn_mnist), train=False).data[:10]
    forms = pen_forms(images)
    for picture, expected in zip(forms[PHOTO], forms["same pen"], strict=True):
        # The same ink in the same place: no stroke made of the page's darker side, no digit made smaller.
        photo, even = inked(prepare_digit(picture)), inked(prepare_digit(expected))
        assert (box(photo) - box(even)).abs().max() <= 2


@pytest.mark.parametrize("light", ["one side", "corner"])
def test_a_blank_page_in_uneven_light_holds_no_digit(light):
    rows, columns = torch.meshgrid(torch.linspace(-1, 1, 240), torch.linspace(-1, 1, 320), indexing="ij")
    shade = {"one side": 140 + 85 * (columns + 1) / 2, "corner": 225 - 80 * ((rows + 1) * (columns + 1) / 4) ** 2}[
        light
    ]
    grey = shade + 3 * torch.randn(shade.shape, generator=torch.Generator().manual_seed(0))
    file = io.BytesIO()
    Image.fromarray(grey.clamp(0, 255).round().byte().numpy()).save(file, format="JPEG")
    with pytest.raises(PictureError, match="nothing but background"):
        prepare_digit(Image.open(file))


def test_a_digit_written_with_any_pen_comes_out_alike(drawn_mnist):
    images = MNIST(str(drawn_mnist), train=False).data[:10]
    widths = {}
    for name, pictures in pen_forms(images).items():
        prepared = torch.stack([prepare_digit(picture)[0] for picture in pictures]) * MNIST_STD + MNIST_MEAN
        # Full white cores and grey, anti-aliased edges, as in MNIST.
        assert (prepared.amax(dim=(1, 2)) > 0.99).all() and ((prepared > 0.05) & (prepared < 0.95)).any(), name
        fine = F.interpolate(prepared[:, None], scale_factor=4, mode="bilinear") >= 0.5
        widths[name] = torch.tensor([stroke_width(mask[None].float()) for mask in fine])
    # A pen half or twice as wide gives strokes about as wide as those of the same digit in MNIST's pen.
    # (The font's strokes, heavier than MNIST's, merge into blots with the much thicker pen: the test on
    # real MNIST below measures that one.)
    for name in ("thicker pen", "thinner pen", PHOTO):
        ratio = (widths[name] / widths["same pen"]).median()
        assert 0.85 < ratio < 1.35, (name, ratio)


def test_a_thin_pen_on_a_large_page_is_full_white_after_scaling():
    page = Image.new("L", (1000, 1000), 255)
    ImageDraw.Draw(page).line([(300, 200), (700, 200), (450, 800)], fill=0, width=2)  # a 7, 2 pixels wide
    prepared = prepare_digit(page)[0] * MNIST_STD + MNIST_MEAN
    assert prepared.max() > 0.99 and (prepared > 0.5).sum() >= 30


## Every mode Pillow opens (issue #15)


def test_lab_float_and_32_bit_pictures_are_read_as_their_grey():
    grey = Image.new("L", (60, 60), 255)
    ImageDraw.Draw(grey).line([(15, 10), (45, 10), (25, 50)], fill=0, width=5)
    expected = prepare_digit(grey)
    values = torch.from_numpy(np.array(grey)).float()
    lab = Image.merge("LAB", [grey, Image.new("L", grey.size, 128), Image.new("L", grey.size, 128)])
    file = io.BytesIO()
    lab.save(file, format="TIFF")
    pictures = {
        "LAB TIFF": Image.open(file),
        "F 0-1": Image.fromarray((values / 255).numpy(), mode="F"),
        "F 0-255": Image.fromarray(values.numpy(), mode="F"),
        "I 0-255": Image.fromarray(values.int().numpy()),
        "I 0-65535": Image.fromarray((values * 257).int().numpy()),
    }
    for name, picture in pictures.items():
        assert torch.equal(prepare_digit(picture), expected), name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_float_picture_that_is_not_numbers_is_a_picture_error(value):
    pixels = np.ones((30, 30), dtype=np.float32)
    pixels[10:20, 14:16] = value
    with pytest.raises(PictureError, match="not all numbers"):
        prepare_digit(Image.fromarray(pixels, mode="F"))


MODES = ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV",
         "I", "I;16", "F"]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    size=st.tuples(st.integers(1, 300), st.integers(1, 300)),
    content=st.sampled_from(["blank", "noise", "drawn"]),
    seed=st.integers(0, 2**16),
)
def test_any_picture_of_any_mode_is_a_digit_or_a_picture_error(mode, size, content, seed):
    generator = torch.Generator().manual_seed(seed)
    width, height = size
    if content == "noise":
        rgba = torch.randint(0, 256, (height, width, 4), generator=generator, dtype=torch.uint8)
        picture = Image.fromarray(rgba.numpy(), mode="RGBA")
    else:
        picture = Image.new("RGBA", size, tuple(torch.randint(0, 256, (4,), generator=generator).tolist()))
        if content == "drawn":
            points = (torch.rand(4, generator=generator) * torch.tensor([width, height, width, height])).tolist()
            ImageDraw.Draw(picture).line(points, fill=(0, 0, 0, 255), width=1 + seed % 9)
    if mode in ("I", "I;16", "F"):
        picture = picture.convert("L").convert(mode)
    else:
        picture = picture.convert(mode)
    try:
        prepared = prepare_digit(picture)
    except PictureError:
        return
    assert prepared.shape == (1, 28, 28) and prepared.isfinite().all()


## Unsure answers


def test_two_digits_side_by_side_are_marked_unsure_on_their_line(drawn_run, drawn_mnist, tmp_path, monkeypatch, capsys):
    images = MNIST(str(drawn_mnist), train=False).data[:2]
    page = Image.new("L", (80, 40))
    page.paste(Image.fromarray(images[0].numpy()), (4, 6))
    page.paste(Image.fromarray(images[1].numpy()), (44, 6))
    page.save(tmp_path / "two.png")
    Image.fromarray(images[0].numpy()).save(tmp_path / "one.png")
    monkeypatch.chdir(drawn_run)
    assert main(["--predict", str(tmp_path / "two.png"), str(tmp_path / "one.png")]) == 0
    two, one = capsys.readouterr().out.splitlines()
    assert two.startswith(f"{tmp_path / 'two.png'}: ") and two.endswith("; unsure: ink in 2 separate groups")
    assert "unsure" not in one
    # grep finds it, and cut -d: still gives the digit as the second field.
    assert two.split(":")[1][1].isdigit()


def test_low_probabilities_are_marked_unsure(drawn_run, drawn_mnist, tmp_path, monkeypatch, capsys):
    Image.fromarray(MNIST(str(drawn_mnist), train=False).data[0].numpy()).save(tmp_path / "digit.png")
    monkeypatch.chdir(drawn_run)
    answers = iter([torch.tensor([[0.69, 0.31] + [0.0] * 8]), torch.tensor([[0.71, 0.29] + [0.0] * 8])])
    monkeypatch.setattr(pl.Trainer, "predict", lambda *args, **kwargs: [next(answers)])
    for expected in ("; unsure: top answer under 70%", ")"):
        assert main(["--predict", str(tmp_path / "digit.png")]) == 0
        assert (
            capsys.readouterr()
            .out.rstrip("\n")
            .endswith(f"0 (69.0%; next 1 at 31.0%){expected}" if expected != ")" else "0 (71.0%; next 1 at 29.0%)")
        )


## Real MNIST: at least 300 test digits in each form


def test_real_mnist_digits_written_with_other_pens_and_photographed_are_read(real_default_run, real_mnist):
    cwd, result = real_default_run
    assert result.returncode == 0, result.stderr
    model = LitNeuralNet.load_from_checkpoint(newest_best_checkpoint(cwd / "lightning_logs"), map_location="cpu")
    mnist = MNIST(str(real_mnist), train=False)
    sample = torch.randperm(len(mnist.targets), generator=torch.Generator().manual_seed(1))[:300]
    forms = pen_forms(mnist.data[sample])
    read = {name: read_right(model, pictures, mnist.targets[sample]) for name, pictures in forms.items()}
    # Measured: 98.0, 95.0, 87.3, 95.3 and 98.0%; before issue #16: 97.7, 88.7, about 50, 91.7 and 10.7%.
    minimum = {"same pen": 0.97, "thicker pen": 0.93, "much thicker pen": 0.85, "thinner pen": 0.93, PHOTO: 0.95}
    for name, share in read.items():
        assert share >= minimum[name], (name, share)


def write(picture: Image.Image, text: str, shade, font_size: int = 150, stroke: int = 4) -> None:
    """Write a digit in the middle of a picture, in one shade (a grey, or a colour)."""
    font = ImageFont.load_default(size=font_size)
    middle = (picture.width // 2, picture.height // 2)
    ImageDraw.Draw(picture).text(
        middle, text, fill=shade, font=font, anchor="mm", stroke_width=stroke, stroke_fill=shade
    )


def ink(prepared: torch.Tensor) -> torch.Tensor:
    """A prepared digit back on MNIST's 0-1 scale."""
    return prepared[0] * MNIST_STD + MNIST_MEAN


PAPER = 230  # the grey of white paper in a photo


def photo_of_paper(clean: Image.Image, path: Path) -> Path:
    """The picture as a phone photographs it: the paper's grain, a hand's shadow deepening into one
    corner, JPEG's noise; none of them a tenth of the ink's contrast."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.from_numpy(np.asarray(clean, dtype=np.float32))
    texture = torch.randn(pixels.shape, generator=generator) * 6
    across, down = torch.linspace(0, 1, pixels.shape[1]), torch.linspace(0, 1, pixels.shape[0])
    shadow = 22 * down[:, None] * across[None, :]
    photo = (pixels + texture - shadow).clamp(0, 255).round().to(torch.uint8).numpy()
    Image.fromarray(photo).save(path, quality=70)
    return path


def ruled_notebook(clean: Image.Image, path: Path) -> Path:
    """The same digit written in blue ink on a notebook's faint blue lines, in colour."""
    page = Image.new("RGB", clean.size, (235, 235, 230))
    draw = ImageDraw.Draw(page)
    for line in range(10, page.height, 24):
        draw.line((0, line, page.width, line), fill=(200, 210, 235), width=2)
    write(page, "4", (20, 20, 90))
    page.save(path)
    return path


@pytest.mark.parametrize("paper", [photo_of_paper, ruled_notebook])
def test_paper_texture_shadow_lines_and_jpeg_noise_do_not_become_ink(paper, tmp_path):
    clean = Image.new("L", (240, 240), PAPER)
    write(clean, "4", 30)
    clean = clean.filter(ImageFilter.GaussianBlur(1.5))  # a pen's soft edge
    on_clean, on_paper = ink(prepare_digit(clean)), ink(prepare_digit(paper(clean, tmp_path / "digit.jpg")))
    # What is fainter than the strokes by far stays paper: the digit is prepared as on clean paper.
    assert (on_clean - on_paper).abs().mean() < 0.04
    assert on_paper.sum() == pytest.approx(on_clean.sum().item(), rel=0.15)


@pytest.mark.parametrize(("paper", "faint", "pressed"), [(PAPER, 150, 20), (40, 150, 240)], ids=["paper", "chalkboard"])
def test_a_digit_touching_the_pictures_edge_is_prepared_as_on_a_wider_sheet(paper, faint, pressed):
    # A 7 pressed hard at the top and faint lower down, as a pen runs dry: a third of the edge is ink.
    page = Image.new("L", (240, 240), paper)
    write(page, "7", faint)
    top = page.point(lambda value: 255 if abs(value - paper) > 40 else 0).getbbox()
    hard = Image.new("L", page.size, paper)
    write(hard, "7", pressed)
    upper_half = Image.new("L", page.size, 0)
    ImageDraw.Draw(upper_half).rectangle((0, 0, page.width, (top[1] + top[3]) // 2), fill=255)
    page.paste(hard, (0, 0), upper_half)
    page = page.filter(ImageFilter.GaussianBlur(1))
    cropped = page.crop((top[0] + 2, top[1] + 2, top[2] - 2, top[3] - 2))  # cut through the strokes at each side
    edge = np.concatenate([np.asarray(cropped)[[0, -1]].ravel(), np.asarray(cropped)[:, [0, -1]].ravel()])
    assert 0.2 < (abs(edge.astype(int) - paper) > abs(pressed - paper) / 2).mean() < 0.45
    on_wider_sheet = ImageOps.expand(cropped, 30, fill=paper)
    touching, clear = ink(prepare_digit(cropped)), ink(prepare_digit(on_wider_sheet))
    assert (touching - clear).abs().mean() < 0.02
    assert touching.sum() == pytest.approx(clear.sum().item(), rel=0.05)


@settings(max_examples=60, deadline=None)
@given(
    digit=st.sampled_from("0123456789"),
    pen=st.integers(2, 8),  # stroke widths of the font's digits at 150 pixels: MNIST's pen to nearly twice it
    shades=st.sampled_from([(PAPER, 30), (255, 0), (180, 60), (40, 220), (0, 255)]),  # paper, ink: either way round
    inset=st.integers(0, 2),  # cropped at the ink's box, or into the strokes at each side
)
def test_a_digit_cropped_tightly_is_prepared_as_on_a_wider_sheet(digit, pen, shades, inset):
    assume(not (digit == "1" and inset))  # a 1 cut into, ink along half its edge: a known limitation, below
    paper, shade = shades
    page = Image.new("L", (240, 240), paper)
    write(page, digit, shade, stroke=pen)
    page = page.filter(ImageFilter.GaussianBlur(1))
    left, top, right, bottom = page.point(lambda value: 255 if abs(value - paper) > 40 else 0).getbbox()
    cropped = page.crop((left + inset, top + inset, right - inset, bottom - inset))
    wider = ImageOps.expand(cropped, 30, fill=paper)
    tight, clear = ink(prepare_digit(cropped)), ink(prepare_digit(wider))
    # Alike within a pixel of placement (the centre of mass is rounded to one) and a step of the pen
    # (a thin 1 gains or loses a fifth of its ink with one).
    shifts = [(down, right) for down in (-1, 0, 1) for right in (-1, 0, 1)]
    assert min((tight.roll(shift, (-2, -1)) - clear).abs().mean() for shift in shifts) < 0.03
    assert tight.sum() == pytest.approx(clear.sum().item(), rel=0.25)


@pytest.mark.xfail(
    strict=True,
    reason="known limitation (issue #16): a 1 cut into has ink along half its edge, so the edge cannot say which "
    "shade is paper (mid-grey paper), and its stem, wider than a sixth of the picture, passes for shadow (cut deeper)",
)
@pytest.mark.parametrize(("paper", "shade", "inset"), [(180, 60, 1), (PAPER, 30, 2)], ids=["which shade", "stem"])
def test_a_one_cut_into_is_prepared_as_on_a_wider_sheet(paper, shade, inset):
    page = Image.new("L", (240, 240), paper)
    write(page, "1", shade, stroke=2)
    page = page.filter(ImageFilter.GaussianBlur(1))
    left, top, right, bottom = page.point(lambda value: 255 if abs(value - paper) > 40 else 0).getbbox()
    cropped = page.crop((left + inset, top + inset, right - inset, bottom - inset))
    tight, clear = ink(prepare_digit(cropped)), ink(prepare_digit(ImageOps.expand(cropped, 30, fill=paper)))
    assert (tight - clear).abs().mean() < 0.03


def test_ink_at_the_edge_does_not_decide_which_shade_is_paper():
    # Grey paper, a dark 4 whose strokes run off two sides of the picture, and a patch of glare: the
    # edge is mostly paper, so its median is paper's shade; its mean, pulled down by the ink, would
    # fall below the middle of the darkest and lightest pixel and take the ink for the paper.
    page = Image.new("L", (160, 160), 150)
    write(page, "4", 10, font_size=300, stroke=14)
    ImageDraw.Draw(page).rectangle((120, 120, 145, 145), fill=255)  # glare, away from the edge
    edge = np.concatenate([np.asarray(page)[[0, -1]].ravel(), np.asarray(page)[:, [0, -1]].ravel()])
    assert 0.2 < (edge < 80).mean() < 0.45  # the digit touches the edge, and most of it is paper
    assert edge.mean() < (10 + 255) / 2 < np.median(edge)
    # Prepared as the same page on a wider sheet, whose edge is paper alone.
    touching, clear = ink(prepare_digit(page)), ink(prepare_digit(ImageOps.expand(page, 40, fill=150)))
    assert (touching - clear).abs().mean() < 0.02


@settings(max_examples=25, deadline=None)
@given(paper=st.integers(0, 200), contrast=st.integers(60, 255))
def test_light_strokes_on_darker_paper_of_any_shade_are_read_as_their_mirror(paper, contrast):
    # Chalk on a board, white pen on grey card: whatever the two shades, the darker one that fills the
    # edge is paper, so the picture is prepared as its mirror, dark strokes on the lighter paper.
    strokes = paper + contrast
    assume(strokes <= 255)
    light = Image.new("L", (120, 120), paper)
    write(light, "7", strokes, font_size=100, stroke=6)
    mirror = ImageOps.invert(light)
    assert (ink(prepare_digit(light)) - ink(prepare_digit(mirror))).abs().max() < 1e-4
    assert ink(prepare_digit(light)).max() > 0.9  # a digit, not the paper taken for ink
