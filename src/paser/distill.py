"""The trainer of recovery objectives that need the original model (:mod:`paser.objectives`): ``kd`` and ``mix``.

``kd`` is the forward KL from the teacher's next-token distribution to the student's, at response
positions (``positions="all"``: every real position), with temperature T (scaled by T^2, as usual):

    KD = T^2 * mean_t sum_v p_T(v | t) (log p_T(v | t) - log p_S(v | t)),   p = softmax(logits / T)

``mix`` = alpha * KD + (1 - alpha) * NLL. The teacher runs without gradients on the same batch, or is read
from its stored top-k log-probabilities (:mod:`paser.teacher`; the KL over the top-k buckets and the tail,
at response positions and temperature 1). Each term's
per-step mean is logged beside the loss (``nll``, ``kd`` in ``train_log.json``'s loss curve).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .objectives import Objective
from .teacher import TopK, bucketed_kl

IGNORE_INDEX = -100


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, positions: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over the selected positions of KL(teacher || student), times T^2."""
    s = student_logits[positions].float() / temperature
    t = teacher_logits[positions].float() / temperature
    log_t = t.log_softmax(-1)
    kl = (log_t.exp() * (log_t - s.log_softmax(-1))).sum(-1)
    return kl.mean() * temperature ** 2


def trainer_class(objective: Objective) -> type:
    """The Trainer for an objective: the stock one when it needs no teacher (its loss is the NLL),
    :class:`DistillTrainer` otherwise, which computes the terms and asks the objective for the loss."""
    from transformers import Trainer

    if not objective.needs_teacher:
        return Trainer

    class DistillTrainer(Trainer):
        def __init__(self, *args: Any, teacher: Any, objective: Objective, settings: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.teacher, self.objective, self.settings = teacher, objective, settings
            self.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean: let the Trainer average
            self._terms: dict[str, list[float]] = {"nll": [], "kd": []}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
            outputs = model(input_ids=ids, attention_mask=mask)
            logits = outputs.logits[:, :-1]
            targets = labels[:, 1:]
            response = targets != IGNORE_INDEX
            token_nll = torch.nn.functional.cross_entropy(logits[response].float(), targets[response], reduction="none")
            nll = token_nll.mean()
            if isinstance(self.teacher, TopK):  # the stored teacher: its rows are each record's response positions
                offsets = self.teacher.offsets
                rows = np.concatenate([np.arange(offsets[r], offsets[r + 1]) for r in inputs["record"].tolist()])
                device = logits.device
                kd = bucketed_kl(torch.from_numpy(self.teacher.logprobs[rows]).to(device),
                                 torch.from_numpy(self.teacher.ids[rows]).to(device),
                                 torch.from_numpy(self.teacher.log_tail[rows]).to(device), logits[response]).mean()
                teacher_token_nll = -torch.from_numpy(self.teacher.target_logprobs[rows]).to(device)
            else:
                positions = response if self.settings.kd_positions == "response" else mask[:, 1:].bool()
                with torch.no_grad():
                    teacher_logits = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
                kd = kd_loss(logits, teacher_logits, positions, self.settings.kd_temperature)
                teacher_token_nll = torch.nn.functional.cross_entropy(teacher_logits[response].float(),
                                                                      targets[response], reduction="none")
            # per response token (batch order), for objectives that weigh tokens (e.g. rho)
            terms = {"nll": nll, "kd": kd, "token_nll": token_nll, "teacher_token_nll": teacher_token_nll}
            loss = self.objective.loss(terms, self.settings)
            self._terms["nll"].append(nll.item())
            self._terms["kd"].append(kd.item())
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
            if "loss" in logs and self._terms["kd"]:
                for name, values in self._terms.items():
                    logs[name] = round(sum(values) / len(values), 4)
                    values.clear()
            super().log(logs, *args, **kwargs)

    return DistillTrainer
