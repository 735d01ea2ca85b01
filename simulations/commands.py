"""The ``fedlvc`` subcommands simulations adds: ``sweep``. Registered as the ``fedlvc.commands`` entry point in
pyproject.toml, so the client's command line finds it in the installed metadata and never imports simulations.
Light to import (the command line loads it on every start): the sweep itself is imported when the command runs."""

from __future__ import annotations


def cmd_sweep(args) -> int:
    from simulations.sweep import run_sweep  # imported when the command runs: building the parser stays fast

    out = run_sweep(args.config, args.out, progress=not args.quiet)
    print(f"results in {out / 'results.csv'}; plots privacy_quality.png, rd_curves.png, recon_grid.png")
    return 0


def sweep_parser(sub, subcommand) -> None:
    """``fedlvc sweep``; ``subcommand(sub, name, help, func)``: the command line's parser of one subcommand."""
    w = subcommand(sub, "sweep", "privacy vs quality: one federated simulation per noise setting", cmd_sweep)
    w.add_argument("config", help="YAML: noise-multipliers, num-sites, and any run-config key")
    w.add_argument("--out", required=True, help="output folder (a finished setting there is not rerun)")
