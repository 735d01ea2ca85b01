"""A site's privacy ledger: the DP accountant history ``[(σ, q, steps), ...]`` of everything the site has
released, which only grows.

With ``state-dir`` in the node config (required of a site that holds real video) the ledger lives on the
site's disk and is the only record that counts:

- ``privacy_ledger.json``: the history, the privacy unit, the counts of non-DP releases and a sequence
  number that grows with every save;
- ``privacy_ledger.seal``: the sequence number and total steps of the last save, written after it. A ledger
  that is missing, empty, damaged or older than its seal is an error, never a fresh start (only deleting
  both files starts a new site: keep state-dir backed up);
- ``privacy_ledger.lock``: an exclusive lock (``flock``) held from reading the ledger to saving what a round
  will spend, so concurrent runs on one state-dir serialise their spending.

A round's spending is written before the round trains (a crash mid-round counts as spent).

Without ``state-dir`` (simulated sites) the ledger lives in Flower's ``Context.state`` for the run; a run
continued with ``resume-from`` starts from the server's record of the earlier rounds (``earlier-ledgers``),
checked like a ledger on disk. Such a site has no memory of its own across runs: the server can make it
forget, which is why a site with real video must keep its ledger on disk.
"""

from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path

from common.errors import FedlvcError
from common.fedconfig import RunConfig
from common.privacy import check_privacy_unit, checked_history
from common.video import atomic_output

LEDGER, SEAL, LOCK = "privacy_ledger.json", "privacy_ledger.seal", "privacy_ledger.lock"


def earlier_ledger(config, name: str) -> dict | None:
    """This site's record ``{"unit_frames", "history"}`` in the ``earlier-ledgers`` the server sends with
    a training round of a run continued from ``resume-from`` (None when it has none); checked like a ledger."""
    try:
        doc = json.loads(str(config.get("earlier-ledgers", "{}")))
        if not isinstance(doc, dict):
            raise ValueError("not a mapping of sites to records")
        mine = doc.get(name)
        if mine is None:
            return None
        if not isinstance(mine, dict):
            raise ValueError(f"the record of {name} is not a mapping")
        unit_frames = mine.get("unit_frames", 1)
        if isinstance(unit_frames, bool) or not isinstance(unit_frames, int) or not 1 <= unit_frames <= 64:
            raise ValueError(f"unit_frames {unit_frames!r}")
        history = mine["history"]
    except (ValueError, TypeError, KeyError) as e:
        raise FedlvcError(f"the server's earlier-ledgers record is malformed: {e}") from None
    return {"unit_frames": unit_frames, "history": checked_history(history, "the server's earlier-ledgers record")}


class PrivacyLedger:
    def __init__(
        self, history, unit_frames: int, state_dir: Path | None = None, sequence: int = 0, releases: dict | None = None
    ):
        self.history = [tuple(h) for h in history]
        self.unit_frames, self.state_dir, self.sequence = unit_frames, state_dir, sequence
        self.releases = dict(releases or {})

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def spend(self, sigma: float, q: float, steps: int) -> None:
        """Add a round's spending; equal consecutive settings merge, as Opacus' accountants merge them."""
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))

    def count_release(self, what: str) -> None:
        self.releases[what] = self.releases.get(what, 0) + 1

    def flat(self) -> dict:
        """The history as three parallel lists (Flower metric records hold lists of numbers; never empty:
        a site that has spent nothing reports one entry of zero steps)."""
        history = self.history or [(0.0, 0.0, 0)]
        return {
            "dp_sigma": [float(s) for s, _, _ in history],
            "dp_sample_rate": [float(q) for _, q, _ in history],
            "dp_steps": [int(n) for _, _, n in history],
        }

    # ------------------------------------------------------------------ on disk (state-dir)

    @classmethod
    def _read(cls, state_dir: Path, unit_frames: int) -> PrivacyLedger:
        path, seal_path = state_dir / LEDGER, state_dir / SEAL
        seal = None
        if seal_path.exists():
            try:
                doc = json.loads(seal_path.read_text())
                seal = (int(doc["sequence"]), int(doc["steps"]))
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise FedlvcError(
                    f"privacy ledger seal {seal_path} is damaged ({e}); restore state-dir from a backup"
                ) from None
        if not path.exists():
            if seal is not None:
                raise FedlvcError(
                    f"privacy ledger {path} is missing, but this site has spent privacy before "
                    f"({seal[1]} DP steps, {seal_path}): restore it from a backup (a missing "
                    "ledger is never a fresh start)"
                )
            return cls([], unit_frames, state_dir)
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            history = checked_history(doc["history"], f"privacy ledger {path}")
            sequence = int(doc.get("sequence", 0))
            releases = {str(k): int(v) for k, v in dict(doc.get("releases", {})).items()}
            recorded_unit = int(doc.get("unit_frames", 1))
        except (OSError, ValueError, TypeError, KeyError, FedlvcError) as e:
            raise FedlvcError(
                f"privacy ledger {path} is damaged ({e}); restore it from a backup (a damaged ledger "
                "is never a fresh start)"
            ) from None
        ledger = cls(history, unit_frames, state_dir, sequence, releases)
        if seal is not None and (sequence < seal[0] or ledger.steps < seal[1]):
            raise FedlvcError(
                f"privacy ledger {path} is older than its seal ({ledger.steps} DP steps recorded, "
                f"{seal[1]} spent): a ledger only grows; restore the latest one"
            )
        if history:
            check_privacy_unit(
                recorded_unit, unit_frames, f"privacy ledger {path}", "use another state-dir or the same unit"
            )
        return ledger

    def _write(self, accountant: str, delta: float) -> None:
        self.sequence += 1
        doc = {
            "format": 2,
            "accountant": accountant,
            "delta": delta,
            "unit_frames": self.unit_frames,
            "sequence": self.sequence,
            "steps": self.steps,
            "releases": self.releases,
            "history": [list(h) for h in self.history],
        }
        with atomic_output(self.state_dir / LEDGER) as tmp:
            tmp.write_text(json.dumps(doc, indent=1))
        with atomic_output(self.state_dir / SEAL) as tmp:  # after the ledger: a crash leaves the ledger ahead
            tmp.write_text(json.dumps({"sequence": self.sequence, "steps": self.steps}))

    # ------------------------------------------------------------------ in a run (Context.state)

    def _save_state(self, context) -> None:
        from flwr.app import ConfigRecord

        if self.history:
            context.state["privacy"] = ConfigRecord(
                {
                    "sigma": [float(s) for s, _, _ in self.history],
                    "q": [float(q) for _, q, _ in self.history],
                    "steps": [int(n) for _, _, n in self.history],
                }
            )

    def save(self, context, accountant: str, delta: float) -> None:
        """Keep the ledger: on disk with ``state-dir`` (call inside :func:`open_ledger`'s lock), else in the
        run's ``Context.state``."""
        if self.state_dir is not None:
            self._write(accountant, delta)
        else:
            self._save_state(context)


@contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def state_dir_of(node_config) -> Path | None:
    value = str(node_config.get("state-dir", "") or "")
    return Path(value).expanduser() if value else None


@contextmanager
def open_ledger(context, rc: RunConfig, earlier: dict | None = None):
    """The site's ledger, locked for the block when it is on disk. Without ``state-dir``: this run's
    ``Context.state``, else (the first round of a resumed run) the server's ``earlier`` record."""
    state_dir = state_dir_of(context.node_config)
    if state_dir is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(state_dir / LOCK):
            yield PrivacyLedger._read(state_dir, rc.unit_frames)
        return
    if "privacy" in context.state:
        rec = context.state["privacy"]
        yield PrivacyLedger(zip(rec["sigma"], rec["q"], rec["steps"]), rc.unit_frames)
    elif earlier and earlier["history"]:
        check_privacy_unit(
            earlier["unit_frames"], rc.unit_frames, "the rounds before resume-from", "resume with the same unit"
        )
        yield PrivacyLedger(earlier["history"], rc.unit_frames)
    else:
        yield PrivacyLedger([], rc.unit_frames)
