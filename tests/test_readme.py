"""The documentation's key tables against the code: every run-config key of the option schema and every
node-config key a site reads, with its default, and nothing else; the module map names every module.
Fast: parses Markdown and imports modules, starts no Flower run."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from client.ledger import state_dir_of
from client.personal import personal_dir
from client.policy import SitePolicy
from client.site import site_identity, site_out_dir
from common.config.fedconfig import RUN_OPTIONS
from common.errors import FedlvcError

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
FEDERATION = REPO / "docs" / "federation.md"
ARCHITECTURE = REPO / "docs" / "architecture.md"
UNSET = ("no limit", "as the run asks")  # how the tables write a policy value the site leaves open


def table(path: Path, first_header: str) -> dict[str, list[str]]:
    """{key: the row's other cells} of the Markdown table in ``path`` whose first header cell is ``first_header``;
    keys and cells without backticks and without a trailing remark in brackets."""
    lines = path.read_text().splitlines()
    header = f"| {first_header} |"
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert len(starts) == 1, f"{path.name}: expected one table headed {header!r}, found {len(starts)}"
    rows: dict[str, list[str]] = {}
    for line in lines[starts[0] + 2 :]:
        if not line.startswith("|"):
            break
        cells = [re.sub(r"\s*\(.*\)$", "", c.strip().replace("`", "")) for c in line.strip().strip("|").split("|")]
        assert cells[0] not in rows, f"{path.name}: key {cells[0]!r} appears twice in the table headed {header!r}"
        rows[cells[0]] = cells[1:]
    return rows


def key_problems(documented, expected, where: str) -> list[str]:
    missing, extra = sorted(set(expected) - set(documented)), sorted(set(documented) - set(expected))
    return ([f"{where} lacks key(s) {', '.join(missing)}"] if missing else []) + (
        [f"{where} lists key(s) {', '.join(extra)} that the code does not have"] if extra else []
    )


def test_readme_run_config_table_is_the_schema():
    rows = table(README, "run-config key")
    problems = key_problems(rows, [opt.name for opt in RUN_OPTIONS], "README's run-config table")
    for opt in (o for o in RUN_OPTIONS if o.name in rows):
        text = rows[opt.name][0]
        value = text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text
        try:
            ok = opt.convert(value) == opt.default
        except FedlvcError:
            ok = False
        if not ok:
            problems.append(f"README's run-config table: {opt.name} defaults to {text!r}; the schema: {opt.default!r}")
    assert not problems, "\n".join(problems)


class _Reads(dict):
    """An empty node config that records which keys the site's code asks it for."""

    def __init__(self):
        super().__init__()
        self.asked: list[str] = []

    def get(self, key, default=None):
        self.asked.append(key)
        return default

    def __getitem__(self, key):
        self.asked.append(key)
        raise KeyError(key)


def node_config_keys() -> list[str]:
    """Every node-config key the site reads, found by running the functions that read the node config on an empty
    one (each then reads every key it knows, taking its defaults)."""
    reads = _Reads()
    SitePolicy.of(reads)
    site_identity(reads)
    site_out_dir(reads, "site")
    personal_dir(reads, "site")
    state_dir_of(reads)
    return list(dict.fromkeys(reads.asked))


def _policy_value(policy: SitePolicy, key: str):
    value = getattr(policy, key.replace("-", "_"))
    return None if value is None or value == math.inf else value


def _documented_value(text: str, like):
    """A table cell as a policy value of the type of ``like`` (None: the cell must say the value is open)."""
    if text in UNSET:
        return None
    if isinstance(like, frozenset):
        items = frozenset(t.strip() for t in text.split(",") if t.strip())
        return frozenset() if items == {"none"} else items
    if isinstance(like, bool):
        return {"true": True, "false": False}.get(text, text)
    if isinstance(like, int | float):
        try:
            return float(text)
        except ValueError:
            return text
    return text


@pytest.mark.parametrize("path", [README, FEDERATION], ids=lambda p: p.name)
def test_node_config_tables_are_what_the_site_reads(path):
    rows = table(path, "node-config key")
    keys = node_config_keys()
    problems = key_problems(rows, keys, f"{path.name}'s node-config table")
    real, simulated = SitePolicy.of({"video-dir": "/videos"}), SitePolicy.of({})
    policy_keys = {f.name.replace("_", "-") for f in dataclasses.fields(SitePolicy)} & set(keys)
    assert policy_keys, "no node-config key maps onto a SitePolicy field"
    for key in sorted(policy_keys & set(rows)):
        for text, policy, kind in zip(rows[key][:2], (real, simulated), ("real video", "simulated")):
            want = _policy_value(policy, key)
            got = _documented_value(text, want if want is not None else _policy_value(real, key))
            if got != want:
                problems.append(
                    f"{path.name}: node-config {key} ({kind}) is documented as {text!r}; the code: {want!r}"
                )
    assert not problems, "\n".join(problems)


def test_architecture_module_map_names_every_module():
    text = ARCHITECTURE.read_text()
    modules = sorted(
        str(p.relative_to(REPO))
        for folder in ("common", "client", "server", "simulations")
        for p in (REPO / folder).rglob("*.py")
        if p.name != "__init__.py"
    )
    missing = [m for m in modules if f"`{m}`" not in text]
    assert not missing, f"docs/architecture.md's module map lacks {', '.join(missing)}"
