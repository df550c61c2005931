"""Telling the serving layer that the champion moved: ``POST {url}/v1/admin/reload``.

The request carries ``Authorization: Bearer <token>`` (the token is read from the environment
variable that ``[nightly.deploy] token_env`` names) and a JSON body naming the model. A failure
to notify is reported in the run summary; it never undoes a promotion (a server that missed
the call picks the alias up on its next reload or restart).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any

from pipelines.nightly.settings import DeploySettings

__all__ = ["RELOAD_PATH", "notify_reload", "reload_payload"]

logger = logging.getLogger(__name__)

RELOAD_PATH = "/v1/admin/reload"


def reload_payload(
    model_uri: str, version: str | int | None, reason: str, date: str | None = None
) -> dict[str, Any]:
    """The body of the reload request (``serving.schemas.ReloadRequest``): the model to load,
    and for the server's log the registry version the alias names, why, and the night."""
    payload: dict[str, Any] = {
        "model_uri": model_uri,
        "version": None if version is None else str(version),
        "reason": reason,
    }
    if date is not None:
        payload["date"] = date
    return payload


def notify_reload(deploy: DeploySettings, payload: dict[str, Any]) -> dict[str, Any]:
    """POST the reload request; never raises.

    Args:
        deploy: Where to send it and which environment variable holds the token.
        payload: JSON body (model URI, version, date).

    Returns:
        ``{"url", "ok", "status", "error"}``; ``{"url": None, "ok": None, ...}`` when no
        deployment target is configured.
    """
    if not deploy.url:
        return {"url": None, "ok": None, "status": None, "error": "no deployment target configured"}
    url = deploy.url.rstrip("/") + RELOAD_PATH
    token = os.environ.get(deploy.token_env, "")
    if not token:
        message = f"environment variable {deploy.token_env} is empty: no bearer token to send"
        logger.error("not notifying %s: %s", url, message)
        return {"url": url, "ok": False, "status": None, "error": message}
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=deploy.timeout_s) as response:  # noqa: S310
            status = int(response.status)
            body = response.read(2048).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        detail = exc.read(512).decode(errors="replace") if exc.fp is not None else ""
        message = f"HTTP {exc.code} from {url}: {detail or exc.reason}"
        logger.error("reload notification failed: %s", message)
        return {"url": url, "ok": False, "status": exc.code, "error": message}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        message = f"cannot reach {url}: {reason}"
        logger.error("reload notification failed: %s", message)
        return {"url": url, "ok": False, "status": None, "error": message}
    logger.info("serving layer notified: %s -> HTTP %d", url, status)
    return {"url": url, "ok": 200 <= status < 300, "status": status, "error": None, "body": body}
