"""Implementations of ``service.backend.Backend``: ``inprocess`` (the library in this process) and ``torchserve``."""
