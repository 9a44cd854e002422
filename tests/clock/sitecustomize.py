"""Moves the clock that chat templates read (transformers' ``strftime_now``) by
``RAYCAT_TEST_DAYS_AHEAD`` days, in every process that puts this directory on PYTHONPATH: the CLI and
the Ray workers it starts alike. The end-to-end test reruns a finished job "the next day" with it."""

from __future__ import annotations

import os

_DAYS = os.environ.get("RAYCAT_TEST_DAYS_AHEAD")
_MODULE = "transformers.utils.chat_template_utils"


def _shifted(days: float):
    import datetime as dt

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + dt.timedelta(days=days)

    return Later


def _install(days: float) -> None:
    import importlib.abc
    import importlib.util
    import sys

    class Hook(importlib.abc.MetaPathFinder):
        """Patches the module right after it is executed, wherever it is first imported."""

        def find_spec(self, name, path, target=None):
            if name != _MODULE:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            execute = spec.loader.exec_module

            def exec_module(module):
                execute(module)
                module.datetime = _shifted(days)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())


if _DAYS:
    _install(float(_DAYS))
