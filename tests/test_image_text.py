"""Image-text-to-text: the compiled multimodal Gemma-3 against transformers'
`Gemma3ForConditionalGeneration`, with inputs made by a real `Gemma3Processor`.

The tiny vision checkpoints give each image 16 tokens and their sliding window is 8, so an
image's block of mutually visible tokens is longer than the window; prompts put images
before and beyond the window, across the prefill's 128-query attention blocks, in
left-padded batches mixing rows with and without images.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from optimum.neuron.models.inference import modeling_utils
from PIL import Image
from transformers import AutoProcessor, LogitsProcessor, LogitsProcessorList, pipeline

from optimum_gemma3 import Gemma3NeuronModelForCausalLM, Gemma3NeuronModelForImageTextToText
from optimum_gemma3.accuracy import less_accurate_than
from optimum_gemma3.artifact.files import ArtifactError
from optimum_gemma3.graphs.layers import PREFILL_QUERY_BLOCK
from tests.test_artifacts import exported  # noqa: F401  (session fixture)
from tests.test_cli import optimum_cli
from tests.tiny_models import TOKENS_PER_IMAGE, load_reference

SHAPE = dict(
    batch_size=3, sequence_length=288, context_encoding_buckets=[64, 256], max_num_images=3
)
NEW_TOKENS = 24
LONG_BUCKET = SHAPE["context_encoding_buckets"][-1]


@pytest.fixture(scope="session")
def image_exports(tiny_checkpoints, tmp_path_factory):
    """`(checkpoint, saved folder)` of a tiny vision checkpoint exported once per dtype."""
    exports = {}

    def get(name: str, dtype: str = "fp32"):
        if (name, dtype) not in exports:
            source = tiny_checkpoints(name)
            model = Gemma3NeuronModelForImageTextToText.from_pretrained(
                source, export=True, instance_type="cpu", torch_dtype=dtype, **SHAPE
            )
            folder = tmp_path_factory.mktemp("image-exports") / f"{name}-{dtype}"
            model.save_pretrained(folder)
            model.runtime.close()
            exports[name, dtype] = source, folder
        return exports[name, dtype]

    return get


def random_image(seed: int, height: int = 60, width: int = 90) -> Image.Image:
    pixels = np.random.default_rng(seed).random((height, width, 3)) * 255
    return Image.fromarray(pixels.astype("uint8"))


def words(count: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(12, 500, count))


def mixed_batch(processor):
    """Three left-padded rows: two images, one straddling the 128-query block boundary of
    its 256-token prefill bucket; text only; an image first."""
    image = "<start_of_image>"
    # 40 words, image, 20 words, image, 81 words: 177 tokens, left-padded to 256, put the
    # first image's tokens at indices 120..135.
    texts = [
        f"{words(40, 1)} {image} {words(20, 2)} {image} {words(81, 3)}",
        words(9, 4),
        f"{image} {words(5, 5)}",
    ]
    images = [[random_image(1), random_image(2, 80, 40)], [], [random_image(3)]]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    is_image = inputs["input_ids"][0] == processor.image_token_id
    first = LONG_BUCKET - inputs["input_ids"].shape[1] + int(is_image.long().argmax())
    assert first < PREFILL_QUERY_BLOCK < first + TOKENS_PER_IMAGE, first
    return inputs


class ForceTokens(LogitsProcessor):
    """Teacher forcing through `generate()`: step i picks `tokens[:, i]`."""

    def __init__(self, tokens: torch.Tensor, prompt_width: int):
        self.tokens, self.prompt_width = tokens, prompt_width

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_width
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, self.tokens[:, step : step + 1], 0.0)


@pytest.mark.parametrize("name", ["4b-vision", "27b-vision"])
def test_fp32_greedy_tokens_equal_transformers(name, image_exports):
    source, folder = image_exports(name)
    processor = AutoProcessor.from_pretrained(folder)
    inputs = mixed_batch(processor)
    reference = load_reference(source)
    with torch.inference_mode():
        expected = reference.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    model = Gemma3NeuronModelForImageTextToText.from_pretrained(folder)
    ours = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(ours, expected)


def test_vision_program_equals_get_image_features(image_exports):
    """fp32 image features against transformers' `get_image_features`, one image at a
    time or several: Inductor fuses and reorders the program's sums (the products are the
    same oneDNN/MKL calls), so they may differ by a few ulps, never more."""
    source, folder = image_exports("4b-vision")
    processor = AutoProcessor.from_pretrained(folder)
    images = [random_image(seed, 50 + 10 * seed, 70) for seed in range(3)]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        expected = load_reference(source).model.get_image_features(pixels)
    ours = Gemma3NeuronModelForImageTextToText.from_pretrained(folder).runtime.encode_images(pixels)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_image_blocks_attend_both_ways(image_exports):
    """The first step's logits equal transformers' with token types; without them (the
    compiled prefill then applies the causal mask only, as transformers does) they are far
    off: the bidirectional rule is what the programs compute, not an unused branch."""
    source, folder = image_exports("4b-vision")
    inputs = mixed_batch(AutoProcessor.from_pretrained(folder))
    with torch.inference_mode():
        expected = load_reference(source)(**inputs).logits[:, -1]
    model = Gemma3NeuronModelForImageTextToText.from_pretrained(folder)

    def first_logits(**overrides):
        run = model.generate(
            **{**inputs, **overrides},
            max_new_tokens=1,
            output_logits=True,
            return_dict_in_generate=True,
        )
        return run.logits[0]

    torch.testing.assert_close(first_logits(), expected, rtol=1e-4, atol=1e-4)
    causal = first_logits(token_type_ids=torch.zeros_like(inputs["token_type_ids"]))
    with_images = [0, 2]
    assert (causal[with_images] - expected[with_images]).abs().amax(-1).min() > 0.1
    torch.testing.assert_close(causal[1], expected[1], rtol=1e-4, atol=1e-4)


def test_bf16_no_less_accurate_than_transformers(image_exports):
    """bf16, teacher-forced on transformers' bf16 greedy tokens: against fp32 transformers,
    our logits are as accurate as transformers' bf16 (the text tests' criterion)."""
    source, folder = image_exports("4b-vision", "bf16")
    inputs = mixed_batch(AutoProcessor.from_pretrained(folder))
    with torch.inference_mode():
        run = load_reference(source, torch.bfloat16).generate(
            **inputs,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        width = inputs["input_ids"].shape[1]
        forced = run.sequences[:, width:]
        full = dict(inputs)
        full["input_ids"] = run.sequences
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(forced)], 1)
        full["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(forced)], 1)
        truth = load_reference(source)(**full).logits[:, width - 1 : -1]
    model = Gemma3NeuronModelForImageTextToText.from_pretrained(folder)
    ours = model.generate(
        **inputs,
        max_new_tokens=NEW_TOKENS,
        logits_processor=LogitsProcessorList([ForceTokens(forced, width)]),
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert torch.equal(ours.sequences, run.sequences)
    ours_logits, theirs = torch.stack(ours.logits, 1), torch.stack(run.logits, 1).float()
    problems = less_accurate_than(ours_logits, theirs, truth)
    assert not problems, problems


def test_pan_and_scan_crops_are_more_images(image_exports):
    """The processor's pan-and-scan option turns a wide image into the image plus crops:
    more images in the prompt, the same tokens as transformers."""
    source, folder = image_exports("4b-vision")
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(
        images=[[random_image(7, 40, 200)]],
        text=[f"{words(6, 7)} <start_of_image> {words(4, 8)}"],
        return_tensors="pt",
        do_pan_and_scan=True,
        pan_and_scan_min_crop_size=32,
        pan_and_scan_max_num_crops=2,
    )
    assert inputs["pixel_values"].shape[0] == 3  # the image and two crops
    with torch.inference_mode():
        expected = load_reference(source).generate(**inputs, max_new_tokens=8, do_sample=False)
    model = Gemma3NeuronModelForImageTextToText.from_pretrained(folder)
    assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False), expected)


def test_pipeline_with_chat_messages_holding_images(image_exports, tmp_path):
    """`pipeline("image-text-to-text")` with PIL images and local paths in chat messages
    gives transformers' pipeline's text."""
    source, folder = image_exports("4b-vision")
    path = tmp_path / "photo.png"
    random_image(9).save(path)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(8)},
                {"type": "text", "text": words(5, 9)},
                {"type": "image", "url": str(path)},
                {"type": "text", "text": words(3, 10)},
            ],
        }
    ]
    processor = AutoProcessor.from_pretrained(folder)
    model = Gemma3NeuronModelForImageTextToText.from_pretrained(folder)
    ours = pipeline("image-text-to-text", model=model, processor=processor)
    theirs = pipeline("image-text-to-text", model=load_reference(source), processor=processor)
    kwargs = dict(max_new_tokens=10, do_sample=False, return_full_text=False)
    text = ours(text=messages, **kwargs)[0]["generated_text"]
    assert text and text == theirs(text=messages, **kwargs)[0]["generated_text"]


def test_text_only_use_of_an_image_export(image_exports):
    """The text class loads an image-text-to-text export and generates from text alone."""
    source, folder = image_exports("4b-vision")
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor.tokenizer([words(7, 11), words(12, 12)], return_tensors="pt", padding=True)
    with torch.inference_mode():
        expected = load_reference(source).generate(**inputs, max_new_tokens=12, do_sample=False)
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=False), expected)
    with pytest.raises(ValueError, match="Gemma3NeuronModelForImageTextToText"):
        model.generate(**inputs, pixel_values=torch.zeros(1, 3, 112, 112))


def test_image_inputs_that_do_not_match_are_refused(image_exports):
    _, folder = image_exports("4b-vision")
    processor = AutoProcessor.from_pretrained(folder)
    model = Gemma3NeuronModelForImageTextToText.from_pretrained(folder)
    image = "<start_of_image>"
    inputs = processor(
        images=[[random_image(1), random_image(2)]],
        text=[f"{image} w20 {image} w21"],
        return_tensors="pt",
    )
    with pytest.raises(ValueError, match="32 image tokens, but 1 images need 16"):
        model.generate(**{**inputs, "pixel_values": inputs["pixel_values"][:1]})
    with pytest.raises(ValueError, match="32 image tokens, but no pixel_values need 0"):
        model.generate(**{k: v for k, v in inputs.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match="shape"):
        model.generate(**{**inputs, "pixel_values": inputs["pixel_values"][..., :56]})
    four = processor(
        images=[[random_image(s) for s in range(4)]],
        text=[f"{image} {image} w5 {image} {image}"],
        return_tensors="pt",
    )
    with pytest.raises(ValueError, match="max_num_images=3"):
        model.generate(**four)
    merged = dict(inputs)
    merged["token_type_ids"] = torch.ones_like(inputs["token_type_ids"])
    with pytest.raises(ValueError, match="block of"):
        model.generate(**merged)


def test_exports_and_folders_that_cannot_take_images_are_refused(
    image_exports, tiny_checkpoints, tmp_path
):
    with pytest.raises(ValueError, match="no vision tower"):
        Gemma3NeuronModelForImageTextToText.get_neuron_config(tiny_checkpoints("4b"))
    source, folder = image_exports("4b-vision")
    with pytest.raises(ValueError, match="max_num_images=9 images take 144 image tokens"):
        Gemma3NeuronModelForImageTextToText.from_pretrained(
            source,
            export=True,
            **{**SHAPE, "max_num_images": 9, "context_encoding_buckets": [64]},
            max_context_length=64,
        )
    without_processor = tmp_path / "no-processor"
    shutil.copytree(source, without_processor)
    (without_processor / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        Gemma3NeuronModelForImageTextToText.from_pretrained(without_processor, export=True, **SHAPE)

    copy = tmp_path / "copied"
    shutil.copytree(folder, copy)
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(ArtifactError, match="preprocessor_config.json is missing"):
        Gemma3NeuronModelForImageTextToText.from_pretrained(copy)


def test_text_exports_take_no_images(exported):  # noqa: F811
    """A text-generation export: the image class refuses it, the text class refuses images."""
    _, model, folder = exported
    with pytest.raises(ValueError, match="exported for text-generation"):
        Gemma3NeuronModelForImageTextToText.from_pretrained(folder)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="image-text-to-text"):
        model.generate(ids, pixel_values=torch.zeros(1, 3, 112, 112))
    with pytest.raises(ValueError, match="no vision program"):
        model.runtime.prefill(ids, torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))


def test_cli_exports_image_text_to_text(image_exports, tmp_path):
    """`optimum-cli export neuron --task image-text-to-text`: the vision program, its
    weights and the processor in the folder; optimum-neuron's registry finds the class."""
    source, _ = image_exports("4b-vision")  # the same programs: from the compile cache
    output = tmp_path / "cli"
    shape = ["--batch_size", "3", "--sequence_length", "288", "--max_num_images", "3"]
    args = ["--task", "image-text-to-text", *shape, str(output)]
    result = optimum_cli(
        "export", "neuron", "--model", str(source), "--context_encoding_buckets", "64,256", *args
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("compiled/vision.pt2", "vision.safetensors", "preprocessor_config.json"):
        assert (output / name).is_file(), name
    found = modeling_utils.get_neuron_model_class("gemma3", "image-text-to-text", "inference")
    assert found is Gemma3NeuronModelForImageTextToText
    processor = AutoProcessor.from_pretrained(output)
    inputs = processor(
        images=[[random_image(4)]],
        text=[f"w30 <start_of_image> {words(3, 13)}"],
        return_tensors="pt",
    )
    with torch.inference_mode():
        expected = load_reference(source).generate(**inputs, max_new_tokens=6, do_sample=False)
    model = found.from_pretrained(output)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), expected)


def test_tensor_parallel_text_with_the_vision_program_in_this_process(tiny_checkpoints, tmp_path):
    """tensor_parallel_size=2: the ranks run the sharded text programs, taking the image
    features the vision program computes in the calling process; tokens stay transformers'."""
    source = tiny_checkpoints("4b-vision")
    model = Gemma3NeuronModelForImageTextToText.from_pretrained(
        source,
        export=True,
        instance_type="cpu",
        tensor_parallel_size=2,
        batch_size=2,
        sequence_length=96,
        context_encoding_buckets=[64],
        max_num_images=2,
    )
    processor = AutoProcessor.from_pretrained(source)
    inputs = processor(
        images=[[random_image(5)], []],
        text=[f"{words(9, 14)} <start_of_image> {words(4, 15)}", words(6, 16)],
        return_tensors="pt",
        padding=True,
    )
    with torch.inference_mode():
        expected = load_reference(source).generate(**inputs, max_new_tokens=16, do_sample=False)
    try:
        assert torch.equal(model.generate(**inputs, max_new_tokens=16, do_sample=False), expected)
    finally:
        model.runtime.close()
