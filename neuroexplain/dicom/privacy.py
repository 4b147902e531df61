"""Keep patient data out of logs: pydicom's loggers may print element values (names, IDs, UIDs, dates).

pydicom logs element values at DEBUG (``pydicom.config.debug()``) and quotes invalid values in its warnings. Every
``pydicom`` logger (the package's and its submodules') gets a filter that drops DEBUG/INFO records and replaces the
text of the others by a fixed sentence naming only the logger and level. Reading validation is set to ignore, so
pydicom does not raise ``warnings`` that quote header values while we parse (we validate what we use ourselves).
"""

from __future__ import annotations

import logging

import pydicom.config

WITHHELD = "record withheld: pydicom messages may quote DICOM header values (patient data)"


class RedactPydicom(logging.Filter):
    """Drops DEBUG/INFO records and blanks the message of the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        record.msg = f"{record.name} {record.levelname.lower()}: {WITHHELD}"
        record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


_FILTER = RedactPydicom()


def quiet_pydicom() -> None:
    """Install the redacting filter on every ``pydicom`` logger that exists now (idempotent, cheap)."""
    names = ["pydicom", *(n for n in logging.root.manager.loggerDict if n.startswith("pydicom."))]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
