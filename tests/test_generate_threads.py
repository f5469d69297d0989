"""Concurrent generate() and pipeline calls on one compiled model each return what they
would alone (the model has one set of KV caches: calls take turns)."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import transformers
from transformers import TextIteratorStreamer

from tests.test_artifacts import exported  # noqa: F401  (session fixture)
from tests.test_parity import left_padded_batch
from tests.tiny_models import tiny_tokenizer

THREADS = 6


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every few microseconds, so that unserialized calls interleave their
    steps on every run instead of now and then."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def run_together(calls: list) -> list:
    """Start every call at once (a barrier) on its own thread; their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def requests(count: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Different prompts, batch sizes, lengths and numbers of new tokens."""
    out = []
    for index in range(count):
        lengths = [(5, 23, 14), (9,), (17, 3), (30,), (2, 11, 7), (26, 20)][index % 6]
        ids, mask = left_padded_batch(520, seed=40 + index, lengths=lengths)
        out.append((ids, mask, 8 + 3 * index))
    return out


def test_concurrent_generate_calls_return_what_they_would_alone(
    exported,  # noqa: F811
    frequent_thread_switches,
):
    _, model, _ = exported
    work = requests(THREADS)
    alone = [model.generate(ids, mask, max_new_tokens=new) for ids, mask, new in work]
    for _ in range(2):
        together = run_together(
            [lambda a=args: model.generate(a[0], a[1], max_new_tokens=a[2]) for args in work]
        )
        for index, (mine, expected) in enumerate(zip(together, alone, strict=True)):
            assert torch.equal(mine, expected), f"call {index} got other tokens"


def test_streaming_calls_with_consumer_threads_do_not_deadlock(exported):  # noqa: F811
    """Each call streams to its own consumer while other calls wait for the model."""
    _, model, _ = exported
    tokenizer = tiny_tokenizer(520)
    prompts = ["w9 w10 w11", "w100 w200", "w7 w8 w9 w10 w11 w12", "w300"]
    alone = [
        model.generate(**tokenizer([p], return_tensors="pt"), max_new_tokens=10) for p in prompts
    ]

    def stream(prompt: str) -> tuple[torch.Tensor, str]:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
        inputs = tokenizer([prompt], return_tensors="pt")
        result = {}
        producer = threading.Thread(
            target=lambda: result.update(
                out=model.generate(**inputs, max_new_tokens=10, streamer=streamer)
            )
        )
        producer.start()
        text = "".join(streamer)  # the consumer: this thread
        producer.join(timeout=60)
        assert not producer.is_alive()
        return result["out"], text

    results = run_together([lambda p=p: stream(p) for p in prompts])
    for (out, text), expected in zip(results, alone, strict=True):
        assert torch.equal(out, expected)
        prompt_length = expected.shape[1] - 10
        assert text.strip() == tokenizer.decode(expected[0, prompt_length:]).strip()


def test_concurrent_pipeline_calls(exported, frequent_thread_switches):  # noqa: F811
    _, model, _ = exported
    tokenizer = tiny_tokenizer(520)
    tokenizer.padding_side = "left"
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = [["w100 w200 w300", "w42"], ["w17 w18 w19 w20 w21"], ["w5 w6", "w7 w8 w9", "w10"]]
    kwargs = dict(max_new_tokens=12, do_sample=False, batch_size=3)
    alone = [pipe(p, **kwargs) for p in prompts]
    together = run_together([lambda p=p: pipe(p, **kwargs) for p in prompts])
    assert together == alone
