"""The vision program of an image-text-to-text artifact, loaded and ready to encode images."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..artifact.files import VISION_WEIGHTS_NAME, verify_file, vision_program_name
from ..artifact.neuron_config import Gemma3NeuronConfig
from ..compiler import backend_for_target
from ..graphs.program import canonical
from ..graphs.vision import Gemma3VisionEncoder
from ..weights import check_tensors


class VisionEngine:
    """Pixels to image features, one image per program call.

    One image at a time: an image's features never depend on the other images of the
    call, and the program has one static shape whatever the number of images. It runs in
    the calling process, also for a tensor-parallel text decoder (its ranks receive the
    features with the prompt).
    """

    def __init__(self, folder: Path, nc: Gemma3NeuronConfig, config):
        backend = backend_for_target(nc.target)
        name = vision_program_name(backend.program_suffix)
        self.program = backend.load(verify_file(folder, name, nc.artifact_files.get(name)))
        skeleton = Gemma3VisionEncoder.skeleton(config, nc.torch_dtype)
        path = verify_file(folder, VISION_WEIGHTS_NAME)
        self.weights = canonical(load_file(path))
        check_tensors(self.weights, skeleton, path)
        self.image_shape = (skeleton.num_channels, skeleton.image_size, skeleton.image_size)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[N, C, H, W]` images (as the checkpoint's processor makes them) to `[N, T, hidden]`."""
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != self.image_shape:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}: this model takes "
                f"[images, {', '.join(map(str, self.image_shape))}], as its processor "
                "(AutoProcessor.from_pretrained(<model folder>)) makes them."
            )
        pixels = pixel_values.to(torch.float32)
        return torch.cat([self.program(self.weights, image[None]) for image in pixels])
