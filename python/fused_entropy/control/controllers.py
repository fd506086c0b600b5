"""Entropy controllers: one protocol for every rule that adapts a coefficient to the policy entropy.

Protocol (MATH.md section 5)::

    ctrl.coef                              # entropy-bonus coefficient applied during the current optimizer step
    ctrl.observe(entropy_sum, token_count) # once per micro-batch: sum of per-token entropies over the valid
                                           # tokens, and the number of those tokens
    ctrl.step()                            # at each optimizer-step boundary: closes the window, updates the state
    ctrl.state_dict() / ctrl.load_state_dict(sd)   # JSON-serializable; a resumed run continues exactly

Every controller holds

- ``value``: the controlled quantity (the raw coefficient; zeta for :class:`REPOZeta`; epsilon_high for
  :class:`AdaptiveClip`);
- ``enabled``: the gate. Only :class:`AdaptiveEntropyCoef` has a real gate; it is always True elsewhere;
- ``coef``: what a loss multiplies the mean entropy by, ``value if enabled else 0.0`` for the entropy-bonus
  controllers, and always ``0.0`` for :class:`REPOZeta` and :class:`AdaptiveClip` (they act on the
  advantages or the clip range, never through an entropy bonus, so handing one of them to a loss as
  ``entropy_controller=`` lets the loss feed it observations without adding any bonus).

The window statistic is the token-weighted mean over every micro-batch observed since the last
``step()``, over all ranks when ``torch.distributed`` is initialized::

    H_bar = all_reduce_sum(sum_i entropy_sum_i) / all_reduce_sum(sum_i token_count_i)

so four micro-batches of one step give exactly the coefficient one batch of the same tokens gives.
``step()`` is a collective when ``torch.distributed`` is initialized: every rank of the group calls it,
including ranks that observed nothing. A window with no tokens (on all ranks) changes nothing: the
coefficient, the gate, the step counter and the last window's entropy all keep their values. (TRL
instead divides by ``max(count, 1)`` and reads the empty window as entropy 0.)
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Dict, Optional

import torch

_STATE_VERSION = 1


def _check_number(name: str, value, *, min_value: Optional[float] = None, allow_none: bool = False) -> Optional[float]:
    """A finite Python number (optionally >= min_value) as a float; TypeError/ValueError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}, got {value}")
    return value


def _check_bounds(lo_name: str, lo: float, hi_name: str, hi: float) -> None:
    if lo > hi:
        raise ValueError(f"{lo_name} must be <= {hi_name}, got {lo_name}={lo} > {hi_name}={hi}")


def _check_within(name: str, value: float, lo_name: str, lo: float, hi_name: str, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo_name}, {hi_name}] = [{lo}, {hi}], got {value}")


def _observation(name: str, x) -> float:
    """A float or a one-element tensor as a Python float (one host sync for device tensors)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar (0-d or one-element tensor), got shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            raise TypeError(f"{name} must be a real number, got a {x.dtype} tensor")
        x = x.detach().reshape(()).double().item()
    elif isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-d tensor, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


class EntropyController(ABC):
    """Base class: window accumulation, the cross-rank reduction and checkpoint state.

    Subclasses implement ``_update(mean_entropy)`` (called by :meth:`step` once per non-empty window,
    after ``num_steps`` has been incremented) and list their state fields in ``_STATE_FIELDS``.

    Args:
        group: the ``torch.distributed`` process group that :meth:`step` reduces over (None: the
            default group). Ignored when ``torch.distributed`` is not initialized.
    """

    _STATE_FIELDS: tuple = ()
    #: True for the controllers whose ``value`` is an entropy-bonus coefficient.
    _IS_BONUS: bool = True

    def __init__(self, *, group=None):
        self.group = group
        self.num_steps = 0  # windows that contained tokens
        self.last_entropy: Optional[float] = None  # token-weighted mean of the last non-empty window
        self._window_sum = 0.0
        self._window_count = 0.0
        self._device: Optional[torch.device] = None

    # --- the protocol -------------------------------------------------------------------------
    @property
    @abstractmethod
    def value(self) -> float:
        """The controlled quantity (raw coefficient, zeta or epsilon_high)."""

    @property
    def enabled(self) -> bool:
        """The gate: whether the bonus applies during the current optimizer step."""
        return True

    @property
    def coef(self) -> float:
        """Entropy-bonus coefficient for the current step: ``value if enabled else 0.0`` (0.0 for the
        controllers that do not act through a bonus)."""
        if not self._IS_BONUS or not self.enabled:
            return 0.0
        return float(self.value)

    def observe(self, entropy_sum, token_count) -> None:
        """Add one micro-batch to the current window.

        Args:
            entropy_sum: ``sum(H * mask)`` over the micro-batch (float or 0-d tensor), the same token
                set the bonus acts on.
            token_count: ``sum(mask)`` (float or 0-d tensor), >= 0.
        """
        if isinstance(entropy_sum, torch.Tensor):
            self._device = entropy_sum.device
        elif isinstance(token_count, torch.Tensor):
            self._device = token_count.device
        s = _observation("entropy_sum", entropy_sum)
        n = _observation("token_count", token_count)
        if n < 0:
            raise ValueError(f"token_count must be >= 0, got {n}")
        if n == 0 and s != 0:
            raise ValueError(f"entropy_sum must be 0 when token_count is 0, got entropy_sum={s}")
        self._window_sum += s
        self._window_count += n

    def step(self, group=None) -> Optional[float]:
        """Close the window: reduce it over ranks, update the state, and start a new window.

        Args:
            group: process group for this reduction (None: the one given to the constructor, whose
                default is the default group).

        Returns:
            The window's token-weighted mean entropy over all ranks, or None when it had no tokens
            (then the state is left as it was).
        """
        s, n = self._window_sum, self._window_count
        self._window_sum = 0.0
        self._window_count = 0.0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.group if group is None else group
            totals = torch.tensor([s, n], dtype=torch.float64, device=self._reduce_device(group))
            torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM, group=group)
            s, n = totals.tolist()
        if n <= 0:
            return None
        mean = s / n
        self.num_steps += 1
        self._update(mean)
        self.last_entropy = mean
        return mean

    def _reduce_device(self, group) -> torch.device:
        if self._device is not None:
            return self._device
        if torch.distributed.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @abstractmethod
    def _update(self, mean_entropy: float) -> None:
        """Apply the rule to one non-empty window's mean entropy."""

    # --- checkpoints --------------------------------------------------------------------------
    def _config(self) -> Dict[str, Any]:
        return {}

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serializable state (plain floats, ints, bools and None), including any open window.

        ``config`` records the constructor arguments for inspection; :meth:`load_state_dict` does not
        apply it (the arguments the controller was built with stay in force).
        """
        sd = {
            "controller": type(self).__name__,
            "version": _STATE_VERSION,
            "config": self._config(),
            "num_steps": self.num_steps,
            "last_entropy": self.last_entropy,
            "window_entropy_sum": self._window_sum,
            "window_token_count": self._window_count,
        }
        for f in self._STATE_FIELDS:
            sd[f] = getattr(self, "_" + f)
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (also after a ``json.dumps``/``json.loads`` round trip)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        name = state_dict.get("controller")
        if name != type(self).__name__:
            raise ValueError(f"state_dict is for controller {name!r}, cannot load it into {type(self).__name__}")
        missing = [k for k in ("num_steps", "last_entropy", "window_entropy_sum", "window_token_count") + self._STATE_FIELDS
                   if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict for {name} is missing {missing}")
        # Check every entry before assigning any: a NaN or a string must not load silently (a NaN
        # coefficient would make every later loss NaN), and a bad state must leave this one intact.
        steps = state_dict["num_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state_dict['num_steps'] must be an int >= 0, got {steps!r}")
        le = _check_number("state_dict['last_entropy']", state_dict["last_entropy"], allow_none=True)
        ws = _check_number("state_dict['window_entropy_sum']", state_dict["window_entropy_sum"])
        wc = _check_number("state_dict['window_token_count']", state_dict["window_token_count"], min_value=0.0)
        fields = {}
        for f in self._STATE_FIELDS:
            v = state_dict[f]
            fields[f] = v if v is None or isinstance(v, bool) else _check_number(f"state_dict[{f!r}]", v)
        self.num_steps = steps
        self.last_entropy = le
        self._window_sum = ws
        self._window_count = wc
        for f, v in fields.items():
            setattr(self, "_" + f, v)

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({cfg}; value={self.value!r}, enabled={self.enabled}, coef={self.coef!r})"


class StaticEntropyCoef(EntropyController):
    """A constant entropy-bonus coefficient ``alpha`` (TRL ``entropy_coef``; verl ``entropy_coeff``).

    ``loss = loss_policy - coef * mean(H)``. A negative ``coef`` turns the bonus into an entropy
    penalty. Observations are accepted (and ``last_entropy`` tracked for logging) but change nothing.
    """

    _STATE_FIELDS = ()

    def __init__(self, coef: float, *, group=None):
        super().__init__(group=group)
        self._coef = _check_number("coef", coef)

    @property
    def value(self) -> float:
        return self._coef

    def _config(self):
        return {"coef": self._coef}

    def _update(self, mean_entropy: float) -> None:
        pass


class AdaptiveEntropyCoef(EntropyController):
    """Skywork-OR1 / TRL adaptive entropy coefficient, gate included (MATH.md section 5).

    After each optimizer step, with ``H_bar`` the token-weighted mean entropy of the window over all
    ranks and ``below = H_bar <= target`` (``H_bar < target`` when ``strict``)::

        value   <- min(value + delta, coef_max)   if below
                   max(value - delta, coef_min)   otherwise
        enabled <- below

    The next step applies ``coef = value if enabled else 0.0``: the bonus only acts while the last
    window's entropy was at or below the target, and it grows the longer entropy stays there.

    ``enabled`` starts at ``start_enabled``. The defaults reproduce TRL >= 1.10
    (``GRPOConfig.use_adaptive_entropy``: ``<=``, and the last entropy starts at ``+inf`` so the first
    window has no bonus). ``strict=True, start_enabled=True`` reproduces Skywork-OR1's
    ``EntController`` (strict ``<``, ``entropy_loss_enabled = 1`` at start, so the first window applies
    ``init``); Skywork's published settings are ``delta=1e-4, coef_max=0.005, target=0.2``.

    Args:
        target: entropy target in nats (TRL ``entropy_target``).
        delta: step of the coefficient, >= 0 (TRL ``entropy_coef_delta``).
        coef_min, coef_max: bounds of the coefficient (TRL ``entropy_coef_min/max``).
        init: initial coefficient, in ``[coef_min, coef_max]`` (TRL ``entropy_coef``).
        strict: use ``H_bar < target`` instead of ``<=``.
        start_enabled: the gate before any window has been seen.
    """

    _STATE_FIELDS = ("value", "enabled")

    def __init__(self, target: float = 0.2, delta: float = 0.005, coef_min: float = 0.0, coef_max: float = 1.0,
                 init: float = 0.0, strict: bool = False, start_enabled: bool = False, *, group=None):
        super().__init__(group=group)
        self.target = _check_number("target", target)
        self.delta = _check_number("delta", delta, min_value=0.0)
        self.coef_min = _check_number("coef_min", coef_min)
        self.coef_max = _check_number("coef_max", coef_max)
        _check_bounds("coef_min", self.coef_min, "coef_max", self.coef_max)
        init = _check_number("init", init)
        _check_within("init", init, "coef_min", self.coef_min, "coef_max", self.coef_max)
        self.strict = bool(strict)
        self.start_enabled = bool(start_enabled)
        self._value = init
        self._enabled = self.start_enabled

    @property
    def value(self) -> float:
        return self._value

    @property
    def enabled(self) -> bool:
        return bool(self._enabled)

    def _config(self):
        return {"target": self.target, "delta": self.delta, "coef_min": self.coef_min, "coef_max": self.coef_max,
                "strict": self.strict, "start_enabled": self.start_enabled}

    def _update(self, mean_entropy: float) -> None:
        below = mean_entropy < self.target if self.strict else mean_entropy <= self.target
        if below:
            self._value = min(self._value + self.delta, self.coef_max)
        else:
            self._value = max(self._value - self.delta, self.coef_min)
        self._enabled = below


class AEntCoef(EntropyController):
    """AEnt band controller (Shen 2025, arXiv 2509.03493, Eq. 4.1; MATH.md section 5).

    Meant to observe the *clamped* entropy (MATH.md section 3, ``clamp_p``), the quantity its band is
    stated in. After each optimizer step past the warm-up, with ``H_bar`` the window's mean::

        value <- clip(value - lr * [min(0, H_bar - low) + max(0, H_bar - high) + reg * (value - init)],
                      coef_min, coef_max)

    The coefficient rises while entropy is below the band ``[low, high]``, falls while above, and holds
    inside it. The first ``warmup`` non-empty windows leave it at ``init`` (the bonus still applies).
    (AReaL's recipe updates when ``warmup <= global_step`` with steps counted from 1, i.e. from the
    ``warmup``-th step on; its ``warmup=w`` is this class's ``warmup=w-1``.) No gate: ``coef == value``.

    Args:
        low, high: the entropy band, ``low <= high`` (AReaL ``entropy_low/high``).
        lr: step size, >= 0 (AReaL ``entropy_coeff_lr``).
        coef_min, coef_max: bounds (AReaL ``entropy_coeff_clip_low/high``).
        init: initial coefficient, in ``[coef_min, coef_max]`` (AReaL ``entropy_coeff``).
        warmup: windows before the first update, >= 0 (AReaL ``entropy_coeff_warmup``).
        reg: optional pull toward ``init``, >= 0 (AReaL ``entropy_coeff_reg``, default 0).

    Paper settings (Qwen2.5-Math-1.5B, MATH): ``init=0.002, low=0.15, high=0.24, lr=0.002,
    coef_min=6e-4, coef_max=9e-3, warmup=30`` with ``clamp_p=0.33``.
    """

    _STATE_FIELDS = ("value",)

    def __init__(self, low: float, high: float, lr: float, coef_min: float, coef_max: float, init: float,
                 warmup: int = 0, reg: float = 0.0, *, group=None):
        super().__init__(group=group)
        self.low = _check_number("low", low)
        self.high = _check_number("high", high)
        _check_bounds("low", self.low, "high", self.high)
        self.lr = _check_number("lr", lr, min_value=0.0)
        self.coef_min = _check_number("coef_min", coef_min)
        self.coef_max = _check_number("coef_max", coef_max)
        _check_bounds("coef_min", self.coef_min, "coef_max", self.coef_max)
        self.init = _check_number("init", init)
        _check_within("init", self.init, "coef_min", self.coef_min, "coef_max", self.coef_max)
        if isinstance(warmup, bool) or not isinstance(warmup, int):
            raise TypeError(f"warmup must be an int, got {type(warmup).__name__}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = warmup
        self.reg = _check_number("reg", reg, min_value=0.0)
        self._value = self.init

    @property
    def value(self) -> float:
        return self._value

    def _config(self):
        return {"low": self.low, "high": self.high, "lr": self.lr, "coef_min": self.coef_min,
                "coef_max": self.coef_max, "init": self.init, "warmup": self.warmup, "reg": self.reg}

    def _update(self, mean_entropy: float) -> None:
        if self.num_steps <= self.warmup:
            return
        grad = min(0.0, mean_entropy - self.low) + max(0.0, mean_entropy - self.high) + self.reg * (self._value - self.init)
        self._value = min(max(self._value - self.lr * grad, self.coef_min), self.coef_max)


class REPOZeta(EntropyController):
    """The REPO-R advantage-shaping strength zeta (Petrenko et al., arXiv 2603.11682; MATH.md section 6).

    After each optimizer step, with ``H_bar`` the window's mean entropy::

        zeta <- min(2 * zeta, zeta_max)   if H_bar < target
                max(zeta / 2, zeta_min)   if H_bar > target      (unchanged when equal)

    ``target=None`` takes the first non-empty window's entropy as the target (that window leaves zeta
    unchanged). Use ``zeta`` with :func:`repo_r_advantages`. ``coef`` is always 0.0: REPO acts on the
    advantages, not through an entropy bonus.

    Args:
        init: initial zeta, in ``[zeta_min, zeta_max]``.
        zeta_min, zeta_max: bounds, ``0 < zeta_min <= zeta_max``.
        target: entropy target in nats, or None for the initial entropy.
    """

    _STATE_FIELDS = ("value", "target")
    _IS_BONUS = False

    def __init__(self, init: float, zeta_min: float = 1e-4, zeta_max: float = 0.05, target: Optional[float] = None,
                 *, group=None):
        super().__init__(group=group)
        self.zeta_min = _check_number("zeta_min", zeta_min)
        if self.zeta_min <= 0:
            raise ValueError(f"zeta_min must be > 0 (zeta is halved and doubled), got {self.zeta_min}")
        self.zeta_max = _check_number("zeta_max", zeta_max)
        _check_bounds("zeta_min", self.zeta_min, "zeta_max", self.zeta_max)
        init = _check_number("init", init)
        _check_within("init", init, "zeta_min", self.zeta_min, "zeta_max", self.zeta_max)
        self._value = init
        self._target = _check_number("target", target, allow_none=True)

    @property
    def value(self) -> float:
        return self._value

    @property
    def zeta(self) -> float:
        """The current zeta (same as ``value``)."""
        return self._value

    @property
    def target(self) -> Optional[float]:
        """The entropy target (None until the first window when built with ``target=None``)."""
        return self._target

    def _config(self):
        return {"zeta_min": self.zeta_min, "zeta_max": self.zeta_max}

    def _update(self, mean_entropy: float) -> None:
        if self._target is None:
            self._target = mean_entropy
        if mean_entropy < self._target:
            self._value = min(2.0 * self._value, self.zeta_max)
        elif mean_entropy > self._target:
            self._value = max(0.5 * self._value, self.zeta_min)


class AdaptiveClip(EntropyController):
    """ADAPO-style adaptive upper clip range: ``epsilon_high`` follows the entropy.

    The ADAPO paper describes raising the upper clip bound when entropy falls and lowering it when
    entropy rises, but publishes no exact rule. This class uses a fixed-step (bang-bang) rule, the same
    shape as Skywork-OR1's coefficient rule. After each optimizer step, with ``H_bar`` the window's mean::

        epsilon_high <- min(epsilon_high + delta, epsilon_high_max)   if H_bar < target
                        max(epsilon_high - delta, epsilon_high_min)   if H_bar > target
                        (unchanged when equal)

    A larger ``epsilon_high`` lets low-probability tokens with positive advantage grow more per step
    (DAPO's clip-higher), which raises entropy. ``target=None`` takes the first non-empty window's
    entropy. Read ``epsilon_high`` before each optimizer step and pass it to the loss. ``coef`` is
    always 0.0 (no entropy bonus).

    Args:
        epsilon_high: initial upper clip range (0.28 = DAPO's clip-higher), in the bounds.
        delta: step, >= 0.
        epsilon_high_min, epsilon_high_max: bounds, ``0 < min <= max``.
        target: entropy target in nats, or None for the initial entropy.
    """

    _STATE_FIELDS = ("value", "target")
    _IS_BONUS = False

    def __init__(self, epsilon_high: float = 0.28, delta: float = 0.01, epsilon_high_min: float = 0.2,
                 epsilon_high_max: float = 0.4, target: Optional[float] = None, *, group=None):
        super().__init__(group=group)
        self.delta = _check_number("delta", delta, min_value=0.0)
        self.epsilon_high_min = _check_number("epsilon_high_min", epsilon_high_min)
        if self.epsilon_high_min <= 0:
            raise ValueError(f"epsilon_high_min must be > 0, got {self.epsilon_high_min}")
        self.epsilon_high_max = _check_number("epsilon_high_max", epsilon_high_max)
        _check_bounds("epsilon_high_min", self.epsilon_high_min, "epsilon_high_max", self.epsilon_high_max)
        epsilon_high = _check_number("epsilon_high", epsilon_high)
        _check_within("epsilon_high", epsilon_high, "epsilon_high_min", self.epsilon_high_min,
                      "epsilon_high_max", self.epsilon_high_max)
        self._value = epsilon_high
        self._target = _check_number("target", target, allow_none=True)

    @property
    def value(self) -> float:
        return self._value

    @property
    def epsilon_high(self) -> float:
        """The upper clip range for the current optimizer step."""
        return self._value

    @property
    def target(self) -> Optional[float]:
        return self._target

    def _config(self):
        return {"delta": self.delta, "epsilon_high_min": self.epsilon_high_min,
                "epsilon_high_max": self.epsilon_high_max}

    def _update(self, mean_entropy: float) -> None:
        if self._target is None:
            self._target = mean_entropy
        if mean_entropy < self._target:
            self._value = min(self._value + self.delta, self.epsilon_high_max)
        elif mean_entropy > self._target:
            self._value = max(self._value - self.delta, self.epsilon_high_min)
