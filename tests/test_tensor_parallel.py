"""Tensor parallelism: the sharding math on every kv-head layout, and TP=2 through the product.

- The sharded graphs run eagerly on a 2-rank gloo group (tests/parallel_ranks.py) for
  configs with 1, 2 and 4 kv heads and the real 270M: greedy tokens identical to
  transformers (and so to TP=1, which test_parity holds to the same tokens).
- The compiled path: `from_pretrained(..., export=True, tensor_parallel_size=2)`, generate,
  pipeline, save and reload, a rank killed mid-generation, and no process left behind.
"""

from __future__ import annotations

import gc
import json
import os
import signal

import psutil
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import Gemma3TextConfig, StoppingCriteria, pipeline

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.graphs.parallel import RANK_NAME, TensorParallelLayout, shard_state_dict
from optimum_gemma3.runtime.pool import TensorParallelError
from optimum_gemma3.weights import load_decoder_state_dict
from tests.parallel_ranks import greedy_rank
from tests.test_artifacts import run_in_new_process
from tests.test_parity import NEW_TOKENS, hf_greedy, left_padded_batch
from tests.tiny_models import load_reference, tiny_tokenizer

SHAPE = dict(batch_size=3, sequence_length=128, context_encoding_buckets=[32])


def sharded_greedy(checkpoint, ids, mask, new_tokens, sequence_length, tmp_path, degree=2):
    out = str(tmp_path / "tokens.safetensors")
    args = (degree, str(checkpoint), ids, mask, new_tokens, sequence_length, out)
    mp.spawn(greedy_rank, args=args, nprocs=degree)
    return load_file(out)["tokens"]


@pytest.mark.parametrize("name", ["270m", "27b", "4b"])  # 1, 2 and 4 kv heads
def test_sharded_graphs_match_transformers(name, tiny_checkpoints, tmp_path):
    source = tiny_checkpoints(name)
    reference = load_reference(source)
    ids, mask = left_padded_batch(reference.config.vocab_size)
    expected = hf_greedy(reference, ids, mask)
    assert torch.equal(sharded_greedy(source, ids, mask, NEW_TOKENS, 128, tmp_path), expected)


def test_sharded_graphs_match_transformers_on_the_real_270m(real_270m, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(real_270m, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    # A 600-token prompt (past the 512-token window) and a short one, left-padded.
    ids = torch.zeros(2, 600, dtype=torch.long)
    ids[0] = torch.randint(1000, 200000, (600,), generator=generator)
    ids[1, -20:] = torch.randint(1000, 200000, (20,), generator=generator)
    ids[0, 0], ids[1, -20] = 2, 2  # <bos>
    mask = (ids != 0).long()
    expected = hf_greedy(reference, ids, mask, new_tokens=16, eos_token_id=None)
    ours = sharded_greedy(real_270m, ids, mask, 16, 640, tmp_path)
    assert (ours != expected).nonzero().tolist() == []


def test_layout_refuses_degrees_that_cannot_split_the_heads():
    config = Gemma3TextConfig(num_attention_heads=6, num_key_value_heads=3, vocab_size=516)
    with pytest.raises(ValueError, match=r"tp_degree=2 cannot split .* Valid degrees: \[1, 3, 6\]"):
        TensorParallelLayout.for_config(config, 2)
    assert TensorParallelLayout.for_config(config, 3).num_kv_heads == 1


def test_shards_split_columns_rows_and_replicate_single_kv_heads(tiny_checkpoints):
    source = tiny_checkpoints("270m")  # 4 query heads, 1 kv head
    config = load_reference(source).config
    full = load_decoder_state_dict(source, torch.float32)
    shards = shard_state_dict(full, config, 2)
    q, k, o = (f"layers.0.self_attn.{p}_proj.weight" for p in "qko")
    assert torch.equal(torch.cat([s[q] for s in shards]), full[q])
    assert torch.equal(torch.cat([s[o] for s in shards], dim=1), full[o])
    assert all(torch.equal(s[k], full[k]) for s in shards)  # the one kv head, on every rank
    vocab = full["embed_tokens.weight"]
    assert torch.equal(torch.cat([s["embed_tokens.weight"] for s in shards]), vocab)
    assert [int(s[RANK_NAME]) for s in shards] == [0, 1]


def rank_processes_alive(pids):
    return [
        pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
    ]


@pytest.fixture(scope="module")
def tp2_folder(tiny_checkpoints, tmp_path_factory):
    """The 270m-shaped tiny model (one kv head) exported with tensor_parallel_size=2."""
    source = tiny_checkpoints("270m")
    model = Gemma3NeuronModelForCausalLM.from_pretrained(
        source, export=True, tensor_parallel_size=2, instance_type="cpu", **SHAPE
    )
    folder = model.save_pretrained(tmp_path_factory.mktemp("tp2") / "model")
    model.runtime.close()
    return source, folder


def test_tp2_export_generate_reload_and_pipeline(tp2_folder):
    source, folder = tp2_folder
    files = {str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")}
    assert files == {"weights/tp_rank_0.safetensors", "weights/tp_rank_1.safetensors"}
    reference = load_reference(source)
    ids, mask = left_padded_batch(reference.config.vocab_size)
    # generate() stops rows at the checkpoint's EOS (and pads them): so does the reference.
    expected = hf_greedy(
        reference, ids, mask, eos_token_id=reference.generation_config.eos_token_id
    )

    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)  # reload: no compile
    assert model.neuron_config.tp_degree == 2
    pids = model.runtime.engine.pids
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
    )
    assert torch.equal(out, expected)

    tokenizer = tiny_tokenizer(reference.config.vocab_size)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator("a b c", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("a b c")

    del model, generator
    gc.collect()
    assert rank_processes_alive(pids) == []


def test_interpreter_exit_stops_the_ranks(tp2_folder):
    _, folder = tp2_folder
    pids = run_in_new_process(
        "import json\n"
        "from optimum_gemma3 import Gemma3NeuronModelForCausalLM as M\n"
        f"m = M.from_pretrained({str(folder)!r})\n"
        "print(json.dumps(m.runtime.engine.pids))\n"  # exits without closing the model
    )
    assert rank_processes_alive(json.loads(pids)) == []


class KillRank(StoppingCriteria):
    """Kills one rank process on the `at`-th decode step, as an out-of-memory kill would."""

    def __init__(self, pid: int, at: int):
        self.pid, self.at, self.calls = pid, at, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            os.kill(self.pid, signal.SIGKILL)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_many_calls_in_a_row_never_deadlock_the_ranks(tp2_folder, monkeypatch):
    """Hundreds of decode calls back to back. A program output that was a collective's
    buffer deadlocked a rank within tens of calls (gloo's worker dropping it needs the
    GIL, which the rank's next program holds); a stuck collective now fails in 30 s."""
    from optimum_gemma3.runtime import pool

    monkeypatch.setattr(pool, "COLLECTIVE_TIMEOUT_S", 30.0)
    _, folder = tp2_folder
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        ids = torch.randint(3, 500, (1, 8), generator=generator)
        out = model.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert out.shape == (1, 32)
    model.runtime.close()


def test_a_killed_rank_fails_the_call_clearly_and_leaves_no_process(tp2_folder):
    _, folder = tp2_folder
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    pids = model.runtime.engine.pids
    ids = torch.tensor([[2, 10, 11, 12]])
    death = r"died during decode: rank 1 \(pid \d+\) exited with code -9"
    with pytest.raises(TensorParallelError, match=death):
        model.generate(
            input_ids=ids,
            max_new_tokens=20,
            do_sample=False,
            stopping_criteria=[KillRank(pids[1], at=5)],
        )
    assert rank_processes_alive(pids) == []
    with pytest.raises(TensorParallelError, match="load the model again"):
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)


def test_tp2_continuous_batching_and_server_close_stop_the_ranks(tp2_folder):
    """Requests joining and leaving on TP=2 get their alone tokens; closing the serving
    engine (what SIGTERM does) stops the rank processes."""
    from optimum_gemma3.serve.engine import ServingEngine
    from tests.test_continuous_batching import check_traffic, random_requests

    _, folder = tp2_folder
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    pids = model.runtime.engine.pids
    specs = random_requests(8, max_prompt=32, sequence_length=128, vocab=512, seed=41, max_new=20)
    check_traffic(model, specs, seed=43)
    ServingEngine(model).close(timeout=5)
    assert rank_processes_alive(pids) == []
