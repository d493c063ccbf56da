"""Digits "written on paper and photographed", drawn by a program: a stand-in for a phone photo.

Each is a hand-like stroke (wobbly, in a marker's width) in dark ink on off-white paper under
uneven light, with sensor noise, a little blur and JPEG compression, placed off-centre at its
own size: what `--predict` must cope with in a real photo. Not a test (pytest does not collect
it); it made the pictures under docs/images/digits:

    python -m tests.draw_digits docs/images/digits
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFilter

Point = tuple[float, float]


def arc(centre: Point, radius: tuple[float, float], start: float, end: float, steps: int = 24) -> list[Point]:
    """Points along an ellipse from angle start to end (degrees, counter-clockwise, y pointing up)."""
    (x, y), (rx, ry) = centre, radius
    angles = [math.radians(start + (end - start) * i / steps) for i in range(steps + 1)]
    return [(x + rx * math.cos(angle), y - ry * math.sin(angle)) for angle in angles]


# Strokes per digit in a unit box (x to the right, y down), each a list of points.
STROKES: dict[str, list[list[Point]]] = {
    "0": [arc((0.5, 0.5), (0.27, 0.4), 90, 450, 40)],
    "1": [[(0.36, 0.26), (0.55, 0.1), (0.52, 0.9)]],
    "2": [arc((0.5, 0.32), (0.24, 0.22), 160, -40, 20) + [(0.2, 0.88), (0.84, 0.86)]],
    "3": [arc((0.47, 0.3), (0.22, 0.2), 150, -90, 20) + arc((0.47, 0.69), (0.26, 0.21), 90, -150, 20)],
    "4": [[(0.64, 0.9), (0.64, 0.1), (0.16, 0.64), (0.86, 0.64)]],
    "5": [[(0.78, 0.12), (0.34, 0.12), (0.29, 0.45)] + arc((0.5, 0.65), (0.26, 0.23), 140, -150, 20)],
    "7": [[(0.18, 0.14), (0.82, 0.14), (0.4, 0.9)]],
    "8": [arc((0.5, 0.29), (0.2, 0.19), 270, -90, 30), arc((0.5, 0.7), (0.25, 0.21), 90, 450, 30)],
    "9": [arc((0.48, 0.33), (0.22, 0.21), 0, 360, 30) + [(0.69, 0.36), (0.6, 0.9)]],
}


def wobble(points: list[Point], generator: random.Random, amount: float) -> list[Point]:
    """A hand's wobble: each point moves a little, neighbours alike (a slow drift, not noise)."""
    drift_x = drift_y = 0.0
    moved = []
    for x, y in points:
        drift_x = 0.7 * drift_x + generator.gauss(0, amount)
        drift_y = 0.7 * drift_y + generator.gauss(0, amount)
        moved.append((x + drift_x, y + drift_y))
    return moved


def photo_of_digit(digit: str, seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """One digit on paper, as a phone would photograph it."""
    generator = random.Random(seed)
    width, height = size
    paper = Image.new("L", size)
    corner_x, corner_y = generator.random() * width, generator.random() * height
    shade = [int(238 - 40 * math.hypot(x - corner_x, y - corner_y) / math.hypot(width, height))
             for y in range(height) for x in range(width)]  # light falling off from one corner
    paper.putdata(shade)
    box = generator.uniform(0.45, 0.7) * height
    left = generator.uniform(0.1 * width, width - box * 0.9 - 0.1 * width)
    top = generator.uniform(0.08 * height, height - box - 0.08 * height)
    pen = int(box * generator.uniform(0.07, 0.1))
    draw = ImageDraw.Draw(paper)
    slant = generator.uniform(-0.15, 0.15)
    for stroke in STROKES[digit]:
        points = [(left + (x + slant * (0.5 - y)) * box * 0.9, top + y * box)
                  for x, y in wobble(stroke, generator, 0.01)]
        draw.line(points, fill=45, width=pen, joint="curve")
        for x, y in (points[0], points[-1]):  # round pen ends
            draw.ellipse([x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2], fill=45)
    noise = torch.randn(height, width, generator=torch.Generator().manual_seed(seed)) * 5
    grain = (torch.frombuffer(bytearray(paper.tobytes()), dtype=torch.uint8).view(height, width) + noise)
    paper = Image.frombytes("L", size, grain.clamp(0, 255).to(torch.uint8).numpy().tobytes())
    tint = Image.merge("RGB", [paper.point(lambda v, k=k: int(v * k)) for k in (1.0, 0.98, 0.93)])  # warm paper
    return tint.filter(ImageFilter.GaussianBlur(1.0))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write the JPEG files")
    parser.add_argument("--digits", default="0123457", help="which digits to draw")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    for seed, digit in enumerate(args.digits):
        photo_of_digit(digit, seed).save(args.folder / f"digit_{digit}.jpg", quality=80)
        print(args.folder / f"digit_{digit}.jpg")


if __name__ == "__main__":
    main()
