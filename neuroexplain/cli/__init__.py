"""The ``neuroexplain`` command line: one entry point, one module per command under ``commands/``."""
