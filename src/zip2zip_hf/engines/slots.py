"""Per-request zip2zip state in stable slots, the way serving engines keep their requests.

An engine (vLLM, SGLang) keeps each live request in a slot and, at every step, batches one row per
scheduled token of the live requests: one row per request when decoding, several for a chunk of a
prompt, and padding rows (slot -1) up to a captured shape. A zip2zip request's codebook and its
hypertoken vectors are per-request model state, so `SlotCodebooks` keeps them in the same slots:

* `SlotCodebooks.add` rebuilds a slot from a request's ids (a new request, one resumed after
  preemption, a prefix-cache hit), on the host: once per request, never on the hot path;
* `SlotCodebooks.step` feeds each row's id to its slot's canonical codebook (`DeviceCodebooks`),
  encodes the entries they install and returns the rows' input embeddings and positions, and what
  their logits need: tensor work of fixed shapes, no host sync (DESIGN §9, §10);
* `SlotCodebooks.logits` turns the base model's last hidden states of the sampled rows into
  ``V + K`` logits, masked as `Zip2ZipForCausalLM.forward` masks them (`widen_logits`: the same
  code, so the engine samples from exactly the distribution `generate` samples from).

The base model (attention, KV cache, scheduling) stays the engine's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..codebook_blocks import ConsumedBlock
from ..codebook_stores import PAST_THE_POSITIONS, past_the_positions
from ..configuration_zip2zip import Zip2ZipConfig
from ..device_codebooks import DeviceCodebooks, static_address
from ..hyper_encoder import encode_entries
from ..hyper_logits import widen_logits
from ..lzw_codebook import as_id_list


__all__ = ["SlotCodebooks", "SlotStep"]

# Verdicts recorded past `DeviceCodebooks.expand`'s (1: outside the id space, 2: not installed) and
# `PAST_THE_POSITIONS` (3).
TOO_MANY_ROWS = 4  # a slot had more rows in a step than its ``max_rows_per_slot``: the rest were not fed
NO_SUCH_SLOT = 5  # a row named a slot that holds no request (kept in the sink row's record)
# Columns of the per-row record a step writes (then M provisional base ids, then M created slots).
_LENGTH, _POSITION, _LEGAL, _PROVISIONAL_LENGTH, _INSTALLED, _OPEN = range(6)


@dataclass(frozen=True)
class SlotStep:
    """What `SlotCodebooks.step` tells about each of a step's ``N`` rows.

    Its tensors are the step's output: valid until the next step (a CUDA graph's replay reuses their
    memory), which is when an engine has sampled from them.

    Attributes:
        inputs_embeds: ``(N, D)`` the base model's input: base ids' embedding rows, hypertokens'
            input hyper-encoder vectors.
        positions: ``(N,)`` the base model's position ids (``config.position_mode``; 0 on padding).
        slots: ``(N,)`` the codebook row of each row (``max_num_seqs``, the sink, for padding).
        codes: ``(N,)`` each row's id, -1 where it was not fed (padding).
        lengths: ``(N,)`` the base ids each id stood for (0: padding, or an id that was not legal).
        legal: ``(N,)`` the hyper ids legal after each row (``V .. V + legal - 1``).
        provisional / provisional_lengths: ``(N, M)`` / ``(N,)`` the provisional entry after each
            row (length 0: none).
        num_installed: ``(N,)`` the entries installed after each row.
        open: ``(N,)`` True after a prompt's last id, where the text may go on inside its phrase.
    """

    inputs_embeds: torch.Tensor
    positions: torch.LongTensor
    slots: torch.LongTensor
    codes: torch.LongTensor
    lengths: torch.LongTensor
    legal: torch.LongTensor
    provisional: torch.LongTensor
    provisional_lengths: torch.LongTensor
    num_installed: torch.LongTensor
    open: torch.BoolTensor

    def select(self, rows: torch.LongTensor) -> SlotStep:
        """These rows only (``rows``: indices into the step's rows, e.g. the engine's sampled rows)."""
        return SlotStep(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


class SlotCodebooks:
    """The codebooks and hypertoken vectors of up to ``max_num_seqs`` requests, in stable slots.

    Everything lives on the model's device in tensors allocated once and written in place (their
    addresses stay, as captured CUDA graphs need), one row per slot plus a sink row that padding
    rows read and that nothing real ever changes:

    * ``codebooks``: a `DeviceCodebooks` of ``max_num_seqs + 1`` rows;
    * ``input_table`` / ``output_table``: ``(max_num_seqs + 1, K + M, D)`` each slot's entries
      encoded by the input hyper-encoder (over input-embedding rows) and the output one (over the
      head's rows), entry k at index k (the last M: sinks for masked writes);
    * ``prompt_lengths``: per slot, the index after its prompt's last id (what ``open`` tests);
    * ``first_illegal``: per slot, a sticky record of the first id a step fed that was not legal
      (verdict, position in the request, id), read by `raise_if_illegal` (a host sync) when the
      caller chooses, never by a step.

    Args:
        config: the model's `Zip2ZipConfig` (codec, positions, the logits' rules).
        input_embeddings / output_embeddings: the base model's input embedding and head (modules
            with a ``weight``: ``(rows, D)``).
        input_hyper_encoder / output_hyper_encoder: the model's encoders (the same module if tied).
        max_num_seqs: the slots (the engine's most concurrent requests).
        host_reads_free: where reading the device costs no stall (a CPU): a step then encodes only
            the entries it installed rather than a fixed ``N * M``, and `logits` scores only the
            entries installed rather than all K (the same results; shapes that vary by step).
    """

    def __init__(
        self,
        config: Zip2ZipConfig,
        input_embeddings: nn.Module,
        output_embeddings: nn.Module,
        input_hyper_encoder: nn.Module,
        output_hyper_encoder: nn.Module,
        max_num_seqs: int,
        host_reads_free: bool = False,
    ):
        if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an int >= 1, got {max_num_seqs!r}")
        self.config = config
        self.codec = config.codec()
        self.max_num_seqs = max_num_seqs
        self.host_reads_free = host_reads_free
        self.input_embeddings, self.output_embeddings = input_embeddings, output_embeddings
        self.input_hyper_encoder, self.output_hyper_encoder = input_hyper_encoder, output_hyper_encoder
        self.max_positions: int | None = getattr(config.get_text_config(), "max_position_embeddings", None)
        # What `generate` does: a model that does not write the provisional id never samples it.
        self.score_provisional: bool = config.write_provisional_hypertokens
        K, M, rows = self.codec.max_codebook_size, self.codec.max_subtokens, max_num_seqs + 1
        device = input_embeddings.weight.device
        self.codebooks = DeviceCodebooks(self.codec, rows, device).to(device)
        self.input_table, self.output_table = (
            static_address(module.weight.new_zeros(rows, K + M, module.weight.shape[-1]))
            for module in (input_embeddings, output_embeddings)
        )
        self.prompt_lengths = static_address(torch.full((rows,), -1, dtype=torch.long, device=device))
        self.live = static_address(torch.zeros(rows, dtype=torch.bool, device=device))  # the sink: never
        self.first_illegal = static_address(torch.zeros(rows, 3, dtype=torch.long, device=device))
        self._blank = DeviceCodebooks(self.codec, 1, device)  # what a removed slot holds
        self._occupied = [False] * max_num_seqs  # the host's copy of ``live``: add and remove check it

    @classmethod
    def from_model(cls, model, max_num_seqs: int, host_reads_free: bool = False) -> SlotCodebooks:
        """The slots of a `Zip2ZipForCausalLM`: its config, embeddings, head and encoders (shared)."""
        return cls(
            model.config,
            model.get_input_embeddings(),
            model.get_output_embeddings(),
            model.input_hyper_encoder,
            model._output_hyper_encoder(),
            max_num_seqs,
            host_reads_free,
        )

    # ------------------------------------------------------------------ requests (host, rare)

    @torch.no_grad()
    def add(self, slot: int, ids: Sequence[int], num_computed: int = 0, prompt_length: int | None = None) -> None:
        """Give the free ``slot`` to a request whose ids so far are ``ids`` (prompt, then output).

        The slot's codebook is rebuilt from ``ids[:num_computed]``, the ids the engine already holds
        the KV of (0 for a new request or one resumed by recomputation; a prefix-cache hit's
        length, or all but the last for a request resumed with its KV): the KV, positions and
        codebook of a prefix are functions of its ids alone. ``ids[num_computed:]`` are the ids the
        engine's next steps schedule for this slot, in order. Every id is checked here.

        Args:
            prompt_length: how many of ``ids`` are the prompt (default: all). The row that feeds its
                last id gets logits that let the text go on inside the prompt's last phrase, as
                `generate` does (``open_phrase_at``); every later row gets canonical ids only.

        Raises:
            ValueError: a slot out of range or taken, counts out of range, an id outside the id
                space or not legal where it stands, or ids needing positions the model lacks.
        """
        self._check_slot(slot)
        if self._occupied[slot]:
            raise ValueError(f"slot {slot} holds a request: remove it first")
        ids = as_id_list(ids)
        prompt_length = len(ids) if prompt_length is None else prompt_length
        for name, value in (("num_computed", num_computed), ("prompt_length", prompt_length)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= len(ids):
                raise ValueError(f"{name} must be an int in [0, {len(ids)}] (the ids given), got {value!r}")
        stream = self.codec.stream()
        stream.feed(ids[:num_computed])  # a ValueError names the first id that is not legal
        computed = DeviceCodebooks.from_streams(self.codec, [stream], [num_computed], self.live.device)
        every_id = stream.copy()
        every_id.feed(ids[num_computed:])
        needed = every_id.num_base_ids if self.config.position_mode == "base" else len(ids)
        if self.max_positions is not None and needed > self.max_positions:
            raise ValueError(f"ids: {past_the_positions(self.max_positions)}")
        self._install(slot, computed)
        installed = stream.num_installed
        if installed:
            codebooks = self.codebooks
            subtokens, lengths = codebooks.content[slot, :installed], codebooks.length[slot, :installed]
            for table, vectors in zip((self.input_table, self.output_table), self._encode(subtokens, lengths)):
                table[slot, :installed] = vectors.to(table.dtype)
        self.prompt_lengths[slot] = prompt_length
        self.live[slot] = True
        self._occupied[slot] = True

    @torch.no_grad()
    def remove(self, slot: int) -> None:
        """Free ``slot`` (a finished, aborted or preempted request); a free slot stays free."""
        self._check_slot(slot)
        self._install(slot, self._blank)
        self.prompt_lengths[slot] = -1
        self.live[slot] = False
        self._occupied[slot] = False

    def _install(self, slot: int, row: DeviceCodebooks) -> None:
        """Copy a one-row codebook state into ``slot`` (in place: the addresses stay)."""
        self.codebooks.table[slot].copy_(row.table[0])
        self.codebooks.state[slot].copy_(row.state[0])
        self.first_illegal[slot].zero_()

    def _check_slot(self, slot: int) -> None:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.max_num_seqs:
            raise ValueError(f"slot must be an int in [0, {self.max_num_seqs}) (max_num_seqs), got {slot!r}")

    # ------------------------------------------------------------------ a step (the hot path)

    @torch.no_grad()
    def step(
        self, slots: torch.LongTensor, ids: torch.LongTensor, max_rows_per_slot: int | None = None
    ) -> SlotStep:
        """Feed one engine step's rows: row i gives id ``ids[i]`` to the request in ``slots[i]``.

        A slot's rows are its next ids in row order, wherever they sit among the others (rows move
        from step to step as the engine likes). A row whose slot is -1 is padding: it reads the
        sink row and changes nothing. Tensor work of shapes fixed by ``N`` and
        ``max_rows_per_slot``, no host sync: an id that is not legal, or a row naming a slot that
        holds no request, is recorded for `raise_if_illegal`, not raised.

        Args:
            slots: ``(N,)`` each row's slot, -1 for padding.
            ids: ``(N,)`` each row's compressed id (anything in padding rows).
            max_rows_per_slot: the most rows any slot has in this step (1 for a step of decoding
                only; the engine's scheduler knows it on the host). The ids are fed in that many
                rounds, each one id per slot; a slot with more rows is recorded as an error.
                Default ``N``: always enough, at a round per row.

        Returns:
            A `SlotStep`: the rows' input embeddings and positions, and what `logits` needs.
        """
        rounds = self._check_step(slots, ids, max_rows_per_slot)
        slots, ids = slots.long(), ids.long()  # no copy when they are already
        slot_rows, real = self._rows_of(slots)
        occurrence = _occurrence(slot_rows)
        fed = real & (occurrence < rounds)
        self._note_overflow(slot_rows, real & ~fed, rounds)
        # row_of[s, r]: the row whose id slot s reads in round r, N (a row past the step) for none.
        N, index = len(ids), torch.arange(len(ids), device=ids.device)
        row_of = index.new_full((self.max_num_seqs + 1, rounds + 1), N)
        row_of.index_put_((slot_rows, torch.where(fed, occurrence, rounds)), index)  # column `rounds`: trash
        padded_ids, padded_fed = torch.cat([ids, ids.new_zeros(1)]), torch.cat([fed, fed.new_zeros(1)])
        M, K = self.codec.max_subtokens, self.codec.max_codebook_size
        record = ids.new_zeros(N + 1, 6 + 2 * M)  # row N: where slots without a row this round write
        record[:, 6 + M :] = K  # created nothing: a sink slot
        for r in range(rounds):
            rows = row_of[:, r]
            self._feed_round(padded_ids[rows], padded_fed[rows], rows, record)
        record = record[:N]
        lengths, created = record[:, _LENGTH], record[:, 6 + M :]
        self._encode_created(slot_rows, created)
        return SlotStep(
            inputs_embeds=self._embed(ids, slot_rows, lengths > 0),
            positions=record[:, _POSITION].contiguous(),  # engines' position kernels read it flat
            slots=slot_rows,
            codes=torch.where(fed, ids, -1),
            lengths=lengths,
            legal=record[:, _LEGAL],
            provisional=record[:, 6 : 6 + M],
            provisional_lengths=record[:, _PROVISIONAL_LENGTH],
            num_installed=record[:, _INSTALLED],
            open=record[:, _OPEN] > 0,
        )

    def _check_step(self, slots, ids, max_rows_per_slot) -> int:
        """The rounds a step takes; shapes and types checked (metadata only: no sync)."""
        for name, tensor in (("slots", slots), ("ids", ids)):
            if not isinstance(tensor, torch.Tensor) or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor, got {getattr(tensor, 'dtype', type(tensor))}")
            if tensor.dim() != 1 or tensor.numel() == 0:
                raise ValueError(f"{name} must be a non-empty 1-D tensor (one per row), got {tuple(tensor.shape)}")
        if slots.shape != ids.shape:
            raise ValueError(f"slots {tuple(slots.shape)} and ids {tuple(ids.shape)} must have one entry per row")
        if max_rows_per_slot is None:
            return len(ids)
        if isinstance(max_rows_per_slot, bool) or not isinstance(max_rows_per_slot, int) or max_rows_per_slot < 1:
            raise ValueError(f"max_rows_per_slot must be an int >= 1 or None, got {max_rows_per_slot!r}")
        return min(max_rows_per_slot, len(ids))

    def _rows_of(self, slots: torch.LongTensor) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Each row's codebook row (the sink for padding) and whether it is a request's row. A row
        naming a slot that holds no request is padding, and recorded in the sink row's record."""
        sink = self.max_num_seqs
        in_range = (slots >= 0) & (slots < sink)
        real = self.live[torch.where(in_range, slots, sink)]
        unknown = (slots != -1) & ~real
        first = unknown.int().argmax(dim=0, keepdim=True)  # the first such row (row 0 if none)
        found = torch.cat([torch.where(unknown.any(), NO_SUCH_SLOT, 0)[None], first, slots.gather(0, first)])
        self.first_illegal[sink].copy_(torch.where(self.first_illegal[sink, 0] == 0, found, self.first_illegal[sink]))
        return torch.where(real, slots, sink), real

    def _feed_round(self, codes, real, rows, record) -> None:
        """Feed every slot its id of this round (``real`` False: none) and write what follows into
        ``record`` at the ``rows`` the ids came from."""
        codebooks = self.codebooks
        lengths, created, legality = codebooks.feed(codes, real)
        content, content_length = codebooks.provisional()
        installed, count = codebooks.num_installed, codebooks.num_real_tokens
        held = codebooks.num_base_ids if self.config.position_mode == "base" else count
        positions = torch.where(lengths > 0, held - 1, 0)  # as `positions_of`: an id at its last base id
        verdicts = torch.where(real, legality, 0)
        if self.max_positions is not None:  # never an index past the base model's table
            verdicts = torch.where(positions >= self.max_positions, PAST_THE_POSITIONS, verdicts)
            positions = positions.clamp(max=self.max_positions - 1)
        opened = real & (count == self.prompt_lengths)
        columns = [lengths, positions, installed + (content_length > 0), content_length, installed, opened.long()]
        record.index_put_((rows,), torch.cat([torch.stack(columns, dim=1), content, created], dim=1))
        self._note_illegal(verdicts, count - 1, codes)

    def _note_illegal(self, verdicts, positions, codes) -> None:
        """Keep, per slot, the first illegal id ever recorded (a slot that has one keeps it)."""
        found = torch.stack([verdicts, positions, codes], dim=1)
        self.first_illegal.copy_(torch.where(self.first_illegal[:, :1] == 0, found, self.first_illegal))

    def _note_overflow(self, slot_rows, overflow, rounds: int) -> None:
        """Record the slots that had rows past ``rounds`` (those rows were not fed)."""
        sink = self.max_num_seqs
        flags = overflow.new_zeros(sink + 2)  # index sink + 1 takes the rows that did not overflow
        flags.index_put_((torch.where(overflow, slot_rows, sink + 1),), overflow)
        verdicts = torch.where(flags[: sink + 1], TOO_MANY_ROWS, 0)
        self._note_illegal(verdicts, torch.full_like(verdicts, rounds), torch.zeros_like(verdicts))

    def _encode(self, subtokens: torch.LongTensor, lengths: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and output vectors of entries (sinks too: a length below 1 is read as 1)."""
        lengths = lengths.clamp(min=1)
        return (
            encode_entries(self.input_hyper_encoder, subtokens, lengths, self.input_embeddings.weight),
            encode_entries(self.output_hyper_encoder, subtokens, lengths, self.output_embeddings.weight),
        )

    def _encode_created(self, slot_rows: torch.LongTensor, created: torch.LongTensor) -> None:
        """Encode the entries the step installed (``created``: ``(N, M)`` slots per row, sinks for
        none: a fixed ``N * M`` entries) into both tables, before any row reads them: a row may use
        an entry an earlier row of the same step installed."""
        M, K = self.codec.max_subtokens, self.codec.max_codebook_size
        rows, slots = slot_rows[:, None].expand_as(created).reshape(-1), created.reshape(-1)
        if self.host_reads_free:  # the entries installed only: a decoding step installs about one a row
            installed = slots < K
            rows, slots = rows[installed], slots[installed]
        entries = self.codebooks.table[rows, slots]
        vectors = self._encode(entries[:, :M], entries[:, M + 1])
        for table, table_vectors in zip((self.input_table, self.output_table), vectors):
            table.index_put_((rows, slots), table_vectors.to(table.dtype))

    def _embed(self, ids: torch.LongTensor, slot_rows: torch.LongTensor, real: torch.BoolTensor) -> torch.Tensor:
        """Base ids' embedding rows; hypertokens' vectors from their slot's input table (as the model's
        `_embed_block`: an id that is not legal, or padding, reads a base row in bounds)."""
        V, width = self.codec.initial_vocab_size, self.input_table.shape[1]
        embeds = self.input_embeddings(ids.clamp(0, V - 1))
        vectors = self.input_table[slot_rows, (ids - V).clamp(0, width - 1)]
        return torch.where(((ids >= V) & real)[:, None], vectors.to(embeds.dtype), embeds)

    # ------------------------------------------------------------------ logits

    @torch.no_grad()
    def logits(
        self,
        hidden: torch.Tensor,
        step: SlotStep,
        rows: torch.LongTensor | None = None,
        base_logits: torch.Tensor | None = None,
        score_provisional: bool | None = None,
        entries: int | None = None,
    ) -> torch.Tensor:
        """``(R, V + K)`` logits of ``R`` rows of a step, as `Zip2ZipForCausalLM.forward` computes
        them: base logits then hyper logit k = ``h . f_out(entry k)`` of the row's slot, every id
        that is not legal after the row ``-inf`` (uninstalled entries, model rows past V, ids that
        are not canonical there but after a prompt's end), the head's post-processing applied.

        Args:
            hidden: ``(R, D)`` the base model's last hidden states at those rows.
            step: what `step` returned for the step.
            rows: ``(R,)`` which of the step's rows (default: all, R = N).
            base_logits: ``(R, rows of the head)`` the head's raw output at those rows, if the engine
                computed it already (default: the output embeddings applied to ``hidden``).
            score_provisional: whether the provisional entry gets a logit (default: the model's
                ``write_provisional_hypertokens``, as `generate` does).
            entries: at least the entries any of these rows' slots has installed, where the caller
                knows a bound (default: K, or `installed_bound` where ``host_reads_free``): hyper
                logits are computed for those slots only (and the provisional one), the rest are
                ``-inf`` all the same.
        """
        if rows is not None:
            step = step.select(rows)
        if hidden.dim() != 2 or hidden.shape[0] != step.slots.shape[0]:
            raise ValueError(f"hidden must be (rows, D) with {step.slots.shape[0]} rows, got {tuple(hidden.shape)}")
        V, K, codebooks = self.codec.initial_vocab_size, self.codec.max_codebook_size, self.codebooks
        consumed = ConsumedBlock(  # each row a batch row with one kept position
            lengths=step.lengths[:, None],
            positions=step.positions[:, None],
            legal=step.legal[:, None],
            provisional=step.provisional[:, None],
            provisional_lengths=step.provisional_lengths[:, None],
            extending=codebooks.extending(step.codes, step.slots, step.num_installed)[:, None],
            entry_first_ids=codebooks.content[step.slots, :K, 0],
        )
        provisional_vectors = encode_entries(
            self.output_hyper_encoder,
            step.provisional,
            step.provisional_lengths.clamp(min=1),
            self.output_embeddings.weight,
        )
        if base_logits is None:
            base_logits = self.output_embeddings(hidden)
        if entries is None and self.host_reads_free:
            entries = self.installed_bound(step)
        width = K if entries is None else max(0, min(K, entries))
        logits = widen_logits(
            base_logits[:, None],
            hidden[:, None],
            consumed,
            self.output_table[step.slots, :width],
            provisional_vectors[:, None],
            V,
            K,
            self.config.get_text_config(),
            self.score_provisional if score_provisional is None else score_provisional,
            self.config.canonical_ids_only,
            step.open[:, None],
        )
        return logits[:, 0]

    @staticmethod
    def installed_bound(step: SlotStep, rows: torch.LongTensor | None = None) -> int:
        """The most entries installed after any of ``rows`` (default: all) of a step: a host sync
        (the ``entries`` of `logits`)."""
        installed = step.num_installed if rows is None else step.num_installed[rows]
        return int(installed.max()) if installed.numel() else 0

    # ------------------------------------------------------------------ errors (host, when asked)

    @torch.compiler.disable  # a host sync by design: never part of a compiled step
    def raise_if_illegal(self) -> None:
        """Raise naming the first problem a step recorded (one host sync), if any: an id that was
        not legal where it stood, a position past the model's, a slot given more rows than
        ``max_rows_per_slot``, or a row naming a slot that holds no request. A slot's record stays
        until it is removed or added again; that of rows naming no request is cleared when raised."""
        sink, V, K = self.max_num_seqs, self.codec.initial_vocab_size, self.codec.max_codebook_size
        for slot, (verdict, position, code) in enumerate(self.first_illegal.tolist()):
            if verdict == 0:
                continue
            if slot == sink:
                self.first_illegal[sink].zero_()
                raise ValueError(
                    f"row {position} of a step names slot {code}, which holds no request "
                    f"(a slot in [0, {sink}) after add, or -1 for padding)"
                )
            name = f"slot {slot}, position {position}"
            if verdict == 1:
                raise ValueError(f"{name}: id {code} is outside the id space [0, {V + K})")
            if verdict == 2:
                raise ValueError(f"{name}: hyper id {code} is not installed (nor the provisional id) there")
            if verdict == PAST_THE_POSITIONS:
                raise ValueError(f"{name}: {past_the_positions(self.max_positions)}")
            raise ValueError(f"slot {slot}: a step gave it more rows than max_rows_per_slot={position}")


def _occurrence(keys: torch.LongTensor) -> torch.LongTensor:
    """``(N,)`` how many earlier rows have the same key as each row: a row's round. A stable sort
    groups equal keys in row order; each row's rank is its distance from its group's start."""
    order = torch.argsort(keys, stable=True)
    ordered = keys[order]
    index = torch.arange(len(keys), device=keys.device)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[1:] = ordered[1:] != ordered[:-1]
    group_start = torch.where(starts, index, 0).cummax(dim=0).values
    return torch.empty_like(index).scatter_(0, order, index - group_start)
