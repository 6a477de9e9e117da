"""DICOM admission and routing as pure decisions: access lists, reject reasons, first-match rules."""

from __future__ import annotations

from typing import Any

import pytest

from medlb.config import parse_config
from medlb.layers.dicom import (
    ADMIT_DEFAULT,
    REASON_CALLED_AE,
    REASON_CALLING_AE,
    REASON_NONE,
    REJECTED_PERMANENT,
    SOURCE_USER,
    DicomPolicy,
)


def policy(**dicom: Any) -> DicomPolicy:
    raw = {
        "frontends": [
            {"name": "pacs", "mode": "dicom", "bind": ["127.0.0.1:0"], "default_backend": "a", "dicom": dicom}
        ],
        "backends": [{"name": n, "servers": [{"name": "s", "address": "10.0.0.1:104"}]} for n in ("a", "b", "c")],
    }
    return DicomPolicy.compile(parse_config(raw).frontends[0])


def test_no_lists_admit_everyone_to_the_default_backend() -> None:
    assert policy().admit("ANY", "ARCHIVE", "192.0.2.1") is ADMIT_DEFAULT


@pytest.mark.parametrize(
    ("calling", "called", "address", "reason"),
    [
        ("CT01", "ARCHIVE", "10.1.2.3", None),
        ("CT01      ", "ARCHIVE         ", "10.1.2.3", None),  # padding is not significant
        ("MR7", "ARCHIVE", "10.1.2.3", None),
        ("XA1", "ARCHIVE", "10.1.2.3", REASON_CALLING_AE),
        ("ct01", "ARCHIVE", "10.1.2.3", REASON_CALLING_AE),  # AE titles are case-sensitive
        ("CT01", "OTHER", "10.1.2.3", REASON_CALLED_AE),
        ("CT01", "ARCHIVE", "192.0.2.9", REASON_NONE),  # an unknown network learns nothing
        ("XA1", "OTHER", "192.0.2.9", REASON_NONE),  # the network check comes first
        ("XA1", "OTHER", "10.1.2.3", REASON_CALLING_AE),  # then calling, then called
        ("CT01", "ARCHIVE", "::ffff:10.1.2.3", None),  # IPv4-mapped peers match IPv4 networks
    ],
)
def test_access_lists_give_the_right_reject_reason(calling: str, called: str, address: str, reason: int | None) -> None:
    p = policy(allow_calling=["CT*", "MR?"], allow_called=["ARCHIVE"], allow_networks=["10.0.0.0/8"])
    verdict = p.admit(calling, called, address)
    if reason is None:
        assert verdict.reject is None
    else:
        assert verdict.reject is not None
        assert (verdict.reject.result, verdict.reject.source, verdict.reject.reason) == (
            REJECTED_PERMANENT,
            SOURCE_USER,
            reason,
        )


@pytest.mark.parametrize(
    ("calling", "called", "address", "backend"),
    [
        ("CT01", "ARCHIVE", "10.0.0.5", "b"),
        ("CT01", "RESEARCH", "10.0.0.5", "c"),  # the first rule needs ARCHIVE
        ("US1", "ARCHIVE", "10.9.0.5", "c"),  # network rule
        ("US1", "ARCHIVE", "10.0.0.5", None),  # nothing matches: default backend
    ],
)
def test_first_matching_rule_chooses_the_backend(calling: str, called: str, address: str, backend: str | None) -> None:
    p = policy(
        rules=[
            {"if": {"called": ["ARCHIVE"], "calling": ["CT*", "MR*"]}, "use_backend": "b"},
            {"if": {"calling": ["CT*"]}, "use_backend": "c"},
            {"if": {"source": ["10.9.0.0/16"]}, "use_backend": "c"},
        ]
    )
    verdict = p.admit(calling, called, address)
    assert verdict.reject is None and verdict.backend == backend


def test_certificate_maps_limit_calling_titles() -> None:
    p = policy(certificate_ae_titles={"modality-ct1": ["CT01"], "router": ["*"]})
    assert p.admit("CT01", "ARCHIVE", "10.0.0.1", "modality-ct1").reject is None
    assert p.admit("ANY", "ARCHIVE", "10.0.0.1", "router").reject is None
    for calling, cn in (("MR01", "modality-ct1"), ("CT01", "stranger"), ("CT01", None)):
        verdict = p.admit(calling, "ARCHIVE", "10.0.0.1", cn)
        assert verdict.reject is not None and verdict.reject.reason == REASON_CALLING_AE, (calling, cn)
