""":func:`clip_step`: one optimizer step's clipping, non-finite handling, history and metrics.

Example:
    >>> import torch
    >>> from gradstab import _clipping
    >>> cfg = _clipping.make_config("demo", mode="norm", max_norm=1.0)
    >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
    >>> plan = _clipping.build_plan(cfg, [{"params": [w]}], {id(w): "w"}, None, "demo")
    >>> skip, metrics = _clipping.clip_step(cfg, _clipping.ClipState(), plan, log=True)
    >>> metrics["grad_2.0_norm_total"]
    5.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradstab._library import OPS
from gradstab.adaptive import AdaptiveThreshold

if TYPE_CHECKING:
    from gradstab.diagnosis import GradHistory
from gradstab._clipping import shortcut
from gradstab._clipping.config import ClipConfig
from gradstab._clipping.fold import FoldRequest, fold_unit, nothing_to_fold
from gradstab._clipping.metrics import record_history, step_metrics
from gradstab._clipping.parts import (
    Job,
    Part,
    Stats,
    make_jobs,
    measure,
    needs_two_phase,
    run_unit,
)
from gradstab._clipping.plan import Plan, Unit
from gradstab._clipping.state import ClipState


def _nonfinite_error(counts: Sequence[int], names: Sequence[str], step: int | None) -> RuntimeError:
    first = next(i for i, c in enumerate(counts) if c)
    affected = sum(1 for c in counts if c)
    at = f" at optimizer step {step}" if step is not None else ""
    return RuntimeError(
        f"gradstab: non-finite gradient{at}: parameter {names[first]!r} has {int(counts[first])} "
        f"NaN/Inf value(s) in its gradient ({affected} of {len(counts)} parameters with a "
        "gradient are affected). No gradient was changed and the optimizer step was not taken. "
        "Use nonfinite='skip' to skip such steps or 'zero' to zero their gradients"
    )


def _find_nonfinite(jobs: Sequence[Job], p: float, step: int | None) -> RuntimeError | None:
    """The error naming the first non-finite gradient of ``jobs``, if any (read-only).

    Sharded parts count across ranks, so every rank raises the same error.
    """
    counts: list[int] = []
    names: list[str] = []
    for job in jobs:
        if job.lay is not None:
            counts += measure(job, p, False)[2].tolist()  # host read: "raise" asked for it
            names += job.names
            continue
        for _, gs, ns, *_ in job.per_dev:
            counts += OPS["grad_stats"](gs, p)[2].tolist()  # host read: "raise" asked for it
            names += ns
    return _nonfinite_error(counts, names, step) if any(counts) else None


def _host_read_is_free(parts: Sequence[Part]) -> bool:
    """Whether reading a flag on the host costs no device synchronization (all on the CPU)."""
    for part in parts:
        if isinstance(part.grads, shortcut.LazyGrads):  # one device: that of the statistics
            if part.stats[0].device.type != "cpu":
                return False
        elif any(gs and gs[0].device.type != "cpu" for gs in part.grads):
            return False
    return True


def _run_units(
    cfg: ClipConfig,
    state: ClipState,
    plan: Plan,
    parts: list[Part],
    unit_logs: list[tuple[Unit, list[Part], AdaptiveThreshold | None]],
    *,
    check: bool,
    step: int | None,
    grad_scale: Tensor | None,
    fold: FoldRequest | None,
    with_max_abs: bool,
) -> None:
    """Every unit through the ops (the dispatcher path), into ``parts`` and ``unit_logs``."""
    p = cfg.norm_type
    jobs = make_jobs(cfg, plan)
    # One norm-clipped job in one fused op: its kernel checks the total before writing anything
    # (error_if_nonfinite).  Otherwise a read-only check must come before any gradient changes.
    kernel_checks = (
        check
        and fold is None
        and len(jobs) == 1
        and jobs[0].kind == "norm"
        and jobs[0].lay is None
        and not needs_two_phase("norm", jobs[0].per_dev)
    )
    if check and not kernel_checks and fold is None:
        err = _find_nonfinite(jobs, p, step)
        if err is not None:
            raise err

    def check_stats(stats: Stats, names: list[str]) -> None:  # a folded "raise": one read
        if bool(stats[2].any()):  # host read: "raise" asked for it
            raise _nonfinite_error(stats[2].tolist(), names, step)

    by_unit: dict[int, list[Job]] = {}
    for job in jobs:
        by_unit.setdefault(id(job.unit), []).append(job)
    try:
        for ujobs in by_unit.values():
            if fold is not None:
                uparts, thr = fold_unit(
                    cfg,
                    state,
                    plan,
                    ujobs[0].unit,
                    ujobs,
                    request=fold,
                    grad_scale=grad_scale,
                    with_max_abs=with_max_abs,
                    check=check_stats if check else None,
                )
            else:
                uparts, thr = run_unit(
                    cfg,
                    state,
                    plan,
                    ujobs[0].unit,
                    ujobs,
                    grad_scale=grad_scale,
                    error_if_nonfinite=kernel_checks,
                    with_max_abs=with_max_abs,
                )
            parts += uparts
            unit_logs.append((ujobs[0].unit, uparts, thr))
    except RuntimeError as exc:
        err = _find_nonfinite(jobs, p, step) if kernel_checks else None
        if err is not None:  # the kernel refused before writing: name the parameter
            raise err from exc
        raise  # not about a NaN/Inf (or the norm overflowed): the kernel's own message


def _device_flags(parts: Sequence[Part], state: ClipState, scaler_skips: bool) -> Tensor:
    """The step's non-finite flag (0-d bool on the first part's device), counted with whether
    it clipped on the device (no host read)."""
    dev0 = parts[0].stats[0].device
    if len(parts) == 1:
        flag = parts[0].stats[2].any()
    else:
        flag = torch.stack([part.stats[2].any().to(dev0) for part in parts]).any()
    clipped = None
    for part in parts:
        c = part.clipped()
        if c is not None:
            clipped = c.to(dev0) if clipped is None else clipped | c.to(dev0)
    # clipped on a finite step; for bools a > b is "a and not b", in one op
    clipped = torch.zeros_like(flag) if clipped is None else torch.gt(clipped, flag)
    state.add(clipped, flag, scaler_skips)
    return flag


def clip_step(
    cfg: ClipConfig,
    state: ClipState,
    plan: Plan,
    *,
    log: bool,
    grad_scale: Tensor | None = None,
    scaler_skips: bool = False,
    step: int | None = None,
    history: GradHistory | None = None,
    history_step: int | None = None,
    fold: FoldRequest | None = None,
) -> tuple[bool, dict[str, float] | None]:
    """Clip, count and apply the non-finite policy for one optimizer step.

    Args:
        cfg: the validated options.
        state: the optimizer's counters and adaptive thresholds (updated in place).
        plan: from :func:`build_plan` for the optimizer's current param groups.
        log: build and return the metrics (one host read).  With sharded gradients every
            rank must pass the same ``log`` (the metrics may need collectives).
        grad_scale: the gradients are still multiplied by this 0-d device tensor (a fused
            optimizer under a GradScaler, which unscales inside ``step()``): the thresholds
            are multiplied by it and the statistics divided by it, so the clip is that of the
            unscaled gradients (up to ``eps``) and adaptive thresholds see unscaled norms.
            Not for ``"value"`` and ``"agc"`` modes (unscale first: clamping would turn an
            overflowed scaled gradient into a finite one the scaler cannot see, and AGC
            compares gradients with weights).
        scaler_skips: a GradScaler skips this step if the gradients are non-finite: the
            non-finite policy is left to it, and such steps are counted as skipped.
        step: the step number for error messages.
        history: a :class:`~gradstab.GradHistory` to record this step into (on the device,
            from the statistics the ops returned), or ``None``.
        history_step: the step number of the history's row (steps recorded twice merge).
        fold: fold the clip into a torch fused optimizer's step (:mod:`.fold`; mode
            ``"norm"``, one unit): the gradients are measured, not written;
            ``fold.coef`` receives the coefficient (the caller sets ``grad_scale = 1 / coef``)
            and, with ``"skip"`` and ``fold.skip_on_device``, ``fold.found_inf`` the skip flag
            (no host read; ``skip`` is then False and the step is counted as skipped on the
            device). With ``"zero"`` the coefficient of a non-finite step is 1 (the zeros stay
            zeros); ``"raise"`` checks the statistics of the one read. Where
            :func:`.fold.nothing_to_fold` (on the CPU: coefficient 1, no skip) both stay
            ``None``: the caller runs the optimizer's own step.

    Returns:
        ``(skip, metrics)``: ``skip`` is True when the ``"skip"`` policy wants the optimizer
        step not to happen; ``metrics`` is ``None`` unless ``log``.

    Raises:
        RuntimeError: with ``nonfinite="raise"``, naming the first parameter whose gradient
            holds a NaN/Inf; no gradient has been changed then.
    """
    p = cfg.norm_type
    with_max_abs = cfg.mode == "value" or cfg.history > 0 or (log and cfg.log_per_layer)
    check = cfg.nonfinite == "raise" and not scaler_skips
    parts: list[Part] = []
    unit_logs: list[tuple[Unit, list[Part], AdaptiveThreshold | None]] = []
    fast = None
    if fold is None and grad_scale is None:
        try:
            fast = shortcut.run(plan, p, check=check)
        except RuntimeError as exc:  # the kernel refused a NaN/Inf before writing: name it
            err = _find_nonfinite(make_jobs(cfg, plan), p, step) if check else None
            if err is not None:
                raise err from exc
            raise
    if fast is not None:
        parts.append(fast)
        unit_logs.append((plan.units[0], [fast], None))
    else:
        _run_units(
            cfg,
            state,
            plan,
            parts,
            unit_logs,
            check=check,
            step=step,
            grad_scale=grad_scale,
            fold=fold,
            with_max_abs=with_max_abs,
        )

    state.steps += 1
    state.window_steps += 1
    if not parts:
        return False, (step_metrics(cfg, state, [], [], zeroed=False) if log else None)

    # a folded "skip" on the device: the optimizer skips the step, counted like a scaler's skip
    device_skip = (
        fold is not None and fold.skip_on_device and cfg.nonfinite == "skip" and not scaler_skips
    )
    flag: bool | Tensor
    if fast is not None and _host_read_is_free(parts):
        flag, clipped_now = shortcut.host_flags(fast)
        state.count(clipped_now, flag, scaler_skips)
    else:
        flag = _device_flags(parts, state, scaler_skips or device_skip)
    if fold is not None and fold.coef is not None and cfg.nonfinite == "zero":
        fold.coef = torch.where(flag.to(fold.coef.device), torch.ones_like(fold.coef), fold.coef)

    skip = False
    zeroed: bool | Tensor = False
    if cfg.nonfinite == "zero" and not scaler_skips:
        if not isinstance(flag, Tensor) or _host_read_is_free(parts):
            zeroed = bool(flag)
            if zeroed:
                state.policy_steps += 1
                for part in parts:
                    for gs in part.grads:
                        if gs:
                            torch._foreach_zero_(gs)
        else:  # no host read: a masked fill of every gradient
            for part in parts:
                for gs in part.grads:
                    if not gs:
                        continue
                    f = flag.to(gs[0].device)
                    for g in gs:
                        g.masked_fill_(f, 0)
            zeroed = flag
            state.zeroed_on_device = True  # counted when the counters are next read
    elif device_skip:
        assert fold is not None
        fold.found_inf = flag
        state.skipped_on_device = True  # counted when the counters are next read
        zeroed = flag
    elif cfg.nonfinite == "skip" and not scaler_skips:
        skip = bool(flag)  # one host read per step: the optimizer step happens or not
        if skip:
            state.skipped_steps += 1
            state.policy_steps += 1
    if fold is not None and fold.coef is not None and nothing_to_fold(fold.coef, fold.found_inf):
        fold.coef = fold.found_inf = None  # on the CPU: no clip, no skip, the optimizer's own step
    if history is not None:
        record_history(
            cfg,
            history,
            plan,
            parts,
            unit_logs,
            zeroed=skip or zeroed,
            skipped=flag if scaler_skips or device_skip else skip,
            scale=grad_scale,
            step=history_step,
        )
    if not log:
        return skip, None
    # a step the GradScaler skips is not applied either: logged as zeroed (post 0, coef 0)
    gone = flag if scaler_skips else (skip or zeroed)
    return skip, step_metrics(cfg, state, parts, unit_logs, zeroed=gone)


def _decade(n: int) -> int:
    """``floor(log10(n))`` for ``n >= 1``; -1 for 0."""
    return len(str(n)) - 1 if n > 0 else -1


def nonfinite_notice(
    cfg: ClipConfig, state: ClipState, owner: str, step: int | None, *, skipped_now: bool
) -> str | None:
    """The warning due about steps the non-finite policy skipped or zeroed, or ``None``.

    Rate-limited so that a run of NaN steps does not flood the output: a warning at the 1st,
    10th, 100th, ... such step (when a count read at a logging step jumps past several of
    these, one warning). Reads nothing on the device: it uses what the host already knows
    (``"skip"``: every step; ``"zero"``: every step on the CPU, else at the next host read
    of the counters).

    Args:
        cfg: the options.
        state: the counters (``state.warned_policy_steps`` is updated when a warning is due).
        owner: the class name for the message.
        step: the optimizer step just taken (0-based), for the message.
        skipped_now: this very step was skipped or zeroed (known on the host).

    Returns:
        The message, or ``None`` when no warning is due.

    Example:
        >>> from gradstab import _clipping
        >>> cfg = _clipping.make_config("Demo", max_norm=1.0, nonfinite="skip")
        >>> st = _clipping.ClipState(policy_steps=1)
        >>> print(nonfinite_notice(cfg, st, "Demo", 7, skipped_now=True))  # doctest: +ELLIPSIS
        Demo: optimizer step 7 skipped: its gradients hold NaN/Inf values (nonfinite='skip'); ...
        >>> nonfinite_notice(cfg, st, "Demo", 8, skipped_now=False) is None
        True
    """
    n = state.policy_steps
    if _decade(n) <= _decade(state.warned_policy_steps):
        return None
    state.warned_policy_steps = n
    verb = "skipped" if cfg.nonfinite == "skip" else "zeroed"
    so_far = f"{n} step{'s' if n != 1 else ''} {verb} in this process"
    if skipped_now and cfg.nonfinite == "skip":
        head = f"optimizer step {step} skipped: its gradients hold NaN/Inf values"
    elif skipped_now:
        head = f"optimizer step {step}: its gradients hold NaN/Inf values and were zeroed"
    elif cfg.nonfinite == "skip":  # folded (found_inf): found when the counters were read
        head = (
            "NaN/Inf gradients: the fused optimizer skipped some of the optimizer steps up to "
            f"{step}"
        )
    else:  # "zero" off the CPU: found when the device counters were read
        head = f"NaN/Inf gradients were zeroed at some of the optimizer steps up to {step}"
    return (
        f"{owner}: {head} (nonfinite={cfg.nonfinite!r}); {so_far}. The next warning comes at "
        f"{10 ** (_decade(n) + 1)} such steps; counters() and the logged "
        f"{cfg.log_prefix}/nonfinite_steps, {cfg.log_prefix}/skipped_steps count every one"
    )
