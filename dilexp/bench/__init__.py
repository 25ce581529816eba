"""Building blocks of task=bench: timing with spread, useful-FLOP counts, per-case memory, reports.

Orchestration (config -> cases -> rows) lives in ``dilexp.tasks.bench``; nothing here knows
about Hydra or Lightning, so the pieces can be reused from notebooks and tests.
"""
