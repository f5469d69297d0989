"""Both graphs go through `torch.export.export(strict=True)` with static shapes, and the
exported programs, sharing one set of caches, generate what the eager decoder does."""

from __future__ import annotations

import torch

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.compiler import export
from optimum_gemma3.graphs import DecodeGraph, PrefillGraph, layers, program
from optimum_gemma3.runtime import engine
from optimum_gemma3.runtime.loop import greedy_generate
from tests.test_parity import build_decoder, hf_greedy, left_padded_batch
from tests.tiny_models import load_reference


def export_graphs(decoder, prompt_length: int):
    batch = decoder.batch_size
    ids = torch.zeros(1, prompt_length, dtype=torch.long)
    slot = torch.zeros(1, dtype=torch.long)
    prefill = torch.export.export(
        PrefillGraph(decoder), (ids, torch.ones_like(ids), slot), strict=True
    )
    decode = torch.export.export(
        DecodeGraph(decoder),
        (torch.zeros(batch, 1, dtype=torch.long), torch.zeros(batch, dtype=torch.long)),
        strict=True,
    )
    return prefill, decode


def prefill_rows(prefill):
    """A batch prefill from a one-prompt one: each row into its own cache row, as the
    runtime runs the compiled prefill."""

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        rows = range(ids.shape[0])
        return torch.cat(
            [prefill(ids[r : r + 1], mask[r : r + 1], torch.tensor([r])) for r in rows]
        )

    return run


def share_buffers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Point the target program's caches at the source's, as a runtime does."""
    buffers = dict(source.named_buffers())
    for name, _ in list(target.named_buffers()):
        owner, attr = name.rsplit(".", 1)
        target.get_submodule(owner)._buffers[attr] = buffers[name]


def test_exported_programs_match_eager(tiny_checkpoints):
    decoder = build_decoder(tiny_checkpoints("4b"))
    prefill, decode = export_graphs(decoder, prompt_length=32)

    # Caches are mutated in place inside the graphs, not returned as copies.
    decode_ops = {str(node.target) for node in decode.graph.nodes}
    assert "aten.index_put_.default" in decode_ops
    assert not decode.graph_signature.buffers_to_mutate

    prefill_module, decode_module = prefill.module(), decode.module()
    share_buffers(prefill_module, decode_module)
    ids, mask = left_padded_batch(520, seed=5)
    with torch.inference_mode():
        eager = greedy_generate(
            prefill_rows(decoder.prefill), decoder.decode, ids, mask, 40, prompt_length=32
        )
        exported = greedy_generate(
            prefill_rows(prefill_module), decode_module, ids, mask, 40, prompt_length=32
        )
    assert torch.equal(exported.sequences, eager.sequences)
    assert torch.equal(exported.logits, eager.logits)


def test_bf16_graphs_export(tiny_checkpoints):
    decoder = build_decoder(tiny_checkpoints("27b"), torch.bfloat16)
    prefill, decode = export_graphs(decoder, prompt_length=16)
    logits_spec = prefill.graph_signature.output_specs[-1]
    assert logits_spec.kind.name == "USER_OUTPUT"


def test_one_prefill_program_serves_every_prompt_length(tiny_checkpoints, monkeypatch):
    """The `cpu` export's one prefill program (dynamic length), in blocks of 4 queries
    against an 8-token window: prompts inside its first blocks, at its edge and past it
    give transformers' greedy tokens."""
    for module in (layers, program, engine):  # every reader of the block size
        monkeypatch.setattr(module, "SDPA_QUERY_BLOCK", 4)
    monkeypatch.setenv("OPTIMUM_GEMMA3_DISABLE_COMPILE_CACHE", "1")  # not a real shape's key
    monkeypatch.setattr(export.os, "cpu_count", lambda: 1)  # compile here, patched
    folder = tiny_checkpoints("270m")
    reference = load_reference(folder)
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        folder, instance_type="cpu", batch_size=1, sequence_length=64, max_context_length=24
    )
    model = Gemma3NeuronModelForCausalLM.export(folder, config)
    parts = program.layer_parts(model.config, program.PREFILL)  # each for any length
    assert {name for name in model.neuron_config.artifact_files if "prefill" in name} == {
        f"compiled/prefill-{part}.pt2" for part in parts
    }
    generator = torch.Generator().manual_seed(8)
    for length in (1, 3, 4, 8, 9, 13, 24):
        ids = torch.randint(3, 512, (1, length), generator=generator)
        mask = torch.ones_like(ids)
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        assert torch.equal(ours, hf_greedy(reference, ids, mask, 12)), length
