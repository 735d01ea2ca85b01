"""The ClientApp of a test federation with faults (``clientapp = "tests.fault_app:app"`` in a copy of the app
made by tests/fault_mod.py's ``app_with_faults``): client.app's handlers, striking the faults of the plan
written next to this file."""

from pathlib import Path

from tests.fault_mod import PLAN_FILE, faulty_app, read_plan

app = faulty_app(read_plan(Path(__file__).with_name(PLAN_FILE)))
