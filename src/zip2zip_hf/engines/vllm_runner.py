"""The adapter between vLLM's Model Runner V1 (the runner vLLM uses on CPU) and `SlotCodebooks`.

MRV1 gives a model no request identity: its forward sees only the step's rows, and the rows of a
request move between steps (the persistent batch condenses and reorders). The runner itself knows,
right after it prepared a step's inputs: the batch's requests in row order, how many rows each has,
how many of each request's ids its KV cache already holds, and which rows it will sample. The
adapter wraps that one method (`GPUModelRunner._prepare_inputs`, which the CPU runner inherits) to
hand the zip2zip model its `StepSchedule`, after it keeps each live request in a slot:

* a request gets a slot when it is first scheduled, rebuilt from all its ids the engine holds
  (``add(slot, ids, num_computed)``): a new request, one resumed after preemption (its KV
  recomputed, or a prefix-cache hit) alike, as the ids fed so far no longer match what the
  engine computed;
* a request that left the batch (finished, aborted or preempted) gives its slot back.
"""

from __future__ import annotations

import numpy as np

from .vllm_model import StepSchedule, Zip2ZipVllmForCausalLM, row_slots


__all__ = ["RequestSlots", "install"]


class RequestSlots:
    """Which slot each live request sits in, and how many of its ids its slot has been fed."""

    def __init__(self, model: Zip2ZipVllmForCausalLM):
        self.model = model
        self.slot_of: dict[str, int] = {}
        self.fed: dict[str, int] = {}
        self.free = list(range(model.max_num_seqs - 1, -1, -1))

    def schedule(self, input_batch, num_scheduled: np.ndarray, logits_indices, rows: int) -> StepSchedule:
        """The step's schedule, after the slots follow the batch (see the module's docstring)."""
        req_ids = list(input_batch.req_ids)
        live = set(req_ids)
        for req_id in [r for r in self.slot_of if r not in live]:
            self._release(req_id)
        order = []
        for i, req_id in enumerate(req_ids):
            computed = int(input_batch.num_computed_tokens_cpu[i])
            if self.fed.get(req_id) != computed:
                self._rebuild(req_id, input_batch, i, computed)
            self.fed[req_id] = computed + int(num_scheduled[i])
            order.append(self.slot_of[req_id])
        slots = row_slots(np.array(order, dtype=np.int64), num_scheduled, rows, logits_indices.device)
        return StepSchedule(slots, int(num_scheduled.max()), logits_indices)

    def _rebuild(self, req_id: str, input_batch, index: int, computed: int) -> None:
        if req_id in self.slot_of:
            self._release(req_id)
        slot = self.free.pop()
        known = int(input_batch.num_tokens_no_spec[index])
        ids = input_batch.token_ids_cpu[index, :known].tolist()
        prompt_length = int(input_batch.num_prompt_tokens[index])
        self.model.slots.add(slot, ids, num_computed=computed, prompt_length=prompt_length)
        self.slot_of[req_id] = slot

    def _release(self, req_id: str) -> None:
        slot = self.slot_of.pop(req_id)
        self.fed.pop(req_id, None)
        self.model.slots.remove(slot)
        self.free.append(slot)


def install() -> None:
    """Wrap MRV1's `_prepare_inputs` once per process (a no-op for every model but zip2zip's)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    prepare = GPUModelRunner._prepare_inputs
    if getattr(prepare, "zip2zip", False):
        return

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = prepare(self, scheduler_output, num_scheduled_tokens)
        model = self.get_model()
        if isinstance(model, Zip2ZipVllmForCausalLM):
            if not hasattr(self, "zip2zip_slots"):
                self.zip2zip_slots = RequestSlots(model)
            rows = len(self.input_ids.gpu)
            model.schedule = self.zip2zip_slots.schedule(self.input_batch, num_scheduled_tokens, result[0], rows)
        return result

    _prepare_inputs.zip2zip = True
    GPUModelRunner._prepare_inputs = _prepare_inputs
