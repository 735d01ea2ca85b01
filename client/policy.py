"""A site's privacy policy: decided by the site (its node config), enforced at the site.

The run config comes from whoever submits the run; it may only tighten what the policy allows. A training
round the policy forbids is declined, with the reason in the reply, before anything is trained.

    node config key        site with real video (video-dir)   simulated site (generated data)
    max-epsilon            10                                  no limit (the run's epsilon-budget)
    delta                  1e-5                                1e-5
    accountant             rdp                                 rdp
    min-noise-multiplier   0.5                                 0
    max-local-steps        1000                                no limit
    privacy-unit           frame                               as the run asks
    segment-frames         4                                   as the run asks
    allow-non-private      false                               true (the sweep's references)
    release                eval                                eval,rd,compress-summary,train-loss
    max-memory-mb          8192                                8192
    require-secure-aggregation  false                          false
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config.fedconfig import RunConfig
from common.config.options import ACCOUNTANTS
from common.errors import FedlvcError
from common.train.privacy import epsilon_from_history

RELEASES = ("eval", "rd", "compress-summary", "train-loss")
SITE_ACCOUNTANTS = tuple(a for a in ACCOUNTANTS if a != "gdp")  # gdp can underestimate ε, does not compose


@dataclass(frozen=True)
class RoundPlan:
    """What a training round will spend, as the policy allows it (or why it is declined)."""

    noise_multiplier: float
    steps: int
    delta: float  # the δ every ε of this round is computed at: the site's, or a smaller one the run asks
    accountants: tuple[str, ...]  # ε is the largest over these: the site's, and one the run asks for
    budget: float  # the site's max-epsilon, or a smaller epsilon-budget the run asks for
    private: bool
    declined: str = ""  # why the round is declined ("" = it may train)

    def epsilon(self, history) -> float:
        return max(epsilon_from_history(history, self.delta, a) for a in self.accountants)


def _number(node_config, key: str, default, kind=float, lo=None, hi=None):
    value = node_config.get(key, default)
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        out = kind(value)
        if kind is int and float(value) != out:
            raise ValueError
        if isinstance(out, float) and math.isnan(out):
            raise ValueError
    except (TypeError, ValueError):
        raise FedlvcError(f"node-config {key!r} must be a {kind.__name__}, not {value!r}") from None
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise FedlvcError(f"node-config {key!r} must be in [{lo}, {hi}], not {value!r}")
    return out


def _flag(node_config, key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise FedlvcError(f"node-config {key!r} must be true or false, not {value!r}")
    return value


@dataclass(frozen=True)
class SitePolicy:
    max_epsilon: float
    delta: float
    accountant: str
    min_noise_multiplier: float
    max_local_steps: int | None  # None: no limit
    privacy_unit: str | None  # None: as the run asks
    segment_frames: int | None
    allow_non_private: bool
    release: frozenset
    max_memory_mb: float
    real_video: bool  # the site holds real video (video-dir): strict defaults, a ledger on disk required
    require_secure_aggregation: bool = False  # decline a training round that is not under SecAgg+

    @classmethod
    def of(cls, node_config) -> SitePolicy:
        """The policy in a node config (``--node-config``), with the defaults of the module docstring."""
        real = bool(node_config.get("video-dir"))
        accountant = str(node_config.get("accountant", "rdp"))
        if accountant not in SITE_ACCOUNTANTS:
            raise FedlvcError(f"node-config 'accountant' must be rdp or prv, not {accountant!r}")
        unit = node_config.get("privacy-unit", "frame" if real else None)
        if unit not in (None, "frame", "segment"):
            raise FedlvcError(f"node-config 'privacy-unit' must be frame or segment, not {unit!r}")
        release = str(node_config.get("release", "eval" if real else ",".join(RELEASES)))
        items = {r.strip() for r in release.split(",") if r.strip()}
        if items == {"none"}:
            items = set()
        unknown = items - set(RELEASES)
        if unknown:
            raise FedlvcError(
                f"node-config 'release' must be a comma list of {', '.join(RELEASES)} or none, not {release!r}"
            )
        return cls(
            max_epsilon=_number(node_config, "max-epsilon", 10.0 if real else math.inf, lo=0),
            delta=_number(node_config, "delta", 1e-5, lo=1e-300, hi=0.1),
            accountant=accountant,
            min_noise_multiplier=_number(node_config, "min-noise-multiplier", 0.5 if real else 0.0, lo=0),
            max_local_steps=_number(node_config, "max-local-steps", 1000 if real else None, int, lo=1),
            privacy_unit=unit,
            segment_frames=_number(
                node_config, "segment-frames", 4 if real or unit == "segment" else None, int, lo=2, hi=64
            ),
            allow_non_private=_flag(node_config, "allow-non-private", not real),
            release=frozenset(items),
            max_memory_mb=_number(node_config, "max-memory-mb", 8192.0, lo=1),
            real_video=real,
            require_secure_aggregation=_flag(node_config, "require-secure-aggregation", False),
        )

    def plan(self, rc: RunConfig) -> RoundPlan:
        """The round the run asks for, tightened by this policy: δ, budget and accountant are the stricter of
        the two; anything the policy does not allow declines the round."""
        accountants = (self.accountant,) + ((rc.accountant,) if rc.accountant != self.accountant else ())
        plan = RoundPlan(
            rc.noise_multiplier,
            rc.local_steps,
            min(self.delta, rc.delta),
            accountants,
            min(self.max_epsilon, rc.epsilon_budget),
            rc.private,
        )
        reason = ""
        if rc.accountant not in SITE_ACCOUNTANTS:
            reason = (
                f"the run asks for the {rc.accountant} accountant; this site accounts with "
                f"{' or '.join(SITE_ACCOUNTANTS)} only"
            )
        elif self.privacy_unit and rc.privacy_unit != self.privacy_unit:
            reason = f"the site's privacy unit is {self.privacy_unit}; the run asks for {rc.privacy_unit}"
        elif self.privacy_unit == "segment" and rc.segment_frames != self.segment_frames:
            reason = (
                f"the site's privacy unit is a segment of {self.segment_frames} frames; the run asks for "
                f"{rc.segment_frames}"
            )
        elif not rc.private and not self.allow_non_private:
            reason = (
                "the run asks for a non-private round ("
                + ("clip-only" if rc.clip_only else "noise-multiplier 0")
                + "); the site's policy refuses them (allow-non-private = false)"
            )
        elif rc.private and rc.noise_multiplier < self.min_noise_multiplier:
            reason = (
                f"the run asks for noise-multiplier {rc.noise_multiplier:g}; the site's policy needs at least "
                f"{self.min_noise_multiplier:g}"
            )
        elif self.max_local_steps is not None and rc.local_steps > self.max_local_steps:
            reason = (
                f"the run asks for {rc.local_steps} local steps; the site's policy allows at most "
                f"{self.max_local_steps} a round"
            )
        return RoundPlan(**{**plan.__dict__, "declined": reason})

    def releases(self, what: str) -> bool:
        return what in self.release

    def memory_refusal(self, what: str, nbytes: float) -> str:
        """Why work of this estimated size is refused ("" = it fits in ``max-memory-mb``)."""
        if nbytes <= self.max_memory_mb * 2**20:
            return ""
        return (
            f"{what} would need about {nbytes / 2**20:,.0f} MB; the site allows {self.max_memory_mb:,.0f} MB "
            "(node-config max-memory-mb)"
        )

    def check_memory(self, what: str, nbytes: float) -> None:
        """Refuse work that would hold more than ``max-memory-mb`` (estimated before anything is allocated)."""
        reason = self.memory_refusal(what, nbytes)
        if reason:
            raise FedlvcError(reason)
