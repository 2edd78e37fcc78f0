"""Started in every Python process the tests start (tests/conftest.py puts this folder on
PYTHONPATH): when torch is imported, a global forward hook records in $SM_TEST_MODEL_USE that
this process ran a model, so that the test which started it must carry the ``numerics`` marker
(``make test-foreign`` repeats exactly those tests under another CPU's kernels)."""

from __future__ import annotations

import os
import sys

_PATH = os.environ.get("SM_TEST_MODEL_USE")


def _record(module, inputs, output):  # a torch forward hook: called after every forward
    global _PATH
    if _PATH:
        with open(_PATH, "a") as file:  # several children may share one test's file
            file.write(f"{os.getpid()} {type(module).__name__}\n")
        _PATH = None  # once is enough


class _WatchTorch:
    """Lets torch import as usual, then adds the hook (a meta path finder for 'torch' only)."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_watch(module):
            exec_module(module)
            module.nn.modules.module.register_module_forward_hook(_record)

        spec.loader.exec_module = exec_and_watch
        return spec


if _PATH and "torch" not in sys.modules:
    sys.meta_path.insert(0, _WatchTorch())
