"""Progress of downloads and batch jobs: a tqdm bar on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import logging
import sys
from typing import Any

from tqdm.std import tqdm

log = logging.getLogger("gguf_appliance.fetch")


class LogLineProgress(tqdm):  # type: ignore[type-arg]
    """A tqdm that logs one line every `mininterval` seconds instead of drawing a bar.

    journald and CI logs get `model.gguf: 512M/1.9G [00:09<00:26, 53.1MB/s]` lines: bytes,
    rate and time left, never carriage returns.
    """

    logger: logging.Logger = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("mininterval", 10.0)
        kwargs["miniters"] = 1
        kwargs["disable"] = False
        kwargs["file"] = sys.stderr
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        if self.n:  # the empty first frame says nothing
            self.logger.info("%s", msg or self.format_meter(**self.format_dict))


def progress_class(interval: float, logger: logging.Logger = log) -> type[tqdm]:  # type: ignore[type-arg]
    """The tqdm class for this process: a bar on a terminal, log lines otherwise."""
    if sys.stderr.isatty():
        return tqdm

    class Periodic(LogLineProgress):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["mininterval"] = interval
            super().__init__(*args, **kwargs)

    Periodic.logger = logger
    return Periodic


def new_bar(cls: type[tqdm], total: int | None, name: str, initial: int = 0) -> tqdm:  # type: ignore[type-arg]
    return cls(
        total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024
    )
