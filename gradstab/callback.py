"""``GradStabCallback``: fused gradient clipping and gradient-health monitoring for Lightning.

Needs ``lightning`` (``pip install "gradstab[lightning]"``); the rest of gradstab does not.

Example:
    >>> import lightning.pytorch as pl
    >>> from gradstab import GradStabCallback
    >>> trainer = pl.Trainer(callbacks=[GradStabCallback(max_norm=1.0)])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.amp.grad_scaler import OptState

from gradstab import _clipping
from gradstab._clipping import fold as _fold
from gradstab.adaptive import AdaptiveThreshold
from gradstab.agc_units import UnitDim
from gradstab.diagnosis import Diagnosis, GradHistory, diagnose
from gradstab.diagnosis.plots import plot_history
from gradstab.optimizer import GradStabOptimizer

__all__ = ["GradStabCallback"]

_OWNER = "GradStabCallback"


class GradStabCallback(Callback):
    r"""Clip gradients in one fused pass and log per-layer gradient health (Lightning).

    Works in ``on_before_optimizer_step``, once per optimizer step: after backward (and after
    the last micro-batch with ``accumulate_grad_batches``), after fp16 AMP unscaling, before
    ``optimizer.step()``; only the parameters of the optimizer being stepped are touched. A
    healthy step reads every gradient once and writes only what is clipped; between logging
    steps nothing is read on the host (policies ``"ignore"`` and, off the CPU, ``"zero"``).
    Every ``log_every_n_steps`` optimizer steps it writes the pre/post-clip total norm, the
    clip coefficient and rate, non-finite and skipped step counts, thresholds and, on request,
    per-layer norms to every logger of the trainer. With ``history=N`` it records the last N
    steps' statistics on the device and diagnoses them at the end of ``fit``. In mode
    ``"norm"`` with a torch fused optimizer (``fused=True``) the clip is folded into the
    optimizer's own pass (see ``fold``). The guide,
    docs/lightning.md, explains the modes, the logged keys, the non-finite policies, AMP and
    fused optimizers, adaptive thresholds, sharded training and checkpoints.

    Args:
        mode: ``"norm"``, ``"layer"``, ``"value"``, ``"agc"``, ``"normalize"`` or ``None``
            (monitor only).
        max_norm: threshold of ``"norm"``/``"layer"``: a positive number, an adaptive
            threshold (:class:`~gradstab.ZScoreThreshold`,
            :class:`~gradstab.PercentileThreshold`), or a dict
            ``{param_group_index: number or threshold}``.
        clip_value: threshold of ``"value"``: a positive number or such a dict.
        target_norm: the norm of every gradient in ``"normalize"`` (default 1.0; number or
            dict).
        clip_factor: lambda of ``"agc"`` (default 0.01; number or dict).
        agc_eps: floor of the weight norm in ``"agc"`` (default 1e-3).
        agc_exclude: parameters ``"agc"`` monitors without clipping: a name prefix, a
            sequence of prefixes (e.g. ``"fc."``), or a callable ``(name, param) -> bool``.
        agc_unit_dim: the unit axis of ``"agc"``: ``"auto"`` (default: read from the
            LightningModule's layers by :func:`gradstab.agc_unit_dims`, e.g. dim 1 for
            ``ConvTranspose`` and Hugging Face ``Conv1D`` weights), an int, a mapping
            ``{parameter: dim}`` or a callable ``parameter -> dim``.
        norm_type: p of the p-norm (positive, ``inf`` or ``"inf"``).
        group_by: ``"param"`` or ``"module"`` (for ``"layer"`` and ``"normalize"``).
        nonfinite: ``"ignore"``, ``"zero"``, ``"skip"`` or ``"raise"``. Skipped and zeroed
            steps are warned about (rank 0; at the 1st, 10th, 100th, ... such step), and the
            end of ``fit`` prints the counters in one line.
        log_every_n_steps: logging period in optimizer steps; ``None`` uses the trainer's
            ``log_every_n_steps``; 0 never logs.
        log_per_layer: also log per-parameter norms and max-abs.
        log_prefix: prefix of gradstab's own metric keys.
        history: keep a gradient history of this many optimizer steps (0: off).
        history_extras: the history also records zero fractions and parameter norms.
        diagnose_on_fit_end: log the diagnosis of the history at the end of ``fit``: the
            findings and their prescriptions (cause, remedy, the call; the LightningModule's
            modules are part of their evidence).
        plot_dir: write the history's plots into this folder at the end of ``fit`` (needs
            ``history``; matplotlib).
        process_group: the group plain gradients are sharded over (ZeRO-style), ``"world"``,
            or ``None`` (never with DDP: its gradients are replicated).
        fold: fold the clip into the optimizer's own pass. ``None`` (the default): wherever
            possible, i.e. mode ``"norm"`` with one threshold (not a ``{group: threshold}``
            dict), unsharded gradients and a torch fused optimizer (``Adam``, ``AdamW``,
            ``SGD``, ``Adagrad`` with ``fused=True`` in every param group). ``True``: the
            same, and anything else is an error (options: in the constructor; the optimizer: at
            the start of ``fit``). ``False``: always the explicit clip. The hook then measures
            the gradients (one read, nothing written) and sets ``optimizer.grad_scale = 1 /
            coefficient`` (under fp16 AMP the GradScaler multiplies its scale in, and removes
            it after the step; otherwise a step post-hook does) and, for ``"skip"``,
            ``optimizer.found_inf`` (no host read). On the CPU, where reading the coefficient
            costs no sync, a step that neither clips nor skips sets neither (the fused step
            would rewrite every gradient, divided by 1). Callbacks after this one and the module's
            ``on_before_optimizer_step`` see the gradients unclipped; after the step ``.grad``
            holds the clipped (unscaled) gradients, as with the explicit clip, up to float
            rounding. A skipped step leaves its ``.grad`` in
            place (the explicit path sets it to ``None``). Metrics, counters, thresholds and
            history are the same.

    Raises:
        TypeError, ValueError: a bad option, naming it and its value (a ``{group:
            threshold}`` dict naming a group the optimizer lacks: at the first step).
        MisconfigurationException: a clipping callback (``mode`` not ``None``) next to
            ``Trainer(gradient_clip_val=...)`` (in ``setup()``) or a
            :class:`~gradstab.GradStabOptimizer` (either would clip a second time). A
            monitor-only callback works beside both and sees the gradients before they clip.

    Example:
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from gradstab import GradStabCallback
        >>> cb = GradStabCallback(max_norm=1.0, nonfinite="skip", log_every_n_steps=2)
        >>> trainer = pl.Trainer(max_steps=4, callbacks=[cb], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False)  # doctest: +SKIP
        >>> trainer.fit(BoringModel())  # doctest: +SKIP
        >>> cb.counters()["steps"]  # doctest: +SKIP
        4
    """

    def __init__(
        self,
        *,
        mode: str | None = "norm",
        max_norm: Union[
            float, AdaptiveThreshold, Mapping[int, Union[float, AdaptiveThreshold]], None
        ] = None,
        clip_value: Union[float, Mapping[int, float], None] = None,
        target_norm: Union[float, Mapping[int, float], None] = None,
        clip_factor: Union[float, Mapping[int, float], None] = None,
        agc_eps: float | None = None,
        agc_exclude: Union[str, Sequence[str], Callable[[str, torch.Tensor], bool], None] = None,
        agc_unit_dim: Union[str, UnitDim] = "auto",
        norm_type: Union[float, str] = 2.0,
        group_by: str = "param",
        nonfinite: str = "ignore",
        log_every_n_steps: int | None = None,
        log_per_layer: bool = False,
        log_prefix: str = "grad",
        history: int = 0,
        history_extras: bool = False,
        diagnose_on_fit_end: bool = True,
        plot_dir: Union[str, os.PathLike, None] = None,
        process_group: Any = None,
        fold: bool | None = None,
    ) -> None:
        super().__init__()
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
        self._log_every = _clipping.check_log_every(_OWNER, log_every_n_steps)
        self._fold = _fold.check_fold(_OWNER, fold)
        _fold.resolve(_OWNER, fold, _fold.config_obstacle(self._config))
        if not isinstance(diagnose_on_fit_end, bool):
            raise TypeError(
                f"{_OWNER}: diagnose_on_fit_end must be True or False; got {diagnose_on_fit_end!r}"
            )
        if plot_dir is not None:
            if not isinstance(plot_dir, (str, os.PathLike)) or not os.fspath(plot_dir):
                raise TypeError(
                    f"{_OWNER}: plot_dir must be a folder path (str) or None; got {plot_dir!r}"
                )
            if not history:
                raise ValueError(
                    f"{_OWNER}: plot_dir={plot_dir!r} plots the gradient history, which is off; "
                    "set history=<number of steps to keep> too"
                )
        self._diagnose_on_fit_end = diagnose_on_fit_end
        self._plot_dir = None if plot_dir is None else os.fspath(plot_dir)
        self._states: dict[int, _clipping.ClipState] = {}
        self._plans: dict[int, _clipping.Plan] = {}
        self._names: dict[int, str] | None = None
        self._module_of: dict[int, int] | None = None
        self.last_metrics: dict[str, float] = {}
        #: The gradient history (a :class:`~gradstab.GradHistory` on the gradients' device)
        #: with ``history > 0``, on global rank 0, from the first optimizer step; else None.
        self.history: GradHistory | None = None
        #: The :class:`~gradstab.Diagnosis` made at the end of ``fit`` (``history > 0``,
        #: ``diagnose_on_fit_end=True``, global rank 0); else None.
        self.diagnosis: Diagnosis | None = None

    # ------------------------------------------------------------------ properties

    @property
    def mode(self) -> str | None:
        """The clipping mode."""
        return self._config.mode

    @property
    def max_norm(self) -> Union[float, dict[int, float], None]:
        """The norm threshold(s)."""
        return self._config.max_norm

    @property
    def clip_value(self) -> Union[float, dict[int, float], None]:
        """The value threshold(s)."""
        return self._config.clip_value

    @property
    def target_norm(self) -> Union[float, dict[int, float], None]:
        """The target norm(s) of ``mode="normalize"``."""
        return self._config.target_norm

    @property
    def clip_factor(self) -> Union[float, dict[int, float], None]:
        """The clip factor(s) of ``mode="agc"``."""
        return self._config.clip_factor

    @property
    def norm_type(self) -> float:
        """p of the p-norm."""
        return self._config.norm_type

    @property
    def nonfinite(self) -> str:
        """The non-finite policy."""
        return self._config.nonfinite

    @property
    def state_key(self) -> str:
        """Tells instances with different options apart in a checkpoint."""
        c = self._config
        extra: dict[str, Any] = {}  # options that change the state, only where they are set
        if c.mode in ("agc", "normalize"):
            extra[c.threshold_name] = c.threshold  # type: ignore[index]
        if c.mode == "agc":
            extra["agc_eps"] = c.agc_eps
            ex = c.agc_exclude
            if ex is not None:
                extra["agc_exclude"] = (
                    ex if isinstance(ex, tuple) else f"{ex.__module__}.{ex.__qualname__}"
                )
        return self._generate_state_key(
            mode=c.mode,
            max_norm=c.max_norm,
            clip_value=c.clip_value,
            norm_type=c.norm_type,
            group_by=c.group_by,
            nonfinite=c.nonfinite,
            log_prefix=c.log_prefix,
            **extra,
        )

    def counters(self) -> dict[str, int]:
        """``steps``, ``clipped_steps``, ``nonfinite_steps``, ``skipped_steps``, all optimizers.

        Reads the device counters on the host (one transfer per optimizer).
        """
        out = dict.fromkeys(_clipping.COUNTERS, 0)
        for st in self._states.values():
            for k, v in st.counters().items():
                out[k] += v
        return out

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse ``Trainer(gradient_clip_val=...)`` when this callback clips too (double
        clipping); beside it, a monitor-only callback (``mode=None``) says what it logs.
        Forget cached names."""
        clip_val = trainer.gradient_clip_val
        lightning_clips = clip_val is not None and clip_val != 0
        if lightning_clips and self.mode is None:
            if stage == "fit":
                rank_zero_info(
                    f"{_OWNER}(mode=None) monitors the gradients before Trainer(gradient_clip_val="
                    f"{clip_val!r}, gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}) "
                    "clips them (Lightning clips after the callbacks' on_before_optimizer_step): "
                    "its norms, history and diagnosis are of the pre-clip gradients, and its "
                    f"{self._config.log_prefix}/post_clip_norm_total and "
                    f"{self._config.log_prefix}/clip_coef leave Lightning's clip out"
                )
        elif lightning_clips:
            raise MisconfigurationException(
                f"{_OWNER}(mode={self.mode!r}) clips and monitors the gradients itself, and "
                f"Trainer(gradient_clip_val={clip_val!r}, gradient_clip_algorithm="
                f"{trainer.gradient_clip_algorithm!r}) would clip them a second time. Remove "
                f"gradient_clip_val from the Trainer (use {_OWNER}(mode='norm', max_norm=...) "
                f"or {_OWNER}(mode='value', clip_value=...) instead), or make the {_OWNER} "
                "monitor only (mode=None), or remove it"
            )
        self._names = None
        self._module_of = None
        self._plans = {}
        if stage == "fit":
            self.history = None  # a new history for each fit, made at its first step
            self.diagnosis = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse a :class:`~gradstab.GradStabOptimizer` (it clips inside its own step) when
        this callback clips too; with ``fold=True``, an optimizer the clip cannot fold into."""
        if self.mode is None:  # monitoring: the wrapper clips later, inside its step()
            return
        for i, opt in enumerate(trainer.optimizers):
            if isinstance(opt, GradStabOptimizer):
                raise MisconfigurationException(
                    f"{_OWNER} and the GradStabOptimizer returned by configure_optimizers "
                    f"(optimizer {i}) would both clip the same gradients: in Lightning use the "
                    f"callback and return the plain optimizer (GradStabOptimizer.optimizer)"
                )
            if getattr(self, "_fold", None):
                obstacle = _fold.optimizer_obstacle(opt)
                _fold.resolve(_OWNER, True, obstacle and f"optimizer {i}: {obstacle}")

    def _folds(self, optimizer: torch.optim.Optimizer, plan: _clipping.Plan) -> bool:
        """Whether this step folds the clip into ``optimizer``'s step."""
        fold = getattr(self, "_fold", None)  # pickles from before the option: automatic
        if fold is False:
            return False
        obstacle = (
            _fold.config_obstacle(self._config)
            or _fold.optimizer_obstacle(optimizer)
            or _fold.plan_obstacle(plan)
        )
        return _fold.resolve(_OWNER, fold, obstacle)

    def _plan_for(
        self, idx: int, optimizer: torch.optim.Optimizer, pl_module: pl.LightningModule
    ) -> _clipping.Plan:
        groups = optimizer.param_groups
        plan = self._plans.get(idx)
        if plan is None or plan.key != _clipping.plan_key(groups):
            if self._names is None or self._module_of is None:
                self._names = {id(p): n for n, p in pl_module.named_parameters()}
                self._module_of = {
                    id(p): id(m) for m in pl_module.modules() for p in m.parameters(recurse=False)
                }
            plan = self._plans[idx] = _clipping.build_plan(
                self._config, groups, self._names, self._module_of, _OWNER, module=pl_module
            )
        return plan

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Clip the gradients of ``optimizer``'s parameters, count, apply the policy, log."""
        idx = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
        state = self._states.get(idx)
        if state is None:
            state = self._states[idx] = _clipping.ClipState()
        plan = self._plan_for(idx, optimizer, pl_module)

        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scaler_on = isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
        grad_scale = None
        if scaler_on and getattr(optimizer, "_step_supports_amp_scaling", False):
            # A fused optimizer: Lightning left the gradients scaled; step() unscales them.
            if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
                if self._config.mode in ("value", "agc") or scaler._scale is None:
                    scaler.unscale_(optimizer)
                else:
                    grad_scale = scaler._scale

        every = trainer.log_every_n_steps if self._log_every is None else self._log_every
        batches = trainer.fit_loop.epoch_loop._batches_that_stepped
        log = bool(every) and (batches + 1) % every == 0
        if self._config.history and self.history is None and trainer.is_global_zero:
            self.history = self._make_history(pl_module)
        _fold.undo_pending(optimizer)  # a folded step that never ran (e.g. no backward)
        request = None
        if self._folds(optimizer, plan):
            request = _clipping.FoldRequest(skip_on_device=_fold.skip_on_device_ok(optimizer))
        policy_before = state.policy_steps
        skip, metrics = _clipping.clip_step(
            self._config,
            state,
            plan,
            log=log,
            grad_scale=grad_scale,
            scaler_skips=scaler_on,
            step=trainer.global_step,
            history=self.history,
            history_step=batches,
            fold=request,
        )
        if skip:
            for p in plan.params:
                p.grad = None
        elif request is not None and request.coef is not None:
            inv = _fold.inverse(request.coef)
            if scaler_on and getattr(optimizer, "_step_supports_amp_scaling", False):
                # scaler.step() multiplies its scale into grad_scale (or, after unscale_, uses
                # ours), sets found_inf itself and deletes both after the step
                _fold.left_to_scaler(optimizer, _fold.apply(optimizer, inv, None))
            else:
                applied = _fold.apply(optimizer, inv, request.found_inf)
                _fold.undo_after_step(optimizer, applied)
        if state.policy_steps > state.warned_policy_steps:
            notice = _clipping.nonfinite_notice(
                self._config,
                state,
                _OWNER,
                trainer.global_step,
                skipped_now=skip
                or (
                    state.policy_steps > policy_before
                    and not (state.zeroed_on_device or state.skipped_on_device)
                ),
            )
            if notice is not None:
                rank_zero_warn(notice)
        if metrics is not None:
            if len(trainer.optimizers) > 1:
                per_param = _clipping.per_param_prefixes(self._config)
                metrics = {
                    (k if k.startswith(per_param) else f"{k}_opt{idx}"): v
                    for k, v in metrics.items()
                }
            self.last_metrics.update(metrics)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=batches)

    # ------------------------------------------------------------------ diagnosis

    def _make_history(self, pl_module: pl.LightningModule) -> GradHistory:
        c = self._config
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        return GradHistory(
            named,
            capacity=c.history,
            norm_type=c.norm_type,
            zero_fraction=c.history_extras,
            param_norms=c.history_extras,
            model=pl_module,  # the prescriptions read its modules
        )

    def diagnose(self, **kwargs: Any) -> Diagnosis:
        """Diagnose the gradient history now (copies it to the host once).

        Args:
            **kwargs: thresholds of :func:`gradstab.diagnose` (``window``, ``vanish_decades``,
                ``spike_z``, ...).

        Returns:
            The :class:`~gradstab.Diagnosis` (``print`` it for the findings and a table).

        Raises:
            RuntimeError: no history (``history=0``, not global rank 0, or before the first
                optimizer step).

        Example:
            >>> cb = GradStabCallback(max_norm=1.0, history=500)  # doctest: +SKIP
            >>> trainer.fit(model); print(cb.diagnose(window=100))  # doctest: +SKIP
        """
        if self.history is None:
            why = (
                "construct the callback with history=<number of steps to keep>"
                if not self._config.history
                else "it is recorded on global rank 0 only, from the first optimizer step on"
            )
            raise RuntimeError(f"{_OWNER}.diagnose: there is no gradient history ({why})")
        return diagnose(self.history, **kwargs)

    def _summary(self, c: Mapping[str, int]) -> str:
        """The fit-end line: the counters ``c`` (from :meth:`counters`) in words."""
        line = (
            f"{_OWNER}(mode={self.mode!r}, nonfinite={self.nonfinite!r}): {c['steps']} "
            f"optimizer steps, {c['clipped_steps']} clipped, {c['nonfinite_steps']} with "
            f"NaN/Inf gradients, {c['skipped_steps']} skipped"
        )
        zeroed = sum(st.policy_steps for st in self._states.values())
        if self.nonfinite == "zero":
            line += f", {zeroed} zeroed"
        return line

    def _nonfinite_left_in(self, counts: Mapping[str, int]) -> bool:
        """Whether steps with NaN/Inf gradients were skipped or zeroed by the policy, or, with
        ``"ignore"``, reached the weights (a GradScaler's routine skips do not count)."""
        if any(st.policy_steps for st in self._states.values()):
            return True
        return self.nonfinite == "ignore" and counts["nonfinite_steps"] > counts["skipped_steps"]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the counters in one line (a warning when NaN/Inf steps were skipped,
        zeroed or let through); with a history: log the diagnosis (``diagnose_on_fit_end``),
        write the plots."""
        if self._states:
            counts = self.counters()  # one read per optimizer, on every rank (equal under DDP)
            line = self._summary(counts)
            if self._nonfinite_left_in(counts):
                rank_zero_warn(line)
            else:
                rank_zero_info(line)
        if self.history is None or not trainer.is_global_zero:
            return
        if self._diagnose_on_fit_end or self._plot_dir is not None:
            self.diagnosis = self.diagnose()
        if self._diagnose_on_fit_end:
            rank_zero_info(str(self.diagnosis))
        if self._plot_dir is not None:
            try:
                paths = plot_history(self.history.data(), self._plot_dir, diagnosis=self.diagnosis)
            except ImportError as exc:
                rank_zero_warn(f"{_OWNER}(plot_dir={self._plot_dir!r}): no plots written: {exc}")
            else:
                rank_zero_info(f"{_OWNER}: gradient plots written: {', '.join(paths)}")

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The counters per optimizer, as Python ints (reads the device counters), and the
        state of each adaptive threshold (device tensors): a resumed run continues both."""
        return {
            "version": 1,
            "optimizers": {i: st.state_dict() for i, st in sorted(self._states.items())},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys are 0."""
        self._states = {}
        for i, d in state_dict.get("optimizers", {}).items():
            st = _clipping.ClipState()
            st.load_state_dict(d, self._config)
            self._states[int(i)] = st

    def __getstate__(self) -> dict[str, Any]:
        # the history holds the parameters (by reference): not part of a pickle
        return {
            **self.__dict__,
            "_plans": {},
            "_names": None,
            "_module_of": None,
            "history": None,
        }
