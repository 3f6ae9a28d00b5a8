"""The serving path as a black-box attacker meets it: a query oracle for score-based (Square) and
decision-based (HopSkipJump) attacks.

An ``Oracle`` wraps anything with ``predict(x, seed) -> Prediction`` (the in-process
``DefendedClassifier`` or a ``RemoteClassifier`` over gRPC) and answers what the endpoint
answers: the served label (-1 where the detector rejected the image, or a smoothed pipeline
abstained), the probabilities and the detector's flag. It never exposes gradients.

* Every call is a fresh draw of a random pipeline: call k is seeded from (``seed``, k), so the
  attack never sees the same noise twice (as an outside attacker who cannot pin the seed) while an
  audit stays reproducible.
* Queries are counted per image (``queries[i]``: images the attack sent on behalf of sample i).
* A flagged answer is a failure when ``flagged_is_failure``: ``adversarial`` is "misclassified,
  not rejected and not flagged", and ``margin`` adds ``FLAG_PENALTY`` where flagged, so a
  score-based search never prefers a flagged point to an unflagged one.
* ``chunk`` images go out per ``predict`` call (a ``RemoteClassifier`` splits further by its
  server's batch size): many images' queries travel together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from advshield.core.errors import InputError

FLAG_PENALTY = 1e3  # added to the margin loss of a flagged answer (log-probability margins are far smaller)
SEED_SPACE = 2**62  # seeds handed to the serving path lie in [0, SEED_SPACE)


@dataclass(frozen=True)
class Answer:
    """The endpoint's answer to one batch of queries."""

    labels: torch.Tensor  # int64 [N]: the served label (-1: rejected or abstained)
    probs: torch.Tensor  # float32 [N, K]
    flagged: torch.Tensor  # bool [N] (all False without a detector)


class Oracle:
    """Query access to ``scorer`` for the ``n`` samples of one attack call (see the module docstring)."""

    def __init__(self, scorer: Any, n: int, *, seed: int = 0, flagged_is_failure: bool = True,
                 chunk: int = 1024) -> None:
        if n < 1:
            raise InputError(f"oracle: need at least one sample, got {n}")
        if chunk < 1:
            raise InputError(f"oracle: chunk must be >= 1, got {chunk}")
        self.scorer = scorer
        self.seed = int(seed)
        self.flagged_is_failure = flagged_is_failure
        self.chunk = int(chunk)
        self.queries = np.zeros(n, np.int64)
        self.calls = 0

    @property
    def random(self) -> bool:
        return bool(getattr(self.scorer, "random", False))

    def _next_seed(self) -> int:
        state = np.random.SeedSequence((self.seed, self.calls)).generate_state(2, np.uint32)
        self.calls += 1
        return int((int(state[0]) << 32 | int(state[1])) % SEED_SPACE)

    def __call__(self, x: torch.Tensor, rows: np.ndarray | torch.Tensor | list[int]) -> Answer:
        """Score ``x`` [M, C, H, W]; ``rows[m]`` is the sample that query m is for (repeats allowed)."""
        rows = np.asarray(torch.as_tensor(rows).cpu(), np.int64).reshape(-1)
        if len(rows) != len(x):
            raise InputError(f"oracle: {len(x)} queries but {len(rows)} sample indices")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.queries)):
            raise InputError(f"oracle: sample index out of range [0, {len(self.queries)})")
        np.add.at(self.queries, rows, 1)
        x = x.detach().clamp(0.0, 1.0)
        labels, probs, flagged = [], [], []
        for i in range(0, len(x), self.chunk):
            pred = self.scorer.predict(x[i : i + self.chunk], seed=self._next_seed())
            labels.append(np.asarray(pred.labels, np.int64).reshape(-1))
            probs.append(np.asarray(pred.probs, np.float32))
            f = pred.flagged
            flagged.append(np.zeros(len(labels[-1]), bool) if f is None else np.asarray(f, bool).reshape(-1))
        dev = x.device
        return Answer(torch.from_numpy(np.concatenate(labels)).to(dev),
                      torch.from_numpy(np.concatenate(probs)).to(dev),
                      torch.from_numpy(np.concatenate(flagged)).to(dev))

    def failed_by_flag(self, ans: Answer) -> torch.Tensor:
        return ans.flagged if self.flagged_is_failure else torch.zeros_like(ans.flagged)

    def adversarial(self, ans: Answer, labels: torch.Tensor) -> torch.Tensor:
        """Per query: misclassified, not rejected or abstained, and (``flagged_is_failure``) not flagged."""
        return (ans.labels != labels) & (ans.labels >= 0) & ~self.failed_by_flag(ans)

    def margin(self, ans: Answer, labels: torch.Tensor) -> torch.Tensor:
        """Per query, the loss a score-based attack minimises: log p_label - max_{k != label} log p_k
        (the logit margin up to the softmax's constant; below 0: misclassified), plus
        ``FLAG_PENALTY`` where a flag makes the answer a failure."""
        logp = torch.log(ans.probs.clamp_min(torch.finfo(torch.float32).tiny))
        own = logp.gather(1, labels.view(-1, 1)).squeeze(1)
        other = logp.scatter(1, labels.view(-1, 1), float("-inf")).amax(1)
        m = own - other
        return torch.where(self.failed_by_flag(ans), m.clamp_min(0.0) + FLAG_PENALTY, m)
