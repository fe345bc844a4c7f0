"""The one trainer of every recovery objective (:mod:`paser.objectives`): it computes the terms an objective
declares, asks the objective for the loss, and logs each term beside it.

``kd`` is the forward KL from the teacher's next-token distribution to the student's, at response positions
(``kd_positions all``: every real position), with temperature T (scaled by T^2, as usual):

    KD = T^2 * mean_t sum_v p_T(v | t) (log p_T(v | t) - log p_S(v | t)),   p = softmax(logits / T)

The teacher runs without gradients on the same batch, or is read from its stored top-k log-probabilities
(:mod:`paser.teacher`; the KL over the top-k buckets and the tail, at response positions and temperature 1).
``features`` is SquareHead's hidden-state loss (:func:`feature_loss`), which needs the live teacher.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Trainer

from ..objectives import Objective
from ..teacher import TopK, bucketed_kl
from .data import IGNORE_INDEX


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, positions: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over the selected positions of KL(teacher || student), times T^2."""
    s = student_logits[positions].float() / temperature
    t = teacher_logits[positions].float() / temperature
    log_t = t.log_softmax(-1)
    kl = (log_t.exp() * (log_t - s.log_softmax(-1))).sum(-1)
    return kl.mean() * temperature ** 2


def feature_loss(student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...],
                 positions: torch.Tensor) -> torch.Tensor:
    """SquareHead: mean over decoder layers of MSE(student, teacher) / Var(teacher) at ``positions`` (each layer's
    output; the embeddings, shared and untouched by pruning, are left out)."""
    losses = []
    for s, t in zip(student_hidden[1:], teacher_hidden[1:]):
        s, t = s[positions].float(), t[positions].float()
        losses.append((s - t).pow(2).mean() / t.var().clamp_min(1e-6))
    return torch.stack(losses).mean()


class RecoveryTrainer(Trainer):
    """The Trainer for every objective. An objective that reads ``nll`` alone trains on the model's own loss,
    token-weighted over the optimizer step (the stock Trainer's); any other gets per-micro-batch means."""

    def __init__(self, *args: Any, objective: Objective, settings: Any, teacher: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.objective, self.settings, self.teacher = objective, settings, teacher
        self.token_weighted = objective.terms == {"nll"}
        self.model_accepts_loss_kwargs = self.token_weighted  # else: let the Trainer average the micro-batches
        self._logged: dict[str, list[float]] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        wants = self.objective.terms
        if self.token_weighted:  # the stock loss, with its scaling for token counts summed across processes
            nll, outputs = super().compute_loss(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                                                return_outputs=True, num_items_in_batch=num_items_in_batch)
            loss = self.objective.loss({"nll": nll}, self.settings)
            return (loss, outputs) if return_outputs else loss
        outputs = model(input_ids=ids, attention_mask=mask, output_hidden_states="features" in wants)
        terms = self._terms(outputs, inputs)
        loss = self.objective.loss({name: terms[name] for name in wants}, self.settings)
        for name, value in terms.items():
            if value.dim() == 0:
                self._logged.setdefault(name, []).append(value.item())
        return (loss, outputs) if return_outputs else loss

    def _terms(self, outputs: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The declared terms of one micro-batch, and only those."""
        wants = self.objective.terms
        logits, targets = outputs.logits[:, :-1], inputs["labels"][:, 1:]
        response = targets != IGNORE_INDEX
        token_nll = torch.nn.functional.cross_entropy(logits[response].float(), targets[response], reduction="none")
        terms = {"nll": token_nll.mean(), "token_nll": token_nll}
        if self.objective.needs_teacher:
            terms.update(self._teacher_terms(outputs, inputs, logits, response))
        # the declared terms, and nll and kd where they were computed (every run logs its two yardsticks)
        return {name: value for name, value in terms.items() if name in wants or name in ("nll", "kd")}

    def _teacher_terms(self, outputs: Any, inputs: dict[str, torch.Tensor], logits: torch.Tensor,
                       response: torch.Tensor) -> dict[str, torch.Tensor]:
        if isinstance(self.teacher, TopK):  # the stored teacher: its rows are each record's response positions
            offsets = self.teacher.offsets
            rows = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in inputs["record"].tolist()])
            stored = [torch.from_numpy(a[rows]).to(logits.device)
                      for a in (self.teacher.logprobs, self.teacher.ids, self.teacher.log_tail)]
            return {"kd": bucketed_kl(*stored, logits[response]).mean(),
                    "teacher_token_nll": -torch.from_numpy(self.teacher.target_logprobs[rows]).to(logits.device)}
        ids, mask, targets = inputs["input_ids"], inputs["attention_mask"], inputs["labels"][:, 1:]
        positions = response if self.settings.kd_positions == "response" else mask[:, 1:].bool()
        with torch.no_grad():
            teacher = self.teacher(input_ids=ids, attention_mask=mask,
                                   output_hidden_states="features" in self.objective.terms)
        teacher_logits = teacher.logits[:, :-1]
        terms = {"kd": kd_loss(logits, teacher_logits, positions, self.settings.kd_temperature),
                 "teacher_token_nll": torch.nn.functional.cross_entropy(teacher_logits[response].float(),
                                                                        targets[response], reduction="none")}
        if "features" in self.objective.terms:
            # the hidden states at the positions KD reads (inputs' positions: shifted like the logits)
            hidden_positions = torch.nn.functional.pad(positions, (0, 1))
            terms["features"] = feature_loss(outputs.hidden_states, teacher.hidden_states, hidden_positions)
        return terms

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and not self.token_weighted:
            for name, values in self._logged.items():
                if values:
                    logs[name] = round(sum(values) / len(values), 4)
                    values.clear()
        super().log(logs, *args, **kwargs)
