"""A FAKE vLLM engine for the keyed-noise logits processor tests. Not a test module.

vLLM cannot be installed or run on the machines these tests run on (no GPU), so this stands in for
``vllm.LLM`` + its V1 persistent batch: it runs a tiny transformers model, keeps a batch of at most
``max_batch`` requests and tells the logits processor about it through the V1 protocol
(``update_state(BatchUpdate)`` with removed / added / moved entries, then ``apply(logits)``), as
vllm/v1/sample/logits_processor/interface.py describes it:

* finished requests leave holes, reported as ``removed`` the next step; at most ``admit_per_step``
  new requests a step fill holes first (and that index is then not reported removed, as vLLM's
  ``BatchUpdateBuilder.pop_removed``), then the remaining holes are closed by moving the last
  requests down (``UNIDIRECTIONAL``);
* every ``swap_every`` steps two requests swap places (``SWAP``);
* added entries are ``(index, params, prompt ids, output ids)`` (``added_arity=3``: the older
  ``(index, params, output ids)``), the output ids list being the live list the engine appends to;
* the engine samples greedily (temperature 0) from the processed logits; ``update_state(None)`` when
  the batch did not change.

Requests are admitted as slots free up, so one batch holds requests at different positions. It is
only as faithful as that description: the real engine path is UNTESTED.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import torch


class MoveDirectionality(enum.Enum):  # the names of vllm.v1.sample.logits_processor.MoveDirectionality
    UNIDIRECTIONAL = enum.auto()
    SWAP = enum.auto()


@dataclass(frozen=True)
class BatchUpdate:
    batch_size: int
    removed: list
    added: list
    moved: list


class FakeVLLMEngine:
    """``generate(prompts, sampling_params, use_tqdm)`` as ``vllm.LLM`` with one logits processor."""

    def __init__(self, model, processor_cls, max_batch: int = 3, swap_every: int = 2, added_arity: int = 4,
                 admit_per_step: int = 1):
        self.model, self.max_batch, self.swap_every, self.added_arity = model, max_batch, swap_every, added_arity
        self.admit_per_step = admit_per_step
        self.processor = processor_cls(None, model.device, False)
        self.updates: list[BatchUpdate | None] = []  # what update_state was given, step by step
        self.batch_positions: list[list[int]] = []  # per step: each batch row's position

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        n = len(prompts)
        prompt_ids = [list(p["prompt_token_ids"]) for p in prompts]
        outputs: list[list[int]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n
        waiting = deque(range(n))
        slots: list[int | None] = []  # batch index -> request
        holes: list[int] = []  # freed last step, to be reported as removed
        step = 0
        while waiting or any(s is not None for s in slots):
            removed, added, moved = list(holes), [], []
            admitted = 0
            while waiting and admitted < self.admit_per_step and (holes or len(slots) < self.max_batch):
                admitted += 1
                r = waiting.popleft()
                if holes:
                    index = holes.pop(0)
                    removed.remove(index)  # a re-used slot is not reported removed (vLLM pops it)
                    slots[index] = r
                else:
                    index = len(slots)
                    slots.append(r)
                params = sampling_params[r]
                entry = (index, params, prompt_ids[r], outputs[r])
                added.append(entry if self.added_arity == 4 else (index, params, outputs[r]))
            for hole in sorted(holes):  # condense: the last request moves into each remaining hole
                while slots and slots[-1] is None:
                    slots.pop()
                if hole < len(slots):
                    moved.append((len(slots) - 1, hole, MoveDirectionality.UNIDIRECTIONAL))
                    slots[hole] = slots.pop()
            while slots and slots[-1] is None:
                slots.pop()
            holes = []
            if self.swap_every and step % self.swap_every == 1 and len(slots) >= 2:
                moved.append((0, len(slots) - 1, MoveDirectionality.SWAP))
                slots[0], slots[-1] = slots[-1], slots[0]
            update = BatchUpdate(len(slots), removed, added, moved) if removed or added or moved else None
            self.updates.append(update)
            self.processor.update_state(update)

            self.batch_positions.append([len(outputs[r]) for r in slots])
            logits = torch.stack([self.model(input_ids=torch.tensor([prompt_ids[r] + outputs[r]])).logits[0, -1]
                                  for r in slots]).float()
            tokens = self.processor.apply(logits).argmax(dim=-1).tolist()  # greedy: temperature 0
            for index, (r, tok) in enumerate(zip(list(slots), tokens)):
                outputs[r].append(tok)
                params = sampling_params[r]
                if tok in params.stop_token_ids or len(outputs[r]) >= params.max_tokens:
                    reasons[r] = "stop" if tok in params.stop_token_ids else "length"
                    slots[index] = None
                    holes.append(index)
            step += 1
        return [SimpleNamespace(prompt_token_ids=prompt_ids[r], outputs=[SimpleNamespace(
            index=0, token_ids=list(outputs[r]), finish_reason=reasons[r], logprobs=None)]) for r in range(n)]
