"""ipywidgets controls with static twins: when no front end is attached (papermill, CI, a plain
Python process) every control renders a static table or figure instead.
"""

from __future__ import annotations

import os
import sys


def has_frontend() -> bool:
    """True only inside an IPython kernel that a live front end (Jupyter, Colab) is attached to.

    ``QLORA_SERIES_STATIC=1`` forces the static twins (papermill runs set it).
    """
    if os.environ.get("QLORA_SERIES_STATIC") == "1":
        return False
    if "google.colab" in sys.modules:
        return True
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    if ip is None or not hasattr(ip, "kernel"):
        return False
    return "PAPERMILL_EXECUTION" not in os.environ and "papermill" not in sys.modules
