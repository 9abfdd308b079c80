"""Loaded by every Python process the test's Spark workers start (their PYTHONPATH): when the
control file names an image, decoding it kills, the first time only ("executor": the task's
executor JVM, as a lost machine or the OOM killer would) or every time ("always": the task's
Python worker, a decoder crash). Each kill adds a line to the control file's ".killed"
companion. No hook in the code: pipeline.loader.decode is wrapped once it is imported."""

from __future__ import annotations

import json
import os
import signal
import sys

CONTROL = "LABEL_IMAGES_SPARK_CONTROL"


class _Wrapper:
    """An import hook that wraps pipeline.loader.decode once the module is executed."""

    def find_spec(self, name, path=None, target=None):
        if name != "pipeline.loader":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _install(module)

        spec.loader.exec_module = exec_module
        return spec


def _install(loader) -> None:
    real_decode = loader.decode

    def decode(data, *args, **kwargs):
        path = os.environ.get(CONTROL)
        if path and os.path.exists(path):
            with open(path) as fh:
                control = json.load(fh)
            with open(control["image"], "rb") as fh:
                poison = fh.read()
            flag = path + ".killed"
            kills = open(flag).read().count("\n") if os.path.exists(flag) else 0
            if data == poison and (control["mode"] == "always" or not kills):
                with open(flag, "a") as fh:
                    fh.write("killed\n")
                if control["mode"] == "executor":  # the JVM above pyspark's daemon
                    daemon = os.getppid()
                    with open(f"/proc/{daemon}/stat") as fh:
                        executor = int(fh.read().rsplit(")", 1)[1].split()[1])
                    os.kill(executor, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_decode(data, *args, **kwargs)

    loader.decode = decode


if os.environ.get(CONTROL):
    sys.meta_path.insert(0, _Wrapper())
