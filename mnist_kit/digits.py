"""Your own pictures of digits, prepared as MNIST's were, for --predict and prepare_digit."""

import io
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from mnist_kit.data import MNIST_MEAN, MNIST_STD
from mnist_kit.files import FileRefused, read_whole

# MNIST's digits began as black-and-white scans. Each was scaled to fit a 20x20 box, its aspect
# ratio kept (the grey edges come from the anti-aliasing of that scaling), and placed in a 28x28
# image so that its centre of mass lies at the centre. The model has seen nothing else: a digit
# drawn dark on white paper, large or off-centre, is misread unless it is prepared the same way.
MNIST_SIDE = 28  # pixels a side of an MNIST image
DIGIT_BOX = 20  # pixels a side of the box that a digit's longer side is scaled to
MNIST_CENTRE = 14  # row and column, counted from 0, of MNIST's centres of mass (13.99, 14.01 on average)
MIN_CONTRAST = 0.1  # ink fainter than this against its background (on a 0-1 scale) is no digit
INK_THRESHOLD = 0.2  # what is fainter than this share of the darkest stroke is paper: texture, shadow, JPEG noise
LARGEST_SIDE = 1024  # pixels; a larger picture is first shrunk to this, 50 times the box, to save time and memory
BACKGROUND_SIDE = 32  # pixels a side of the shrunk copy on which the paper's brightness is estimated
FINE = 4  # strokes are redrawn in a frame 4 times finer than the box: 80x80
# MNIST's pen, measured with stroke_width below on the first 5,000 training digits, each cropped, scaled
# to the fine frame and cut at half white: quartiles 1.67 and 2.30 pixels of the box, median 1.96.
PEN_WIDTHS = (1.67, 2.30)  # pixels in the 20x20 box: a pen outside this range is brought to its nearer end
# On the 10,000 MNIST test digits, the default run's answers below 70% are right 59% of the time, those
# above 98.8%; and 0.35% of the digits (7 of the first 2,000) hold two groups of ink of 10% each or more.
UNSURE_BELOW = 0.7  # a top probability below this marks the answer as unsure
GROUP_SHARE = 0.1  # a group of ink counts when it holds this share of the digit's ink; less is a speck


class PictureError(Exception):
    """A picture that cannot be read as a digit; the message says why."""


PICTURE_FILE_LIMIT = 2**28  # bytes: 256 MiB, more than a photo's; Pillow refuses more pixels than that anyway


def picture_bytes(path: str | Path) -> bytes:
    """The bytes of a picture file, read with a bound: no FIFO, device or endless file is read forever."""
    if Path(path).is_dir():
        raise IsADirectoryError(path)  # "a folder, not a picture", as open_picture says
    try:
        return read_whole(path, "", PICTURE_FILE_LIMIT)
    except FileRefused as error:  # the line of a picture already starts with its name
        raise PictureError(error.reason.removeprefix("is ")) from None


def open_picture(path: str | Path) -> Image.Image:
    """The picture in a file, in any format Pillow reads, or a PictureError that says what is wrong."""
    try:
        # Pillow warns about pictures over 89 megapixels, which could be made to exhaust memory, and
        # refuses those over twice as many. These are the user's own pictures: only the refusal is shown.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(picture_bytes(path))) as picture:
                picture.load()  # Pillow reads lazily: a damaged file fails here, not later
                return picture
    except FileNotFoundError:
        raise PictureError("no such file") from None
    except IsADirectoryError:
        raise PictureError("a folder, not a picture") from None
    except PermissionError:
        raise PictureError("not allowed to read it") from None
    except UnidentifiedImageError:
        raise PictureError("not a picture, or in a format Pillow cannot read") from None
    except Image.DecompressionBombError as error:
        raise PictureError(f"too large to read safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        if isinstance(error, OSError) and error.errno:  # the system's: a name too long, a disk that fails, ...
            raise PictureError(f"cannot be read ({error.strerror})") from None
        # What Pillow raises for a damaged or truncated file, in its own words.
        raise PictureError(f"the picture is damaged or cut short ({error})") from None


def grey_and_alpha(picture: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """The picture's brightness and opacity, each 0-1 and no larger than LARGEST_SIDE, from any Pillow mode."""
    if picture.mode == "LAB":
        picture = picture.getchannel("L")  # CIELab's lightness is grey; Pillow converts LAB to nothing else
    elif picture.mode == "F" or picture.mode.startswith("I"):
        # Numbers rather than bytes: the mode and the data say which range is white. Floats hold 0-1 or
        # 0-255; 16-bit integers 0-65535; 32-bit integers 0-255 or 0-65535, whichever the data fit.
        values = pil_to_tensor(picture.convert("F"))
        if not values.isfinite().all():
            raise PictureError("its pixels are not all numbers (NaN or infinity)")
        if picture.mode == "F":
            white = 1.0 if values.max() <= 1 else 255.0
        else:
            white = 255.0 if picture.mode == "I" and values.max() <= 255 else 65535.0
        picture = to_pil_image((values / white).clamp(0, 1).mul(255).round().to(torch.uint8))
    picture = picture.convert("LA")  # grey and alpha, from any other of Pillow's modes
    picture.thumbnail((LARGEST_SIDE, LARGEST_SIDE))
    grey, alpha = (pil_to_tensor(channel)[0] / 255 for channel in picture.split())
    return grey, alpha


def square_max(pixels: torch.Tensor, window: int, inside: bool = False) -> torch.Tensor:
    """The largest value in each window x window square of pixels (N, 1, H, W): along rows, then columns.
    With inside=True, of a square centred on each pixel, of the pixels within the picture."""
    half = window // 2 if inside else 0
    return F.max_pool2d(F.max_pool2d(pixels, (1, window), 1, (0, half)), (window, 1), 1, (half, 0))


def paper_brightness(grey: torch.Tensor) -> torch.Tensor:
    """The paper's brightness under each pixel of a picture of dark ink on lighter paper, however unevenly lit.

    A closing (the lightest pixel around, then the darkest of those) fills in every dark stroke narrower
    than its window and keeps slow changes of light, a slope or a vignette, as they are. It runs on a
    copy shrunk to BACKGROUND_SIDE, for speed and to average out the paper's grain."""
    height, width = grey.shape
    scale = min(1.0, BACKGROUND_SIDE / max(height, width))
    small = F.interpolate(grey[None, None], size=[max(1, round(height * scale)), max(1, round(width * scale))],
                          mode="area")  # fmt: skip
    window = max(small.shape) // 2 * 2 + 1  # half the picture: wider than any stroke of a digit that fits in it
    # The picture is padded by the pixels of its edge, so that the paper's slope reaches to the edge
    # unchanged. Where a stroke runs along a whole side (a digit cropped tightly), that would pad with
    # ink, and the stroke would pass for shadow. So the edge's ink is first painted over with the
    # paper that a closing of the picture alone finds there, reaching 6 of 32 pixels in: past a
    # stroke as wide as a sixth of the picture, nearly twice MNIST's pen. Unable to see past the
    # edge, that closing also lightens the darker side of a page in uneven light, by up to 0.18 in
    # the dark corner of a vignette: ink is what lies deeper below it than twice MIN_CONTRAST, and
    # than half the deepest ink.
    near = max(small.shape) // 5 * 2 + 1
    inside = -square_max(-square_max(small, near, inside=True), near, inside=True)
    below = inside - small
    edge = torch.ones_like(small, dtype=torch.bool)
    edge[..., 1:-1, 1:-1] = False
    small = torch.where(edge & (below > max(below.max() / 2, 2 * MIN_CONTRAST)), inside, small)
    lightest = square_max(F.pad(small, [window - 1] * 4, mode="replicate"), window)
    paper = -square_max(-lightest, window)
    return F.interpolate(paper, size=[height, width], mode="bilinear")[0, 0]


def stroke_width(mask: torch.Tensor) -> torch.Tensor:
    """The mean width of the strokes of a mask (1, 1, H, W) of 0 and 1, in its pixels: its area over half
    its outline, since a stroke of length L has an outline of about 2L."""
    padded = F.pad(mask, [1] * 4)
    outline = (padded[..., 1:, :] != padded[..., :-1, :]).sum() + (padded[..., 1:] != padded[..., :-1]).sum()
    return 2 * mask.sum() / outline.clamp(min=1)


def grown(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """A mask (1, 1, H, W) of 0 and 1 grown by a pixel a side each step, or shrunk where steps < 0. Steps
    alternate between a square and a cross, so that a dot grows into an octagon, near a circle."""
    sign = 1 if steps > 0 else -1  # shrinking the ink is growing the paper
    pixels = sign * mask
    for step in range(abs(steps)):
        if step % 2 == 0:
            pixels = F.max_pool2d(pixels, 3, stride=1, padding=1)
        else:
            pixels = torch.maximum(F.max_pool2d(pixels, (1, 3), stride=1, padding=(0, 1)),
                                   F.max_pool2d(pixels, (3, 1), stride=1, padding=(1, 0)))  # fmt: skip
    return sign * pixels


def even_strokes(ink: torch.Tensor) -> torch.Tensor:
    """A cropped digit's ink as if written with MNIST's pen, scaled to fit the 20x20 box.

    In a frame FINE times finer than the box, the strokes are cut at half the strongest and made
    thinner or thicker until their width lies within MNIST's usual range; shrinking that to the box
    gives MNIST's full white cores and grey, anti-aliased edges."""
    scale = FINE * DIGIT_BOX / max(ink.shape)
    ink = ink[None, None]
    if scale < 0.5:  # a fine pen on a large picture: keep what any pixel of each block holds, not its average
        block = math.floor(1 / scale)
        ink, scale = F.max_pool2d(ink, block, ceil_mode=True), scale * block
    size = [max(1, round(side * scale)) for side in ink.shape[2:]]
    ink = F.interpolate(ink, size=size, mode="bilinear", antialias=True)
    mask = (ink >= ink.max() / 2).float()
    # A pen of radius r more on each side makes strokes of width w and a digit of length L into w + 2r
    # and L + 2r; scaled to the box, the width is (w + 2r) * DIGIT_BOX / (L + 2r). Solved for r:
    width, length = stroke_width(mask), max(size)
    target = (width * DIGIT_BOX / length).clamp(PEN_WIDTHS[0], PEN_WIDTHS[1])
    radius = ((target * length / DIGIT_BOX - width) / (2 * (1 - target / DIGIT_BOX))).item()
    steps = round(radius)
    if steps:
        drawn = grown(F.pad(mask, [abs(steps)] * 4), steps)
        rows, columns = drawn[0, 0].any(dim=1).nonzero(), drawn[0, 0].any(dim=0).nonzero()
        if len(rows):  # else thinning rubbed out every stroke (a blot, not strokes): keep them as they are
            mask = drawn[..., rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    height, width = mask.shape[2:]
    scale = DIGIT_BOX / max(height, width)
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return F.interpolate(mask, size=size, mode="area")[0, 0]


def prepare_digit(picture: str | Path | Image.Image) -> torch.Tensor:
    """A picture of one digit (a file or a Pillow image) as MNIST's images are: (1, 28, 28), normalised.

    Raises PictureError, with the reason, for a file that is missing or no picture, and for a picture
    that holds nothing but background."""
    if not isinstance(picture, Image.Image):
        picture = open_picture(picture)
    picture = ImageOps.exif_transpose(picture)  # photos taken sideways, as their camera says
    grey, alpha = grey_and_alpha(picture)
    if (alpha < 1).any():
        # Transparent pixels are background, as in drawing programs' exports: lay the strokes on
        # paper of the opposite shade, white behind dark strokes and black behind light ones.
        strokes = (grey * alpha).sum() / alpha.sum().clamp(min=1)  # their mean shade; 0 if there are none
        paper = 1.0 if strokes < 0.5 else 0.0
        grey = grey * alpha + paper * (1 - alpha)
    # The shade of most of the picture's edge is the paper's. When it is the darker one (light strokes
    # on a dark ground, as in MNIST), invert: from here on, the paper is the lighter.
    edge = torch.cat([grey[0], grey[-1], grey[:, 0], grey[:, -1]]).median()
    if edge <= (grey.min() + grey.max()) / 2:
        grey = 1 - grey
    paper = paper_brightness(grey)
    if (paper - grey).max() < MIN_CONTRAST:
        raise PictureError("nothing but background: no digit found")
    # Ink is the share of the light that the paper would reflect which the pen took away: the same
    # on the brightly and the dimly lit side of a page.
    ink = ((paper - grey) / paper.clamp(min=MIN_CONTRAST)).clamp(0, 1)
    ink[ink < INK_THRESHOLD * ink.max()] = 0
    rows, columns = ink.any(dim=1).nonzero(), ink.any(dim=0).nonzero()
    ink = even_strokes(ink[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1])
    # Place it in 28x28 so that its centre of mass falls on MNIST's (negative padding crops).
    height, width = ink.shape
    row = (ink.sum(dim=1) * torch.arange(height)).sum() / ink.sum()
    column = (ink.sum(dim=0) * torch.arange(width)).sum() / ink.sum()
    top, left = round(MNIST_CENTRE - row.item()), round(MNIST_CENTRE - column.item())
    image = F.pad(ink, (left, MNIST_SIDE - left - width, top, MNIST_SIDE - top - height))
    return ((image - MNIST_MEAN) / MNIST_STD).unsqueeze(0)


def ink_groups(image: torch.Tensor) -> int:
    """How many separate groups of ink a prepared digit (1, 28, 28) holds, each at least GROUP_SHARE of it."""
    ink = image[0] * MNIST_STD + MNIST_MEAN  # back to 0-1
    inked = ink > MIN_CONTRAST
    # Each inked pixel takes the largest number among its 8 neighbours until nothing changes: then each
    # group of touching pixels holds one number.
    labels = torch.arange(1, inked.numel() + 1, dtype=torch.float).reshape(inked.shape) * inked
    while True:
        spread = F.max_pool2d(labels[None], 3, stride=1, padding=1)[0] * inked
        if torch.equal(spread, labels):
            break
        labels = spread
    shares = [ink[labels == label].sum() / ink.sum() for label in labels.unique() if label > 0]
    return sum(share >= GROUP_SHARE for share in shares)


def doubts(probabilities: torch.Tensor, image: torch.Tensor) -> list[str]:
    """Why the model's answer for a prepared digit may be wrong: nothing when there is no reason to doubt it."""
    reasons = []
    if probabilities.max() < UNSURE_BELOW:
        reasons.append(f"top answer under {UNSURE_BELOW:.0%}")
    groups = ink_groups(image)
    if groups > 1:
        reasons.append(f"ink in {groups} separate groups")
    return reasons
