"""--demo: a page in your browser to play with a trained run, built with Gradio (pip install gradio).

Every script answers `--demo` as it answers `--predict`: `python lenet.py --demo` opens the most recent
finished run (or `--out-dir`). Draw a digit on the canvas (the MNIST scripts) or upload a picture,
or click one of the test images (the CIFAR scripts); after each stroke or upload the page shows the
top 3 classes with their probabilities, what the network saw after the preparation `--predict`
uses (`utils.prepare_image`), and the Grad-CAM map over it. It listens on 127.0.0.1 only; Ctrl-C
stops it. utils.examine calls `serve`; nothing else imports this file, so Gradio stays optional.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from torch import Tensor, nn

import utils


def answer(picture: Any, model: nn.Module, layer: nn.Module, data: utils.ImageData, precision: torch.dtype | None,
           resize: int | None) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """What the page shows for one picture (a PIL image): {class: probability} of the top 3, what the network
    saw, and that under its Grad-CAM map (both as RGB arrays, enlarged to be seen)."""
    seen = utils.prepare_image(picture, data.shape)[None]
    probabilities, heat = utils.classify(model, layer, data, seen, precision, resize)
    top = probabilities[0].topk(min(3, data.num_classes))
    best = {data.classes[index]: value for value, index in zip(top.values.tolist(), top.indices.tolist())}
    return best, enlarged(seen.expand(-1, 3, -1, -1)), enlarged(utils.with_heat(seen, heat))


def enlarged(images: Tensor, scale: int = 8) -> np.ndarray:
    """The first uint8 RGB image (1, 3, H, W) as an (H * scale, W * scale, 3) array: sharp pixels in the browser."""
    return images[0].repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).permute(1, 2, 0).numpy()


def page(model: nn.Module, layer: nn.Module, data: utils.ImageData, run: utils.Run, precision: torch.dtype | None,
         resize: int | None, examples: list[str]) -> gr.Blocks:
    """The page: the picture on the left (a canvas for digits), the network's answer on the right."""
    def respond(picture: Any) -> tuple[dict[str, float] | None, np.ndarray | None, np.ndarray | None]:
        if isinstance(picture, dict):  # the canvas: its strokes flattened onto one picture
            picture = picture.get("composite")
        if picture is None:
            return None, None, None
        try:
            return answer(picture, model, layer, data, precision, resize)
        except utils.RunError:  # a blank canvas, or a picture of nothing
            gr.Info("No digit to read yet: draw one, filling a good part of the canvas." if digits else
                    "Nothing to read in that picture.")
            return None, None, None

    digits = data.shape[0] == 1
    with gr.Blocks(title=f"{run.script}: {run.folder}") as blocks:
        gr.Markdown(f"### {run.script}.py, the run in `{run.folder}`\n"
                    + ("Draw a digit (or upload a picture of one): the network answers after each stroke." if digits
                       else f"Upload a picture{', or click one of the test images' * bool(examples)}: the network "
                       "answers each one."))
        with gr.Row():
            with gr.Column():
                inputs = []
                if digits:
                    canvas = gr.Sketchpad(label="draw a digit", type="pil", image_mode="RGBA", canvas_size=(280, 280),
                                          brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"))
                    inputs.append(canvas)
                upload = gr.Image(label="or upload a picture" if digits else "upload a picture", type="pil",
                                  image_mode="RGBA", sources=["upload"], height=280)
                inputs.append(upload)
                if examples:
                    gr.Examples(examples, inputs=upload, label="test images")
            with gr.Column():
                top = gr.Label(num_top_classes=3, label="top 3 classes")
                with gr.Row():
                    seen = gr.Image(label="what the network saw", interactive=False)
                    cam = gr.Image(label="Grad-CAM", interactive=False)
        for source in inputs:  # one answer at a time: Grad-CAM hooks the one model
            source.change(respond, inputs=source, outputs=[top, seen, cam], concurrency_id="model")
        # The canvas starts with its brush in hand: draw at once.
        blocks.load(None, js="() => setTimeout(() => document.querySelector('button[aria-label=Brush]')?.click(), 300)")
    return blocks


def example_images(args: argparse.Namespace, count: int = 8) -> utils.ImageData | None:
    """The first test images of a CIFAR run's dataset, where its files are at hand (nothing is downloaded)."""
    with contextlib.suppress(utils.RunError, OSError, KeyError):
        if args.dataset != "fake":
            folder, files = utils.expected_files(args.dataset, Path(args.data_dir))
            if not all((folder / file).is_file() for file in files):
                return None
        return utils.load_data(args.dataset, args.data_dir, limit=count, fake_like="cifar10")
    return None


def serve(model: nn.Module, layer: nn.Module, data: utils.ImageData, run: utils.Run, precision: torch.dtype | None,
          resize: int | None, args: argparse.Namespace) -> dict[str, Any]:
    """Serve the page on 127.0.0.1 until Ctrl-C; print its address."""
    with tempfile.TemporaryDirectory() as folder:
        examples = []
        if data.shape[0] == 3 and (tests := example_images(args)) is not None:  # a few test images to click
            from PIL import Image
            for index, image in enumerate(tests.test_images):
                examples.append(str(Path(folder) / f"test_{index}_{tests.classes[tests.test_labels[index]]}.png"))
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(examples[-1])
        blocks = page(model, layer, data, run, precision, resize, examples)
        # Gradio asks its own server over HTTP: a web proxy the user has set must not be asked for 127.0.0.1.
        for name in ("NO_PROXY", "no_proxy"):
            os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
        blocks.queue()
        _, address, _ = blocks.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True,
                                      allowed_paths=[folder])
        print(f"The demo of {run.folder} is at {address} (Ctrl-C stops it).", flush=True)
        try:
            blocks.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            blocks.close()
    print("Demo stopped.")
    return {"script": run.script, "variant": run.variant, "run": str(run.folder), "demo": address}
