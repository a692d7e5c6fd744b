"""Report, at the end of an inference run, the inputs it left out."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from ignite.engine import Events

from common.files import write_text_atomic

SKIPPED_FILE = "skipped_inputs.csv"


class ReportSkippedInputs:
    """On completion, log the inputs that ``inference_items(..., skip_bad_inputs=True)`` left out and
    write them as ``<output_dir>/skipped_inputs.csv`` (``file,problem``).

    The list comes last in the log, where a long folder run ends, so bad files are not lost among
    thousands of lines; a run that skipped nothing removes a list left by an earlier run in the folder.
    """

    def __init__(self, items, output_dir: str | os.PathLike, logger_name: str = "ReportSkippedInputs"):
        self.skipped = list(getattr(items, "skipped", ()))
        self.path = Path(output_dir) / SKIPPED_FILE
        self.logger = logging.getLogger(logger_name)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        if not self.skipped:
            self.path.unlink(missing_ok=True)
            return
        rows = io.StringIO()
        writer = csv.writer(rows)
        writer.writerow(["file", "problem"])
        writer.writerows(self.skipped)
        write_text_atomic(self.path, rows.getvalue())
        lines = "\n".join(f"  {problem}" for _, problem in self.skipped)
        self.logger.warning(f"{len(self.skipped)} input(s) skipped (listed in {self.path}):\n{lines}")
