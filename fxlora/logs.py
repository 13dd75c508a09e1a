"""fxlora's decisions in the user's training logs, through the standard `logging` module.

Everything fxlora says goes to the logger "fxlora": at INFO one line per compiled graph
(sites found, rewritten, rejected), one line per site left alone, with the reason, and one per
distinct Dynamo graph break met while tracing for fxlora, with what to do; at DEBUG the whole
site report of every graph. Three ways to see it:

    FXLORA_LOG=info python train.py        # or debug; fxlora attaches a stderr handler on import
    TORCH_LOGS="fxlora" python train.py    # torch's switch: "+fxlora" for DEBUG, TORCH_LOGS_OUT=file
    fxlora.set_logs("info")                # from code; or configure logging.getLogger("fxlora") yourself
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

from fxlora.report import GraphBreak, GraphReport, checkpoint_note, summary

LOG_ENV = "FXLORA_LOG"
log = logging.getLogger("fxlora")
_handler: Optional[logging.Handler] = None
_breaks_logged: set = set()  # GraphBreak.key: a break met in many frames is said once


def set_logs(level: Union[str, int, None] = "info", stream=None) -> None:
    """Show fxlora's decisions at `level` ("debug", "info", "warning", or a logging level) on stderr.

    None removes the handler this function attached and resets the level.
    """
    global _handler
    if _handler is not None:
        log.removeHandler(_handler)
        _handler = None
    if level is None:
        log.setLevel(logging.NOTSET)
        return
    log.setLevel(_level(level))
    _handler = logging.StreamHandler(stream)
    _handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.addHandler(_handler)


def configure_from_env() -> None:
    """Called by `import fxlora`: honour FXLORA_LOG if set (a bad value warns, never fails the import)."""
    value = os.environ.get(LOG_ENV, "").strip()
    if not value:
        return
    try:
        set_logs(value)
    except ValueError as err:
        logging.getLogger("fxlora").warning("%s", err)


def _level(level: Union[str, int]) -> int:
    if isinstance(level, int):
        return level
    named = logging.getLevelName(str(level).upper())
    if not isinstance(named, int):
        raise ValueError(f"{LOG_ENV} / set_logs level must be debug, info, warning or error; got {level!r}")
    return named


def log_report(report: GraphReport) -> None:
    """One graph's report: its summary line, every site left alone and every rejection (each
    with the reason) at INFO, the full report at DEBUG."""
    if not log.isEnabledFor(logging.INFO):
        return
    graph = report.compile_id
    log.info("fxlora: graph %s: %s", graph, summary(report) if report.kinds else f"left untouched: {report.fallback}")
    for r in report.kinds:
        for d in r.decisions:
            if not d.rewritten:
                log.info("fxlora: graph %s %s site %d not rewritten: %s", graph, r.kind.title, d.site, d.reason)
        for x in r.match.rejections:
            log.info("fxlora: graph %s rejected %s%s: %s", graph, x.node, f" in {x.module}" if x.module else "", x.reason)
    for region in report.regions:  # sites inside activation-checkpointed regions
        for r in region.kinds:
            for d in r.decisions:
                if not d.rewritten:
                    log.info("fxlora: graph %s region %s %s site %d not rewritten: %s", graph, region.body,
                             r.kind.title, d.site, d.reason)
    if report.checkpointed_regions and not report.regions:
        log.info("fxlora: graph %s: %s", graph, checkpoint_note(report.checkpointed_regions))
    log.debug("fxlora: report of graph %s\n%s", graph, report.format(verbose=True))


def log_break(brk: GraphBreak) -> None:
    """A Dynamo graph break in one of fxlora's compiles, once per distinct break, at INFO."""
    if brk.key in _breaks_logged or not log.isEnabledFor(logging.INFO):
        return
    _breaks_logged.add(brk.key)
    log.info("fxlora: Dynamo graph break in %s: %s; what to do: %s", brk.frame or "a traced frame", brk.describe(),
             brk.advice)
