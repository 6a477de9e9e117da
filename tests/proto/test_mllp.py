"""Tests for medlb.proto.mllp: framing whole, byte by byte and in random splits; the junk, oversize and
broken-end-block policy; byte preservation; fuzzing.

The framed vectors are written by hand from HL7 v2 Appendix C (VT payload FS CR), never produced by
``frame`` except in the round-trip tests.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medlb.errors import Hl7ProtocolError, ProtocolError
from medlb.proto import mllp
from medlb.proto.mllp import DEFAULT_MAX_MESSAGE, HEAD_LIMIT, MllpFramer, frame

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ADT = (
    b"MSH|^~\\&|ADT1|GOOD HEALTH HOSPITAL|GHH LAB|ELAB-3|198808181126|SECURITY|ADT^A01^ADT_A01|MSG00001|P|2.5.1\r"
    b"EVN|A01|200708181123\r"
    b"PID|1||PATID1234^^^GOOD HEALTH HOSPITAL^MR~123456789^^^USSSA^SS||EVERYMAN^ADAM^A^III||19610615|M\r"
)
ACK = (
    b"MSH|^~\\&|GHH LAB|ELAB-3|ADT1|GOOD HEALTH HOSPITAL|198808181127||ACK^A01^ACK|ACK00001|P|2.5.1\rMSA|AA|MSG00001\r"
)
# Non-ASCII payloads: MSH-18 names the character set; the framer must not care.
UTF8 = "MSH|^~\\&|A|B|C|D|2024||ADT^A08|U1|P|2.6||||||UNICODE UTF-8\rPID|1||42||Müller^Zoë^Ødegård\r".encode()
LATIN1 = "MSH|^~\\&|A|B|C|D|2024||ADT^A08|L1|P|2.5||||||8859/1\rPID|1||43||Françoise^Hélène\r".encode("latin-1")


def framed(payload: bytes) -> bytes:
    return b"\x0b" + payload + b"\x1c\x0d"


def feed_all(framer: MllpFramer, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += framer.feed(chunk)
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    chunks, prev = [], 0
    for p in points:
        chunks.append(data[prev:p])
        prev = p
    chunks.append(data[prev:])
    return chunks


# --------------------------------------------------------------------------- happy paths


def test_whole_message() -> None:
    f = MllpFramer()
    assert f.feed(framed(ADT)) == [ADT]
    assert f.at_boundary and f.pending == 0


def test_one_byte_at_a_time() -> None:
    f = MllpFramer()
    stream = framed(ADT) + framed(ACK)
    out: list[bytes] = []
    for i in range(len(stream)):
        got = f.feed(stream[i : i + 1])
        out += got
        # A message is delivered exactly when its CR arrives, not before.
        assert bool(got) == (i in (len(framed(ADT)) - 1, len(stream) - 1))
    assert out == [ADT, ACK]
    assert f.at_boundary


def test_two_messages_in_one_feed_and_many() -> None:
    f = MllpFramer()
    assert f.feed(framed(ADT) + framed(ACK)) == [ADT, ACK]
    many = [ADT.replace(b"MSG00001", f"MSG{i:05d}".encode()) for i in range(500)]
    assert f.feed(b"".join(framed(m) for m in many)) == many


def test_message_split_across_feeds_with_next_one_starting() -> None:
    f = MllpFramer()
    stream = framed(ADT) + framed(ACK)
    cut = len(framed(ADT)) + 10
    assert f.feed(stream[:cut]) == [ADT]
    assert not f.at_boundary and f.pending == 9  # VT is not held, 9 payload bytes are
    assert f.feed(stream[cut:]) == [ACK]


@pytest.mark.parametrize("filler", [b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b"\x00" * 1000, b"\r\n \x00\t"])
def test_whitespace_and_nul_between_messages_are_skipped(filler: bytes) -> None:
    f = MllpFramer()
    stream = filler + framed(ADT) + filler + framed(ACK) + filler
    assert f.feed(stream) == [ADT, ACK]
    assert f.at_boundary
    g = MllpFramer()
    assert feed_all(g, [bytes([b]) for b in stream]) == [ADT, ACK]


def test_empty_frame_is_a_payload() -> None:
    assert MllpFramer().feed(b"\x0b\x1c\x0d") == [b""]


def test_end_block_split_between_feeds() -> None:
    f = MllpFramer()
    assert f.feed(framed(ADT)[:-1]) == []
    assert not f.at_boundary
    assert f.feed(b"\x0d" + framed(ACK)) == [ADT, ACK]


@pytest.mark.parametrize("payload", [UTF8, LATIN1, bytes(range(0x80, 0x100)), b"MSH|\xff\xfe\x00\x01"])
def test_payload_bytes_are_preserved_exactly(payload: bytes) -> None:
    (got,) = MllpFramer().feed(framed(payload))
    assert got == payload and type(got) is bytes
    assert feed_all(MllpFramer(), [bytes([b]) for b in framed(payload)]) == [payload]


def test_accepts_bytearray_and_memoryview() -> None:
    f = MllpFramer()
    assert f.feed(bytearray(framed(ADT))) == [ADT]
    assert f.feed(memoryview(framed(ACK))) == [ACK]


def test_large_message_in_chunks() -> None:
    big = ADT + b"OBX|1|ED|PDF^Report||^application^pdf^Base64^" + b"QUJD" * 500_000 + b"||||||F\r"
    stream = framed(big)
    f = MllpFramer()
    out = feed_all(f, [stream[i : i + 65536] for i in range(0, len(stream), 65536)])
    assert out == [big]
    assert f.pending == 0


def test_frame_round_trip() -> None:
    assert frame(ADT) == b"\x0b" + ADT + b"\x1c\x0d"
    assert MllpFramer().feed(frame(UTF8) + frame(LATIN1)) == [UTF8, LATIN1]
    assert frame(b"") == b"\x0b\x1c\x0d"


@pytest.mark.parametrize("bad", [b"MSH\x0b", b"MSH\x1c", b"\x1c\x0d"])
def test_frame_refuses_framing_bytes_in_payload(bad: bytes) -> None:
    with pytest.raises(ValueError):
        frame(bad)


def test_constants() -> None:
    assert DEFAULT_MAX_MESSAGE == 16 * 1024 * 1024
    assert MllpFramer().max_message == DEFAULT_MAX_MESSAGE
    assert (mllp.VT, mllp.FS, mllp.CR) == (0x0B, 0x1C, 0x0D)
    with pytest.raises(ValueError):
        MllpFramer(0)


# --------------------------------------------------------------------------- policy: junk, size, end block


@pytest.mark.parametrize(
    "stream",
    [
        b"GET / HTTP/1.1\r\n",  # a web client on the MLLP port
        b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5\r",  # HL7 without MLLP framing
        framed(ADT) + b"\x1a",  # trailing junk after a good message
        b"\x00\r\n\x1c\x0d",  # an end block with no start
    ],
)
def test_junk_before_start_block_is_an_error_without_nak(stream: bytes) -> None:
    f = MllpFramer()
    with pytest.raises(Hl7ProtocolError, match="junk before start block") as info:
        f.feed(stream)
    assert info.value.ack_code is None  # nothing identifiable: close
    assert info.value.head == b""
    assert isinstance(info.value, ProtocolError)
    # The framer stays failed: the same error, whatever comes next.
    assert f.failed
    with pytest.raises(Hl7ProtocolError) as again:
        f.feed(framed(ACK))
    assert again.value is info.value


def test_junk_byte_by_byte_after_good_message() -> None:
    f = MllpFramer()
    assert feed_all(f, [bytes([b]) for b in framed(ADT)]) == [ADT]
    with pytest.raises(Hl7ProtocolError, match="junk"):
        f.feed(b"X")


@pytest.mark.parametrize("limit", [1, 100, 4096])
def test_payload_of_exactly_max_message_is_accepted(limit: int) -> None:
    payload = (b"MSH|" + b"x" * limit)[:limit]
    f = MllpFramer(limit)
    assert f.feed(framed(payload)) == [payload]
    assert feed_all(MllpFramer(limit), [bytes([b]) for b in framed(payload)]) == [payload]
    # Max-sized payload, FS in the next chunk.
    g = MllpFramer(limit)
    assert g.feed(b"\x0b" + payload) == []
    assert g.pending == limit
    assert g.feed(b"\x1c\x0d") == [payload]


@pytest.mark.parametrize("chunk", [1, 7, 100, 1000])
def test_oversize_is_rejected_before_buffering_beyond_the_limit(chunk: int) -> None:
    limit = 1000
    stream = framed(ADT + b"Z" * 5000)
    f = MllpFramer(limit)
    fed, seen = 0, 0
    with pytest.raises(Hl7ProtocolError, match="larger than max_message") as info:
        for i in range(0, len(stream), chunk):
            f.feed(stream[i : i + chunk])
            fed = i + chunk
            seen = max(seen, f.pending)
            assert f.pending <= limit
    # The error came as soon as the payload went past the limit, not at the end of the stream.
    assert fed <= 1 + limit
    assert seen <= limit
    assert f.pending == 0 and f.failed
    assert info.value.ack_code == "AE"  # resending the same message cannot help
    assert info.value.head.startswith(ADT[:50]) and len(info.value.head) <= HEAD_LIMIT


def test_oversize_in_one_huge_chunk_keeps_nothing() -> None:
    f = MllpFramer(1000)
    with pytest.raises(Hl7ProtocolError) as info:
        f.feed(framed(ADT + b"Z" * 10_000_000))
    assert f.pending == 0
    assert len(info.value.head) <= HEAD_LIMIT


def test_oversize_counts_held_bytes_across_messages_separately() -> None:
    # The limit is per message: many messages near the limit are fine.
    payload = b"MSH|" + b"y" * 96
    f = MllpFramer(100)
    assert f.feed(framed(payload) * 50) == [payload] * 50


def test_start_block_inside_a_message_is_an_error_with_nak() -> None:
    # The sender lost the end block of MSG00001 and started over: a truncated message must not be
    # forwarded as if it were whole.
    f = MllpFramer()
    assert f.feed(b"\x0b" + ADT[:120]) == []
    with pytest.raises(Hl7ProtocolError, match="start block inside a message") as info:
        f.feed(framed(ACK))
    assert info.value.ack_code == "AR"
    assert info.value.head == ADT[:120]
    assert f.pending == 0 and f.failed


def test_start_block_inside_a_message_same_chunk() -> None:
    with pytest.raises(Hl7ProtocolError, match="start block") as info:
        MllpFramer().feed(b"\x0b" + ADT + b"\x0b" + ACK + b"\x1c\x0d")
    assert info.value.head == ADT


@pytest.mark.parametrize("split", [False, True])
def test_fs_not_followed_by_cr_is_an_error(split: bool) -> None:
    f = MllpFramer()
    stream = b"\x0b" + ADT + b"\x1c" + b"\x0b" + ACK
    with pytest.raises(Hl7ProtocolError, match="FS not followed by CR") as info:
        if split:
            f.feed(stream[: len(ADT) + 2])
            f.feed(stream[len(ADT) + 2 :])
        else:
            f.feed(stream)
    assert info.value.ack_code == "AR"
    assert info.value.head == ADT[:HEAD_LIMIT]


def test_at_boundary_tracks_partial_messages() -> None:
    f = MllpFramer()
    assert f.at_boundary
    f.feed(b"\r\n\x00")
    assert f.at_boundary  # filler holds nothing
    f.feed(b"\x0b")
    assert not f.at_boundary and f.pending == 0
    f.feed(ADT)
    assert f.pending == len(ADT)
    f.feed(b"\x1c")
    assert not f.at_boundary
    assert f.feed(b"\x0d") == [ADT]
    assert f.at_boundary and f.pending == 0


# --------------------------------------------------------------------------- properties and fuzzing

payloads = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))
fillers = st.sampled_from([b"", b"", b"\r", b"\n", b"\x00", b"\r\n", b" \x00"])


@FUZZ
@given(
    msgs=st.lists(st.tuples(fillers, payloads), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=2500), max_size=20),
)
def test_random_splits_give_the_same_payloads(msgs: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    stream = b"".join(fill + framed(p) for fill, p in msgs)
    f = MllpFramer()
    assert feed_all(f, split_at(stream, cuts)) == [p for _, p in msgs]
    assert f.at_boundary and f.pending == 0


@FUZZ
@given(
    data=st.binary(max_size=400)
    | st.lists(st.sampled_from([b"\x0b", b"\x1c", b"\r", b"\x00", b"MSH|", b"x"])).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    limit=st.integers(min_value=1, max_value=64),
)
@example(data=b"\x0bab\x1c", cuts=[], limit=64)
@example(data=b"\x0b" + b"a" * 64 + b"\x1c\r", cuts=[65], limit=64)
def test_fuzz_messages_or_protocol_error_only(data: bytes, cuts: list[int], limit: int) -> None:
    """Arbitrary bytes give payloads or Hl7ProtocolError, never anything else; chunking never changes the
    verdict; the bytes held never exceed the limit."""

    def run(chunks: list[bytes]) -> tuple[list[bytes], str | None, bool]:
        f = MllpFramer(limit)
        out: list[bytes] = []
        try:
            for c in chunks:
                out += f.feed(c)
                assert f.pending <= limit
        except Hl7ProtocolError as exc:
            return out, str(exc).split(":")[0], f.at_boundary
        for p in out:
            assert b"\x0b" not in p and b"\x1c" not in p and len(p) <= limit
        return out, None, f.at_boundary

    whole = run([data])
    chunked = run(split_at(data, cuts))
    assert chunked[1] == whole[1]
    if whole[1] is None:
        assert chunked == whole
    else:
        # Messages completed in the chunk that failed are dropped with the error: a prefix survives.
        assert whole[0] == []
        assert len(chunked[0]) <= data.count(b"\x1c\r")
