"""Self-distillation for uptraining: the base model, reading base tokens, teaches its zip2zip wrap.

The teacher is the same network as the student with the zip2zip parts switched off: the base LM
with its LoRA disabled (one copy of the weights; ``model.disable_adapter()``), or a frozen copy for a
full finetune. It reads the window's *base* ids; the student reads the same text compressed. Every
compressed id is exactly a span of base ids, so the alignment between the two is exact and free.

Write ``b`` for the window's base ids, ``c_t`` for its canonical compressed ids and ``[s_t, e_t)`` for
the base span of ``c_t``. Greedy LZW writes ``c_t`` only when the base id after its span does not
extend it (no child of the phrase is installed there, the phrase is ``M`` long, or the next id is
disabled): call that child set ``X_t``. Under the teacher's distribution over texts, the probability
that canonical LZW writes ``c_t`` next, given what came before, is::

    q(c_t) = p_T(b[s_t:e_t] | b[:s_t]) * (1 - p_T(X_t | b[:e_t])) / (1 - p_T(X_{t-1} | b[:s_t]))

and over a window these factors telescope to the teacher's probability of the text: a student that
matched them would score the teacher's bits per byte on canonical ids. The terms (`DistillationConfig`,
each switchable by its weight):

* ``ce``: cross-entropy on the canonical ids (the plain recipe);
* ``span``: the student's ``log p_S(c_t)`` against ``log q(c_t)`` above (``correction=False`` drops the
  two ``X`` factors, the naive span likelihood), compared as surprisals ``u = -log q``,
  ``v = -log p_S`` with ``u log(u / v) - u + v`` (ALM's large-temperature limit);
* ``marginal``: the student's probabilities summed by each legal id's first base id, against the
  teacher's next-token distribution with ``X_{t-1}`` removed and renormalised (the same correction
  over the whole vocabulary: a dense target at every position);
* ``hidden``: the squared distance between the student's last hidden state at ``c_t`` and the
  teacher's at ``e_t - 1`` (the same text read), per channel over the teacher's mean energy.

Each term is a sum over the window's targets divided by the same count as the cross-entropy (the
Trainer's ``num_items_in_batch`` under gradient accumulation), so the weights are per target.

`Zip2ZipDataCollator(tokenizer, distillation=True)` adds what the loss needs (`alignment_tensors`:
base ids and extension sets, from the codec, off the critical path), so the loss runs no Python per id.
`Zip2ZipDistillationTrainer` is a ``transformers.Trainer`` that uses it.

Not part of a checkpoint's remote-code closure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..lzw import LZWCodec


__all__ = [
    "DistillationConfig",
    "Zip2ZipDistillationTrainer",
    "Zip2ZipDistiller",
    "alignment_tensors",
]

# What `alignment_tensors` returns (the collator's ``distillation`` entry).
ALIGNMENT_KEYS = ("base_ids", "base_mask", "extension_rows", "extension_codes", "extension_ids")


def alignment_tensors(
    codec: LZWCodec, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None
) -> dict[str, torch.LongTensor]:
    """What the distillation loss needs beyond `codebook_tensors`, as tensors.

    * ``base_ids`` / ``base_mask`` ``(B, L)``: each row's real ids expanded to base ids, left-aligned
      (the teacher's input);
    * ``extension_rows`` / ``extension_codes`` / ``extension_ids`` ``(N,)``: one triple per child of
      a written phrase that was installed when LZW wrote it (the set ``X_t`` of the module docstring):
      row, position of the compressed id in ``input_ids``, and the base id that would have extended it.

    The base span of each compressed id is `codebook_tensors`' ``lengths`` (cumulated), so it is not
    repeated here.
    """
    real = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
    rows, spans_ext = [], ([], [], [])
    for b, (row, row_real) in enumerate(zip(input_ids.tolist(), real.tolist())):
        columns = [t for t, keep in enumerate(row_real) if keep]
        codes = [row[t] for t in columns]
        base, extensions = _row_alignment(codec, codes)
        rows.append(base)
        for index, children in extensions:
            spans_ext[0].extend([b] * len(children))
            spans_ext[1].extend([columns[index]] * len(children))
            spans_ext[2].extend(children)
    width = max(map(len, rows), default=0)
    base_ids = torch.zeros((len(rows), width), dtype=torch.long)
    base_mask = torch.zeros_like(base_ids)
    for b, base in enumerate(rows):
        base_ids[b, : len(base)] = torch.tensor(base, dtype=torch.long)
        base_mask[b, : len(base)] = 1
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return {
        "base_ids": base_ids,
        "base_mask": base_mask,
        "extension_rows": as_tensor(spans_ext[0]),
        "extension_codes": as_tensor(spans_ext[1]),
        "extension_ids": as_tensor(spans_ext[2]),
    }


def _row_alignment(codec: LZWCodec, codes: list[int]) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """``(base ids, [(index, children installed when codes[index] was written), ...])`` of one row.

    Entry ``k`` of the canonical codebook (key ``prefix * V + last``) is created when its prefix is
    written and ``last`` is the next id's first base id; the entries are created in order, so one
    walk over the codes finds when each was. A phrase of ``M`` base ids has no extension.
    """
    base, codebook = codec.decode(codes)
    V, M = codec.initial_vocab_size, codec.max_subtokens
    keys = list(codebook._lookup)
    children: dict[int, list[int]] = {}
    extensions, k = [], 0
    firsts = [codebook.get_subtokens(code)[0] for code in codes]
    for t, code in enumerate(codes):
        if code in children and len(codebook.get_subtokens(code)) < M:
            extensions.append((t, list(children[code])))
        if k < len(keys) and t + 1 < len(codes):
            prefix, last = divmod(keys[k], V)
            if prefix == code and last == firsts[t + 1]:
                children.setdefault(code, []).append(last)
                k += 1
    if k != len(keys):  # the codec and this walk disagree: never silently wrong targets
        raise AssertionError(f"extension walk placed {k} of {len(keys)} entries")
    return base, extensions


@dataclass
class DistillationConfig:
    """Weights of the distillation terms (0 switches a term off) and their settings.

    Attributes:
        ce: cross-entropy on canonical ids.
        span: span likelihood against the teacher (surprisal divergence).
        marginal: first-base-token marginal KL.
        hidden: last-hidden-state matching at span ends.
        correction: apply the LZW outcome correction to the span and marginal targets.
    """

    ce: float = 1.0
    span: float = 1.0
    marginal: float = 0.0
    hidden: float = 0.0
    correction: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def needs_teacher(self) -> bool:
        return any(w > 0 for w in (self.span, self.marginal, self.hidden))


class Zip2ZipDistiller:
    """Computes the distillation loss of one batch (see the module docstring).

    Args:
        config: the terms and their weights.
        teacher_model: a frozen base causal LM for a full finetune; None with LoRA (the student's own
            base LM with the adapter disabled is the teacher).
    """

    def __init__(self, config: DistillationConfig | None = None, teacher_model: nn.Module | None = None):
        self.config = config or DistillationConfig()
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.requires_grad_(False).eval()

    def __call__(self, model: nn.Module, inputs: Mapping, num_items_in_batch=None):
        """``(loss, outputs, terms)``: the weighted loss, the student's output, each term's value
        (detached tensors: reading them waits for the device)."""
        config = self.config
        inputs = dict(inputs)
        inputs.pop("labels", None)  # the CE is computed here, from the same log-probabilities
        alignment = inputs.pop("distillation", None)
        codebooks = inputs.get("codebooks")
        if codebooks is None or (config.needs_teacher and alignment is None):
            raise ValueError(
                "distillation needs the batch's codebooks and alignment: use "
                "Zip2ZipDataCollator(tokenizer, distillation=True)"
            )
        outputs = model(**inputs, use_cache=False, output_hidden_states=config.hidden > 0)
        student = _unwrap(model)
        V = student.codec.initial_vocab_size
        input_ids, lengths = inputs["input_ids"], codebooks["lengths"].to(outputs.logits.device)
        log_probs = torch.log_softmax(outputs.logits.float(), dim=-1)
        targets = input_ids[:, 1:]
        counted = (lengths[:, 1:] > 0) & (lengths[:, :-1] > 0)
        student_target = log_probs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        denominator = num_items_in_batch if num_items_in_batch is not None else counted.sum().clamp(min=1)
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(log_probs.device)

        def total(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
            # where(), not a product: an id that is not legal at a padding position has -inf there
            return torch.where(where, values, torch.zeros_like(values)).sum() / denominator

        terms = {}
        if config.ce:
            terms["ce"] = total(-student_target, counted)
        if config.needs_teacher:
            teacher = self._teacher_outputs(model, alignment, config.hidden > 0)
            spans = _Spans(lengths, alignment, teacher.logits[..., :V], config.correction)
            if config.span:
                expected = spans.target_log_probs()
                terms["span"] = total(_surprisal_divergence(expected, student_target), counted)
            if config.marginal:
                marginal = spans.marginal_kl(log_probs, codebooks, V)
                terms["marginal"] = total(marginal, counted)
            if config.hidden:
                distance = spans.hidden_distance(outputs.hidden_states[-1], teacher.hidden_states[-1])
                terms["hidden"] = total(distance, lengths > 0)
        loss = sum(getattr(config, name) * value for name, value in terms.items())
        return loss, outputs, {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def _teacher_outputs(self, model: nn.Module, alignment: Mapping, hidden: bool):
        kwargs = dict(
            input_ids=alignment["base_ids"],
            attention_mask=alignment["base_mask"],
            use_cache=False,
            output_hidden_states=hidden,
        )
        if self.teacher_model is not None:
            return self.teacher_model(**kwargs)
        if not hasattr(model, "disable_adapter"):
            raise ValueError("without a LoRA adapter to disable, pass a frozen teacher_model (full finetune)")
        language_model = _unwrap(model).language_model
        was_training = language_model.training
        language_model.eval()  # no dropout in the teacher
        try:
            with model.disable_adapter():
                return language_model(**kwargs)
        finally:
            language_model.train(was_training)


def _unwrap(model: nn.Module) -> nn.Module:
    """The `Zip2ZipForCausalLM` inside a PEFT / DDP wrapper."""
    while not hasattr(model, "codec"):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model.module
    return model


def _surprisal_divergence(expected_log_probs: torch.Tensor, student_log_probs: torch.Tensor) -> torch.Tensor:
    """``u log(u / v) - u + v`` with ``u``, ``v`` the teacher's and the student's surprisals (>= 0,
    0 only where they are equal): ALM's binarised divergence at a large temperature."""
    u = (-expected_log_probs).clamp(min=1e-4)
    v = (-student_log_probs).clamp(min=1e-4)
    return u * torch.log(u / v) - u + v


class _Spans:
    """The teacher's numbers, aligned to the student's positions (all ``(B, T)`` but where said).

    ``end[t]`` is the base index one past code ``t``'s span; the teacher's row ``end[t] - 1`` is its
    distribution over the base id after the span.
    """

    def __init__(self, lengths, alignment, teacher_logits, correction: bool):
        self.lengths = lengths
        self.real = lengths > 0
        self.end = lengths.cumsum(1)
        self.start = self.end - lengths
        # Log-probabilities are read at a few ids per row (and whole rows at span ends only): keep
        # the logits and their normaliser, not a second (B, L, V) tensor.
        self.teacher_logits = teacher_logits.float()  # (B, L, V)
        self.teacher_normaliser = torch.logsumexp(self.teacher_logits, dim=-1)  # (B, L)
        self.base_ids = alignment["base_ids"]
        self.correction = correction
        rows, codes, ids = (alignment[k] for k in ("extension_rows", "extension_codes", "extension_ids"))
        self.extension = (rows, codes, ids)
        # p_T(X_t | b[:e_t]): the teacher's probability that the next base id extends code t.
        self.extend = torch.zeros_like(lengths, dtype=teacher_logits.dtype)
        if correction and rows.numel():
            after = (self.end[rows, codes] - 1).clamp(min=0)
            probs = (self.teacher_logits[rows, after, ids] - self.teacher_normaliser[rows, after]).exp()
            self.extend = self.extend.index_put((rows, codes), probs, accumulate=True)
        self.extend = self.extend.clamp(max=1 - 1e-6)

    @property
    def after(self) -> torch.Tensor:
        """``(B, T)``: the teacher's row at each code's last base id (its distribution over the next)."""
        return (self.end - 1).clamp(min=0)

    def target_log_probs(self) -> torch.Tensor:
        """``(B, T - 1)``: ``log q(c_t)`` for t = 1 .. T - 1 (the module docstring)."""
        base = self.base_ids
        token = self.teacher_logits[:, :-1].gather(-1, base[:, 1:, None]).squeeze(-1) - self.teacher_normaliser[:, :-1]
        cumulative = F.pad(F.pad(token, (1, 0)).cumsum(1), (1, 0))  # cumulative[i] = sum of token[< i]
        span = cumulative.gather(1, self.end) - cumulative.gather(1, self.start)
        keep = torch.log1p(-self.extend)
        last = self.real & ~F.pad(self.real[:, 1:], (0, 1))  # nothing follows: the window ended
        written = span + torch.where(last, torch.zeros_like(keep), keep)
        return (written[:, 1:] - keep[:, :-1]).clamp(max=0.0)

    def marginal_kl(self, log_probs: torch.Tensor, codebooks: Mapping, V: int) -> torch.Tensor:
        """``(B, T - 1)``: KL(teacher's next-base-token distribution without the previous code's
        extensions || the student's probabilities summed by first base id)."""
        T = self.lengths.shape[1]
        rows = torch.arange(len(self.after), device=self.after.device)[:, None]
        teacher = torch.softmax(self.teacher_logits[rows, self.after[:, :-1]], dim=-1)  # (B, T - 1, V)
        if self.correction and self.extension[0].numel():
            rows, codes, ids = self.extension
            inside = codes < T - 1
            teacher.index_put_((rows[inside], codes[inside], ids[inside]), teacher.new_zeros(()))
        teacher /= teacher.sum(-1, keepdim=True).clamp(min=1e-12)

        student = _first_id_marginal(log_probs[:, :-1].exp(), codebooks, V)
        return (torch.special.xlogy(teacher, teacher) - teacher * student.clamp(min=1e-30).log()).sum(-1)

    def hidden_distance(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
        """``(B, T)``: per-channel squared distance at span ends over the teacher's mean energy."""
        after = self.after
        teacher = teacher_hidden.float().gather(1, after[..., None].expand(-1, -1, teacher_hidden.shape[-1]))
        real = self.real[..., None]
        energy = (teacher.square() * real).sum((0, 1)) / real.sum().clamp(min=1)
        return ((student_hidden.float() - teacher).square() / (energy + 1e-6)).mean(-1)


def _first_id_marginal(probs: torch.Tensor, codebooks: Mapping, V: int) -> torch.Tensor:
    """``(B, T, V)``: the probabilities ``(B, T, V + K)`` summed by each id's first base id (a hyper
    slot's first id from the codebook; the provisional slot's from its pending content). Slots that
    are not legal have probability 0, so their first id does not matter."""
    B, T = probs.shape[:2]
    entries = codebooks["entries"].to(probs.device)
    width = min(probs.shape[-1] - V, entries.shape[1] + 1)  # installed entries, and the slot after them
    if width == 0:
        return probs[..., :V]
    firsts = F.pad(entries[:, :, 0], (0, 1))[:, None, :width].expand(B, T, width).clone()
    slot = (codebooks["legal"][:, :T] - 1).clamp(min=0, max=width - 1)[..., None]
    pending = codebooks["provisional"][:, :T, :1]
    firsts.scatter_(
        -1, slot, torch.where(codebooks["provisional_lengths"][:, :T, None] > 0, pending, firsts.gather(-1, slot))
    )
    return probs[..., :V].scatter_add(-1, firsts, probs[..., V : V + width])


class Zip2ZipDistillationTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is `Zip2ZipDistiller`'s (batches from
    ``Zip2ZipDataCollator(tokenizer, distillation=True)``).

    Args:
        distillation: the terms and weights (default `DistillationConfig()`).
        teacher_model: a frozen base causal LM for a full finetune; with LoRA leave it None.
        args, kwargs: as for ``Trainer``. Each term's mean since the last log is added to the logs.
    """

    def __init__(self, *args, distillation: DistillationConfig | None = None, teacher_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        if teacher_model is not None:
            teacher_model.to(self.args.device)
        self.distiller = Zip2ZipDistiller(distillation, teacher_model)
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs, terms = self.distiller(model, inputs, num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # ``num_items_in_batch`` counts every process's targets, and DDP / FSDP average the
            # gradients over the processes: scaled back as `Trainer.compute_loss` does, the step and
            # the logged loss are those of one process reading the whole batch.
            scale = self.accelerator.num_processes
            loss = loss * scale
            terms = {name: value * scale for name, value in terms.items()}
        for name, value in terms.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + value  # tensors: no sync per step
        self._term_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._term_count:
            sums = self._term_sums
            if self.args.world_size > 1:  # every process logs the loss together: the terms are averaged alike
                sums = {
                    k: self.accelerator.reduce(torch.as_tensor(v, device=self.args.device), "mean")
                    for k, v in sums.items()
                }
            logs.update({f"distill_{k}": round(float(v) / self._term_count, 4) for k, v in sums.items()})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)
