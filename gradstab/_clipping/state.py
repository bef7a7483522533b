"""What a clipper carries from step to step (:class:`ClipState`): counters on the device, the
adaptive thresholds' copies, their checkpointed state.

Example:
    >>> from gradstab._clipping.state import ClipState
    >>> ClipState().counters()["steps"]
    0
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradstab.adaptive import AdaptiveThreshold

if TYPE_CHECKING:
    pass
from gradstab._clipping.config import COUNTERS, ClipConfig

# ------------------------------------------------------------------------------ state


@dataclass
class ClipState:
    """Counters of one optimizer: Python ints plus a small device tensor of pending counts.

    ``pending`` (int64 ``[3]``: steps clipped, steps with non-finite gradients, of those the
    steps a GradScaler skips) accumulates on the gradients' device between host reads;
    :meth:`flush` folds it into the Python counters with one read.  ``thresholds`` holds the
    optimizer's own copies of the adaptive thresholds, by unit key.
    """

    steps: int = 0
    clipped_steps: int = 0
    nonfinite_steps: int = 0
    skipped_steps: int = 0
    window_steps: int = 0
    window_clipped: int = 0
    #: Steps the non-finite policy skipped or zeroed, as far as the host knows: counted at the
    #: step for ``"skip"`` (and ``"zero"`` on the CPU), at the next host read of the counters
    #: for ``"zero"`` elsewhere (no read is added for it). Not part of checkpoints.
    policy_steps: int = 0
    #: ``policy_steps`` at the last warning (see :func:`gradstab._clipping.nonfinite_notice`).
    warned_policy_steps: int = 0
    #: ``"zero"`` off the CPU: the steps it zeroed are counted when the counters are read.
    zeroed_on_device: bool = False
    #: ``"skip"`` folded into a fused optimizer (``found_inf``): the steps it skipped are
    #: counted (``pending[2]``) and known on the host when the counters are read.
    skipped_on_device: bool = False
    pending: Tensor | None = field(default=None, repr=False)
    head: Tensor | None = field(default=None, repr=False)  # pending[:2], made once
    last_metrics: dict[str, float] = field(default_factory=dict, repr=False)
    thresholds: dict[str, AdaptiveThreshold] = field(default_factory=dict, repr=False)

    def _fold(self, vals: Sequence[float]) -> None:
        clipped, nonfinite, skipped = (round(v) for v in vals)
        self.clipped_steps += clipped
        self.window_clipped += clipped
        self.nonfinite_steps += nonfinite
        self.skipped_steps += skipped
        if self.zeroed_on_device:  # every non-finite step the GradScaler did not skip
            self.policy_steps += nonfinite - skipped
        elif self.skipped_on_device:  # the steps found_inf skipped
            self.policy_steps += skipped
        if self.pending is not None:
            self.pending.zero_()

    def flush(self) -> None:
        """Fold the device counters into the Python ones (one host read)."""
        if self.pending is not None:
            self._fold(self.pending.tolist())

    def counters(self) -> dict[str, int]:
        """``steps``, ``clipped_steps``, ``nonfinite_steps``, ``skipped_steps`` (flushes first)."""
        self.flush()
        return {k: getattr(self, k) for k in COUNTERS}

    def threshold(self, cfg: ClipConfig, key: str) -> AdaptiveThreshold:
        """The optimizer's copy of the adaptive threshold of unit ``key`` (made on first use)."""
        thr = self.thresholds.get(key)
        if thr is None:
            thr = self.thresholds[key] = copy.deepcopy(cfg.adaptive()[key])
        return thr

    def state_dict(self) -> dict[str, Any]:
        """The counters and the running logging window as Python ints, plus ``"thresholds"``
        (each adaptive threshold's ``state_dict()``, device tensors) when there are any."""
        self.flush()
        out: dict[str, Any] = {
            k: int(getattr(self, k)) for k in (*COUNTERS, "window_steps", "window_clipped")
        }
        if self.thresholds:
            out["thresholds"] = {k: t.state_dict() for k, t in sorted(self.thresholds.items())}
        return out

    def load_state_dict(self, state: Mapping[str, Any], cfg: ClipConfig | None = None) -> None:
        """Restore :meth:`state_dict`; missing keys are 0.

        Args:
            state: from :meth:`state_dict`.
            cfg: the options; needed to restore saved adaptive thresholds (each is a copy of
                the configured prototype loaded with the saved state, which must match its
                configuration: ``ValueError`` otherwise).
        """
        for k in (*COUNTERS, "window_steps", "window_clipped"):
            setattr(self, k, int(state.get(k, 0)))
        self.pending = self.head = None
        self.thresholds = {}
        saved = state.get("thresholds") or {}
        if saved:
            protos = cfg.adaptive() if cfg is not None else {}
            for key, sd in saved.items():
                if key not in protos:
                    raise ValueError(
                        f"gradstab: the checkpoint holds the state of an adaptive threshold for "
                        f"{key!r}, but the configured max_norm has none there "
                        f"(adaptive thresholds configured: {sorted(protos) or 'none'})"
                    )
                thr = copy.deepcopy(protos[key])
                thr.load_state_dict(sd)
                self.thresholds[key] = thr

    def add(self, clipped: Tensor, nonfinite: Tensor, scaler_skips: bool) -> None:
        """Count one step on the device: 0-d bools, on the device of the statistics."""
        if self.pending is None or self.pending.device != clipped.device:
            self.flush()
            self.pending = torch.zeros(3, dtype=torch.int64, device=clipped.device)
            self.head = self.pending[:2]
        if scaler_skips:
            self.pending.add_(torch.stack((clipped, nonfinite, nonfinite)))
        else:
            self.head.add_(torch.stack((clipped, nonfinite)))  # type: ignore[union-attr]

    def count(self, clipped: bool, nonfinite: bool, scaler_skips: bool) -> None:
        """Count one step on the host (where reading its flags was free): ``clipped`` on a
        finite step, ``nonfinite`` gradients, skipped by a GradScaler (``scaler_skips``)."""
        c = int(clipped and not nonfinite)
        self.clipped_steps += c
        self.window_clipped += c
        if nonfinite:
            self.nonfinite_steps += 1
            if scaler_skips:
                self.skipped_steps += 1

    def __getstate__(self) -> dict[str, Any]:
        self.flush()
        return {**self.__dict__, "pending": None, "head": None}
