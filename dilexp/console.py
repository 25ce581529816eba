"""A job's console: dilexp's own lines and the warnings that matter, set up once per process.

What a bare `python -m dilexp` printed before its first metric line was mostly other
packages talking: Lightning's INFO lines twice (its own handler and, through the root
logger, Hydra's), an advert for another logger, warnings about our own run folder and
about code inside a dependency. ``quiet_console`` turns those off by name; every other
warning still shows (nothing here silences a category or a package's warnings wholesale).
"""

from __future__ import annotations

import logging
import warnings

# Lightning's loggers: INFO is start-up chatter (accelerator found, a tip, "fit stopped"),
# WARNING and above still show.
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")

# (message pattern, why it is noise here): each names one warning, never a category.
IGNORED_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"The `srun` command is available on your system but is not used",
     "a machine with SLURM tools installed is not a SLURM job; launcher=slurm submits properly"),
    (r"Experiment logs directory .* exists and is not empty",
     "CSVLogger writes into the run folder, which already holds .hydra/ and summary.json; "
     "it only ever rewrites its own metrics.csv"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "raised inside Lightning's own code by newer torch; nothing a user of dilexp can change"),
)


def quiet_console() -> None:
    """Apply the filters above and keep Lightning to warnings, each printed once. Safe to
    call more than once (a multirun calls it per job)."""
    import lightning.pytorch  # noqa: F401  (its import sets its loggers to INFO: set them after)

    for pattern, _why in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    root_has_handlers = logging.getLogger().hasHandlers()
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        if logger.handlers and root_has_handlers:
            # Its own handler prints the line; passing it on to Hydra's root handler printed it twice.
            logger.propagate = False
