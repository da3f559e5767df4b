"""Studies: the Study spec and run_study, the in-trace strategies (projected, paired), the head
search, analysis, figures and the summary.

A study file needs only ``from qktrace.study import Study`` (and `StudyOption` for a setting of
its own that the command line passes); `run_study` and `load_study` run
one from Python. They are imported on first use, so that `qktrace show` (which reads
`qktrace.study.summary`) does not import the pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qktrace.core.lazy import lazy_names

if TYPE_CHECKING:
    from qktrace.study.pipeline import Run, Study, StudyOption, load_study, run_study

__all__ = ["Study", "StudyOption", "Run", "run_study", "load_study"]

lazy_names(__name__, dict.fromkeys(__all__, "qktrace.study.pipeline"))
