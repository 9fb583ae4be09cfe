"""TensorBoard's pictures: the validation digits with the model's guesses, the confusion matrix,
and the learning-rate finder's curve, drawn with Pillow."""

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.loggers import TensorBoardLogger
from torchmetrics.classification import MulticlassConfusionMatrix
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

from mnist_kit.data import MNIST_MEAN, MNIST_STD

# TensorBoard shows each picture in a card about 330 pixels wide, shrinking what is wider
# (unless "Show actual image size" is ticked): the pictures are drawn for that width.
CARD_WIDTH = 330
GRID_IMAGES = 32  # validation images shown with the model's guess, the same ones every epoch
GRID_COLUMNS = 4  # so 8 rows of 4, each image 3 times MNIST's size: 356 pixels across, barely shrunk
GRID_SCALE = 3
GRID_PADDING = 4  # white pixels between the images
FONT_SIZE = 16  # pixels; text in the pictures, about 15 on screen in the card


class ValidationPictures(pl.Callback):
    """TensorBoard's Images tab, once per validation epoch: the model's guesses on the first
    validation images, and its confusion matrix over all of them."""

    def __init__(self, num_classes: int) -> None:
        self.confusion = MulticlassConfusionMatrix(num_classes, validate_args=False)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.confusion.to(pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        images, labels = batch
        self.confusion.update(outputs, labels)  # outputs: the logits that validation_step returns
        if batch_idx == 0:
            # The validation loader never shuffles: these are the same images every epoch, and
            # TensorBoard's slider shows the guesses for them change as the model learns.
            self.shown = images[:GRID_IMAGES], outputs[:GRID_IMAGES].argmax(dim=1), labels[:GRID_IMAGES]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = self.confusion.compute()  # every process takes part: it adds up their counts
        self.confusion.reset()
        # One process draws, and not for the few batches of the sanity check before training.
        if trainer.sanity_checking or not trainer.is_global_zero or not isinstance(trainer.logger, TensorBoardLogger):
            return
        tensorboard = trainer.logger.experiment  # torch's SummaryWriter
        tensorboard.add_image("val_predictions", predictions_grid(*self.shown), trainer.current_epoch)
        tensorboard.add_image("val_confusion_matrix", confusion_picture(counts), trainer.current_epoch)


def predictions_grid(images: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalised images in a grid, each framed and labelled with the model's guess: green if right,
    red and followed by the true digit if wrong ("7, is 1")."""
    pixels = (images.float().cpu() * MNIST_STD + MNIST_MEAN).clamp(0, 1)  # undo the normalisation
    pixels = F.interpolate(pixels, scale_factor=GRID_SCALE)  # room for a caption in a corner
    size = pixels.shape[-1]
    grid = to_pil_image(make_grid(pixels, nrow=GRID_COLUMNS, padding=GRID_PADDING, pad_value=1))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=FONT_SIZE)
    for index, (predicted, true) in enumerate(zip(predictions.tolist(), labels.tolist(), strict=True)):
        row, column = divmod(index, GRID_COLUMNS)
        left, top = GRID_PADDING + column * (size + GRID_PADDING), GRID_PADDING + row * (size + GRID_PADDING)
        colour = "green" if predicted == true else "red"
        caption = str(predicted) if predicted == true else f"{predicted}, is {true}"
        draw.rectangle((left, top, left + size - 1, top + size - 1), outline=colour, width=2)
        text_right, text_bottom = draw.textbbox((left + 3, top + 1), caption, font=font)[2:]
        draw.rectangle((left, top, text_right + 3, text_bottom + 3), fill=colour)
        draw.text((left + 3, top + 1), caption, fill="white", font=font)
    return pil_to_tensor(grid)


CELL = 40  # pixels a side of a confusion-matrix cell, room for a count of 5,000
BLUE, RED = (8, 48, 107), (165, 15, 21)  # the colours of a full cell: right guesses, mistakes
EMPTY = 245  # the light grey of an empty cell


def confusion_picture(counts: torch.Tensor) -> torch.Tensor:
    """The confusion matrix, true digits down and guesses across, each cell with its count and
    tinted by its share of the true digit's images: blue when right, red for the mistakes."""
    # Drawn with Pillow: matplotlib took longer than a tenth of an epoch for this picture.
    font = ImageFont.load_default(size=14)
    side = CELL * (len(counts) + 1)
    picture = Image.new("RGB", (side, side + CELL // 2), "white")
    draw = ImageDraw.Draw(picture)
    caption = "rows: the true digit, columns: the model's guess"
    draw.text((side // 2, side + CELL // 4), caption, fill="black", font=font, anchor="mm")
    shares = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).tolist()
    for true, row in enumerate(counts.tolist()):
        centre = CELL * (true + 1) + CELL // 2
        draw.text((centre, CELL // 2), str(true), fill="black", font=font, anchor="mm")  # the guesses, across
        draw.text((CELL // 2, centre), str(true), fill="black", font=font, anchor="mm")  # the true digits, down
        for guess, count in enumerate(row):
            # The square root makes a mistake of 1% of a digit's images visible: a tenth of the full colour.
            strength = shares[true][guess] ** 0.5
            full = BLUE if guess == true else RED
            fill = tuple(round(EMPTY + strength * (channel - EMPTY)) for channel in full)
            left, top = CELL * (guess + 1), CELL * (true + 1)
            draw.rectangle((left, top, left + CELL - 2, top + CELL - 2), fill=fill)
            if count:
                text = "white" if strength > 0.6 else "black"
                draw.text((left + CELL // 2, top + CELL // 2), str(count), fill=text, font=font, anchor="mm")
    return pil_to_tensor(picture)


def lr_find_picture(rates: list[float], losses: list[float], suggestion: float | None) -> torch.Tensor:
    """The learning-rate finder's loss against the learning rate, on a log scale, with its
    suggestion as a red dot (what Lightning's lr_finder.plot draws, without matplotlib)."""
    width, height, left_margin, bottom_margin, top_margin = CARD_WIDTH, 250, 52, 44, 24
    points = [(math.log10(rate), loss) for rate, loss in zip(rates, losses, strict=True) if math.isfinite(loss)]
    (first, last), (low, high) = ((min(axis), max(axis)) for axis in zip(*points, strict=True))
    ticks = loss_ticks(low, high)
    low, high = ticks[0], ticks[-1]  # the axis runs from tick to tick

    def at(x: float, y: float) -> tuple[float, float]:
        across = (x - first) / ((last - first) or 1)
        up = (y - low) / (high - low)
        return left_margin + across * (width - left_margin - 12), height - bottom_margin - up * (
            height - bottom_margin - top_margin
        )

    font = ImageFont.load_default(size=FONT_SIZE - 2)
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    draw.line([at(first, high), at(first, low), at(last, low)], fill="black")  # the axes
    powers = range(math.ceil(first), math.floor(last) + 1)  # 1e-05, 1e-04, ...
    stride = math.ceil(len(powers) * 40 / (width - left_margin))  # a label needs about 40 pixels
    for power in powers[::stride]:
        x, y = at(power, low)
        draw.line([(x, y), (x, y + 4)], fill="black")
        draw.text((x, y + 6), f"1e{power}", fill="black", font=font, anchor="mt")
    for loss in ticks:
        x, y = at(first, loss)
        draw.line([(x - 4, y), (x, y)], fill="black")
        draw.text((x - 6, y), f"{loss:.{tick_decimals(ticks)}f}", fill="black", font=font, anchor="rm")
    draw.text((width / 2, height - 10), "learning rate", fill="black", font=font, anchor="ms")
    draw.text((4, 4), "loss", fill="black", font=font, anchor="lt")
    draw.line([at(x, y) for x, y in points], fill=BLUE, width=2)
    if suggestion is not None:
        x, y = at(*min(points, key=lambda point: abs(point[0] - math.log10(suggestion))))
        draw.ellipse((x - 5, y - 5, x + 5, y + 5), fill="red")
    return pil_to_tensor(picture)


def loss_ticks(low: float, high: float) -> list[float]:
    """Round values for the loss axis, 1, 2 or 5 times a power of ten apart, from at or below
    low to at or above high: 3 to 7 of them, so the axis reads at a glance."""
    if high - low <= 1e-9 * max(abs(low), abs(high), 1e-9):  # flat, to float precision: an axis around it
        margin = 0.05 * abs(low) or 0.5
        low, high = low - margin, high + margin
    spread = high - low
    power = 10 ** math.floor(math.log10(spread / 5))
    step = next(power * multiple for multiple in (1, 2, 5, 10) if spread / (power * multiple) <= 5)
    start, end = math.floor(low / step), math.ceil(high / step)
    return [index * step for index in range(start, max(end, start + 1) + 1)]


def tick_decimals(ticks: list[float]) -> int:
    """Decimals enough to tell the ticks apart: 0.05 apart, two."""
    return max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9))
