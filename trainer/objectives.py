"""Training objectives of a job, as the batched step needs them: which sequences a micro-batch puts into the
forward (and which of them run through the job's adapter), and, from the log-probabilities of its target
tokens, the loss and its derivative with respect to each target's log-probability.

- SFT: the token cross-entropy summed over the optimizer step's trained targets, divided by their count
  (each job's gradients equal those of training it alone). Its derivatives are known before the forward
  (-1/count for every target), so the batched step applies them as the head's backward goes.
- DPO (Rafailov et al. 2023, TRL's `DPOTrainer` sigmoid loss): per preference pair,
  loss = -log sigmoid(beta * ((log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected))))
  averaged over the optimizer step's pairs, log-probabilities summed over each completion's tokens. The
  reference policy is the frozen base: each pair's two sequences run twice in the same forward, once with the
  job's adapter and once without any (rows no adapter touches are the base model), so no second model
  exists. Its derivatives need the whole pair's sums, so a pair's four sequences stay in one chunk of the
  step, and the head scales each target's gradient once the chunk's sums are known.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .batch import num_targets
from .data import PackedSequence, PreferencePair

DEFAULT_DPO_BETA = 0.1  # TRL's and OpenAI's default


@dataclass(slots=True)
class ChunkLoss:
    """One job's share of one chunk: the loss summed over its units, the derivative of the job's whole step
    loss with respect to each target's log-probability (None: the upfront weights were already applied), and
    metric sums (divided by `count` keys when reported)."""
    loss_sum: float
    coefficients: torch.Tensor | None
    metrics: dict[str, float] = field(default_factory=dict)


class SFT:
    name = "supervised"
    group = 1  # sequences that must share a chunk
    metric_keys = ("correct", "count")  # of its ChunkLoss

    def expand(self, units: list[PackedSequence]) -> tuple[list[PackedSequence], list[bool]]:
        """-> (sequences in forward order, whether each runs with the job's adapter)."""
        return list(units), [True] * len(units)

    def normaliser(self, units: list[PackedSequence]) -> int:
        return max(1, num_targets(units))

    def units(self, units: list[PackedSequence]) -> int:
        """What a reported loss is a mean over."""
        return num_targets(units)

    def upfront_weight(self, norm: int) -> float | None:
        return -1.0 / norm  # d(step loss)/d(log p) of every target

    def chunk_loss(self, logp: torch.Tensor, correct: torch.Tensor, seq: torch.Tensor, num_seqs: int,
                   norm: int) -> ChunkLoss:
        return ChunkLoss(float(-logp.sum()), None, {"correct": float(correct.sum()), "count": float(logp.numel())})

    def report(self, sums: dict[str, float], norm: int) -> dict[str, float]:
        """Step metrics from the summed ChunkLoss metrics of an optimizer step (or an evaluation)."""
        count = sums.get("count", 0.0)
        return {"accuracy": sums.get("correct", 0.0) / count if count else float("nan")}


class DPO:
    name = "dpo"
    group = 4  # chosen and rejected, with the adapter and without
    metric_keys = ("pairs", "reward_accuracy_sum", "margin_sum", "chosen_reward_sum", "rejected_reward_sum")

    def __init__(self, beta: float = DEFAULT_DPO_BETA) -> None:
        if not 0 < beta <= 100:
            raise ValueError(f"beta must be above 0 and at most 100; got {beta}")
        self.beta = float(beta)

    def expand(self, units: list[PreferencePair]) -> tuple[list[PackedSequence], list[bool]]:
        seqs, policy = [], []
        for pair in units:
            seqs += [pair.chosen, pair.rejected, pair.chosen, pair.rejected]
            policy += [True, True, False, False]
        return seqs, policy

    def normaliser(self, units: list[PreferencePair]) -> int:
        return max(1, len(units))

    def units(self, units: list[PreferencePair]) -> int:
        return len(units)

    def upfront_weight(self, norm: int) -> float | None:
        return None

    def chunk_loss(self, logp: torch.Tensor, correct: torch.Tensor, seq: torch.Tensor, num_seqs: int,
                   norm: int) -> ChunkLoss:
        sums = torch.zeros(num_seqs, dtype=torch.float64, device=logp.device).index_add_(0, seq, logp.double())
        present = torch.zeros(num_seqs, dtype=torch.bool, device=logp.device)
        present[seq] = True
        s = sums.view(-1, 4)
        units = present.view(-1, 4).all(dim=1)  # the units of this chunk (a unit never spans chunks)
        logits = (s[:, 0] - s[:, 1]) - (s[:, 2] - s[:, 3])  # float64: the pair's log-ratio difference
        z = self.beta * logits
        loss = -F.logsigmoid(z)
        # d loss_u / d log pi(chosen) = -beta * sigmoid(-z); rejected: +beta * sigmoid(-z); reference: 0
        d = (self.beta * torch.sigmoid(-z) / norm) * units
        per_seq = torch.stack([-d, d, torch.zeros_like(d), torch.zeros_like(d)], dim=1).reshape(-1)
        coefficients = per_seq[seq].to(torch.float32)
        chosen_reward = self.beta * (s[:, 0] - s[:, 2])
        rejected_reward = self.beta * (s[:, 1] - s[:, 3])
        pick = lambda v: float(v[units].sum())  # noqa: E731
        return ChunkLoss(pick(loss), coefficients, {
            "pairs": float(units.sum()), "reward_accuracy_sum": float(((z > 0) & units).sum()),
            "margin_sum": pick(chosen_reward - rejected_reward), "chosen_reward_sum": pick(chosen_reward),
            "rejected_reward_sum": pick(rejected_reward)})

    def report(self, sums: dict[str, float], norm: int) -> dict[str, float]:
        pairs = sums.get("pairs", 0.0)
        if not pairs:
            return {}
        return {"accuracy": sums["reward_accuracy_sum"] / pairs, "margin": sums["margin_sum"] / pairs,
                "chosen_reward": sums["chosen_reward_sum"] / pairs,
                "rejected_reward": sums["rejected_reward_sum"] / pairs}


Objective = Any  # SFT | DPO
