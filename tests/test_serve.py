"""The OpenAI-compatible server, driven on 127.0.0.1 with the real `openai` client.

Every completion equals what `generate()` returns for the request alone (greedy) or after
`torch.manual_seed(seed)` (seeded sampling), streamed or not, alone or under a load of
64 requests from 16 concurrent clients; bad input gets OpenAI-style errors and disturbs
nothing; a full queue answers 429 with Retry-After; a client that leaves frees its slot;
SIGTERM lets the request in flight finish and stops the process; `optimum-cli neuron
serve` and `python -m optimum_gemma3.serve` start it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.serve.app import build_app
from optimum_gemma3.serve.engine import ServingEngine
from tests.test_batch_invariance import SHAPE
from tests.test_generate_options import stop_string_tokenizer
from tests.test_kernels import needs_kernels

pytestmark = needs_kernels

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-gemma3"
SEQUENCE_LENGTH = SHAPE["sequence_length"]  # 48; prompts up to 32 tokens (two buckets)


class ServerThread:
    """uvicorn serving `app` on a free 127.0.0.1 port, in a thread of this process."""

    def __init__(self, app):
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kwargs)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    """The 2-layer tiny model, 8 slots, fp32 (the programs test_batch_invariance compiles)."""
    source = tiny_checkpoints("2-layer")
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        source, instance_type="cpu", torch_dtype="float32", **SHAPE
    )
    return Gemma3NeuronModelForCausalLM.export(source, config)


@pytest.fixture(scope="module")
def tokenizer():
    return stop_string_tokenizer()


def serve(model, tokenizer, **engine_options) -> tuple[ServerThread, ServingEngine]:
    engine = ServingEngine(model, **engine_options)
    return ServerThread(build_app(engine, tokenizer, NAME, shutdown_timeout=10)), engine


@pytest.fixture(scope="module")
def server(model, tokenizer):
    thread, engine = serve(model, tokenizer)
    with thread:
        thread.engine = engine
        yield thread


def words(rng: random.Random, count: int) -> str:
    return " ".join(f"w{rng.randrange(7, 512)}" for _ in range(count))


def alone(model, tokenizer, prompt_ids: list[int], **options) -> list[int]:
    """`generate()`'s new tokens for one request (seeded first if `seed` is given)."""
    seed = options.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt_ids]), tokenizer=tokenizer, **options)
    return out[0, len(prompt_ids) :].tolist()


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def chat_ids(tokenizer, content: str) -> list[int]:
    messages = [{"role": "user", "content": content}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def test_models_health_and_metrics(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    server.client().completions.create(model=NAME, prompt="w9 w10", max_tokens=3, temperature=0)
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in (
        "optimum_gemma3_requests_total",
        "optimum_gemma3_queue_length",
        "optimum_gemma3_active_slots",
        "optimum_gemma3_generated_tokens_total",
        "optimum_gemma3_time_to_first_token_seconds_bucket",
        "optimum_gemma3_inter_token_latency_seconds_bucket",
    ):
        assert name in metrics, name
    assert 'optimum_gemma3_requests_total{endpoint="/v1/completions",status="200"}' in metrics


def test_completion_streamed_or_not_is_generate_alone(server, model, tokenizer):
    prompt = words(random.Random(1), 20)  # longer than the sliding window of 8
    ids = tokenizer(prompt)["input_ids"]
    expected = alone(model, tokenizer, ids, max_new_tokens=20, do_sample=False)
    client = server.client()
    answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    choice = answer.choices[0]
    assert choice.text == text_of(tokenizer, expected)
    assert choice.finish_reason == ("stop" if 1 in expected else "length")
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == len(expected)
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == choice.text
    through_eos = alone(model, tokenizer, ids, max_new_tokens=24, eos_token_id=None)
    ignoring = client.completions.create(
        model=NAME, prompt=ids, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    assert ignoring.usage.completion_tokens == 24
    assert ignoring.choices[0].text == text_of(tokenizer, through_eos)
    chunks = list(
        client.completions.create(
            model=NAME,
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected)


def test_chat_streamed_or_not_uses_the_chat_template(server, model, tokenizer):
    ids = chat_ids(tokenizer, "w11 w12 w13 w14 w15 w16 w17 w18 w19 w20")
    expected = alone(model, tokenizer, ids, max_new_tokens=SEQUENCE_LENGTH - len(ids))
    client = server.client()
    messages = [{"role": "user", "content": "w11 w12 w13 w14 w15 w16 w17 w18 w19 w20"}]
    answer = client.chat.completions.create(model=NAME, messages=messages, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == text_of(tokenizer, expected)
    assert answer.usage.prompt_tokens == len(ids)
    assert answer.usage.completion_tokens == len(expected)  # no max_tokens: all the room
    stream = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_seeded_sampling_is_reproducible(server, model, tokenizer):
    prompt = words(random.Random(2), 12)
    ids = tokenizer(prompt)["input_ids"]
    options = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    client = server.client()
    first = client.completions.create(model=NAME, prompt=prompt, **options).choices[0].text
    again = client.completions.create(model=NAME, prompt=prompt, **options).choices[0].text
    expected = alone(
        model, tokenizer, ids, max_new_tokens=16, do_sample=True, temperature=0.9,
        top_p=0.95, top_k=0, seed=1234,
    )  # fmt: skip
    assert first == again == text_of(tokenizer, expected)


def first_new_word(tokenizer, tokens: list[int]) -> int:
    """The first index from 2 whose word does not occur in the text before it."""
    return next(
        j
        for j in range(2, len(tokens))
        if tokenizer.decode(tokens[j]) not in text_of(tokenizer, tokens[:j])
    )


def test_stop_string_ends_the_text_before_it(server, model, tokenizer):
    prompt = words(random.Random(3), 10)
    ids = tokenizer(prompt)["input_ids"]
    tokens = alone(model, tokenizer, ids, max_new_tokens=20, repetition_penalty=3.0)
    end = first_new_word(tokenizer, tokens)
    stop = tokenizer.decode(tokens[end])
    options = dict(
        max_tokens=20, temperature=0, stop=[stop], extra_body={"repetition_penalty": 3.0}
    )
    client = server.client()
    answer = client.completions.create(model=NAME, prompt=prompt, **options)
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].text == text_of(tokenizer, tokens[:end]) + " "
    streamed = client.completions.create(model=NAME, prompt=prompt, stream=True, **options)
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text


def load_mix(tokenizer, count: int) -> list[dict]:
    """Requests of every kind: completions and chats, streamed or not, greedy or seeded,
    prompts of 1..30 tokens, budgets through the sliding window."""
    rng = random.Random(7)
    mix = []
    for index in range(count):
        prompt = words(rng, rng.randint(1, 24))
        chat = index % 3 == 0
        ids = chat_ids(tokenizer, prompt) if chat else tokenizer(prompt)["input_ids"]
        budget = rng.randint(1, min(24, SEQUENCE_LENGTH - len(ids)))
        sampled = index % 4 == 1
        options = dict(max_tokens=budget, temperature=0.8 if sampled else 0)
        if sampled:
            options.update(seed=index, top_k=20)
        mix.append(dict(prompt=prompt, ids=ids, chat=chat, stream=index % 2 == 0, **options))
    return mix


def expected_text(model, tokenizer, request: dict) -> str:
    options = dict(max_new_tokens=request["max_tokens"], do_sample=request["temperature"] > 0)
    if options["do_sample"]:
        options.update(temperature=request["temperature"], top_k=20, top_p=1.0)
        options["seed"] = request["seed"]
    return text_of(tokenizer, alone(model, tokenizer, request["ids"], **options))


async def ask(client: openai.AsyncOpenAI, request: dict) -> str:
    options = {
        k: request[k] for k in ("max_tokens", "temperature", "seed", "top_k") if k in request
    }
    extra = {"top_k": options.pop("top_k")} if "top_k" in options else None
    if request["chat"]:
        messages = [{"role": "user", "content": request["prompt"]}]
        answer = await client.chat.completions.create(
            model=NAME, messages=messages, stream=request["stream"], extra_body=extra, **options
        )
        if not request["stream"]:
            return answer.choices[0].message.content
        return "".join([c.choices[0].delta.content or "" async for c in answer])
    answer = await client.completions.create(
        model=NAME, prompt=request["prompt"], stream=request["stream"], extra_body=extra, **options
    )
    if not request["stream"]:
        return answer.choices[0].text
    return "".join([c.choices[0].text async for c in answer])


def test_load_64_requests_from_16_clients_each_get_their_alone_text(server, model, tokenizer):
    mix = load_mix(tokenizer, 64)
    expected = [expected_text(model, tokenizer, request) for request in mix]

    async def run() -> list[str | None]:
        answers: list[str | None] = [None] * len(mix)
        queue = list(enumerate(mix))

        async def client_loop() -> None:
            async with openai.AsyncOpenAI(
                base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120
            ) as client:
                while queue:
                    index, request = queue.pop(0)
                    answers[index] = await ask(client, request)

        await asyncio.gather(*(client_loop() for _ in range(16)))
        return answers

    answers = asyncio.run(asyncio.wait_for(run(), timeout=600))
    mismatched = [i for i, (a, e) in enumerate(zip(answers, expected, strict=True)) if a != e]
    assert not mismatched, [(mix[i], answers[i], expected[i]) for i in mismatched[:3]]
    engine = server.engine
    deadline = time.monotonic() + 10
    while not engine.batcher.idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.batcher.idle and not engine.batcher.active
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "optimum_gemma3_active_slots 0.0" in metrics
    assert "optimum_gemma3_queue_length 0.0" in metrics


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "path, body, status, words_in_message",
    [
        ("/v1/completions", b"{not json", 400, ["Invalid request", "JSON"]),
        ("/v1/completions", {"model": NAME, "prompt": "w9", "temprature": 0}, 400, ["temprature"]),
        ("/v1/completions", {"model": "other", "prompt": "w9"}, 404, ["other", NAME]),
        ("/v1/completions", {"model": NAME, "prompt": " ".join(["w9"] * 40)}, 400, ["40", "32"]),
        (
            "/v1/completions",
            {"model": NAME, "prompt": "w9 w10", "max_tokens": 47},
            400,
            ["max_tokens=47", "46", "sequence_length=48"],
        ),
        ("/v1/completions", {"model": NAME, "prompt": "w9", "n": 2}, 400, ["n=1"]),
        ("/v1/completions", {"model": NAME, "prompt": "w9", "logprobs": 2}, 400, ["logprobs"]),
        ("/v1/completions", {"model": NAME, "prompt": [2, 99999]}, 400, ["99999", "vocabulary"]),
        ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, ["messages"]),
        (
            "/v1/chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            ["messages"],
        ),
        ("/v1/nothing", {"model": NAME}, 404, ["Not Found"]),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, words_in_message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{server.url}{path}", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    message = error_of(response)["message"]
    for word in words_in_message:
        assert word in message, message
    # Nothing else is disturbed: the server still answers.
    ok = server.client().completions.create(model=NAME, prompt="w9", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


def test_full_queue_answers_429_with_retry_after(model, tokenizer):
    thread, engine = serve(model, tokenizer, max_queue_size=2)
    body = {"model": NAME, "prompt": "w9 w10 w11", "max_tokens": 4, "temperature": 0}
    with thread:
        results: list[httpx.Response] = []
        with model._generate_lock:  # the engine cannot step: requests wait in its queue
            waiting = [
                threading.Thread(
                    target=lambda: results.append(
                        httpx.post(f"{thread.url}/v1/completions", json=body, timeout=60)
                    )
                )
                for _ in range(2)
            ]
            for waiter in waiting:
                waiter.start()
            deadline = time.monotonic() + 10
            while engine._waiting < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = httpx.post(f"{thread.url}/v1/completions", json=body)
            assert refused.status_code == 429
            assert int(refused.headers["Retry-After"]) >= 1
            assert error_of(refused)["type"] == "rate_limit_exceeded"
        for waiter in waiting:
            waiter.join(timeout=60)
        assert [r.status_code for r in results] == [200, 200]


def test_a_client_that_leaves_frees_its_slot(model, tokenizer):
    thread, engine = serve(model, tokenizer)
    with thread:
        with model._generate_lock:  # requests wait for a slot while their clients leave
            # Not streamed: the client gives up waiting for the response.
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    f"{thread.url}/v1/completions",
                    json={"model": NAME, "prompt": "w9 w10", "max_tokens": 40, "temperature": 0},
                    timeout=0.5,
                )
            # Streamed: the client reads the first chunk, then closes the connection.
            body = {
                "model": NAME,
                "messages": [{"role": "user", "content": "w9"}],
                "max_tokens": 30,
                "temperature": 0,
                "stream": True,
            }
            with httpx.stream("POST", f"{thread.url}/v1/chat/completions", json=body) as response:
                assert next(response.iter_lines()).startswith("data: ")
            time.sleep(0.5)  # the disconnect watcher polls every 0.1 s
        deadline = time.monotonic() + 10
        while not engine.batcher.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.batcher.idle and not engine.batcher.active
        # Neither ran to its budget: at most a token each before their cancels were seen.
        generated = engine.metrics.registry.get_sample_value(
            "optimum_gemma3_generated_tokens_total"
        )
        assert generated <= 2
        ok = thread.client().completions.create(
            model=NAME, prompt="w9", max_tokens=2, temperature=0
        )
        assert ok.usage.completion_tokens == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not come up")


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def served_folder(model, tokenizer, tmp_path_factory):
    folder = model.save_pretrained(tmp_path_factory.mktemp("served") / "tiny")
    tokenizer.save_pretrained(folder)
    return folder


def test_optimum_cli_neuron_serve_and_sigterm(served_folder, model, tokenizer):
    """optimum-neuron's `neuron serve` command serves Gemma-3 here (its own needs vLLM);
    SIGTERM lets the streaming request finish, then the process exits cleanly."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cli = str(Path(sys.executable).parent / "optimum-cli")
    process = start(
        [cli, "neuron", "serve", "--model", str(served_folder), "--port", str(port),
         "--served_model_name", NAME, "--host", "127.0.0.1", "--shutdown_timeout", "60"]
    )  # fmt: skip
    try:
        wait_healthy(url, process)
        ids = tokenizer("w9 w10 w11")["input_ids"]
        expected = alone(model, tokenizer, ids, max_new_tokens=SEQUENCE_LENGTH - len(ids))
        body = {"model": NAME, "prompt": "w9 w10 w11", "max_tokens": len(expected),
                "temperature": 0, "stream": True}  # fmt: skip
        pieces = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            pieces.append(next(lines))
            process.send_signal(signal.SIGTERM)
            pieces.extend(lines)
        pieces = [p for p in pieces if p]  # SSE events end with a blank line
        data = [json.loads(p[6:]) for p in pieces if p.startswith("data: {")]
        assert "".join(d["choices"][0]["text"] for d in data) == text_of(tokenizer, expected)
        assert pieces[-1] == "data: [DONE]"
        assert process.wait(timeout=60) == 0
        stderr = process.stderr.read()
        assert "Traceback" not in stderr, stderr
    finally:
        process.kill()
        process.wait()


def test_python_m_serve_exports_a_checkpoint_first(tiny_checkpoints, tokenizer, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoints("2-layer"), checkpoint)
    tokenizer.save_pretrained(checkpoint)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start(
        [sys.executable, "-m", "optimum_gemma3.serve", "--model", str(checkpoint),
         "--port", str(port), "--batch_size", "2", "--sequence_length", "32"]
    )  # fmt: skip
    try:
        wait_healthy(url, process)
        card = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert card["id"] == str(checkpoint) and card["max_model_len"] == 32
        answer = httpx.post(
            f"{url}/v1/completions",
            json={"model": str(checkpoint), "prompt": [2, 9, 10], "max_tokens": 3},
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()


def test_other_models_go_to_optimum_neurons_serve(tmp_path):
    import argparse

    from transformers import LlamaConfig

    from optimum_gemma3.serve.launch import serve_if_gemma3

    LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    assert serve_if_gemma3(argparse.Namespace(model=str(tmp_path), _unknown_args=[])) is False


def test_optimum_cli_serve_help_names_the_gemma3_flags():
    cli = str(Path(sys.executable).parent / "optimum-cli")
    result = subprocess.run(
        [cli, "neuron", "serve", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    help_text = " ".join(result.stdout.split())
    assert "served by optimum-gemma3" in help_text and "--max_queue_size" in help_text
