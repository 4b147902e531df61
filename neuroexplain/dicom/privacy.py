"""Keep patient data out of logs: DICOM libraries' loggers may print element values (names, IDs, UIDs, dates).

pydicom logs element values at DEBUG (``pydicom.config.debug()``) and quotes invalid values in its warnings;
highdicom logs UIDs at INFO. Every logger of such a package (the package's and its submodules') gets one filter that
drops DEBUG/INFO records and replaces the text of the others by a fixed sentence naming only the logger and level
(:func:`redact_loggers`). Reading validation is set to ignore, so pydicom does not raise ``warnings`` that quote
header values while we parse (we validate what we use ourselves).
"""

from __future__ import annotations

import logging

import pydicom.config

WITHHELD = "record withheld: DICOM library messages may quote header values (patient data)"


class RedactDicomLogs(logging.Filter):
    """Drops DEBUG/INFO records and blanks the message of the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        record.msg = f"{record.name} {record.levelname.lower()}: {WITHHELD}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


_FILTER = RedactDicomLogs()


def redact_loggers(*packages: str) -> None:
    """Install the redacting filter on every logger of ``packages`` that exists now (idempotent, cheap; a filter on
    a parent does not see a child's records, so each logger gets its own)."""
    children = tuple(f"{p}." for p in packages)
    for name in [*packages, *(n for n in logging.root.manager.loggerDict if n.startswith(children))]:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def quiet_pydicom() -> None:
    """Redact pydicom's loggers and turn its reading validation off (no warnings quoting values while parsing)."""
    redact_loggers("pydicom")
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
