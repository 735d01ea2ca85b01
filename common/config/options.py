"""The one schema of fedlvc's options: name, type, default, range or choices, and help of every setting that a
run config (``client``/``server``: :class:`common.config.fedconfig.RunConfig`), single-site training
(:class:`common.train.training.TrainConfig`) or the command line (``fedlvc``) takes. Each limit and each list of
choices is typed here once; the configs, argparse and the pyproject check are built from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from common.errors import FedlvcError

_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(frozen=True)
class Option:
    name: str  # dashed, as in run configs and on the command line: "noise-multiplier"
    kind: type  # int, float, str or bool
    default: object
    help: str
    lo: float | None = None  # inclusive bounds (``lo_open``: exclusive)
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple | None = None
    multiple_of: int | None = None

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    def but(self, **changes) -> Option:
        """The same option in another context (another default or help), same limits."""
        return replace(self, **changes)

    def rule(self) -> str:
        """The option's limits in words: "in [0, 1000]", "one of rdp, prv, gdp"."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.lo is None and self.hi is None:
            return ""
        lo = "-inf" if self.lo is None else f"{self.lo:g}"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        text = f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def convert(self, value, where: str = "run-config key"):
        """``value`` as this option's type within its limits; one FedlvcError naming the option otherwise."""
        kind = self.kind
        try:
            if kind is bool:
                if isinstance(value, str) and value.lower() in ("true", "false"):
                    value = value.lower() == "true"
                if not isinstance(value, bool):
                    raise ValueError
            elif isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = kind(value)
        except (TypeError, ValueError):
            raise FedlvcError(f"{where} {self.name!r} must be {kind.__name__}, got {value!r}") from None
        self.check(value, where)
        return value

    def check(self, value, where: str = "run-config key") -> None:
        ok = True
        if value is None and self.default is None:  # an optional setting left unset
            return
        if self.choices is not None:
            ok = value in self.choices
        elif self.kind in (int, float):
            ok = not (isinstance(value, float) and math.isnan(value))
            if self.lo is not None:
                ok = ok and (value > self.lo if self.lo_open else value >= self.lo)
            if self.hi is not None:
                ok = ok and (value < self.hi if self.hi_open else value <= self.hi)
            if self.multiple_of:
                ok = ok and value % self.multiple_of == 0
        if not ok:
            raise FedlvcError(f"{where} {self.name!r} must be {self.rule()}, not {value!r}")

    def add_to(self, parser, *flags: str, **overrides) -> None:
        """An argparse argument for this option (``--name`` unless ``flags``), checked by :meth:`convert`."""

        def parse(text: str):  # a bad value is the CLI's one-line error (FedlvcError), naming the flag
            try:
                return self.convert(text, "option")
            except FedlvcError as e:
                raise FedlvcError(str(e).replace(f"option {self.name!r}", f"--{self.name}", 1)) from None

        rule = self.rule()
        kwargs = {"default": self.default, "help": self.help + (f" ({rule})" if rule else "")}
        if self.kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = parse
        kwargs.update(overrides)
        parser.add_argument(*(flags or (f"--{self.name}",)), dest=self.attr, **kwargs)


def check_fields(config, options, where: str) -> None:
    """Check every option's field of a config dataclass against the schema."""
    for option in options:
        option.check(getattr(config, option.attr), where)


ACCOUNTANTS = ("rdp", "prv", "gdp")
TRAIN_PARTS = ("all", "entropy", "temporal", "adapters", "motion")

# ------------------------------------------------------------------- training (federated rounds and single-site)
SEED = Option("seed", int, 0, "seed of the crops and of training's own randomness (never of DP noise)")
BATCH_SIZE = Option(
    "batch-size", int, 16, "expected batch size (Poisson under DP); q = 1 / ceil(rows / batch)", 1, 4096
)
MAX_PHYSICAL_BATCH = Option(
    "max-physical-batch",
    int,
    0,
    "DP-SGD: a Poisson batch larger than this is processed in pieces of at most this many rows (per-sample "
    "clipped gradients summed, one noise draw and one accounted step per batch): memory stays bounded whatever "
    "the batch size; 0 = one piece",
    0,
    4096,
)
CROP_SIZE = Option("crop-size", int, 64, "training crop, pixels", 16, 512, multiple_of=16)
LEARNING_RATE = Option("learning-rate", float, 3e-4, "Adam learning rate", 0, 10, lo_open=True)
TRAIN_PART = Option(
    "train-parts",
    str,
    "all",
    "what training moves: all; entropy: only the quantization gains and "
    "priors; temporal: only the P-frame prior (segments); adapters: only FiLM adapters on the transforms "
    "(added, identity at start, when the model has none); motion: only the residual codec of motion-compensated "
    "P-frames (segments; a motion model)",
    choices=TRAIN_PARTS,
)
PRIVACY_UNIT = Option(
    "privacy-unit",
    str,
    "frame",
    "one training row and DP unit: a frame, or a segment of "
    "segment-frames consecutive frames (trains the P-frame prior too)",
    choices=("frame", "segment"),
)
SEGMENT_FRAMES = Option("segment-frames", int, 4, "frames per segment (privacy-unit segment)", 2, 64)
# ------------------------------------------------------------------- differential privacy
NOISE_MULTIPLIER = Option("noise-multiplier", float, 1.0, "DP noise multiplier sigma; 0 = non-private", 0, 1e6)
MAX_GRAD_NORM = Option("max-grad-norm", float, 1.0, "per-sample clipping norm C", 0, 1e6, lo_open=True)
DELTA = Option("delta", float, 1e-5, "DP delta", 0, 1, lo_open=True, hi_open=True)
ACCOUNTANT = Option("accountant", str, "rdp", "privacy accountant", choices=ACCOUNTANTS)
GRAD_SAMPLE_MODE = Option(
    "grad-sample-mode",
    str,
    "hooks",
    "Opacus per-sample gradients (ew cannot take the level embeddings' 1-D input)",
    choices=("hooks", "functorch"),
)
# ------------------------------------------------------------------- the encoder's P-frame rule and groups
MAX_GOP = 65535  # the .lvc header's gop field is 16 bits (common.coding.bitstream.HEADER)
GOP = Option(
    "gop", int, 32, "group-of-pictures length: an I-frame every N frames, P-frames between (1 = intra-only)", 1, MAX_GOP
)
RD_WEIGHT = Option(
    "rd-weight",
    float,
    1.0,
    "P-frame latents chosen by rate-distortion cost, distortion weighted by "
    "K times the quality level's training lambda (0 = plain rounding with skip-threshold)",
    0,
    1000,
)
SKIP_THRESHOLD = Option(
    "skip-threshold",
    float,
    0.2,
    "with rd-weight 0: a P-frame keeps the previous latent where the new one is within 0.5+T of it",
    0,
    10,
    hi_open=True,
)


@dataclass(frozen=True)
class PFrameRule:
    """How an encoder picks the integer latent of a P-frame; the decoder needs none of it.

    * ``rd_weight`` κ > 0: rate–distortion optimised quantization. Channel group by channel group (in coding
      order, so each group sees the in-frame contexts of the decisions before it), every element takes the
      value among {previous value, round(y), round(y) one step towards the previous value} that minimises
      ``κ·λ_q·255²/3 · w_c·(y − v)² + bits(v)``: the per-frame training loss ``λ_q·255²·MSE + bpp`` times
      the pixel count, with the distortion linearised per channel (``w_c``: squared error of the decoded
      frame, in [0, 1] units summed over RGB, per unit² of latent error, measured at the group's I-frame by
      :func:`common.coding.rdo.synthesis_sensitivity`) and the rate under the temporal prior. A change that buys little
      quality (sensor noise, a channel the decoder hardly uses, a still background where a change is
      improbable) is not coded.
    * otherwise ``skip_threshold`` T: keep the previous value where |y − previous| < ½ + T, round elsewhere.
    """

    rd_weight: float = 0.0
    skip_threshold: float = 0.0

    @classmethod
    def of(cls, rd_weight: float, skip_threshold: float) -> PFrameRule:
        """The rule of a config holding both settings: the skip threshold counts only without RDO."""
        return cls(rd_weight, 0.0 if rd_weight > 0 else skip_threshold)

    @classmethod
    def from_options(cls, rd_weight: float | None = None, skip_threshold: float | None = None) -> PFrameRule:
        """The rule of the command-line options (unset: None): rate–distortion optimised with weight ``rd_weight``
        (default RD_WEIGHT's), or, with ``rd_weight`` 0, rounding with ``skip_threshold``. Their ranges are checked
        where they are read (the command line) and where the rule is used (the encoder, the training config)."""
        rd = RD_WEIGHT.default if rd_weight is None else rd_weight
        if skip_threshold is not None and rd > 0:
            raise FedlvcError("--skip-threshold applies only without rate-distortion optimisation: add --rd-weight 0")
        return cls(rd_weight=rd, skip_threshold=skip_threshold or 0.0)

    @property
    def uses_rd(self) -> bool:
        return self.rd_weight > 0


# Single-site training (`fedlvc train`, common.train.training.TrainConfig) and DP-SGD
# (common.train.privacy.DPConfig): here, not beside their code, so that building the command line imports neither
# torch nor Opacus.
TRAIN_OPTIONS: tuple[Option, ...] = (
    Option("steps", int, 20000, "total optimizer steps (a resumed run continues up to this)", 1, 10**9),
    BATCH_SIZE,
    MAX_PHYSICAL_BATCH,
    CROP_SIZE.but(default=96),
    LEARNING_RATE.but(default=1e-3),
    Option("lr-drop-at", float, 0.75, "fraction of the steps after which the learning rate is divided by 10", 0, 1),
    Option(
        "clip-norm",
        float,
        1.0,
        "global gradient-norm clipping of non-private training (stability)",
        0,
        None,
        lo_open=True,
    ),
    Option("checkpoint-seconds", float, 120.0, "seconds between checkpoints", 0, None, lo_open=True),
    Option("validate-every", int, 250, "steps between validations (and checkpoints)", 1, None),
    SEED,
    Option("every", int, 1, "use every n-th frame of each video", 1, None),
    Option("max-frames-per-video", int, None, "use at most this many frames of each video", 1, None),
    SEGMENT_FRAMES.but(
        default=0,
        lo=0,
        help="0: one row = one frame (I-frame training); S >= 2: one row = S consecutive frames (I+P training)",
    ),
    TRAIN_PART,
    RD_WEIGHT,
    SKIP_THRESHOLD,
    Option(
        "ema",
        float,
        0.0,
        "decay per step of an exponential moving average of the weights, which validation and the checkpoints use "
        "(0 = off; 0.999 averages about the last 1,000 steps: a smoother, usually better model than the last step)",
        0,
        1,
        hi_open=True,
    ),
    Option(
        "compile",
        bool,
        False,
        "torch.compile the model's forward pass of frame-row training without DP (1.14x the crop pixels a second "
        "of a v4 step on the 2-core CPU, docs/results.md); the first steps wait for the compilation",
    ),
)

DP_OPTIONS = (NOISE_MULTIPLIER, MAX_GRAD_NORM, DELTA, ACCOUNTANT, GRAD_SAMPLE_MODE)
