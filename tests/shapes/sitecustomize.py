"""Makes this interpreter look like Windows' or macOS' to the proxy, on Linux (tests/test_platforms.py).

Put on PYTHONPATH with DICOM_PROXY_TEST_SHAPE=windows or =macos. The variable is removed at once, so the
proxy's children (the `az` stand-in) run as usual. Windows: the Unix-only modules `resource` and `fcntl`,
`os.fork`, `socket.SO_REUSEPORT` and /proc are gone, and the event loop's `add_signal_handler` raises
NotImplementedError, as Windows' loops do. macOS: only /proc is gone. psutil, the platform layer the
proxy asks for processes, still reads /proc: it has its own backend on each platform.
"""

import builtins
import io
import os
import sys

SHAPE = os.environ.pop("DICOM_PROXY_TEST_SHAPE", None)


def _hide_proc() -> None:
    real_open, real_scandir, real_listdir = builtins.open, os.scandir, os.listdir

    def from_psutil() -> bool:
        return sys._getframe(3).f_globals.get("__name__", "").startswith("psutil")

    def refuse(path: object) -> bool:
        text = os.fsdecode(path) if isinstance(path, str | bytes | os.PathLike) else ""
        return text.startswith("/proc") and not from_psutil()

    def guarded_open(file, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if refuse(file):
            raise FileNotFoundError(2, "no /proc on this platform", str(file))
        return real_open(file, *args, **kwargs)

    def guarded_scandir(path="."):  # noqa: ANN001, ANN202
        if refuse(path):
            raise FileNotFoundError(2, "no /proc on this platform", str(path))
        return real_scandir(path)

    def guarded_listdir(path="."):  # noqa: ANN001, ANN202
        if refuse(path):
            raise FileNotFoundError(2, "no /proc on this platform", str(path))
        return real_listdir(path)

    builtins.open = io.open = guarded_open
    os.scandir, os.listdir = guarded_scandir, guarded_listdir


if SHAPE in ("windows", "macos"):
    _hide_proc()
if SHAPE == "windows":
    import socket
    from asyncio import unix_events

    import psutil  # noqa: F401  (its Linux backend needs `resource`: loaded before that is hidden)

    for name in ("resource", "fcntl"):
        sys.modules[name] = None  # type: ignore[assignment]  # `import resource` raises ImportError
    for name in ("fork", "forkpty"):
        if hasattr(os, name):
            delattr(os, name)
    if hasattr(socket, "SO_REUSEPORT"):
        del socket.SO_REUSEPORT

    def no_signal_handlers(self, sig, callback, *args):  # noqa: ANN001, ANN002, ANN202
        raise NotImplementedError

    unix_events._UnixSelectorEventLoop.add_signal_handler = no_signal_handlers  # type: ignore[method-assign]
if SHAPE:
    print(f"sitecustomize: this interpreter is shaped like {SHAPE}", file=sys.stderr, flush=True)
