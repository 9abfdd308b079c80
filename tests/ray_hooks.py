"""Run in every Ray worker process the Ray tests start (worker_process_setup_hook): decoding
the image named by the control file kills the process, as a decoder crash or the OOM killer
would, either every time ("always") or the first time only ("once"); or ("outside", with
"times": N) the first N times a loader's decode worker decodes it, as the OOM killer would,
but never the decoder probe that then looks for a crashing file. Each kill adds a line to
the control file's ".killed" companion. No hook in the code."""

from __future__ import annotations

import json
import os
import signal

CONTROL = "LABEL_IMAGES_RAY_CONTROL"  # env: the control file's path


def install() -> None:
    from pipeline import loader

    real_decode = loader.decode

    def decode(data, *args, **kwargs):
        path = os.environ.get(CONTROL)
        if path and os.path.exists(path):
            with open(path) as fh:
                control = json.load(fh)
            with open(control["image"], "rb") as fh:
                poison = fh.read()
            if data == poison:
                flag = path + ".killed"
                kills = open(flag).read().count("\n") if os.path.exists(flag) else 0
                if control["mode"] == "outside":
                    from torch.utils.data import get_worker_info
                    kill = get_worker_info() is not None and kills < control["times"]
                else:
                    kill = control["mode"] == "always" or not kills
                if kill:
                    with open(flag, "a") as fh:
                        fh.write("killed\n")
                    os.kill(os.getpid(), signal.SIGKILL)
        return real_decode(data, *args, **kwargs)

    loader.decode = decode
