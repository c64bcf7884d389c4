"""Code location entry point: every definition lives in ``imaging_assets/defs``."""

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    """Load assets, checks, sensors, schedules, jobs and resources from the defs folder."""
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
