"""A site's privacy ledger: the DP accountant history ``[(σ, q, steps), ...]`` of everything the site has
released, which only grows.

With ``state-dir`` in the node config (required of a site that holds real video) the ledger lives on the
site's disk and is the only record that counts:

- ``privacy_ledger.json``: the history, the privacy unit, the counts of non-DP releases and a sequence
  number that grows with every save;
- ``privacy_ledger.seal``: the sequence number and total steps of the last save, written after it. A ledger
  that is missing, empty, damaged or older than its seal is an error, never a fresh start (only deleting
  both files starts a new site: keep state-dir backed up);
- ``privacy_ledger.key``: a secret made at the first save (0600, never replaced). Both files above end with
  ``mac``, a keyed hash (HMAC-SHA256) of their exact text: any edit, a file from another state-dir or a
  ledger whose key is gone is an error. Whoever can read the key can still rewrite both files, or put back
  an older state-dir whole; the seal cannot tell that from a real history;
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
import hashlib
import hmac
import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

from common.config.fedconfig import RunConfig
from common.data.video import atomic_output
from common.errors import FedlvcError
from common.train.privacy import check_privacy_unit, checked_history

LEDGER, SEAL, LOCK, KEY = "privacy_ledger.json", "privacy_ledger.seal", "privacy_ledger.lock", "privacy_ledger.key"
FORMAT = 3  # 3: both files sealed with the key; 2 (before): unsealed, see seal_old_ledger
KEY_BYTES = 32


def _sealed_text(doc: dict, key: bytes, name: str) -> str:
    """The text of the file ``name`` holding ``doc``: its JSON and ``mac``, the keyed hash of that JSON and of
    the file's name (so that neither file can stand for the other)."""
    body = json.dumps(doc, indent=1)
    mac = hmac.new(key, f"{name}\n{body}".encode(), hashlib.sha256).hexdigest()
    return json.dumps({**doc, "mac": mac}, indent=1)


def _read_key(path: Path) -> bytes | None:
    """The site's secret (None when there is none yet); it must be private to the site's account."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise FedlvcError(f"privacy ledger key {path} cannot be read ({e.strerror}); restore state-dir") from None
    with os.fdopen(fd, "rb") as f:
        info, text = os.fstat(f.fileno()), f.read(4 * KEY_BYTES)
    if info.st_mode & 0o077 or info.st_uid != os.geteuid():
        raise FedlvcError(
            f"privacy ledger key {path} must be private to the site's account: chmod 600 it, owned by that account"
        )
    try:
        key = bytes.fromhex(text.decode())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise FedlvcError(f"privacy ledger key {path} is damaged; restore state-dir from a backup")
    return key


def _new_key(path: Path) -> bytes:
    """A fresh secret at ``path``, 0600 from its creation and whole when it appears (linked from a temporary
    file); never replaces a key that exists: then that key."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.write(fd, secrets.token_hex(KEY_BYTES).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made the key first: use it
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key(path)


def _unsealed(path: Path, key: bytes | None, what: str, old_ok: bool = False) -> dict | None:
    """The content of the ledger file ``path`` without its ``mac`` (None when there is no file): it must be
    exactly what :func:`_sealed_text` wrote with ``key`` (an unsealed one of format 2 only with ``old_ok``)."""
    if not path.exists():
        return None
    try:
        raw = path.read_bytes()  # not read_text: its newline translation would hide an edited "\r"
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise _damaged(what, path, e) from None
    if "mac" not in doc and old_ok:
        return doc
    if key is None and "mac" not in doc:  # with a key, an unsealed file is an edited one
        raise FedlvcError(
            f"{what} {path} was written before ledgers were sealed: check that it is this site's latest ledger, "
            f"then seal it once with `fedlvc seal-ledger {path.parent}`"
        )
    if key is None:
        raise FedlvcError(
            f"privacy ledger key {path.parent / KEY} is missing, but {path} exists: restore state-dir from a "
            "backup (a ledger without its key is never a fresh start)"
        )
    content = {k: v for k, v in doc.items() if k != "mac"}
    if not hmac.compare_digest(raw, _sealed_text(content, key, path.name).encode()):
        raise FedlvcError(
            f"{what} {path} does not match its seal key {KEY}: it was edited or comes from another state-dir; "
            "restore state-dir from a backup"
        )
    return content


def _damaged(what: str, path: Path, e: Exception) -> FedlvcError:
    return FedlvcError(
        f"{what} {path} is damaged ({e}); restore state-dir from a backup (a damaged ledger is never a fresh start)"
    )


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
    def _read(cls, state_dir: Path, unit_frames: int | None, old_ok: bool = False) -> PrivacyLedger:
        """The ledger in ``state_dir`` (``unit_frames`` None: the recorded unit); ``old_ok`` accepts files
        written before ledgers were sealed (:func:`seal_old_ledger`)."""
        path, seal_path = state_dir / LEDGER, state_dir / SEAL
        key = _read_key(state_dir / KEY)
        doc = _unsealed(path, key, "privacy ledger", old_ok)
        seal = _unsealed(seal_path, key, "privacy ledger seal", old_ok)
        if seal is not None:
            try:
                seal = (int(seal["sequence"]), int(seal["steps"]))
            except (ValueError, TypeError, KeyError) as e:
                raise _damaged("privacy ledger seal", seal_path, e) from None
        if doc is None:
            if seal is not None:
                raise FedlvcError(
                    f"privacy ledger {path} is missing, but this site has spent privacy before "
                    f"({seal[1]} DP steps, {seal_path}): restore it from a backup (a missing "
                    "ledger is never a fresh start)"
                )
            return cls([], unit_frames, state_dir)
        try:
            history = checked_history(doc["history"], f"privacy ledger {path}")
            sequence = int(doc.get("sequence", 0))
            releases = {str(k): int(v) for k, v in dict(doc.get("releases", {})).items()}
            recorded_unit = int(doc.get("unit_frames", 1))
        except (ValueError, TypeError, KeyError, FedlvcError) as e:
            raise _damaged("privacy ledger", path, e) from None
        ledger = cls(history, recorded_unit if unit_frames is None else unit_frames, state_dir, sequence, releases)
        if seal is not None and (sequence < seal[0] or ledger.steps < seal[1]):
            raise FedlvcError(
                f"privacy ledger {path} is older than its seal ({ledger.steps} DP steps recorded, "
                f"{seal[1]} spent): a ledger only grows; restore the latest one"
            )
        if history:
            check_privacy_unit(
                recorded_unit, ledger.unit_frames, f"privacy ledger {path}", "use another state-dir or the same unit"
            )
        return ledger

    def _write(self, accountant: str, delta: float) -> None:
        self.sequence += 1
        key = _read_key(self.state_dir / KEY) or _new_key(self.state_dir / KEY)
        doc = {
            "format": FORMAT,
            "accountant": accountant,
            "delta": delta,
            "unit_frames": self.unit_frames,
            "sequence": self.sequence,
            "steps": self.steps,
            "releases": self.releases,
            "history": [list(h) for h in self.history],
        }
        with atomic_output(self.state_dir / LEDGER) as tmp:
            tmp.write_text(_sealed_text(doc, key, LEDGER))
        with atomic_output(self.state_dir / SEAL) as tmp:  # after the ledger: a crash leaves the ledger ahead
            tmp.write_text(_sealed_text({"sequence": self.sequence, "steps": self.steps}, key, SEAL))

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


def seal_old_ledger(state_dir: Path) -> PrivacyLedger:
    """Seal a ledger written before ledgers were sealed (format 2), once: the site's deliberate step, never
    taken silently (else deleting the key would seal an edited ledger). Checked as before (damaged, missing,
    older than its seal), then saved sealed with the key, made now if there is none."""
    path = state_dir / LEDGER
    if not path.exists():
        raise FedlvcError(f"there is no privacy ledger {path} to seal")
    with _exclusive(state_dir / LOCK):
        ledger = PrivacyLedger._read(state_dir, None, old_ok=True)
        recorded = json.loads(path.read_text())  # checked by _read; the accountant and δ it records stay
        ledger._write(recorded.get("accountant"), recorded.get("delta"))
    return ledger
