"""`generate` for zip2zip models: hypertokens inside, plain base ids outside.

The decoding loop is transformers' own; the per-row codebooks ride in the `Zip2ZipCache` that the
model's forward returns, so greedy, sampling, beam search (the cache reorders them) and
``num_return_sequences`` (inputs are expanded before the first forward) need nothing special here.

What this mixin adds is the boundary with code that only knows base ids:

* the returned sequences keep the prompt ids unchanged and give the generated part *expanded to
  base ids*, so ``tokenizer.decode(out[0][n_prompt:])``, pipelines and lm-eval see the right text;
* streamers receive base ids;
* ``stop_strings`` are matched on the decoded generated text (transformers' own criterion indexes a
  table by token id and knows nothing of hyper ids).
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationMixin, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from .lzw import LZWCodec, LZWStream


__all__ = ["Zip2ZipGenerationMixin"]


class Zip2ZipGenerationMixin(GenerationMixin):
    """`GenerationMixin` whose outputs and streamed tokens are base ids (see module docstring)."""

    codec: LZWCodec

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, streamer=None, return_hypertokens: bool = False, **kwargs):
        r"""`GenerationMixin.generate`, with every decoding mode, over compressed ids.

        ``max_new_tokens`` / ``max_length`` count model steps: one step may write a hypertoken
        standing for several base tokens, so the text can be longer than ``max_new_tokens`` tokens.

        Args:
            return_hypertokens: return the raw compressed ids instead of expanding the generated
                part to base ids. With ``return_dict_in_generate=True`` the output also carries
                ``codebooks``, one ``{hyper_id: [base ids]}`` dict per row.

        Returns:
            Like `GenerationMixin.generate`. ``sequences[:, :n_prompt]`` are the prompt ids
            unchanged; the rest is the generated part in base ids, right-padded with the pad id.
            Scores and logits, when requested, stay one per model step and ``V + K`` wide.
        """
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is None:
            raise ValueError("Zip2ZipForCausalLM.generate needs input_ids (or inputs): there is no text-free start")
        attention_mask = kwargs.get("attention_mask")
        if streamer is not None:
            streamer = _BaseIdStreamer(streamer, self.codec)
        output = super().generate(inputs=inputs, generation_config=generation_config, streamer=streamer, **kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        prompts = _PromptStreams(self.codec, input_ids, attention_mask)
        tails, streams = [], []
        for row in range(len(sequences)):
            stream = prompts.stream_for(row, len(sequences))
            tail: list[int] = []
            stream.feed(sequences[row, input_ids.shape[1] :].tolist(), out=tail)
            tails.append(tail)
            streams.append(stream)
        if not isinstance(output, torch.Tensor):
            output.codebooks = [stream.codebook.to_dict() for stream in streams]
        if return_hypertokens:
            return output
        expanded = _with_tails(input_ids.to(sequences.device), tails, self._pad_id(generation_config, kwargs))
        if isinstance(output, torch.Tensor):
            return expanded
        output.sequences = expanded
        return output

    def _pad_id(self, generation_config, kwargs) -> int:
        config = generation_config or self.generation_config
        for candidate in (kwargs.get("pad_token_id"), config.pad_token_id, self.config.pad_token_id, config.eos_token_id):
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if candidate is not None:
                return int(candidate)
        return 0

    def _beam_search(self, *args, **kwargs):
        # transformers 4.x beam search reshapes scores with the text config's vocab_size, not the
        # logits' width (5.x reads the width). Show it V + K for the search only, restored after.
        text_config = self.config.get_text_config()
        vocab_size = text_config.vocab_size
        text_config.vocab_size = self.codec.total_vocab_size
        try:
            return super()._beam_search(*args, **kwargs)
        finally:
            text_config.vocab_size = vocab_size

    def _get_stopping_criteria(self, generation_config, stopping_criteria, tokenizer=None, **kwargs):
        stop_strings = generation_config.stop_strings
        if stop_strings is None or tokenizer is None:  # transformers raises for a missing tokenizer
            return super()._get_stopping_criteria(generation_config, stopping_criteria, tokenizer, **kwargs)
        generation_config = copy.copy(generation_config)
        generation_config.stop_strings = None
        criteria = super()._get_stopping_criteria(generation_config, stopping_criteria, tokenizer, **kwargs)
        criteria.append(StopStringsOnText(stop_strings, tokenizer, self.codec))
        return criteria


class _PromptStreams:
    """LZW streams of the prompts, built once and copied for every generated row of a prompt."""

    def __init__(self, codec: LZWCodec, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        self.codec = codec
        self.input_ids = input_ids.tolist()
        self.mask = attention_mask.tolist() if attention_mask is not None else None
        self._streams: dict[int, LZWStream] = {}

    def stream_for(self, row: int, num_rows: int) -> LZWStream:
        """A fresh copy of the stream of the prompt behind output row ``row`` (of ``num_rows``)."""
        prompt = row * len(self.input_ids) // num_rows  # rows are grouped by prompt
        if prompt not in self._streams:
            ids = self.input_ids[prompt]
            if self.mask is not None:
                ids = [i for i, keep in zip(ids, self.mask[prompt]) if keep]
            stream = self.codec.stream()
            stream.feed(ids)
            self._streams[prompt] = stream
        return self._streams[prompt].copy()


def _with_tails(prompt_ids: torch.Tensor, tails: list[list[int]], pad_id: int) -> torch.Tensor:
    """Prompt ids (repeated per generated row) followed by each row's base-id tail, right-padded."""
    repeats = len(tails) // len(prompt_ids)
    prompts = prompt_ids.repeat_interleave(repeats, dim=0)
    width = max((len(t) for t in tails), default=0)
    tail = torch.full((len(tails), width), pad_id, dtype=prompt_ids.dtype, device=prompt_ids.device)
    for row, ids in enumerate(tails):
        tail[row, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
    return torch.cat([prompts, tail], dim=1)


class _BaseIdStreamer(BaseStreamer):
    """Hands a user's streamer base ids: hypertokens expanded with the row's own codebook."""

    def __init__(self, streamer: BaseStreamer, codec: LZWCodec):
        self.streamer = streamer
        self.codec = codec
        self.stream: LZWStream | None = None

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1 and value.shape[0] > 1:
            raise ValueError("streamers support batch size 1 only")
        ids = value.reshape(-1).tolist()
        base_ids: list[int] = []
        if self.stream is None:  # the first call carries the prompt
            self.stream = self.codec.stream()
            self.stream.feed(ids, out=base_ids)
            self.streamer.put(torch.tensor([base_ids], dtype=value.dtype))
        else:
            self.stream.feed(ids, out=base_ids)
            self.streamer.put(torch.tensor(base_ids, dtype=value.dtype))

    def end(self) -> None:
        self.streamer.end()


class StopStringsOnText(StoppingCriteria):
    """Stops a row once its generated text (decoded through its own codebook) contains a stop string.

    The first call fixes the prompt length (transformers calls stopping criteria after every step).
    """

    def __init__(self, stop_strings: str | list[str], tokenizer, codec: LZWCodec):
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        self.tokenizer = tokenizer
        self.codec = codec
        self.prompt_length: int | None = None
        self._prompt_streams: dict[tuple[int, ...], LZWStream] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1] - 1
        done = []
        for row in input_ids.tolist():
            prompt, generated = tuple(row[: self.prompt_length]), row[self.prompt_length :]
            if prompt not in self._prompt_streams:
                self._prompt_streams[prompt] = self.codec.stream()
                self._prompt_streams[prompt].feed(prompt)
            base_ids: list[int] = []
            self._prompt_streams[prompt].copy().feed(generated, out=base_ids)
            text = self.tokenizer.decode(base_ids)
            done.append(any(s in text for s in self.stop_strings))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
