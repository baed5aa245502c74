"""Fetching a query image by URL, for ``{"image": {"url": ...}}``: off unless ``--allow-url-fetch`` lists
the host, and then only to public addresses.

A server that fetches URLs for strangers is a classic way into a private network (SSRF: cloud metadata at
169.254.169.254, admin pages on localhost). So: the host must be listed; every address the name resolves
to must be public (not private, loopback, link-local, multicast, reserved or unspecified; IPv4-mapped IPv6
counts as its IPv4), and the connection goes to the address that was checked (the Host header and TLS
server name stay the listed host), so a second DNS answer cannot swap in another; redirects are followed
by hand, each hop checked the same way; the body is capped (``max_bytes``) while it streams, and the
whole fetch has one deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from vitrine.errors import VitrineError


class FetchRefused(VitrineError):
    """A URL the server will not fetch (or could not); ``reason`` is the error label."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class FetchPolicy:
    """Which hosts may be fetched from, and the limits of one fetch."""

    hosts: frozenset[str] = frozenset()
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 5.0
    max_redirects: int = 3


def public_address(ip: str) -> bool:
    """True for an address on the public internet; False for anything a server should not be sent to."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    bad = (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )
    return addr.is_global and not bad


def resolve_public(host: str, port: int) -> str:
    """The address to connect to: every address ``host`` resolves to must be public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchRefused("url_fetch_failed", f"cannot resolve {host!r}: {exc}") from None
    addresses = sorted({str(info[4][0]) for info in infos})
    if not addresses or not all(public_address(a) for a in addresses):
        raise FetchRefused("url_not_allowed", f"{host!r} resolves to a private or local address")
    return addresses[0]


def fetch_image(url: str, policy: FetchPolicy) -> bytes:
    """The bytes at ``url`` under ``policy`` (see the module docstring), or FetchRefused."""
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        host, port, target = _checked(url, policy)
        ip = resolve_public(host, port)
        response = _get(url, host, port, ip, target, deadline, policy)
        if isinstance(response, str):
            url = urljoin(url, response)
            continue
        return response
    raise FetchRefused("url_fetch_failed", f"more than {policy.max_redirects} redirects")


def _checked(url: str, policy: FetchPolicy) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchRefused("bad_image", "an image URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise FetchRefused("bad_image", "an image URL must not carry credentials")
    host = parts.hostname.lower().rstrip(".")
    if host not in policy.hosts:
        raise FetchRefused("url_not_allowed", f"this server does not fetch images from {host!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = parts.path or "/"
    return host, port, target + (f"?{parts.query}" if parts.query else "")


def _get(
    url: str, host: str, port: int, ip: str, target: str, deadline: float, policy: FetchPolicy
) -> bytes | str:
    """One GET to the checked address: the body, or the redirect's Location."""
    scheme = urlsplit(url).scheme
    literal = f"[{ip}]" if ":" in ip else ip
    timeout = max(0.1, deadline - time.monotonic())
    headers = {"Host": host if port in (80, 443) else f"{host}:{port}", "Accept": "image/*"}
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
            client.stream(
                "GET",
                f"{scheme}://{literal}:{port}{target}",
                headers=headers,
                extensions={"sni_hostname": host},
            ) as response,
        ):
            if response.is_redirect and "location" in response.headers:
                return response.headers["location"]
            if response.status_code != 200:
                raise FetchRefused("url_fetch_failed", f"the image URL answered {response.status_code}")
            return _body(response, deadline, policy)
    except httpx.HTTPError as exc:
        raise FetchRefused("url_fetch_failed", f"cannot fetch the image URL: {type(exc).__name__}") from None


def _body(response: httpx.Response, deadline: float, policy: FetchPolicy) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise FetchRefused("upload_too_large", f"the image at the URL is over {policy.max_bytes} bytes")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > policy.max_bytes:
            raise FetchRefused("upload_too_large", f"the image at the URL is over {policy.max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchRefused("url_fetch_failed", "fetching the image URL took too long")
        chunks.append(chunk)
    return b"".join(chunks)
