"""A compiled artifact folder, loaded once and ready to run prefill and decode.

Loading checks before running: the export config parses and was written by compatible
versions of this library, torch and the compiler; this host can run the programs (its
CPU has the instruction set they were compiled for, and the C++ kernels their ops profile
calls load here); every program exists and matches its recorded checksum; the weights
are safetensors with exactly the expected tensors. It compiles nothing and needs no
model source for the programs.

Each rank engine owns its weights and one set of KV caches shared by all its programs;
callers pass user-sized batches and, for continuous batching, the cache rows (slots)
they own: each prompt is prefilled alone into its slot, in the smallest bucket that holds
it (or, where one program serves every length, padded to a whole number of its blocks),
and decode runs the compiled batch with the other slots idle. An image-text-to-text
artifact adds its vision program (`VisionEngine`), and its prefill takes each prompt's
image features and token types.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig

from ..artifact.checks import check_host_runs, check_versions, load_neuron_config
from ..artifact.files import PROCESSOR_FILES, verify_file
from ..compiler import backend_for_target
from ..graphs import text_config
from ..graphs.config import ImageTokens
from ..graphs.decoder import head_weight_name
from ..graphs.layers import SDPA_QUERY_BLOCK
from .head import HostHead
from .logits import NextTokenLogits
from .loop import left_align
from .pool import RankPool
from .rank import RankEngine
from .vision import VisionEngine

logger = logging.getLogger(__name__)


class Gemma3Runtime:
    """A compiled folder ready to run: user-sized batches in, logits out.

    Checks the folder against this host, then runs it on one `RankEngine` in this process,
    or with `tp_degree > 1` on a `RankPool` of rank processes it starts and stops itself.
    Where the programs end at the final norm (`head_on_host`), it runs the head itself,
    computing each step's logits only as far as the caller reads them.
    """

    # As an assistant (`speculation.DraftModel`), its caches follow only its own decoding.
    takes_target_entries = False

    def __init__(self, folder: str | Path, token: str | bool | None = None):
        folder = Path(folder)
        self.folder = folder
        self.neuron_config = nc = load_neuron_config(folder)
        self.config = AutoConfig.from_pretrained(folder)
        backend = backend_for_target(nc.target)
        check_versions(nc, backend.versions(), folder)
        check_host_runs(nc, backend.runs_program_isa, folder)
        self.buckets = list(nc.context_encoding_buckets)
        self.pad_token_id = self.config.get_text_config().pad_token_id or 0
        text = text_config(self.config)
        self.image_tokens = ImageTokens.of(self.config) if nc.has_images else None
        if nc.tp_degree == 1:
            self.engine = RankEngine(folder, nc, text, token=token, image_tokens=self.image_tokens)
        else:
            self.engine = RankPool(folder, nc, text.vocab_size, token)
        self.vision = None
        if nc.has_images:
            self.vision = VisionEngine(folder, nc, self.config)
            for name in PROCESSOR_FILES:  # a folder copied without its processor is refused
                if name in nc.artifact_files:
                    verify_file(folder, name)
        self.head = None
        if nc.head_on_host:
            self.head = HostHead(self.engine.weights[head_weight_name(text)], nc.ops_profile)
        # Per slot, the position its next decoded token takes: where an idle slot's row of
        # the compiled decode batch writes (see `decode`).
        self._next_positions = torch.zeros(nc.batch_size, dtype=torch.long)
        self._warm_up()

    def _warm_up(self) -> None:
        """Run the smallest prefill, the decode step and the head once, at load, then zero
        the caches.

        Why: the first call of a program pays for its lazy set-up and for reading the
        memory-mapped weights in from disk; done here, the first request is as fast as the
        rest. Zeroing leaves the caches as loading made them, so no request can depend on
        the warm-up's dummy tokens.
        """
        with torch.inference_mode():
            ids = torch.full((1, self.prefill_width(self.buckets[0])), self.pad_token_id)
            image_inputs = self._image_inputs(ids, None, None)
            hidden = self.engine.prefill(
                ids, torch.ones_like(ids), torch.tensor([0]), *image_inputs
            )
            self._next_token_logits(hidden).near_top(1)
            ids = torch.full((self.batch_size, 1), self.pad_token_id)
            self.engine.decode(ids, torch.zeros(self.batch_size, dtype=torch.long))
            self.engine.zero_caches()
            self._next_positions.zero_()
            if self.vision is not None:
                self.vision.encode(torch.zeros(1, *self.vision.image_shape))

    def close(self) -> None:
        """Stop the rank processes of a tensor-parallel model (also done when collected)."""
        self.engine.close()

    @property
    def batch_size(self) -> int:
        return self.neuron_config.batch_size

    @property
    def sequence_length(self) -> int:
        return self.neuron_config.sequence_length

    @property
    def max_context_length(self) -> int:
        return self.neuron_config.max_context_length

    def bucket_for(self, prompt_length: int) -> int:
        """The smallest compiled prefill length that holds `prompt_length` tokens."""
        for bucket in self.buckets:
            if prompt_length <= bucket:
                return bucket
        raise ValueError(
            f"A prompt of {prompt_length} tokens exceeds the largest prefill bucket "
            f"({self.buckets[-1]} tokens) of this compiled model: shorten it or re-export with "
            "larger context_encoding_buckets / max_context_length / sequence_length."
        )

    def prefill_width(self, prompt_length: int) -> int:
        """How many tokens wide the prefill of a `prompt_length`-token prompt runs: its
        bucket, or with one program for every length (`prefill_any_length`) the prompt
        padded to a whole number of `SDPA_QUERY_BLOCK`s."""
        bucket = self.bucket_for(prompt_length)  # refuses a prompt past the largest
        if not self.neuron_config.prefill_any_length:
            return bucket
        return -(-prompt_length // SDPA_QUERY_BLOCK) * SDPA_QUERY_BLOCK

    def _slots(self, rows: int, slots: Sequence[int] | None) -> torch.Tensor:
        """The cache rows of `rows` inputs: `slots` checked, or 0..rows-1."""
        if rows > self.batch_size:
            raise ValueError(
                f"Batch of {rows} rows exceeds the compiled batch_size={self.batch_size}: "
                "split the batch or re-export with a larger batch_size."
            )
        if slots is None:
            return torch.arange(rows)
        slots = torch.as_tensor(slots, dtype=torch.long).reshape(-1)
        if len(slots) != rows or len(set(slots.tolist())) != rows:
            raise ValueError(f"Expected {rows} distinct slots, one per row, got {slots.tolist()}.")
        if rows and not 0 <= int(slots.min()) <= int(slots.max()) < self.batch_size:
            raise ValueError(
                f"Slots {slots.tolist()} are outside this model's cache rows "
                f"0..{self.batch_size - 1} (batch_size={self.batch_size})."
            )
        return slots

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image features `[N, mm_tokens_per_image, hidden]` of `[N, C, H, W]` pixels."""
        if self.vision is None:
            raise _no_vision_program()
        with torch.inference_mode():
            return self.vision.encode(pixel_values)

    def _image_inputs(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
    ) -> tuple[torch.Tensor, ...]:
        """The prefill's per-token image inputs `(image_embeds, token_type_ids)`, zeros where
        not given (no images, causal only); `()` for a text-only artifact."""
        if self.image_tokens is None:
            if image_embeds is not None or token_type_ids is not None:
                raise _no_vision_program()
            return ()
        rows, width = input_ids.shape
        if image_embeds is None:
            hidden = self.config.get_text_config().hidden_size
            image_embeds = torch.zeros(rows, width, hidden, dtype=self.neuron_config.torch_dtype)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        check_image_blocks(token_type_ids, self.image_tokens.per_image)
        return image_embeds, token_type_ids.to(torch.long)

    def _next_token_logits(self, output: torch.Tensor) -> NextTokenLogits:
        """A program's output rows as logits: its own, or those the head computes from it."""
        if self.head is None:
            return NextTokenLogits.of(output)
        return self.head.next_token_logits(output)

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slots: Sequence[int] | None = None,
        image_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> NextTokenLogits:
        """Logits `[rows, V]` of each prompt's last token, computed as far as they are read;
        fills cache rows `slots` (default 0..rows-1) and no other.

        Each prompt runs alone (`prefill_width` tokens wide) into its own cache row: its
        numbers are the same whichever prompts share the batch, and a request can
        join a batch being decoded. With images (an image-text-to-text artifact),
        `image_embeds` `[rows, S, hidden]` holds the image features at the image-token
        positions and `token_type_ids` `[rows, S]` marks the image blocks.
        """
        slots = self._slots(input_ids.shape[0], slots)
        image_inputs = self._image_inputs(input_ids, image_embeds, token_type_ids)
        outputs = []
        for row, (ids, mask, slot) in enumerate(zip(input_ids, attention_mask, slots, strict=True)):
            length = int(mask.sum())
            width = self.prefill_width(length)
            ids, mask, *extras = left_align(
                ids[None],
                mask[None],
                self.pad_token_id,
                width,
                *(values[row : row + 1] for values in image_inputs),
            )
            outputs.append(self.engine.prefill(ids, mask, slot[None], *extras))
            self._next_positions[slot] = length
        return self._next_token_logits(torch.cat(outputs))

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: Sequence[int] | None = None,
    ) -> NextTokenLogits:
        """Logits `[rows, V]` for one new token per row at `positions`, computed as far as
        they are read; writes those tokens into cache rows `slots` (default 0..rows-1).

        The compiled program decodes every slot. A slot not in `slots` decodes padding at
        the position its own next token will take: full-attention layers hide that cache
        entry until the slot's next step overwrites it, and in a sliding layer it replaces
        the one key that step no longer sees, so an idle request keeps its cache intact.
        """
        slots = self._slots(input_ids.shape[0], slots)
        positions = positions.reshape(-1).to(torch.long)
        if len(positions) and int(positions.max()) >= self.sequence_length:
            raise ValueError(
                f"Position {int(positions.max())} is beyond the compiled sequence_length="
                f"{self.sequence_length}."
            )
        ids = torch.full((self.batch_size, 1), self.pad_token_id, dtype=torch.long)
        ids[slots] = input_ids.reshape(-1, 1).to(torch.long)
        all_positions = self._next_positions.clone()
        all_positions[all_positions >= self.sequence_length] = 0  # a full slot: nothing to keep
        all_positions[slots] = positions
        output = self.engine.decode(ids, all_positions)
        self._next_positions[slots] = positions + 1
        return self._next_token_logits(output[slots])

    @property
    def speculation_length(self) -> int:
        """How many drafted tokens per row `verify` checks (0: no verify program)."""
        return self.neuron_config.speculation_length

    def verify(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: Sequence[int] | None = None,
    ) -> tuple[list[NextTokenLogits], CacheRollback]:
        """Logits of each of `T = speculation_length + 1` consecutive tokens per row
        (`input_ids` `[rows, T]`, the first at `positions` `[rows]`), each the numbers a
        one-token `decode` step at its position computes; and the rollback that keeps
        only the positions the caller accepts (`CacheRollback.keep`).

        All `T` tokens enter the caches; `keep` puts back every cache entry a position
        beyond the accepted ones overwrote, so a rejected draft leaves no trace (in a
        sliding layer's ring it overwrote a key the next steps still see). Other slots
        run padding at their own next positions and are put back whole.
        """
        if not getattr(self.engine, "verifies", False):
            raise ValueError(
                "This model was exported without a verify program (speculation_length=0): "
                "re-export it with speculation_length=k (k drafted tokens checked per step) "
                "for prompt lookup or assisted decoding."
            )
        width = self.speculation_length + 1
        if input_ids.shape[1] != width:
            raise ValueError(
                f"verify takes {width} tokens per row (speculation_length + 1), got "
                f"{input_ids.shape[1]}."
            )
        slots = self._slots(input_ids.shape[0], slots)
        rollback = self.save_positions(positions, width, slots)
        ids = torch.full((self.batch_size, width), self.pad_token_id, dtype=torch.long)
        ids[slots] = input_ids.to(torch.long)
        output = self.engine.verify(ids, rollback.positions)
        # One head call for every position (the screen read once for all of them), then
        # each position's rows as a view of it.
        logits = self._next_token_logits(output[slots].flatten(0, 1))
        rows = torch.arange(len(slots)) * width
        return [logits.rows(rows + j) for j in range(width)], rollback

    def save_positions(
        self, positions: torch.Tensor, width: int, slots: Sequence[int] | None = None
    ) -> CacheRollback:
        """Take the cache entries of `width` consecutive positions from `positions` `[rows]`
        (cache rows `slots`) and from every other slot's next position, before tokens
        there overwrite them (a verify call, or an assistant's decode steps drafting
        ahead), to keep only the accepted ones (`CacheRollback.keep`)."""
        slots = self._slots(len(positions), slots)
        if len(slots) and int(positions.max()) + width > self.sequence_length:
            raise ValueError(
                f"Positions up to {int(positions.max()) + width - 1} are beyond the compiled "
                f"sequence_length={self.sequence_length}: decode the last tokens one at a time."
            )
        # An idle slot near the end is moved back: its entries are put back whole anyway.
        starts = self._next_positions.clamp(max=self.sequence_length - width)
        starts[slots] = positions.reshape(-1).to(torch.long)
        block = starts[:, None] + torch.arange(width)
        return CacheRollback(self.engine.caches, block, slots, self._next_positions)


class CacheRollback:
    """The cache entries tokens at `positions` `[B, T]` will overwrite, taken before they
    are written, and how to put back those of positions that are not kept.

    Every compiled row's entries are taken: rows the caller runs keep their accepted
    positions (`keep`), the others keep none. Why it is needed: a sliding layer's ring
    slot for position `p` held position `p - window`, which the queries before `p` still
    see, so a rejected token at `p` must give it back; a full layer's slot held nothing
    visible, and putting it back is as cheap.
    """

    def __init__(
        self,
        caches: dict[str, torch.Tensor],
        positions: torch.Tensor,
        slots: torch.Tensor,
        next_positions: torch.Tensor,
    ):
        self.caches = caches
        self.rows = torch.arange(positions.shape[0])[:, None].expand_as(positions)
        self.positions = positions
        self.slots = slots
        self.next_positions = next_positions
        # Two cache lengths (sliding, full) among all the layers: one slot index each.
        slot_of = {length: positions % length for length in {c.shape[2] for c in caches.values()}}
        self.index = {name: slot_of[cache.shape[2]] for name, cache in caches.items()}
        self.saved = {name: cache[self.rows, :, self.index[name]] for name, cache in caches.items()}

    def keep(self, counts: torch.Tensor) -> None:
        """Keep the first `counts[i]` positions of the caller's row `i` (at most `T`), put
        back every other entry, and record where each row's next token goes."""
        kept = torch.zeros(self.positions.shape[0], dtype=torch.long)
        kept[self.slots] = counts.to(torch.long)
        dropped = torch.arange(self.positions.shape[1]) >= kept[:, None]
        rows = self.rows[dropped]
        for name, cache in self.caches.items():
            cache[rows, :, self.index[name][dropped]] = self.saved[name][dropped]
        self.next_positions[self.slots] = self.positions[self.slots, 0] + kept[self.slots]


def _no_vision_program() -> ValueError:
    return ValueError(
        "This model was exported for text-generation and has no vision program: export "
        "the multimodal checkpoint with task='image-text-to-text' "
        "(Gemma3NeuronModelForImageTextToText) to give it images."
    )


def check_image_blocks(token_type_ids: torch.Tensor, per_image: int) -> None:
    """Refuse a run of image tokens (`token_type_ids == 1`) longer than one image's
    `per_image` tokens: the processor separates images by `<start_of_image>` /
    `<end_of_image>`, and the compiled prefill widens its attention by one image only."""
    is_image = torch.nn.functional.pad(token_type_ids == 1, (1, 1), value=False).long()
    edges = is_image.diff(dim=-1)
    starts, ends = (edges == 1).nonzero()[:, 1], (edges == -1).nonzero()[:, 1]
    longest = int((ends - starts).max()) if len(starts) else 0
    if longest > per_image:
        raise ValueError(
            f"token_type_ids hold a block of {longest} consecutive image tokens; each image "
            f"has {per_image} (mm_tokens_per_image), and images are separated by "
            "<start_of_image> / <end_of_image> as the model's processor writes them."
        )
