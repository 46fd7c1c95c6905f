"""Fail fast without a network: if the Hub cannot be reached, run in offline mode instead of waiting on timeouts.

Imported by the recipes before transformers / datasets / huggingface_hub, which read HF_HUB_OFFLINE at import.
"""

import os
import socket
from urllib.parse import urlparse


def go_offline_if_hub_unreachable(timeout: float = 3.0) -> bool:
    """Set HF_HUB_OFFLINE=1 when the Hub's host does not answer within `timeout` seconds. Returns offline-ness."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return False
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        print(f"{host} is unreachable: running offline (HF_HUB_OFFLINE=1); only local data and models will load.")
        return True
