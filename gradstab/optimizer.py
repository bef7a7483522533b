"""``GradStabOptimizer``: fused clipping, monitoring and non-finite handling around any optimizer.

Example:
    >>> import torch, gradstab
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = gradstab.GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    >>> model(torch.randn(8, 4)).pow(2).sum().backward()
    >>> opt.step()
    >>> opt.zero_grad()
"""

from __future__ import annotations

import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch

from gradstab import _clipping
from gradstab._clipping import fold as _fold
from gradstab.adaptive import AdaptiveThreshold
from gradstab.agc_units import UnitDim
from gradstab.diagnosis import Diagnosis, GradHistory, diagnose

__all__ = ["GradStabOptimizer"]

_OWNER = "GradStabOptimizer"
#: ``log_every_n_steps`` when a ``log_fn`` is given without one (Lightning's Trainer default).
DEFAULT_LOG_EVERY = 50


def _outside_stacklevel() -> int:
    """The ``stacklevel`` for a warning issued by the caller that points at the first frame
    outside gradstab, torch and Lightning (the training loop that called ``step()``)."""
    inside = ("gradstab", "torch", "lightning", "lightning_fabric", "pytorch_lightning")
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in (
        inside
    ):
        frame, level = frame.f_back, level + 1
    return level


class GradStabOptimizer(torch.optim.Optimizer):
    """Wrap a ``torch.optim`` optimizer so that every ``step()`` clips the gradients first.

    ``step()`` clips the wrapped optimizer's gradients with one fused op call (one read of
    each gradient; only clipped gradients are written), applies the non-finite policy, then
    calls the wrapped ``step()``. In mode ``"norm"`` around a torch fused optimizer (``Adam``,
    ``AdamW``, ``SGD``, ``Adagrad`` with ``fused=True``) the clip is *folded* into that step:
    the gradients are read once, nothing is written before the step, the coefficient goes into
    the optimizer's ``grad_scale`` and a ``"skip"`` into its ``found_inf`` (no host read); the
    fused step writes the clipped gradients back into ``.grad`` (see ``fold``). Everything
    else forwards to the wrapped optimizer; its state dict gains a ``"gradstab"`` entry
    (counters, adaptive thresholds). It is an ``Optimizer``
    subclass, so LR schedulers, ``torch.amp.GradScaler`` (``scaler.step(opt)`` unscales first
    and skips non-finite steps) and Lightning's ``configure_optimizers`` accept it. The options
    are those of :class:`~gradstab.GradStabCallback`; the guide, docs/lightning.md, explains
    modes, metrics, policies, AMP, thresholds and sharded training.

    Args:
        optimizer: the ``torch.optim.Optimizer`` to wrap (not ``LBFGS``, whose step re-evaluates
            the closure).
        mode: ``"norm"`` (global norm, like ``clip_grad_norm_``), ``"layer"`` (each tensor, or
            each module with ``group_by="module"``, by its own norm), ``"value"`` (clamp),
            ``"agc"`` (unit-wise adaptive gradient clipping), ``"normalize"`` (every gradient
            to norm ``target_norm``) or ``None`` (monitor only).
        max_norm: threshold for ``"norm"``/``"layer"``: a positive number, an adaptive
            threshold (:class:`~gradstab.ZScoreThreshold`,
            :class:`~gradstab.PercentileThreshold`; a prototype copied per param group), or a
            dict ``{param_group_index: number or threshold}`` to clip each listed group on
            its own (unlisted groups are monitored only).
        clip_value: threshold for ``"value"``: a positive number or such a dict.
        target_norm: the norm of every gradient in ``"normalize"`` (default 1.0).
        clip_factor: lambda of ``"agc"`` (default 0.01).
        agc_eps: floor of the weight norm in ``"agc"`` (default 1e-3).
        agc_exclude: parameters ``"agc"`` monitors without clipping: name prefix(es) (names
            from ``module``) or a callable ``(name, param) -> bool``.
        agc_unit_dim: the unit axis of ``"agc"``: ``"auto"`` (default: read from the layers
            of ``module`` by :func:`gradstab.agc_unit_dims`, e.g. dim 1 for ``ConvTranspose``
            and Hugging Face ``Conv1D`` weights; dim 0 everywhere without ``module``), an int,
            a mapping ``{parameter: dim}`` or a callable ``parameter -> dim``.
        norm_type: p of the p-norm (positive, ``inf`` or ``"inf"``).
        group_by: ``"param"`` or ``"module"`` (``"layer"``/``"normalize"``; needs ``module``).
        nonfinite: ``"ignore"``, ``"zero"``, ``"skip"`` or ``"raise"``. Skipped and zeroed
            steps are warned about (``warnings.warn`` on rank 0, at the 1st, 10th, 100th, ...
            such step).
        module: the model, to name parameters in errors and metrics and to group them by
            module; without it parameters are named ``param_groups.<g>.<i>``.  With
            ``history``, its modules are evidence for the prescriptions of :meth:`diagnose`
            (without it they say which evidence is missing).
        log_every_n_steps: every this many steps build :attr:`last_metrics` (one host read)
            and pass it to ``log_fn``; 0 never does. ``None`` (the default): every 50 steps
            when ``log_fn`` is given (Lightning's default period), else never (no host read).
            0 with a ``log_fn`` warns that ``log_fn`` is never called.
        log_fn: called as ``log_fn(metrics, step)`` on logging steps, ``step`` counting the
            optimizer steps so far (this one included), e.g. a TensorBoard
            ``SummaryWriter``'s ``add_scalar`` in a loop over ``metrics``.
        log_per_layer: include per-tensor norms and max-abs in the metrics.
        log_prefix: prefix of gradstab's own metric names.
        history: keep a gradient history of this many steps (0: off).
        history_extras: the history also records zero fractions and parameter norms.
        process_group: the group plain gradients are sharded over (ZeRO-style flat shards:
            each rank a disjoint part of the same tensors, in the same order), ``"world"``
            (the default group), or ``None``.  FSDP2 ``DTensor`` gradients need none.
        fold: fold the clip into the wrapped optimizer's own pass. ``None`` (the default):
            wherever possible, i.e. mode ``"norm"`` with one threshold (a number or an adaptive
            threshold, not a ``{group: threshold}`` dict), unsharded gradients, and a torch
            fused optimizer (``fused=True`` in every param group). ``True``: the same, and
            anything else is an error. ``False``: always the explicit clip. A folded step
            sets ``grad_scale = 1 / coefficient`` on the wrapped optimizer (``found_inf`` for
            ``"skip"``) and removes both after its ``step()`` (on the CPU, where reading the
            coefficient costs no sync, a step that neither clips nor skips sets neither: the
            fused step would rewrite every gradient, divided by 1); after the step ``.grad`` holds
            the clipped gradients, as with the explicit clip, up to float rounding (a division
            by ``1 / c`` instead of a multiplication by ``c``). Metrics, counters, thresholds
            and history are the same; a ``"skip"`` reads nothing on the host, so its warning
            comes when the counters are next read (a logging step, :meth:`counters`).

    Raises:
        TypeError, ValueError: a bad option, naming it and its value (a ``{group:
            threshold}`` dict naming a group the optimizer lacks: at the first step;
            ``fold=True`` with sharded parameters or a param group added without
            ``fused=True``: at the step).
        RuntimeError: with ``nonfinite="raise"``, at a step whose gradients hold a NaN/Inf
            (before any gradient is changed), naming the first offending parameter.

    Example:
        >>> import torch, gradstab
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> opt = gradstab.GradStabOptimizer(
        ...     torch.optim.AdamW(model.parameters(), lr=1e-3), max_norm=1.0,
        ...     nonfinite="skip", module=model, log_every_n_steps=10)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     model(torch.randn(16, 4)).pow(2).mean().backward()
        ...     opt.step()
        ...     sched.step()
        >>> sorted(opt.last_metrics)[:2]
        ['grad/clip_coef', 'grad/clip_rate']
        >>> opt.counters()["steps"]
        10
    """

    # The scaler must unscale before step(): clipping needs unscaled gradients.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        mode: str | None = "norm",
        max_norm: Union[
            float, AdaptiveThreshold, Mapping[int, Union[float, AdaptiveThreshold]], None
        ] = None,
        clip_value: Union[float, Mapping[int, float]] | None = None,
        target_norm: Union[float, Mapping[int, float]] | None = None,
        clip_factor: Union[float, Mapping[int, float]] | None = None,
        agc_eps: float | None = None,
        agc_exclude: Union[str, Sequence[str], Callable[[str, torch.Tensor], bool], None] = None,
        agc_unit_dim: Union[str, UnitDim] = "auto",
        norm_type: Union[float, str] = 2.0,
        group_by: str = "param",
        nonfinite: str = "ignore",
        module: torch.nn.Module | None = None,
        log_every_n_steps: int | None = None,
        log_fn: Callable[[dict[str, float], int], None] | None = None,
        log_per_layer: bool = False,
        log_prefix: str = "grad",
        history: int = 0,
        history_extras: bool = False,
        process_group: Any = None,
        fold: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{_OWNER}: optimizer must be a torch.optim.Optimizer; got {optimizer!r} "
                f"of type {type(optimizer).__name__}"
            )
        if isinstance(optimizer, GradStabOptimizer):
            raise TypeError(
                f"{_OWNER}: optimizer is already a GradStabOptimizer; wrapping it again would "
                "clip twice"
            )
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                f"{_OWNER}: optimizer={type(optimizer).__name__} re-evaluates the closure inside "
                "step(), so its gradients cannot be clipped once beforehand; use another optimizer"
            )
        self._config = _clipping.make_config(
            _OWNER,
            mode=mode,
            max_norm=max_norm,
            clip_value=clip_value,
            target_norm=target_norm,
            clip_factor=clip_factor,
            agc_eps=agc_eps,
            agc_exclude=agc_exclude,
            agc_unit_dim=agc_unit_dim if mode == "agc" or agc_unit_dim != "auto" else None,
            norm_type=norm_type,
            group_by=group_by,
            nonfinite=nonfinite,
            log_per_layer=log_per_layer,
            log_prefix=log_prefix,
            history=history,
            history_extras=history_extras,
            process_group=process_group,
        )
        _fold.check_fold(_OWNER, fold)
        _fold.resolve(
            _OWNER,
            fold,
            _fold.config_obstacle(self._config) or _fold.optimizer_obstacle(optimizer),
        )
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"{_OWNER}: module must be a torch.nn.Module or None; got {module!r}")
        if group_by == "module" and module is None:
            raise ValueError(
                f"{_OWNER}: group_by='module' needs module= (the model whose modules group the "
                "parameters); got module=None"
            )
        every = _clipping.check_log_every(_OWNER, log_every_n_steps)
        if log_fn is not None and not callable(log_fn):
            raise TypeError(f"{_OWNER}: log_fn must be callable or None; got {log_fn!r}")
        if every is None:
            every = DEFAULT_LOG_EVERY if log_fn is not None else 0
        elif every == 0 and log_fn is not None:
            warnings.warn(
                f"{_OWNER}: log_fn={log_fn!r} is never called with log_every_n_steps=0; pass "
                f"log_every_n_steps=N to call it every N steps (or leave it out: every "
                f"{DEFAULT_LOG_EVERY} steps with a log_fn)",
                UserWarning,
                stacklevel=2,
            )
        self._wrapped = optimizer
        self._fold = fold
        self._log_every = every
        self._log_fn = log_fn
        self._module = module
        self._clip_state = _clipping.ClipState()
        self._plan: _clipping.Plan | None = None
        self._history: GradHistory | None = None
        self._history_made = False
        # What Optimizer.__init__ sets up for hooks, without re-registering the parameters.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

    # ------------------------------------------------------------------ forwarding

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._wrapped

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The wrapped optimizer's ``param_groups`` (the same list)."""
        return self._wrapped.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._wrapped.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        """The wrapped optimizer's ``state``."""
        return self._wrapped.state

    @state.setter
    def state(self, value: Any) -> None:
        self._wrapped.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's ``defaults``."""
        return self._wrapped.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._wrapped.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forwarded to the wrapped optimizer."""
        self._wrapped.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Forwarded to the wrapped optimizer; the new group is clipped from the next step."""
        self._wrapped.add_param_group(param_group)
        self._plan = None

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus ``"gradstab"``: the counters (Python ints)."""
        sd = self._wrapped.state_dict()
        sd["gradstab"] = self._clip_state.state_dict()
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a :meth:`state_dict`, or a plain state dict of the wrapped optimizer's type."""
        sd = dict(state_dict)
        ours = sd.pop("gradstab", None) or {}
        st = _clipping.ClipState(last_metrics=self._clip_state.last_metrics)
        st.load_state_dict(ours, self._config)  # checked before anything is changed
        self._wrapped.load_state_dict(sd)
        self._clip_state = st
        self._plan = None

    def __repr__(self) -> str:
        cfg = self._config
        bound = f"{cfg.threshold_name or 'max_norm'}={cfg.threshold}"
        inner = repr(self._wrapped).replace("\n", "\n    ")
        return (
            f"{_OWNER}(mode={cfg.mode!r}, {bound}, norm_type={cfg.norm_type}, "
            f"group_by={cfg.group_by!r}, nonfinite={cfg.nonfinite!r},\n    {inner})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # "step" is the per-instance wrapper an LR scheduler installs (not picklable); like
        # torch.optim.Optimizer, the pickle holds the optimizer, not its schedulers' patches.
        d = {k: v for k, v in self.__dict__.items() if k not in ("step", "_opt_called")}
        d["_plan"] = None
        d["_history"], d["_history_made"] = None, False  # holds the parameters by reference
        return d

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    # ------------------------------------------------------------------ gradstab

    @property
    def last_metrics(self) -> dict[str, float]:
        """The metrics of the last logging step (empty before the first)."""
        return self._clip_state.last_metrics

    def counters(self) -> dict[str, int]:
        """``steps``, ``clipped_steps``, ``nonfinite_steps`` and ``skipped_steps`` so far.

        Reads the device counters on the host (one transfer).
        """
        return self._clip_state.counters()

    @property
    def history(self) -> GradHistory | None:
        """The gradient history (``history > 0``; made at the first step; with
        ``torch.distributed`` initialized, on rank 0 only), else ``None``."""
        return self._history

    def diagnose(self, **kwargs: Any) -> Diagnosis:
        """Diagnose the gradient history now (copies it to the host once).

        Args:
            **kwargs: thresholds of :func:`gradstab.diagnose` (``window``, ...).

        Returns:
            The :class:`~gradstab.Diagnosis`.

        Raises:
            RuntimeError: no history (``history=0``, not rank 0, or before the first step).

        Example:
            >>> print(opt.diagnose())  # doctest: +SKIP
        """
        if self._history is None:
            why = (
                "construct the optimizer with history=<number of steps to keep>"
                if not self._config.history
                else "it is made at the first step, on rank 0 only"
            )
            raise RuntimeError(f"{_OWNER}.diagnose: there is no gradient history ({why})")
        return diagnose(self._history, **kwargs)

    def _make_history(self, plan: _clipping.Plan) -> GradHistory | None:
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return None
        if self._module is not None:
            named = [(n, p) for n, p in self._module.named_parameters() if p.requires_grad]
        else:
            named = [(n, p) for u in plan.units for n, p in zip(u.names, u.params)]
            order = {id(p): i for i, p in enumerate(plan.params)}
            named.sort(key=lambda item: order[id(item[1])])
        c = self._config
        return GradHistory(
            named,
            capacity=c.history,
            norm_type=c.norm_type,
            zero_fraction=c.history_extras,
            param_norms=c.history_extras,
            model=self._module,  # the prescriptions read its modules (None: history only)
        )

    def _current_plan(self) -> _clipping.Plan:
        groups = self._wrapped.param_groups
        plan = self._plan
        if plan is None or plan.key != _clipping.plan_key(groups):
            names: dict[int, str] = {}
            module_of = None
            if self._module is not None:  # keyed by id(): rebuilt, never pickled
                names = {id(p): n for n, p in self._module.named_parameters()}
                module_of = {
                    id(p): id(m)
                    for m in self._module.modules()
                    for p in m.parameters(recurse=False)
                }
            plan = self._plan = _clipping.build_plan(
                self._config, groups, names, module_of, _OWNER, module=self._module
            )
        return plan

    @torch.no_grad()
    def clip(self) -> bool:
        """Clip the current gradients and apply the non-finite policy, without stepping.

        ``step()`` calls this (or folds the clip into the wrapped step, see ``fold``); call it
        yourself only to clip without an optimizer step: it always writes the gradients.

        Returns:
            True if the ``"skip"`` policy wants this step skipped.
        """
        return self._clip(None)

    def _folds(self) -> bool:
        """Whether this step folds the clip into the wrapped optimizer's step."""
        fold = getattr(self, "_fold", None)  # pickles from before the option: automatic
        if fold is False:
            return False
        obstacle = (
            _fold.config_obstacle(self._config)
            or _fold.optimizer_obstacle(self._wrapped)
            or _fold.plan_obstacle(self._current_plan())
        )
        return _fold.resolve(_OWNER, fold, obstacle)

    def _clip(self, fold: _clipping.FoldRequest | None) -> bool:
        st = self._clip_state
        every = self._log_every
        log = every > 0 and (st.steps + 1) % every == 0
        plan = self._current_plan()
        if self._config.history and not self._history_made:
            self._history = self._make_history(plan)
            self._history_made = True
        step, policy_before = st.steps, st.policy_steps
        skip, metrics = _clipping.clip_step(
            self._config,
            st,
            plan,
            log=log,
            step=step,
            history=self._history,
            history_step=step,
            fold=fold,
        )
        if st.policy_steps > st.warned_policy_steps:
            on_device = st.zeroed_on_device or st.skipped_on_device
            self._warn_nonfinite(step, skip or (st.policy_steps > policy_before and not on_device))
        if metrics is not None and self._log_fn is not None:
            self._log_fn(metrics, st.steps)
        return skip

    def _warn_nonfinite(self, step: int, skipped_now: bool) -> None:
        """Warn (rate-limited, on rank 0) about steps the non-finite policy skipped/zeroed."""
        import torch.distributed as dist  # noqa: PLC0415

        notice = _clipping.nonfinite_notice(
            self._config, self._clip_state, _OWNER, step, skipped_now=skipped_now
        )
        if notice is None or (dist.is_available() and dist.is_initialized() and dist.get_rank()):
            return
        warnings.warn(notice, UserWarning, stacklevel=_outside_stacklevel())

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Evaluate ``closure`` (if any), clip, then step the wrapped optimizer.

        Args:
            closure: re-computes the loss and the gradients; evaluated once, before the clip.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._folds():
            if self.clip():
                return loss
            self._wrapped.step()
            return loss
        request = _clipping.FoldRequest(skip_on_device=_fold.skip_on_device_ok(self._wrapped))
        with torch.no_grad():
            skip = self._clip(request)
        if skip:  # decided on the host (fused SGD before its momentum buffers exist)
            return loss
        if request.coef is None:  # nothing to fold (no gradient; on the CPU, no clip and no skip)
            self._wrapped.step()
            return loss
        applied = _fold.apply(self._wrapped, _fold.inverse(request.coef), request.found_inf)
        try:
            self._wrapped.step()
        finally:
            _fold.restore(applied)
        return loss
