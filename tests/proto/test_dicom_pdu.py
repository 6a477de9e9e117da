"""Tests for medlb.proto.dicom_pdu: PDU round trips against pynetdicom, stream framing, rejection, fuzzing.

Byte vectors are produced by pynetdicom (an implementation nobody here wrote) through its public PDU
classes, then decoded by medlb and compared value by value and byte by byte; medlb's own encodings
are decoded back by pynetdicom. A few vectors are written by hand from PS3.8 tables.
"""

from __future__ import annotations

import itertools
import struct
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pynetdicom import pdu_primitives as pp
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import (
    A_ABORT_RQ,
    A_ASSOCIATE_AC,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RP,
    A_RELEASE_RQ,
    P_DATA_TF,
)
from pynetdicom.presentation import PresentationContext

from medlb.errors import DicomProtocolError, ProtocolError
from medlb.proto import dicom_pdu as d

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CT = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
JPEG = "1.2.840.10008.1.2.4.50"
PN_IMPL_UID = "1.2.826.0.1.3680043.9.3811.3.0.4"

# --------------------------------------------------------------------------- pynetdicom vectors


def _user_information(*, ac: bool) -> list[object]:
    ml = pp.MaximumLengthNotification()
    ml.maximum_length_received = 16382
    ic = pp.ImplementationClassUIDNotification()
    ic.implementation_class_uid = PN_IMPL_UID
    iv = pp.ImplementationVersionNameNotification()
    iv.implementation_version_name = "PYNETDICOM_304"
    aw = pp.AsynchronousOperationsWindowNegotiation()
    aw.maximum_number_operations_invoked = 5
    aw.maximum_number_operations_performed = 0
    rs = pp.SCP_SCU_RoleSelectionNegotiation()
    rs.sop_class_uid = CT
    rs.scu_role = True
    rs.scp_role = not ac
    en = pp.SOPClassExtendedNegotiation()
    en.sop_class_uid = "1.2.840.10008.5.1.4.1.2.1.1"
    en.service_class_application_information = b"\x01\x01\x00"
    items: list[object] = [ml, ic, iv, aw, rs, en]
    uid = pp.UserIdentityNegotiation()
    if ac:
        uid.server_response = b"token"
    else:
        ce = pp.SOPClassCommonExtendedNegotiation()
        ce.sop_class_uid = "1.2.840.10008.5.1.4.1.1.88.22"
        ce.service_class_uid = "1.2.840.10008.4.2"
        ce.related_general_sop_class_identification = [
            "1.2.840.10008.5.1.4.1.1.88.11",
            "1.2.840.10008.5.1.4.1.1.88.33",
        ]
        items.append(ce)
        uid.user_identity_type = 2
        uid.positive_response_requested = True
        uid.primary_field = b"alice"
        uid.secondary_field = b"s3cret"
    items.append(uid)
    return items


def _primitive() -> pp.A_ASSOCIATE:
    a = pp.A_ASSOCIATE()
    a.application_context_name = d.APPLICATION_CONTEXT_NAME
    a.calling_ae_title = "MODALITY"
    a.called_ae_title = "ARCHIVE"
    return a


def pn_rq() -> bytes:
    """An RQ with three presentation contexts and every user information sub-item."""
    a = _primitive()
    contexts = []
    for cid, abstract, syntaxes in (
        (1, VERIFICATION, [IMPLICIT]),
        (3, CT, [EXPLICIT, IMPLICIT, JPEG]),
        (5, CT, [JPEG]),
    ):
        pc = PresentationContext()
        pc.context_id = cid
        pc.abstract_syntax = abstract
        pc.transfer_syntax = syntaxes
        contexts.append(pc)
    a.presentation_context_definition_list = contexts
    a.user_information = _user_information(ac=False)
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(a)
    return bytes(pdu.encode())


def pn_ac() -> bytes:
    """An AC accepting one context and rejecting three (with the three rejection reasons)."""
    a = _primitive()
    a.result = 0
    results = []
    for cid, result, syntax in ((1, 0, IMPLICIT), (3, 3, IMPLICIT), (5, 4, IMPLICIT), (7, 1, EXPLICIT)):
        pc = PresentationContext()
        pc.context_id = cid
        pc.abstract_syntax = VERIFICATION
        pc.result = result
        pc.transfer_syntax = [syntax]
        results.append(pc)
    a.presentation_context_definition_results_list = results
    a.user_information = _user_information(ac=True)
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(a)
    return bytes(pdu.encode())


def pn_rj(result: int = 1, source: int = 1, reason: int = 7) -> bytes:
    a = _primitive()
    a.result = result
    a.result_source = source
    a.diagnostic = reason
    pdu = A_ASSOCIATE_RJ()
    pdu.from_primitive(a)
    return bytes(pdu.encode())


def pn_abort(provider_reason: int | None = None) -> bytes:
    prim: pp.A_ABORT | pp.A_P_ABORT
    if provider_reason is None:
        prim = pp.A_ABORT()
        prim.abort_source = 0
    else:
        prim = pp.A_P_ABORT()
        prim.provider_reason = provider_reason
    pdu = A_ABORT_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def pn_store_pdatas(max_pdu: int = 64, size: int = 200) -> list[bytes]:
    """A C-STORE-RQ (command + data set) as P-DATA-TF PDUs fragmented to ``max_pdu``."""
    from io import BytesIO

    p = C_STORE()
    p.MessageID = 5
    p.AffectedSOPClassUID = CT
    p.AffectedSOPInstanceUID = "1.2.3.4.5"
    p.Priority = 0
    p.DataSet = BytesIO(bytes(range(256)) * (size // 256) + bytes(range(size % 256)))
    msg = C_STORE_RQ()
    msg.primitive_to_message(p)
    out = []
    for prim in msg.encode_msg(3, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        out.append(bytes(pdu.encode()))
    return out


def pn_pdata_command_and_data() -> bytes:
    """One P-DATA-TF with a command PDV and a data set PDV (as DCMTK packs small messages)."""
    prim = pp.P_DATA()
    prim.presentation_data_value_list = [[1, b"\x03" + b"\x00" * 10], [1, b"\x02" + b"\x08\x00\x10\x00"]]
    pdu = P_DATA_TF()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


RELEASE_RQ = bytes(A_RELEASE_RQ().encode())
RELEASE_RP = bytes(A_RELEASE_RP().encode())

# Hand-written from PS3.8 Table 9-21/9-26 and reference Appendix A (not produced by any encoder).
HAND_RJ = bytes.fromhex("03 00 00000004 00 01 01 07")
HAND_ABORT = bytes.fromhex("07 00 00000004 00 00 02 06")
HAND_RELEASE_RQ = bytes.fromhex("05 00 00000004 00000000")


def all_vectors() -> list[bytes]:
    return [
        pn_rq(),
        pn_ac(),
        pn_rj(),
        pn_rj(2, 3, 1),
        pn_abort(),
        pn_abort(6),
        RELEASE_RQ,
        RELEASE_RP,
        pn_pdata_command_and_data(),
        *pn_store_pdatas(),
        d.associate_rq("ARCHIVE", "MEDLB").encode(),
    ]


def _item(item_type: int, payload: bytes, first: int = 0) -> bytes:
    return struct.pack(">BBH", item_type, first, len(payload)) + payload


def _rq_body(items: bytes, called: bytes = b"ARCHIVE".ljust(16), calling: bytes = b"MODALITY".ljust(16)) -> bytes:
    return struct.pack(">HH", 1, 0) + called + calling + bytes(32) + items


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


APP = _item(0x10, d.APPLICATION_CONTEXT_NAME.encode())
PC1 = _item(0x20, b"\x01\x00\x00\x00" + _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT.encode()))
UI = _item(0x50, _item(0x51, struct.pack(">L", 16384)) + _item(0x52, b"1.2.3"))


def hand_rq(*items: bytes) -> bytes:
    return _pdu(1, _rq_body(b"".join(items) if items else APP + PC1 + UI))


# --------------------------------------------------------------------------- decoding pynetdicom PDUs


def test_rq_values_match_pynetdicom() -> None:
    raw = pn_rq()
    pdu = d.decode_pdu(raw)
    assert isinstance(pdu, d.AssociateRQ)
    assert pdu.called_ae == "ARCHIVE"
    assert pdu.calling_ae == "MODALITY"
    assert pdu.protocol_version == 1
    assert pdu.application_context == d.APPLICATION_CONTEXT_NAME
    pcs = pdu.presentation_contexts
    assert [(pc.context_id, pc.abstract_syntax, pc.transfer_syntaxes) for pc in pcs] == [
        (1, VERIFICATION, (IMPLICIT,)),
        (3, CT, (EXPLICIT, IMPLICIT, JPEG)),
        (5, CT, (JPEG,)),
    ]
    ui = pdu.user_information
    assert pdu.max_length == ui.max_length == 16382
    assert ui.implementation_class_uid == PN_IMPL_UID
    assert ui.implementation_version_name == "PYNETDICOM_304"
    assert ui.async_ops_window == d.AsyncOpsWindow(5, 0)
    assert ui.role_selections == (d.RoleSelection(CT, 1, 1),)
    assert ui.extended_negotiations == (d.SopClassExtendedNegotiation("1.2.840.10008.5.1.4.1.2.1.1", b"\x01\x01\x00"),)
    assert ui.common_extended_negotiations == (
        d.SopClassCommonExtendedNegotiation(
            "1.2.840.10008.5.1.4.1.1.88.22",
            "1.2.840.10008.4.2",
            ("1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.88.33"),
        ),
    )
    assert ui.user_identity == d.UserIdentityRQ(2, 1, b"alice", b"s3cret")
    assert ui.user_identity_response is None
    # and pynetdicom agrees on what it encoded
    theirs = A_ASSOCIATE_RQ()
    theirs.decode(raw)
    assert [pc.context_id for pc in theirs.presentation_context] == [1, 3, 5]


def test_ac_values_match_pynetdicom() -> None:
    pdu = d.decode_pdu(pn_ac())
    assert isinstance(pdu, d.AssociateAC)
    assert (pdu.called_ae, pdu.calling_ae) == ("ARCHIVE", "MODALITY")
    assert [(pc.context_id, pc.result, pc.transfer_syntax, pc.accepted) for pc in pdu.presentation_contexts] == [
        (1, 0, IMPLICIT, True),
        (3, d.ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT, False),
        (5, d.ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, IMPLICIT, False),
        (7, d.ContextResult.USER_REJECTION, EXPLICIT, False),
    ]
    ui = pdu.user_information
    assert ui.user_identity_response == d.UserIdentityAC(b"token")
    assert ui.user_identity is None
    assert ui.role_selections == (d.RoleSelection(CT, 1, 0),)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (pn_rj(), d.AssociateRJ(1, 1, 7)),
        (pn_rj(2, 3, 1), d.AssociateRJ(2, 3, 1)),
        (HAND_RJ, d.AssociateRJ(1, 1, 7)),
        (pn_abort(), d.Abort(0, 0)),
        (pn_abort(6), d.Abort(2, 6)),
        (HAND_ABORT, d.Abort(2, 6)),
        (RELEASE_RQ, d.ReleaseRQ()),
        (HAND_RELEASE_RQ, d.ReleaseRQ()),
        (RELEASE_RP, d.ReleaseRP()),
    ],
)
def test_fixed_pdus_decode(raw: bytes, expected: d.Pdu) -> None:
    assert d.decode_pdu(raw) == expected
    assert expected.encode() == raw


def test_p_data_with_command_and_data_set_pdvs() -> None:
    pdu = d.decode_pdu(pn_pdata_command_and_data())
    assert pdu == d.PDataTF((d.Pdv(1, 0x03, b"\x00" * 10), d.Pdv(1, 0x02, b"\x08\x00\x10\x00")))
    assert isinstance(pdu, d.PDataTF)
    assert [(p.is_command, p.is_last) for p in pdu.pdvs] == [(True, True), (False, True)]


def test_fragmented_c_store_pdus() -> None:
    pdus = [d.decode_pdu(raw) for raw in pn_store_pdatas(max_pdu=64)]
    pdvs = [pdv for pdu in pdus if isinstance(pdu, d.PDataTF) for pdv in pdu.pdvs]
    assert all(pdv.context_id == 3 for pdv in pdvs)
    controls = [pdv.control for pdv in pdvs]
    assert controls[0] == 0x01 and 0x03 in controls and controls[-1] == 0x02
    assert sum(len(p.fragment) for p in pdvs if not p.is_command) == 200


@pytest.mark.parametrize("raw", all_vectors(), ids=lambda raw: f"type{raw[0]}-{len(raw)}")
def test_round_trip_is_byte_exact(raw: bytes) -> None:
    assert d.decode_pdu(raw).encode() == raw


# --------------------------------------------------------------------------- medlb -> pynetdicom


PYNETDICOM_TYPES = {
    1: A_ASSOCIATE_RQ,
    2: A_ASSOCIATE_AC,
    3: A_ASSOCIATE_RJ,
    4: P_DATA_TF,
    5: A_RELEASE_RQ,
    6: A_RELEASE_RP,
    7: A_ABORT_RQ,
}


def _pynetdicom_decode(raw: bytes) -> object:
    pdu = PYNETDICOM_TYPES[raw[0]]()
    pdu.decode(raw)
    assert bytes(pdu.encode()) == raw  # pynetdicom re-encodes medlb's bytes identically
    return pdu


def test_medlb_rq_decodes_in_pynetdicom() -> None:
    ours = d.AssociateRQ(
        b"PACS".ljust(16),
        b"CT01".ljust(16),
        (
            d.ApplicationContext(d.APPLICATION_CONTEXT_NAME),
            d.PresentationContextRQ(1, VERIFICATION, (IMPLICIT,)),
            d.PresentationContextRQ(3, CT, (EXPLICIT, JPEG)),
            d.UserInformation(
                (
                    d.MaximumLength(32768),
                    d.ImplementationClassUID("1.2.3.4"),
                    d.AsyncOpsWindow(2, 3),
                    d.RoleSelection(CT, 0, 1),
                    d.ImplementationVersionName("MEDLB_TEST"),
                    d.SopClassExtendedNegotiation(CT, b"\x01\x00"),
                    d.SopClassCommonExtendedNegotiation(CT, "1.2.840.10008.4.2", ("1.2.3",)),
                    d.UserIdentityRQ(1, 0, b"bob"),
                )
            ),
        ),
    )
    theirs = _pynetdicom_decode(ours.encode())
    assert isinstance(theirs, A_ASSOCIATE_RQ)
    assert (theirs.called_ae_title, theirs.calling_ae_title) == ("PACS", "CT01")
    assert [(pc.context_id, pc.abstract_syntax, pc.transfer_syntax) for pc in theirs.presentation_context] == [
        (1, VERIFICATION, [IMPLICIT]),
        (3, CT, [EXPLICIT, JPEG]),
    ]
    prim = theirs.to_primitive()
    by_type = {type(item).__name__: item for item in prim.user_information}
    assert by_type["MaximumLengthNotification"].maximum_length_received == 32768
    assert by_type["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.3.4"
    assert by_type["ImplementationVersionNameNotification"].implementation_version_name == "MEDLB_TEST"
    window = by_type["AsynchronousOperationsWindowNegotiation"]
    assert (window.maximum_number_operations_invoked, window.maximum_number_operations_performed) == (2, 3)
    role = by_type["SCP_SCU_RoleSelectionNegotiation"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT, False, True)
    assert by_type["SOPClassExtendedNegotiation"].service_class_application_information == b"\x01\x00"
    common = by_type["SOPClassCommonExtendedNegotiation"]
    assert common.related_general_sop_class_identification == ["1.2.3"]
    ident = by_type["UserIdentityNegotiation"]
    assert (ident.user_identity_type, ident.primary_field) == (1, b"bob")


def test_medlb_ac_and_small_pdus_decode_in_pynetdicom() -> None:
    ac = d.AssociateAC(
        b"PACS".ljust(16),
        b"CT01".ljust(16),
        (
            d.ApplicationContext(d.APPLICATION_CONTEXT_NAME),
            d.PresentationContextAC(1, 0, IMPLICIT),
            d.PresentationContextAC(3, 4, IMPLICIT),
            d.UserInformation((d.MaximumLength(0), d.ImplementationClassUID("1.2.3"), d.UserIdentityAC(b"ok"))),
        ),
    )
    theirs = _pynetdicom_decode(ac.encode())
    assert isinstance(theirs, A_ASSOCIATE_AC)
    assert [(pc.context_id, pc.result, pc.transfer_syntax) for pc in theirs.presentation_context] == [
        (1, 0, IMPLICIT),
        (3, 4, IMPLICIT),
    ]
    rj = _pynetdicom_decode(
        d.associate_rj(d.RejectResult.TRANSIENT, d.RejectSource.SERVICE_PROVIDER_PRESENTATION, 2).encode()
    )
    assert isinstance(rj, A_ASSOCIATE_RJ)
    assert (rj.result, rj.source, rj.reason_diagnostic) == (2, 3, 2)
    ab = _pynetdicom_decode(d.abort(d.AbortSource.SERVICE_PROVIDER, d.AbortReason.UNEXPECTED_PDU).encode())
    assert isinstance(ab, A_ABORT_RQ)
    assert (ab.source, ab.reason_diagnostic) == (2, 2)
    pdata = _pynetdicom_decode(d.PDataTF((d.Pdv(5, 0x01, b"ab"), d.Pdv(5, 0x03, b"cd"))).encode())
    assert isinstance(pdata, P_DATA_TF)
    assert pdata.presentation_data_value_items[0].presentation_data_value == b"\x01ab"
    assert pdata.presentation_data_value_items[1].context_id == 5
    assert isinstance(_pynetdicom_decode(d.ReleaseRQ().encode()), A_RELEASE_RQ)
    assert isinstance(_pynetdicom_decode(d.ReleaseRP().encode()), A_RELEASE_RP)


def test_associate_rq_builder_matches_the_reference_recipe() -> None:
    rq = d.associate_rq("ORTHANC", "MEDLB")
    raw = rq.encode()
    theirs = _pynetdicom_decode(raw)
    assert isinstance(theirs, A_ASSOCIATE_RQ)
    assert (theirs.called_ae_title, theirs.calling_ae_title) == ("ORTHANC", "MEDLB")
    assert theirs.application_context_name == d.APPLICATION_CONTEXT_NAME
    [pc] = theirs.presentation_context
    assert (pc.context_id, pc.abstract_syntax, pc.transfer_syntax) == (1, VERIFICATION, [IMPLICIT])
    assert theirs.user_information.maximum_length == 16384
    assert theirs.user_information.implementation_class_uid == d.MEDLB_IMPLEMENTATION_CLASS_UID
    assert theirs.user_information.implementation_version_name == d.MEDLB_IMPLEMENTATION_VERSION_NAME
    assert theirs.user_information.async_ops_window is None
    # Appendix A of the reference, byte for byte (its items, in its order).
    item = _item
    body = struct.pack(">HH", 1, 0) + b"ORTHANC".ljust(16) + b"MEDLB".ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    body += item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    impl = d.MEDLB_IMPLEMENTATION_CLASS_UID.encode()
    version = d.MEDLB_IMPLEMENTATION_VERSION_NAME.encode()
    body += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, impl) + item(0x55, version))
    assert raw == struct.pack(">BBI", 1, 0, len(body)) + body


def test_associate_rq_builder_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="odd"):
        d.associate_rq("A", "B", [(2, VERIFICATION, [IMPLICIT])])
    with pytest.raises(ValueError, match="odd"):
        d.associate_rq("A", "B", [(1, VERIFICATION, [IMPLICIT]), (1, CT, [IMPLICIT])])
    with pytest.raises(ValueError, match="transfer syntax"):
        d.associate_rq("A", "B", [(1, VERIFICATION, [])])
    with pytest.raises(ValueError, match="AE title"):
        d.associate_rq("", "B")
    with pytest.raises(ValueError, match="version"):
        d.associate_rq("A", "B", implementation_version="X" * 17)


# --------------------------------------------------------------------------- lenient values, kept bytes


def test_unknown_user_information_sub_item_is_kept_in_place() -> None:
    ui = _item(0x50, _item(0x51, struct.pack(">L", 0)) + _item(0x5A, b"future", 0x07) + _item(0x52, b"1.2.3"))
    raw = hand_rq(APP, PC1, ui)
    pdu = d.decode_pdu(raw)
    assert isinstance(pdu, d.AssociateRQ)
    assert pdu.user_information.sub_items[1] == d.UnknownItem(0x5A, b"future", 0x07)
    assert pdu.encode() == raw


def test_unknown_variable_item_is_kept_in_place() -> None:
    raw = hand_rq(APP, _item(0x7F, b"\x01\x02"), PC1, UI)
    pdu = d.decode_pdu(raw)
    assert isinstance(pdu, d.AssociateRQ)
    assert pdu.items[1] == d.UnknownItem(0x7F, b"\x01\x02")
    assert pdu.encode() == raw


def test_non_zero_reserved_bytes_are_not_tested() -> None:
    body = bytearray(_rq_body(APP + PC1 + UI))
    body[2] = 0xFF  # reserved, PDU offset 8
    raw = bytearray(_pdu(1, bytes(body)))
    raw[1] = 0x42  # reserved byte of the PDU header
    pdu = d.decode_pdu(bytes(raw))
    assert isinstance(pdu, d.AssociateRQ)
    assert pdu.encode() == hand_rq()  # re-encoded as PS3.8 says to send them: zero


def test_ac_echo_fields_are_kept_verbatim() -> None:
    body = bytearray(_rq_body(APP + _item(0x21, b"\x01\x00\x00\x00" + _item(0x40, IMPLICIT.encode())) + UI))
    body[36:68] = bytes(range(32))  # the AC echoes whatever the RQ had there
    raw = _pdu(2, bytes(body))
    pdu = d.decode_pdu(raw)
    assert isinstance(pdu, d.AssociateAC)
    assert pdu.reserved == bytes(range(32))
    assert pdu.encode() == raw


def test_rejected_ac_context_may_omit_its_transfer_syntax() -> None:
    raw = _pdu(2, _rq_body(APP + _item(0x21, b"\x01\x00\x03\x00") + UI))
    pdu = d.decode_pdu(raw)
    assert isinstance(pdu, d.AssociateAC)
    assert pdu.presentation_contexts == (d.PresentationContextAC(1, 3, None),)
    assert pdu.encode() == raw


def test_padded_uid_is_kept_for_the_round_trip() -> None:
    pc = _item(0x20, b"\x01\x00\x00\x00" + _item(0x30, b"1.2.840.10008.1.1\x00") + _item(0x40, IMPLICIT.encode()))
    raw = hand_rq(APP, pc, UI)
    pdu = d.decode_pdu(raw)
    assert isinstance(pdu, d.AssociateRQ)
    assert pdu.presentation_contexts[0].abstract_syntax.rstrip("\x00") == VERIFICATION
    assert pdu.encode() == raw


def test_non_ascii_text_decodes_without_unicode_errors() -> None:
    ui = _item(0x50, _item(0x51, bytes(4)) + _item(0x52, b"1.2.\xff") + _item(0x55, b"\xe9\x80"))
    raw = hand_rq(APP, PC1, ui)
    pdu = d.decode_pdu(raw)
    assert isinstance(pdu, d.AssociateRQ)
    assert pdu.encode() == raw


# --------------------------------------------------------------------------- malformed PDUs


def _pc_rq(cid: int, *subs: bytes) -> bytes:
    return _item(0x20, bytes((cid, 0, 0, 0)) + b"".join(subs))


AS = _item(0x30, VERIFICATION.encode())
TS = _item(0x40, IMPLICIT.encode())


def _ui(*subs: bytes) -> bytes:
    return _item(0x50, b"".join(subs))


ML = _item(0x51, struct.pack(">L", 16384))
IC = _item(0x52, b"1.2.3")

MALFORMED = {
    "short RQ": _pdu(1, bytes(60)),
    "item overruns the PDU": _pdu(1, _rq_body(APP + PC1 + UI)[:-1]),
    "item header truncated": _pdu(1, _rq_body(APP + PC1 + UI + b"\x10\x00")),
    "sub-item overruns its item": hand_rq(
        APP, _item(0x20, b"\x01\x00\x00\x00" + AS + b"\x40\x00\x00\x40" + b"1.2"), UI
    ),
    "no application context": hand_rq(PC1, UI),
    "two application contexts": hand_rq(APP, APP, PC1, UI),
    "empty application context": hand_rq(_item(0x10, b""), PC1, UI),
    "no presentation context": hand_rq(APP, UI),
    "no user information": hand_rq(APP, PC1),
    "two user informations": hand_rq(APP, PC1, UI, UI),
    "no maximum length": hand_rq(APP, PC1, _ui(IC)),
    "no implementation class uid": hand_rq(APP, PC1, _ui(ML)),
    "even context id": hand_rq(APP, _pc_rq(2, AS, TS), UI),
    "zero context id": hand_rq(APP, _pc_rq(0, AS, TS), UI),
    "repeated context id": hand_rq(APP, _pc_rq(1, AS, TS), _pc_rq(1, AS, TS), UI),
    "context without abstract syntax": hand_rq(APP, _pc_rq(1, TS), UI),
    "context without transfer syntax": hand_rq(APP, _pc_rq(1, AS), UI),
    "context with two abstract syntaxes": hand_rq(APP, _pc_rq(1, AS, AS, TS), UI),
    "context with an unknown sub-item": hand_rq(APP, _pc_rq(1, AS, TS, _item(0x41, b"x")), UI),
    "context item too short": hand_rq(APP, _item(0x20, b"\x01\x00"), UI),
    "empty abstract syntax": hand_rq(APP, _pc_rq(1, _item(0x30, b""), TS), UI),
    "AC context in an RQ": hand_rq(APP, PC1, _item(0x21, b"\x01\x00\x00\x00" + TS), UI),
    "RQ context in an AC": _pdu(2, _rq_body(APP + PC1 + UI)),
    "accepted AC context without transfer syntax": _pdu(2, _rq_body(APP + _item(0x21, b"\x01\x00\x00\x00") + UI)),
    "AC context with two transfer syntaxes": _pdu(2, _rq_body(APP + _item(0x21, b"\x01\x00\x00\x00" + TS + TS) + UI)),
    "maximum length of 3 bytes": hand_rq(APP, PC1, _ui(_item(0x51, b"\x00\x00\x01"), IC)),
    "repeated maximum length": hand_rq(APP, PC1, _ui(ML, ML, IC)),
    "async window of 2 bytes": hand_rq(APP, PC1, _ui(ML, IC, _item(0x53, b"\x00\x01"))),
    "role selection with trailing bytes": hand_rq(
        APP, PC1, _ui(ML, IC, _item(0x54, b"\x00\x01" + b"1" + b"\x01\x01\x00"))
    ),
    "role selection uid overrun": hand_rq(APP, PC1, _ui(ML, IC, _item(0x54, b"\x00\x09" + b"1.2"))),
    "extended negotiation truncated": hand_rq(APP, PC1, _ui(ML, IC, _item(0x56, b"\x00"))),
    "common extended negotiation bad tiling": hand_rq(
        APP, PC1, _ui(ML, IC, _item(0x57, b"\x00\x01" + b"1" + b"\x00\x01" + b"2" + b"\x00\x03" + b"\x00\x05ab"))
    ),
    "common extended negotiation trailing": hand_rq(
        APP, PC1, _ui(ML, IC, _item(0x57, b"\x00\x01" + b"1" + b"\x00\x01" + b"2" + b"\x00\x00" + b"!"))
    ),
    "user identity truncated": hand_rq(APP, PC1, _ui(ML, IC, _item(0x58, b"\x01\x00\x00\x05ab"))),
    "user identity too short": hand_rq(APP, PC1, _ui(ML, IC, _item(0x58, b"\x01"))),
    "user identity trailing": hand_rq(APP, PC1, _ui(ML, IC, _item(0x58, b"\x01\x00\x00\x01a\x00\x00!"))),
    "user identity response in an RQ": hand_rq(APP, PC1, _ui(ML, IC, _item(0x59, b"\x00\x00"))),
    "user identity request in an AC": _pdu(
        2, _rq_body(APP + _item(0x21, b"\x01\x00\x00\x00" + TS) + _ui(ML, IC, _item(0x58, b"\x01\x00\x00\x00\x00\x00")))
    ),
    "user identity response bad length": _pdu(
        2, _rq_body(APP + _item(0x21, b"\x01\x00\x00\x00" + TS) + _ui(ML, IC, _item(0x59, b"\x00\x05ab")))
    ),
    "P-DATA without PDVs": _pdu(4, b""),
    "PDV length 1": _pdu(4, b"\x00\x00\x00\x01\x01"),
    "PDV length 0": _pdu(4, b"\x00\x00\x00\x00"),
    "PDV overruns the PDU": _pdu(4, b"\x00\x00\x00\x08\x01\x03abc"),
    "PDV length truncated": _pdu(4, b"\x00\x00\x00\x03\x01\x03a\x00\x00"),
    "PDV on an even context": _pdu(4, b"\x00\x00\x00\x03\x02\x03a"),
    "PDV on context 0": _pdu(4, b"\x00\x00\x00\x03\x00\x03a"),
    "RJ of 5 bytes": _pdu(3, b"\x00\x01\x01\x07\x00"),
    "release of 3 bytes": _pdu(5, b"\x00\x00\x00"),
    "abort of 0 bytes": _pdu(7, b""),
    "unknown PDU type": _pdu(9, b"\x00\x00\x00\x00"),
    "PDU type 0": _pdu(0, b"\x00\x00\x00\x00"),
    "header only, length lies": b"\x05\x00\x00\x00\x00\x04\x00",
    "shorter than a header": b"\x05\x00\x00",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_pdu_raises_dicom_protocol_error(raw: bytes) -> None:
    with pytest.raises(DicomProtocolError) as info:
        d.decode_pdu(raw)
    assert isinstance(info.value, ProtocolError)
    assert str(info.value)
    assert info.value.abort_source == d.AbortSource.SERVICE_PROVIDER
    assert info.value.abort_reason in tuple(d.AbortReason)


def test_abort_reasons_name_the_problem() -> None:
    with pytest.raises(DicomProtocolError) as info:
        d.decode_pdu(MALFORMED["unknown PDU type"])
    assert info.value.abort_reason == d.AbortReason.UNRECOGNIZED_PDU
    with pytest.raises(DicomProtocolError) as info:
        d.decode_pdu(MALFORMED["repeated maximum length"])
    assert info.value.abort_reason == d.AbortReason.UNEXPECTED_PDU_PARAMETER
    with pytest.raises(DicomProtocolError) as info:
        d.decode_pdu(MALFORMED["PDV length 1"])
    assert info.value.abort_reason == d.AbortReason.INVALID_PDU_PARAMETER_VALUE


# --------------------------------------------------------------------------- PduReader


def stream() -> bytes:
    return b"".join(all_vectors()[:-1])  # starts with the pynetdicom RQ


def read_all(chunks: list[bytes], max_pdu: int = 1 << 20) -> list[d.RawPdu]:
    reader = d.PduReader(max_pdu, expect_associate_rq=True)
    out: list[d.RawPdu] = []
    for chunk in chunks:
        out += reader.feed(chunk)
    assert reader.at_boundary and reader.buffered == 0
    return out


def test_reader_whole_stream() -> None:
    pdus = read_all([stream()])
    assert b"".join(p.encode() for p in pdus) == stream()
    assert [p.pdu_type for p in pdus][:3] == [1, 2, 3]
    assert [p.decode() for p in pdus] == [d.decode_pdu(v) for v in all_vectors()[:-1]]


def test_reader_byte_by_byte() -> None:
    data = stream()
    assert read_all([data[i : i + 1] for i in range(len(data))]) == read_all([data])


def test_reader_accepts_memoryview_and_bytearray() -> None:
    data = stream()
    assert read_all([bytearray(data[:100]), memoryview(data)[100:]]) == read_all([data])


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
@FUZZ
def test_reader_random_splits(cuts: list[int]) -> None:
    data = stream()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    assert read_all(chunks) == read_all([data])


def test_reader_keeps_trailing_partial_pdu() -> None:
    data = stream()
    reader = d.PduReader(1 << 20, expect_associate_rq=True)
    tail = RELEASE_RQ[:7]
    pdus = reader.feed(data + tail)
    assert b"".join(p.encode() for p in pdus) == data
    assert reader.buffered == 1 and not reader.at_boundary  # the header is checked and gone; 1 body byte held
    assert reader.feed(RELEASE_RQ[7:]) == [d.RawPdu(5, bytes(4))]
    assert reader.at_boundary


def test_reader_keeps_reserved_header_byte() -> None:
    raw = b"\x05\x99\x00\x00\x00\x04\x00\x00\x00\x00"
    [pdu] = d.PduReader(1024, expect_associate_rq=False).feed(raw)
    assert pdu.reserved == 0x99 and pdu.encode() == raw


REJECTED_HEADERS = {
    "unknown type 0x08": b"\x08\x00\x00\x00\x00\x04",
    "type 0x00": b"\x00\x00\x00\x00\x00\x04",
    "type 0xff": b"\xff\x00\x00\x00\x00\x04",
    "oversize P-DATA": b"\x04\x00\x00\x01\x00\x01",
    "oversize RQ": b"\x01\x00\xff\xff\xff\xff",
    "RJ length 5": b"\x03\x00\x00\x00\x00\x05",
    "release-rq length 0": b"\x05\x00\x00\x00\x00\x00",
    "release-rp length 8": b"\x06\x00\x00\x00\x00\x08",
    "abort length 2**32-1": b"\x07\x00\xff\xff\xff\xff",
    "RQ shorter than its fixed part": b"\x01\x00\x00\x00\x00\x10",
    "P-DATA shorter than one PDV": b"\x04\x00\x00\x00\x00\x05",
}


@pytest.mark.parametrize("header", list(REJECTED_HEADERS.values()), ids=list(REJECTED_HEADERS))
@pytest.mark.parametrize("tool", ["reader", "scanner"])
def test_bad_header_rejected_from_six_bytes(header: bytes, tool: str) -> None:
    feeder: d.PduReader | d.PduScanner = (
        d.PduReader(65536, expect_associate_rq=False) if tool == "reader" else d.PduScanner(65536)
    )
    for i in range(5):
        assert feeder.feed(header[i : i + 1]) == []  # 5 header bytes: no verdict yet, nothing decided
    if isinstance(feeder, d.PduReader):
        assert feeder.buffered == 5
    with pytest.raises(DicomProtocolError):
        feeder.feed(header[5:])
    if isinstance(feeder, d.PduReader):
        assert feeder.buffered == 0
    with pytest.raises(DicomProtocolError):  # and it stays failed
        feeder.feed(RELEASE_RQ)


@pytest.mark.parametrize("tool", ["reader", "scanner"])
def test_first_pdu_must_be_an_associate_rq(tool: str) -> None:
    for first in (pn_ac(), RELEASE_RQ, pn_abort(), pn_pdata_command_and_data()):
        feeder: d.PduReader | d.PduScanner = (
            d.PduReader(65536, expect_associate_rq=True)
            if tool == "reader"
            else d.PduScanner(65536, expect_associate_rq=True)
        )
        with pytest.raises(DicomProtocolError) as info:
            feeder.feed(first[:6])
        assert info.value.abort_reason == d.AbortReason.UNEXPECTED_PDU
    ok = d.PduReader(65536, expect_associate_rq=True)
    assert [p.pdu_type for p in ok.feed(pn_rq() + RELEASE_RQ)] == [1, 5]  # only the first is checked


def _peak_while(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            action()
        except DicomProtocolError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_oversize_pdu_in_one_big_chunk_is_rejected_before_any_body_byte_is_copied() -> None:
    body = bytes(8 << 20)
    data = struct.pack(">BBL", 4, 0, len(body)) + body
    reader = d.PduReader(1 << 20, expect_associate_rq=False)
    peak = _peak_while(lambda: reader.feed(data))
    assert peak < 64 * 1024, f"{peak} bytes allocated while rejecting"
    scanner = d.PduScanner(1 << 20)
    assert _peak_while(lambda: scanner.feed(data)) < 64 * 1024


def test_huge_announced_length_allocates_nothing_up_front() -> None:
    reader = d.PduReader(0xFFFFFFFF, expect_associate_rq=False)
    header = struct.pack(">BBL", 4, 0, 0xFFFFFF00)
    peak = _peak_while(lambda: reader.feed(header + bytes(1000)))
    assert reader.buffered == 1000
    assert peak < 64 * 1024


def test_reader_limit_can_change_between_pdus() -> None:
    reader = d.PduReader(65536, expect_associate_rq=False)
    big = _pdu(4, struct.pack(">LBB", 1002, 1, 2) + bytes(1000))
    assert len(reader.feed(big)) == 1
    reader.max_pdu_length = 512
    with pytest.raises(DicomProtocolError, match="over the limit"):
        reader.feed(big)


def test_reader_refuses_an_unbounded_limit() -> None:
    with pytest.raises(ValueError):
        d.PduReader(0, expect_associate_rq=False)
    with pytest.raises(ValueError):
        d.PduScanner(0)


# --------------------------------------------------------------------------- PduScanner


def test_scanner_reports_every_header_and_counts_p_data() -> None:
    data = stream()
    scanner = d.PduScanner(1 << 20, expect_associate_rq=True)
    headers = scanner.feed(data)
    expected = [(v[0], len(v) - 6) for v in all_vectors()[:-1]]
    assert [(h.pdu_type, h.length) for h in headers] == expected
    # offsets point at each body in the chunk
    pos = 0
    for h, v in zip(headers, all_vectors()[:-1], strict=True):
        assert h.offset == pos + 6
        pos += len(v)
    assert scanner.p_data_bytes == sum(n for t, n in expected if t == 4)
    assert scanner.pdu_count == len(expected)
    assert scanner.bytes_scanned == len(data)
    assert scanner.at_boundary and scanner.current_type is None


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
@FUZZ
@example(cuts=list(range(0, 3000, 1)))
def test_scanner_random_splits(cuts: list[int]) -> None:
    data = stream()
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    scanner = d.PduScanner(1 << 20)
    seen: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(points):
        for h in scanner.feed(data[a:b]):
            assert 0 <= h.offset <= b - a
            seen.append((h.pdu_type, h.length))
        # the scanner never holds more than a header
        assert scanner.remaining >= 0
    assert seen == [(v[0], len(v) - 6) for v in all_vectors()[:-1]]
    assert scanner.p_data_bytes == sum(len(v) - 6 for v in all_vectors()[:-1] if v[0] == 4)
    assert scanner.at_boundary


def test_scanner_mid_pdu_state() -> None:
    scanner = d.PduScanner(65536)
    pdata = pn_pdata_command_and_data()
    [h] = scanner.feed(pdata[:10])
    assert (h.pdu_type, h.length, h.offset) == (4, len(pdata) - 6, 6)
    assert not scanner.at_boundary
    assert scanner.current_type == 4
    assert scanner.remaining == len(pdata) - 10
    assert scanner.p_data_bytes == 4
    assert scanner.feed(pdata[10:]) == []
    assert scanner.at_boundary and scanner.p_data_bytes == len(pdata) - 6
    scanner.feed(RELEASE_RQ[:3])
    assert not scanner.at_boundary  # a partial header is not a boundary


# --------------------------------------------------------------------------- AE titles


def test_read_ae_titles_matches_pynetdicom() -> None:
    raw = pn_rq()
    theirs = A_ASSOCIATE_RQ()
    theirs.decode(raw)
    assert d.read_ae_titles(raw[6:]) == (theirs.called_ae_title, theirs.calling_ae_title) == ("ARCHIVE", "MODALITY")


@pytest.mark.parametrize(("called", "calling"), [("ORTHANC_2", None), (None, "MEDLB"), ("X", "Y" * 16)])
def test_replace_ae_titles_equals_pynetdicom_decode_set_encode(called: str | None, calling: str | None) -> None:
    raw = pn_rq()
    theirs = A_ASSOCIATE_RQ()
    theirs.decode(raw)
    if called is not None:
        theirs.called_ae_title = called
    if calling is not None:
        theirs.calling_ae_title = calling
    new_body = d.replace_ae_titles(raw[6:], called=called, calling=calling)
    assert len(new_body) == len(raw) - 6
    assert raw[:6] + new_body == bytes(theirs.encode())


def test_ac_restore_gives_the_client_its_own_titles() -> None:
    client_rq = pn_rq()
    upstream_rq = d.replace_ae_titles(client_rq[6:], called="ORTHANC1", calling="MEDLB")
    # the server echoes what it received
    server_ac_body = d.replace_ae_titles(pn_ac()[6:], called="ORTHANC1", calling="MEDLB")
    assert d.read_ae_titles(server_ac_body) == d.read_ae_titles(upstream_rq)
    restored = d.restore_ae_titles(server_ac_body, client_rq[6:])
    assert d.read_ae_titles(restored) == ("ARCHIVE", "MODALITY")
    assert pn_ac()[:6] + restored == pn_ac()  # the AC the client would have got directly
    theirs = A_ASSOCIATE_AC()
    theirs.decode(pn_ac()[:6] + restored)
    assert (theirs.reserved_aet, theirs.reserved_aec) == ("ARCHIVE", "MODALITY")  # pynetdicom: aet called, aec calling


def test_ae_helpers_reject_short_bodies() -> None:
    with pytest.raises(DicomProtocolError):
        d.read_ae_titles(b"\x00" * 40)
    with pytest.raises(DicomProtocolError):
        d.replace_ae_titles(b"\x00" * 67, called="A")
    with pytest.raises(DicomProtocolError):
        d.restore_ae_titles(pn_ac()[6:], b"short")


@pytest.mark.parametrize(
    ("title", "expected"),
    [("ORTHANC", "ORTHANC"), ("  PACS  ", "PACS"), ("A" * 16, "A" * 16), ("MY AE-1_x.~", "MY AE-1_x.~"), ("!", "!")],
)
def test_valid_ae_titles(title: str, expected: str) -> None:
    assert d.validate_ae_title(title) == expected


@pytest.mark.parametrize(
    "title", ["", " " * 16, "    ", "A" * 17, "BACK\\SLASH", "TAB\t", "NL\n", "NUL\x00", "DEL\x7f", "É"]
)
def test_invalid_ae_titles(title: str) -> None:
    with pytest.raises(ValueError):
        d.validate_ae_title(title)
    with pytest.raises(ValueError):
        d.replace_ae_titles(pn_rq()[6:], called=title)


# --------------------------------------------------------------------------- async ops window


def test_drop_async_ops_window() -> None:
    rq = d.decode_pdu(pn_rq())
    assert isinstance(rq, d.AssociateRQ)
    assert rq.user_information.async_ops_window is not None
    dropped = d.with_async_ops_window(rq, None)
    assert dropped.user_information.async_ops_window is None
    raw = dropped.encode()
    assert len(raw) == len(pn_rq()) - 8
    theirs = _pynetdicom_decode(raw)  # lengths are right: pynetdicom re-walks every item
    assert isinstance(theirs, A_ASSOCIATE_RQ)
    assert theirs.user_information.async_ops_window is None
    assert theirs.user_information.user_identity is not None
    # everything else survived, in order
    others = [s for s in rq.user_information.sub_items if not isinstance(s, d.AsyncOpsWindow)]
    assert list(dropped.user_information.sub_items) == others
    assert dropped.presentation_contexts == rq.presentation_contexts
    # dropping again, or from an RQ without one, changes nothing
    assert d.with_async_ops_window(dropped, None).encode() == raw
    plain = d.associate_rq("A", "B")
    assert d.with_async_ops_window(plain, None).encode() == plain.encode()


def test_set_async_ops_window_keeps_ascending_order() -> None:
    plain = d.associate_rq("A", "B")
    windowed = d.with_async_ops_window(plain, d.AsyncOpsWindow(1, 1))
    assert [s.item_type for s in windowed.user_information.sub_items] == [0x51, 0x52, 0x53, 0x55]
    theirs = _pynetdicom_decode(windowed.encode())
    assert isinstance(theirs, A_ASSOCIATE_RQ)
    window = theirs.user_information.async_ops_window
    assert window is not None
    assert (window.maximum_number_operations_invoked, window.maximum_number_operations_performed) == (1, 1)
    replaced = d.with_async_ops_window(windowed, d.AsyncOpsWindow(0, 0))
    assert [s for s in replaced.user_information.sub_items if isinstance(s, d.AsyncOpsWindow)] == [
        d.AsyncOpsWindow(0, 0)
    ]


# --------------------------------------------------------------------------- RJ / ABORT builders


def test_rj_and_abort_builders_match_pynetdicom_bytes() -> None:
    assert d.associate_rj(
        d.RejectResult.PERMANENT, d.RejectSource.SERVICE_USER, d.UserRejectReason.CALLED_AE_NOT_RECOGNIZED
    ).encode() == pn_rj(1, 1, 7)
    assert d.associate_rj(2, 2, d.AcseRejectReason.PROTOCOL_VERSION_NOT_SUPPORTED).encode() == pn_rj(2, 2, 2)
    assert d.associate_rj(2, 3, d.PresentationRejectReason.TEMPORARY_CONGESTION).encode() == pn_rj(2, 3, 1)
    assert d.abort(d.AbortSource.SERVICE_USER).encode() == pn_abort()
    for reason in (0, 1, 2, 4, 5, 6):
        assert d.abort(d.AbortSource.SERVICE_PROVIDER, reason).encode() == pn_abort(reason)


@pytest.mark.parametrize(
    ("result", "source", "reason"), [(3, 1, 1), (1, 4, 1), (1, 1, 4), (1, 2, 3), (1, 3, 7), (0, 1, 1)]
)
def test_rj_builder_rejects_invalid_combinations(result: int, source: int, reason: int) -> None:
    with pytest.raises(ValueError):
        d.associate_rj(result, source, reason)


@pytest.mark.parametrize(("source", "reason"), [(1, 0), (3, 0), (2, 3), (2, 7), (0, 2)])
def test_abort_builder_rejects_invalid_combinations(source: int, reason: int) -> None:
    with pytest.raises(ValueError):
        d.abort(source, reason)


def test_error_reply() -> None:
    err = DicomProtocolError("called AE unknown", reject=(1, 1, 7), abort_reason=0)
    assert d.error_reply(err, can_reject=True) == pn_rj(1, 1, 7)
    assert d.error_reply(err, can_reject=False) == pn_abort(0)
    plain = DicomProtocolError("bad PDV", abort_reason=6)
    assert d.error_reply(plain, can_reject=True) == pn_abort(6)


# --------------------------------------------------------------------------- fuzzing


def _decode_or_error(raw: bytes) -> d.Pdu | None:
    try:
        return d.decode_pdu(raw)
    except DicomProtocolError:
        return None


@given(st.binary(max_size=600), st.booleans())
@FUZZ
@example(b"\x01\x00\x00\x00\x00\x44" + bytes(68), True)
@example(b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03", False)
def test_fuzz_reader_and_decoder_only_raise_protocol_errors(data: bytes, expect_rq: bool) -> None:
    reader = d.PduReader(4096, expect_associate_rq=expect_rq)
    try:
        pdus = reader.feed(data)
    except DicomProtocolError:
        return
    assert reader.buffered <= 4096 + 6
    for raw in pdus:
        try:
            pdu = raw.decode()
        except DicomProtocolError:
            continue
        assert d.decode_pdu(pdu.encode()) == pdu


@given(st.binary(max_size=300))
@FUZZ
def test_fuzz_scanner_only_raises_protocol_errors(data: bytes) -> None:
    scanner = d.PduScanner(4096)
    try:
        for h in scanner.feed(data):
            assert 1 <= h.pdu_type <= 7
    except DicomProtocolError:
        pass


_VECTORS = all_vectors()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(_VECTORS)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "truncate"]))
        pos = draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        if kind == "set" and raw:
            raw[pos] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and raw:
            del raw[pos : pos + draw(st.integers(min_value=1, max_value=4))]
        else:
            del raw[pos:]
    return bytes(raw)


@given(mutated())
@FUZZ
def test_fuzz_mutated_pdus(raw: bytes) -> None:
    pdu = _decode_or_error(raw)
    if pdu is not None:
        again = pdu.encode()
        assert d.decode_pdu(again) == pdu
        assert d.decode_pdu(again).encode() == again
    reader = d.PduReader(65536, expect_associate_rq=False)
    try:
        for rawpdu in reader.feed(raw):
            _decode_or_error(rawpdu.encode())
    except DicomProtocolError:
        pass


@given(st.sampled_from(_VECTORS), st.integers(min_value=0, max_value=255))
@FUZZ
def test_fuzz_reserved_header_byte_is_not_tested(raw: bytes, value: int) -> None:
    # PS3.8 §9.3.1: reserved fields are not tested on receipt, so changing one keeps the value.
    changed = bytearray(raw)
    changed[1] = value
    assert d.decode_pdu(bytes(changed)) == d.decode_pdu(raw)
