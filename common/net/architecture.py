"""The codec's architecture config (:class:`CodecConfig`): serialised next to the weights, hashed into the
fingerprint, checked as a whole; the architectures' names."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from common.errors import FedlvcError

from .temporal import IN_FRAME_VALUES, P_GROUPS, TEMPORAL_CONTEXTS

ARCHITECTURE = "fedlvc-factorized-gain-v3"  # v2 plus contexts inside a P-frame (channel groups)
ARCHITECTURE_V2 = "fedlvc-factorized-gain-v2"  # v1 plus the temporal (P-frame) prior; still loads and decodes
ARCHITECTURE_INTRA = "fedlvc-factorized-gain-v1"  # intra-only models still load (and decode their streams)
# GDN transforms and a mean-scale hyperprior for I-frames, exact integer coding tables (common.net.hyperprior);
# P-frames as v3.
ARCHITECTURE_V4 = "fedlvc-hyperprior-gdn-v4"
ARCHITECTURES = (ARCHITECTURE, ARCHITECTURE_V2, ARCHITECTURE_INTRA, ARCHITECTURE_V4)


@dataclass(frozen=True)
class CodecConfig:
    """Architecture of the codec; serialised next to the weights and hashed into the fingerprint."""

    architecture: str = ARCHITECTURE
    channels: int = 64  # width of the transforms
    latent_channels: int = 96  # channels of y
    mixtures: int = 3  # logistic components per channel of the prior
    support: int = 255  # coded symbols lie in [-support, support]
    lambdas: tuple[float, ...] = (0.0018, 0.0035, 0.0067, 0.013, 0.025, 0.05)  # one per quality level
    stride: int = 16  # total downsampling of g_a; frames are padded to a multiple of it
    hyper_channels: int = 0  # channels of the hyper-latent z (architecture v4 only; 0 otherwise)
    adapters: bool = False  # FiLM adapters after the transforms' convolutions (common.net.transforms.FiLM)
    motion: bool = False  # P-frames as motion-compensated residuals (common.motion.residual) instead of latent P-frames

    @property
    def num_levels(self) -> int:
        return len(self.lambdas)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lambdas"] = list(self.lambdas)
        if not self.hyper:
            del d["hyper_channels"]  # configs (and fingerprints) of v1-v3 models are as they always were
        if not self.adapters:
            del d["adapters"]  # likewise for models without adapters
        if not self.motion:
            del d["motion"]  # and without motion-compensated P-frames
        return d

    @classmethod
    def v4(cls, **kw) -> CodecConfig:
        """The default configuration of architecture v4."""
        base = dict(
            architecture=ARCHITECTURE_V4,
            channels=64,
            latent_channels=128,
            hyper_channels=64,
            lambdas=(0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16),
        )
        return cls(**{**base, **kw})

    @classmethod
    def from_dict(cls, d: dict) -> CodecConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise FedlvcError(f"model config has unknown keys: {sorted(unknown)}")
        d = dict(d)
        try:
            if "lambdas" in d:
                d["lambdas"] = tuple(float(v) for v in d["lambdas"])
        except (TypeError, ValueError):
            raise FedlvcError(f"model config lambdas must be a list of numbers, not {d['lambdas']!r}") from None
        cfg = cls(**d)
        if cfg.architecture not in ARCHITECTURES:
            raise FedlvcError(f"model architecture {cfg.architecture!r} is not supported (expected {ARCHITECTURE!r})")
        cfg.check_bounds()
        return cfg

    # Limits on what a model config (from a checkpoint, or from the server's message to a site) may make us
    # allocate: far above the shipped model (64 / 96 / 3 / 255 / 6 levels), far below what exhausts a machine.
    LIMITS = {
        "channels": (1, 512),
        "latent_channels": (1, 512),
        "mixtures": (1, 16),
        "support": (1, 1023),
        "hyper_channels": (0, 512),
    }
    MAX_LEVELS = 16

    def check_bounds(self) -> None:
        for key, (lo, hi) in self.LIMITS.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise FedlvcError(f"model config {key} must be an integer in {lo}..{hi}, not {value!r}")
        if not 1 <= len(self.lambdas) <= self.MAX_LEVELS or not all(0 < v <= 10 for v in self.lambdas):
            raise FedlvcError(
                f"model config needs 1..{self.MAX_LEVELS} quality levels with lambdas in (0, 10], "
                f"not {list(self.lambdas)!r}"
            )
        if self.stride != 16:
            raise FedlvcError(f"model config stride must be 16 (four stride-2 stages), not {self.stride!r}")
        for key in ("adapters", "motion"):
            if not isinstance(getattr(self, key), bool):
                raise FedlvcError(f"model config {key} must be true or false, not {getattr(self, key)!r}")
        if self.motion and self.architecture not in (ARCHITECTURE, ARCHITECTURE_V4):
            raise FedlvcError(f"model config motion needs architecture {ARCHITECTURE!r} or {ARCHITECTURE_V4!r}")
        if self.hyper != (self.hyper_channels > 0):
            raise FedlvcError(
                f"model config hyper_channels must be at least 1 for architecture {ARCHITECTURE_V4!r} and 0 "
                f"otherwise, not {self.hyper_channels!r}"
            )

    @property
    def hyper(self) -> bool:
        """Whether I-frames are coded under the mean-scale hyperprior (architecture v4)."""
        return self.architecture == ARCHITECTURE_V4

    @property
    def temporal(self) -> bool:
        """Whether the model has a P-frame prior (can code groups of pictures longer than 1)."""
        return self.architecture in (ARCHITECTURE, ARCHITECTURE_V2, ARCHITECTURE_V4)

    @property
    def p_groups(self) -> int:
        """Channel groups a P-frame latent is coded in (1: all at once, as architecture v2 does)."""
        return P_GROUPS if self.architecture in (ARCHITECTURE, ARCHITECTURE_V4) else 1

    @property
    def p_contexts(self) -> int:
        """Contexts of the P-frame prior per (level, channel)."""
        return TEMPORAL_CONTEXTS * (IN_FRAME_VALUES if self.p_groups > 1 else 1)
