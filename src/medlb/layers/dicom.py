"""DICOM association admission and routing: who may associate, and which backend serves them.

Pure (ring 3): the I/O ring decodes the A-ASSOCIATE-RQ and asks :meth:`DicomPolicy.admit`
for a :class:`Admission`. Checks run in the order an archive's own configuration would apply
them, so the reject reason is the one the client's operator can act on:

1. the source network (``allow_networks``): a refused peer gets "no reason given", since
   telling an unknown network which AE titles exist would help it;
2. the calling AE title (``allow_calling``, and with DICOM TLS the titles its certificate may
   use): reason 3, calling AE title not recognised;
3. the called AE title (``allow_called``): reason 7, called AE title not recognised.

Then the routing rules, first match wins, else the frontend's default backend.

AE titles compare without their leading and trailing spaces (PS3.5 §6.2: not significant);
patterns use ``*`` and ``?`` and are case-sensitive, as AE titles are.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from medlb.config import DicomFrontendSettings, FrontendConfig

Net = IPv4Network | IPv6Network

#: A-ASSOCIATE-RJ fields (PS3.8 §9.3.4): result, source, reason.
REJECTED_PERMANENT = 1
REJECTED_TRANSIENT = 2
SOURCE_USER = 1
SOURCE_PRESENTATION = 3
REASON_NONE = 1
REASON_CALLING_AE = 3
REASON_CALLED_AE = 7
REASON_CONGESTION = 1
REASON_LOCAL_LIMIT = 2


@dataclass(frozen=True, slots=True)
class Reject:
    """An A-ASSOCIATE-RJ to send, and why (for the log)."""

    result: int
    source: int
    reason: int
    why: str


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict on one A-ASSOCIATE-RQ: a backend name (None: the default) or a reject."""

    backend: str | None = None
    reject: Reject | None = None


ADMIT_DEFAULT = Admission()


def _matcher(patterns: list[str]) -> re.Pattern[str] | None:
    """One compiled regex for a list of AE title patterns (None: no list, anything matches)."""
    if not patterns:
        return None
    parts = [fnmatch.translate(p.strip(" ")) for p in patterns]
    return re.compile("|".join(f"(?:{part})" for part in parts))


def _matches(matcher: re.Pattern[str] | None, title: str) -> bool:
    return matcher is None or matcher.match(title) is not None


def _in(nets: tuple[Net, ...], address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


@dataclass(frozen=True, slots=True)
class _Rule:
    called: re.Pattern[str] | None
    calling: re.Pattern[str] | None
    source: tuple[Net, ...] | None
    backend: str

    def matches(self, calling: str, called: str, address: str) -> bool:
        if not _matches(self.called, called) or not _matches(self.calling, calling):
            return False
        return self.source is None or _in(self.source, address)


@dataclass(frozen=True, slots=True)
class DicomPolicy:
    """A frontend's compiled ``dicom:`` access lists and routing rules."""

    networks: tuple[Net, ...] = ()
    calling: re.Pattern[str] | None = None
    called: re.Pattern[str] | None = None
    certificates: tuple[tuple[str, re.Pattern[str] | None], ...] = ()
    rules: tuple[_Rule, ...] = ()

    @classmethod
    def compile(cls, frontend: FrontendConfig) -> DicomPolicy:
        settings = frontend.dicom or DicomFrontendSettings()
        rules = tuple(
            _Rule(
                called=_matcher(rule.if_.called or []),
                calling=_matcher(rule.if_.calling or []),
                source=tuple(ipaddress.ip_network(n) for n in rule.if_.source) if rule.if_.source else None,
                backend=rule.use_backend,
            )
            for rule in settings.rules
        )
        return cls(
            networks=tuple(ipaddress.ip_network(n) for n in settings.allow_networks),
            calling=_matcher(settings.allow_calling),
            called=_matcher(settings.allow_called),
            certificates=tuple((cn, _matcher(titles)) for cn, titles in settings.certificate_ae_titles.items()),
            rules=rules,
        )

    def admit(self, calling: str, called: str, address: str, certificate_cn: str | None = None) -> Admission:
        """Decide on an association from ``address`` (AE titles as sent, padding allowed)."""
        calling, called = calling.strip(" "), called.strip(" ")
        if self.networks and not _in(self.networks, address):
            return Admission(reject=Reject(REJECTED_PERMANENT, SOURCE_USER, REASON_NONE, "source network not allowed"))
        if not _matches(self.calling, calling):
            return Admission(
                reject=Reject(REJECTED_PERMANENT, SOURCE_USER, REASON_CALLING_AE, f"calling AE {calling!r} not allowed")
            )
        if self.certificates:
            allowed = dict(self.certificates)
            if certificate_cn is None or certificate_cn not in allowed:
                why = f"client certificate CN {certificate_cn!r} has no AE titles"
                return Admission(reject=Reject(REJECTED_PERMANENT, SOURCE_USER, REASON_CALLING_AE, why))
            if not _matches(allowed[certificate_cn], calling):
                why = f"calling AE {calling!r} not allowed for certificate CN {certificate_cn!r}"
                return Admission(reject=Reject(REJECTED_PERMANENT, SOURCE_USER, REASON_CALLING_AE, why))
        if not _matches(self.called, called):
            return Admission(
                reject=Reject(REJECTED_PERMANENT, SOURCE_USER, REASON_CALLED_AE, f"called AE {called!r} not allowed")
            )
        for rule in self.rules:
            if rule.matches(calling, called, address):
                return Admission(backend=rule.backend)
        return ADMIT_DEFAULT


#: The rejects medlb sends when it cannot serve an admitted association (PS3.8 §9.3.4: transient,
#: from the presentation service provider), so the client's own queue retries later.
NO_SERVER = Reject(REJECTED_TRANSIENT, SOURCE_PRESENTATION, REASON_CONGESTION, "no server available")
SERVERS_FAILED = Reject(REJECTED_TRANSIENT, SOURCE_PRESENTATION, REASON_LOCAL_LIMIT, "no server accepted in time")
