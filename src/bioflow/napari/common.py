"""What both widgets share: running work in a thread, reporting to the viewer, and telling the
predict widgets when a training run has finished."""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

from qtpy.QtCore import QObject, Signal

log = logging.getLogger("bioflow.napari")


class Relay(QObject):
    """Carries reports from a worker thread to the widget (Qt queues them to the main thread)."""

    progressed = Signal(int, int)
    event = Signal(str, int, object)


#: Weak references to the methods told about every training run the train widgets finish (the
#: predict widgets then list it); a closed widget drops out.
_run_listeners: list[weakref.WeakMethod] = []


def on_new_run(listener: Callable[[str], None]) -> None:
    _run_listeners.append(weakref.WeakMethod(listener))


def announce_run(run_id: str) -> None:
    for ref in list(_run_listeners):
        listener = ref()
        try:
            if listener is None or not alive(listener.__self__):
                raise RuntimeError("gone")
            listener(run_id)
        except RuntimeError:  # a widget whose Qt object is gone
            _run_listeners.remove(ref)


def alive(widget) -> bool:
    """Whether a magicgui widget's Qt object still exists (napari deletes it with its viewer)."""
    try:
        widget.native.objectName()
        return True
    except RuntimeError:
        return False


def compact(container, width: int = 460) -> None:
    """Keep a dock widget narrow whatever its texts: long status lines wrap, long choices elide."""
    from qtpy.QtWidgets import QComboBox, QLabel

    container.native.setMaximumWidth(width)
    for label in container.native.findChildren(QLabel):
        label.setWordWrap(True)
    for box in container.native.findChildren(QComboBox):
        box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        box.setMinimumContentsLength(12)


def message(exc: BaseException) -> str:
    """One line for the viewer: bioflow's own message, or the error's type and first line."""
    from bioflow.errors import BioflowError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, BioflowError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def tell(kind: str, text: str) -> None:
    """A notification in the viewer (no traceback dialog), and the same line in the log."""
    from napari.utils import notifications

    (log.warning if kind != "info" else log.info)("%s", text)
    show = {"info": notifications.show_info, "warning": notifications.show_warning,
            "error": notifications.show_error}[kind]
    show(text)


def start(owner, work: Callable[[], Any], returned: Callable[[Any], None], errored: Callable[[BaseException], None],
          finished: Callable[[], None] | None = None):
    """Run ``work`` in a worker thread; the callbacks run in the main thread, unless the
    ``owner`` widget was closed meanwhile (its viewer closed)."""
    from napari.qt.threading import create_worker

    def while_open(callback):
        def call(*args):
            if alive(owner):
                callback(*args)
        return call

    # errors are ours to report (a line in the viewer), not re-raised as a traceback dialog
    connect = {"returned": while_open(returned), "errored": while_open(errored),
               **({"finished": while_open(finished)} if finished else {})}
    return create_worker(work, _connect=connect, _start_thread=True)
