"""Fail fast without a network: if the Hub cannot be reached, run in offline mode instead of waiting on timeouts.

Imported by the recipes before transformers / datasets / huggingface_hub, which read HF_HUB_OFFLINE at import.
"""

import os
import socket
from urllib.parse import urlparse


def offline_requested() -> bool:
    """HF_HUB_OFFLINE read as huggingface_hub reads it (`constants._is_true`: 1, ON, YES or TRUE, any case), without
    importing it: it reads the variable once, at import, and this runs before."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def go_offline_if_hub_unreachable(timeout: float = 3.0) -> bool:
    """Set HF_HUB_OFFLINE=1 when the Hub's host does not answer within `timeout` seconds. Returns offline-ness."""
    if offline_requested():
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        print(f"{host} is unreachable: running offline (HF_HUB_OFFLINE=1); only local data and models will load.")
        return True
