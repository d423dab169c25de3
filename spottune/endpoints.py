"""Endpoint URLs and S3 regions as the settings accept them: no credentials, a strict shape, and messages
that never repeat what may be a secret."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, urlsplit


def refuse_url_credentials(url: str | None) -> str | None:
    """Endpoints carry no credentials: boto3 ignores user:password@ in a URL, and the URL is logged.

    Credentials come from boto3's standard chain only (AWS_* variables, a profile, an instance role),
    so a secret typed into an endpoint is refused instead of being written to .dvc/config.local, logs
    and error messages. The message does not repeat the URL.
    """
    if url is not None and urlsplit(url).username is not None:
        raise ValueError("credentials in the URL (user:password@) are not allowed and not used: give them through "
                         "boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)")
    return url


_NETLOC = re.compile(r"(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
REGION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


def _split(url: str) -> SplitResult | None:
    """The URL's parts, or None where urlsplit (or its port, not a number in 0..65535) refuses it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    return parts


def check_endpoint_url(url: str | None) -> str | None:
    """An S3 endpoint: http(s)://HOST[:PORT][/PATH] and nothing else (botocore refused the rest with a bare
    ValueError that repeated the whole string). The message never repeats the URL: what is malformed in
    it may be a secret pasted there."""
    if url is None:
        return url
    parts = _split(url)
    if parts is not None and parts.username is not None:
        refuse_url_credentials(url)
    if (parts is None or parts.scheme not in ("http", "https") or not _NETLOC.fullmatch(parts.netloc)
            or parts.query or parts.fragment or "#" in url or "?" in url or not url.isprintable() or " " in url):
        raise ValueError("malformed endpoint URL: expected http(s)://HOST[:PORT][/PATH] (the value is not shown)")
    return url


def check_webhook_url(url: str | None) -> str | None:
    """A webhook: http(s)://HOST[:PORT][/PATH][?QUERY], no user:password@. Path and query may carry the
    webhook's token, so the message never repeats the URL."""
    if url is None or url == "":
        return None
    parts = _split(url)
    if (parts is None or parts.scheme not in ("http", "https") or parts.username is not None
            or not _NETLOC.fullmatch(parts.netloc) or not url.isprintable() or " " in url):
        raise ValueError("malformed webhook URL: expected http(s)://HOST[:PORT][/PATH][?QUERY], without "
                         "user:password@ (the value is not shown)")
    return url


def shown_endpoint(url: Any) -> str:
    """scheme://host of an endpoint for a message, or '(not shown)': never the rest, which may hold a secret."""
    try:
        parts = urlsplit(str(url))
        netloc = parts.netloc.rsplit("@", 1)[-1]
    except ValueError:
        return "(not shown)"
    host = _NETLOC.match(netloc)
    if parts.scheme in ("http", "https") and host:
        return f"{parts.scheme}://{host.group('host')}"
    return "(not shown)"


def redact_url_credentials(text: str) -> str:
    """'http://user:secret@host' -> 'http://***@host' anywhere in text: messages never echo a secret."""
    return re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]*@", r"\1***@", text)
