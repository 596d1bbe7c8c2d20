"""h2grpc.hpack against RFC 7541's examples and the `hpack` library (the reference)."""

from __future__ import annotations

import random

import hpack
import pytest
from hpack.exceptions import HPACKDecodingError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from h2grpc.hpack import (
    STATIC_TABLE,
    Decoder,
    HPACKError,
    encode,
    encode_integer,
    huffman_decode,
)

HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
TOKEN = "abcdefghijklmnopqrstuvwxyz0123456789-_."
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def literal(name: str, value: str, *, first: int = 0x00) -> bytes:
    """A literal field with a new name, no Huffman (first octet 0x00, 0x10 or 0x40)."""
    raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
    return (
        bytes((first,))
        + encode_integer(len(raw_name), 7, 0)
        + raw_name
        + encode_integer(len(raw_value), 7, 0)
        + raw_value
    )


def random_headers(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """A mix of static-table fields, static names, and repeats (dynamic-table hits)."""
    pool = [
        (
            f"x-{''.join(rng.choices(TOKEN, k=rng.randint(1, 12)))}",
            "".join(rng.choices(PRINTABLE, k=rng.randint(0, 40))),
        )
        for _ in range(20)
    ]
    headers: list[tuple[str, str]] = []
    for _ in range(count):
        kind = rng.randrange(5)
        if kind == 0:
            headers.append(rng.choice(STATIC_TABLE))
        elif kind == 1:
            name = rng.choice(STATIC_TABLE)[0]
            headers.append((name, "".join(rng.choices(PRINTABLE, k=rng.randint(0, 60)))))
        elif kind == 2:
            headers.append(rng.choice(pool))
        else:
            name = "".join(rng.choices(TOKEN, k=rng.randint(1, 30)))
            headers.append((name, "".join(rng.choices(PRINTABLE, k=rng.randint(0, 200)))))
    return headers


# -- the static table -------------------------------------------------------------------


def test_static_table_is_rfc_7541_appendix_a() -> None:
    reference = tuple(
        (name.decode("ascii"), value.decode("ascii")) for name, value in HeaderTable.STATIC_TABLE
    )
    assert len(STATIC_TABLE) == 61
    assert STATIC_TABLE == reference


@pytest.mark.parametrize(
    ("index", "field"),
    [
        (1, (":authority", "")),
        (2, (":method", "GET")),
        (8, (":status", "200")),
        (61, ("www-authenticate", "")),
    ],
)
def test_indexed_static_fields(index: int, field: tuple[str, str]) -> None:
    assert Decoder().decode(encode_integer(index, 7, 0x80)) == [field]


# -- RFC 7541 Appendix C ----------------------------------------------------------------

REQUESTS = [
    [(":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")],
    [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "www.example.com"),
        ("cache-control", "no-cache"),
    ],
    [
        (":method", "GET"),
        (":scheme", "https"),
        (":path", "/index.html"),
        (":authority", "www.example.com"),
        ("custom-key", "custom-value"),
    ],
]
RESPONSES = [
    [
        (":status", "302"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ],
    [
        (":status", "307"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
        ("location", "https://www.example.com"),
    ],
    [
        (":status", "200"),
        ("cache-control", "private"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
        ("location", "https://www.example.com"),
        ("content-encoding", "gzip"),
        ("set-cookie", "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
    ],
]


@pytest.mark.parametrize(
    "blocks",
    [
        pytest.param(
            [
                "828684410f7777772e6578616d706c652e636f6d",
                "828684be58086e6f2d6361636865",
                "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
            ],
            id="C.3-plain",
        ),
        pytest.param(
            [
                "828684418cf1e3c2e5f23a6ba0ab90f4ff",
                "828684be5886a8eb10649cbf",
                "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
            ],
            id="C.4-huffman",
        ),
    ],
)
def test_rfc_request_examples(blocks: list[str]) -> None:
    decoder = Decoder()
    assert [decoder.decode(bytes.fromhex(block)) for block in blocks] == REQUESTS


@pytest.mark.parametrize(
    "blocks",
    [
        pytest.param(
            [
                "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a"
                "323120474d546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
                "4803333037c1c0bf",
                "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69"
                "707738666f6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d6178"
                "2d6167653d333630303b2076657273696f6e3d31",
            ],
            id="C.5-plain",
        ),
        pytest.param(
            [
                "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29"
                "ad171863c78f0b97c8e9ae82ae43d3",
                "4883640effc1c0bf",
                "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7"
                "f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d50"
                "07",
            ],
            id="C.6-huffman",
        ),
    ],
)
def test_rfc_response_examples_evict_from_a_256_octet_table(blocks: list[str]) -> None:
    decoder = Decoder(max_table_size=256)
    assert [decoder.decode(bytes.fromhex(block)) for block in blocks] == RESPONSES
    # After C.5.3 / C.6.3 the table holds exactly three entries (RFC 7541), newest first:
    # 62 set-cookie, 63 content-encoding, 64 date; 65 was evicted.
    assert decoder.decode(bytes.fromhex("bebfc0")) == [
        RESPONSES[2][5],
        ("content-encoding", "gzip"),
        ("date", "Mon, 21 Oct 2013 20:13:22 GMT"),
    ]
    with pytest.raises(HPACKError):
        decoder.decode(bytes.fromhex("c1"))


# -- against the hpack library's encoder -------------------------------------------------


@pytest.mark.parametrize("huffman", [True, False], ids=["huffman", "plain"])
@pytest.mark.parametrize("seed", range(8))
def test_decodes_hpack_encoder_blocks(huffman: bool, seed: int) -> None:
    rng = random.Random(seed)
    encoder, decoder = hpack.Encoder(), Decoder()
    for _ in range(40):
        headers = random_headers(rng, rng.randint(0, 25))
        block = encoder.encode(headers, huffman=huffman)
        assert decoder.decode(block) == headers


@pytest.mark.parametrize("huffman", [True, False], ids=["huffman", "plain"])
@pytest.mark.parametrize("seed", range(8))
def test_decodes_blocks_across_table_size_updates(huffman: bool, seed: int) -> None:
    """The encoder shrinks and grows its table between blocks (sometimes twice, so a
    block starts with two size updates); entries are evicted on both sides alike."""
    rng = random.Random(1000 + seed)
    encoder, decoder = hpack.Encoder(), Decoder()
    updates = 0
    for _ in range(60):
        for _ in range(rng.choice((0, 0, 1, 2))):
            encoder.header_table_size = rng.choice((0, 1, 40, 64, 100, 256, 1000, 4096))
            updates += 1
        headers = random_headers(rng, rng.randint(1, 20))
        block = encoder.encode(headers, huffman=huffman)
        assert decoder.decode(block) == headers
    assert updates > 20


def test_two_size_updates_in_one_block_evict() -> None:
    encoder, decoder = hpack.Encoder(), Decoder()
    assert decoder.decode(encoder.encode([("x-a", "1"), ("x-b", "2")])) == [
        ("x-a", "1"),
        ("x-b", "2"),
    ]
    encoder.header_table_size = 0
    encoder.header_table_size = 4096
    block = encoder.encode([("x-c", "3")], huffman=False)
    assert block[:1] == b"\x20"  # size update to 0 first
    assert decoder.decode(block) == [("x-c", "3")]
    # Only x-c is left: 62 is x-c, 63 is gone.
    assert decoder.decode(b"\xbe") == [("x-c", "3")]
    with pytest.raises(HPACKError):
        decoder.decode(b"\xbf")


def test_never_indexed_and_latin1_values() -> None:
    rng = random.Random(7)
    encoder, decoder = hpack.Encoder(), Decoder()
    for _ in range(50):
        name = bytes(rng.choices(range(0x61, 0x7B), k=rng.randint(1, 10)))
        value = bytes(rng.choices(range(1, 256), k=rng.randint(0, 50)))  # NUL: see below
        sensitive = rng.random() < 0.5
        block = encoder.encode([(name, value, sensitive)], huffman=rng.random() < 0.5)
        assert decoder.decode(block) == [(name.decode("latin-1"), value.decode("latin-1"))]


def test_huffman_string_cache_stays_correct() -> None:
    """Many distinct Huffman strings (more than the decoder caches), then repeats."""
    encoder, decoder = hpack.Encoder(), Decoder()
    encoder.header_table_size = 0  # every field is a literal: strings are decoded each time
    values = [f"value-{i}" for i in range(600)]
    for value in values + values[:50]:
        assert decoder.decode(encoder.encode([("x-key", value)], huffman=True)) == [
            ("x-key", value)
        ]


# -- our encoder, decoded by the hpack library -------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_encode_is_decoded_by_hpack(seed: int) -> None:
    rng = random.Random(2000 + seed)
    reference = hpack.Decoder()
    for _ in range(40):
        headers = random_headers(rng, rng.randint(0, 25))
        block = encode(headers)
        assert reference.decode(block) == headers
        assert Decoder().decode(block) == headers
    # Stateless: it never adds to the peer's dynamic table.
    assert len(reference.header_table.dynamic_entries) == 0


def test_encode_latin1_values() -> None:
    value = bytes(range(256)).decode("latin-1")
    block = encode([("x-raw", value)])
    assert hpack.Decoder().decode(block, raw=True) == [(b"x-raw", bytes(range(256)))]
    assert Decoder().decode(block) == [("x-raw", value)]


def test_encode_exact_bytes() -> None:
    # Whole static fields are one octet.
    assert encode([(":method", "POST"), (":status", "200"), (":scheme", "http")]) == b"\x83\x88\x86"
    # A static name: literal without indexing, 4-bit name index (content-type is 31 = 15+16).
    assert encode([("content-type", "application/grpc")]) == b"\x0f\x10\x10application/grpc"
    # :path is 4 (first of two :path entries), fits the 4-bit prefix.
    assert encode([(":path", "/a.B/C")]) == b"\x04\x06/a.B/C"
    # A new name.
    assert encode([("grpc-status", "0")]) == b"\x00\x0bgrpc-status\x010"
    assert encode([]) == b""


# -- Huffman -------------------------------------------------------------------------------


def test_huffman_decode_matches_hpack_for_random_bytes() -> None:
    rng = random.Random(3)
    symbols = range(1, 256)  # NUL: see test_huffman_decodes_nul below
    for length in [*range(0, 40), 100, 255, 1000]:
        for _ in range(5):
            data = bytes(rng.choices(symbols, k=length))
            assert huffman_decode(HUFFMAN.encode(data)) == data
    every = bytes(symbols)
    assert huffman_decode(HUFFMAN.encode(every)) == every


def test_huffman_decodes_nul() -> None:
    assert huffman_decode(HUFFMAN.encode(b"\x00")) == b"\x00"
    assert huffman_decode(HUFFMAN.encode(b"a\x00b")) == b"a\x00b"


def test_huffman_decode_agrees_with_hpack_on_arbitrary_bytes() -> None:
    """Random octets, mostly not valid Huffman: we reject exactly what hpack rejects."""
    rng = random.Random(5)
    rejected = 0
    for _ in range(5000):
        data = bytes(rng.choices(range(256), k=rng.randint(0, 8)))
        try:
            expected: bytes | None = decode_huffman(data)
        except HPACKDecodingError:
            expected = None
        if expected is not None and b"\x00" in expected:
            continue  # test_huffman_decodes_nul
        try:
            actual: bytes | None = huffman_decode(data)
        except HPACKError:
            actual = None
        assert actual == expected, data.hex()
        rejected += expected is None
    assert 1000 < rejected < 4000


def test_huffman_decode_known_string() -> None:
    assert huffman_decode(bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")) == b"www.example.com"
    assert huffman_decode(b"") == b""
    assert huffman_decode(b"\x1f") == b"a"  # 00011 + 111 padding


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x18", id="a-padded-with-zeros"),  # 00011 000
        pytest.param(b"\x1f\x00", id="zero-octet-appended"),
        pytest.param(b"\xff", id="eight-bits-of-padding"),
        pytest.param(b"\x1f\xff", id="eleven-bits-of-padding"),
        pytest.param(b"\xff\xff\xff\xff", id="eos-symbol"),
        pytest.param(HUFFMAN.encode(b"www.example.com") + b"\xff", id="padding-octet-appended"),
    ],
)
def test_huffman_bad_padding_or_eos_raises(data: bytes) -> None:
    with pytest.raises(HPACKDecodingError):  # the reference agrees these are invalid
        decode_huffman(data)
    with pytest.raises(HPACKError):
        huffman_decode(data)


def test_bad_huffman_inside_a_block_raises() -> None:
    # Literal without indexing, name :path (4), value Huffman-flagged 1 octet 0x18.
    with pytest.raises(HPACKError):
        Decoder().decode(b"\x04\x81\x18")
    assert Decoder().decode(b"\x04\x81\x1f") == [(":path", "a")]


# -- malformed blocks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"\x80", id="index-0"),
        pytest.param(b"\xbe", id="index-62-empty-table"),
        pytest.param(b"\xff\x80\x01", id="index-255"),
        pytest.param(b"\x7e\x01a", id="literal-name-index-62"),
        pytest.param(b"\x0f\x30\x01a", id="no-index-name-index-63"),
        pytest.param(b"\xff", id="integer-cut"),
        pytest.param(b"\xff\x80", id="integer-continuation-cut"),
        pytest.param(b"\xff\xff\xff\xff\xff\xff\x01", id="integer-too-large"),
        pytest.param(b"\x40", id="literal-missing-name"),
        pytest.param(b"\x40\x05ab", id="name-cut"),
        pytest.param(b"\x40\x01a", id="literal-missing-value"),
        pytest.param(b"\x04\x03ab", id="value-cut"),
        pytest.param(b"\x04", id="indexed-name-missing-value"),
        pytest.param(b"\x04\x7f", id="value-length-cut"),
        pytest.param(b"\x3f\xe2\x1f", id="size-update-4097"),
    ],
)
def test_malformed_blocks_raise(block: bytes) -> None:
    with pytest.raises(HPACKError):
        Decoder().decode(block)


def test_every_proper_prefix_of_a_field_raises() -> None:
    for field in (
        literal("x-name", "some value"),
        literal("x-name", "v", first=0x40),
        literal("x-name", "v", first=0x10),
        hpack.Encoder().encode([("x-huffman-name", "a huffman value" * 20)]),
        encode([("content-type", "x" * 300)]),
        encode_integer(1000, 7, 0x80),
    ):
        for cut in range(1, len(field)):
            with pytest.raises(HPACKError):
                Decoder().decode(field[:cut])


def test_size_update_limit() -> None:
    assert Decoder().decode(encode_integer(4096, 5, 0x20)) == []
    with pytest.raises(HPACKError):
        Decoder().decode(encode_integer(4097, 5, 0x20))
    small = Decoder(max_table_size=100)
    assert small.decode(encode_integer(100, 5, 0x20)) == []
    with pytest.raises(HPACKError):
        small.decode(encode_integer(101, 5, 0x20))


def test_dynamic_table_eviction_by_size() -> None:
    decoder = Decoder()
    # Table size 80: room for two 40-octet entries (32 + 4 + 4), not three.
    block = encode_integer(80, 5, 0x20) + literal("aaaa", "1111", first=0x40)
    assert decoder.decode(block) == [("aaaa", "1111")]
    assert decoder.decode(literal("bbbb", "2222", first=0x40)) == [("bbbb", "2222")]
    assert decoder.decode(b"\xbe\xbf") == [("bbbb", "2222"), ("aaaa", "1111")]
    assert decoder.decode(literal("cccc", "3333", first=0x40)) == [("cccc", "3333")]
    assert decoder.decode(b"\xbe\xbf") == [("cccc", "3333"), ("bbbb", "2222")]
    with pytest.raises(HPACKError):
        decoder.decode(b"\xc0")
    # Literal with indexing and an indexed (dynamic) name.
    assert decoder.decode(b"\x7f\x00\x014") == [("bbbb", "4")]  # name index 63 = bbbb
    assert decoder.decode(b"\xbe\xbf") == [("bbbb", "4"), ("cccc", "3333")]
    # An entry larger than the table empties it.
    assert decoder.decode(literal("big", "x" * 100, first=0x40)) == [("big", "x" * 100)]
    with pytest.raises(HPACKError):
        decoder.decode(b"\xbe")
    # Shrinking to 0 evicts everything; growing back keeps it empty.
    decoder.decode(literal("dddd", "5555", first=0x40))
    assert decoder.decode(b"\xbe") == [("dddd", "5555")]
    decoder.decode(encode_integer(0, 5, 0x20) + encode_integer(80, 5, 0x20))
    with pytest.raises(HPACKError):
        decoder.decode(b"\xbe")


def test_literals_without_indexing_do_not_enter_the_table() -> None:
    decoder = Decoder()
    assert decoder.decode(literal("x-a", "1") + literal("x-b", "2", first=0x10)) == [
        ("x-a", "1"),
        ("x-b", "2"),
    ]
    with pytest.raises(HPACKError):
        decoder.decode(b"\xbe")


# -- integers --------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [4, 5, 6, 7])
def test_integer_boundaries(prefix: int) -> None:
    mask = (1 << prefix) - 1
    values = [0, 1, mask - 1, mask, mask + 1, mask + 127, mask + 128, 127, 128, 255, 256]
    values += [1337, 16_384, 65_535, 2**21, 2**28 - 1, 2**28 + mask]
    for value in values:
        ours = encode_integer(value, prefix, 0)
        assert ours == bytes(hpack.hpack.encode_integer(value, prefix)), value
        assert hpack.hpack.decode_integer(ours, prefix) == (value, len(ours))
        # Flags above the prefix are kept and do not leak into the value.
        flag = 1 << prefix if prefix < 8 else 0
        flagged = encode_integer(value, prefix, flag)
        assert flagged[0] & ~mask & 0xFF == flag
        assert flagged[1:] == ours[1:]
        assert flagged[0] & mask == ours[0] & mask


def test_integer_exact_encodings() -> None:
    # RFC 7541 C.1.
    assert encode_integer(10, 5, 0) == b"\x0a"
    assert encode_integer(1337, 5, 0) == b"\x1f\x9a\x0a"
    # At and around the prefix maximum.
    assert encode_integer(30, 5, 0x20) == b"\x3e"
    assert encode_integer(31, 5, 0x20) == b"\x3f\x00"
    assert encode_integer(32, 5, 0x20) == b"\x3f\x01"
    assert encode_integer(126, 7, 0x80) == b"\xfe"
    assert encode_integer(127, 7, 0x80) == b"\xff\x00"
    assert encode_integer(128, 7, 0x80) == b"\xff\x01"
    assert encode_integer(127 + 128, 7, 0) == b"\x7f\x80\x01"


@pytest.mark.parametrize("value", [0, 30, 31, 32, 158, 159, 160, 4000, 4096])
def test_decoder_reads_size_update_integers(value: int) -> None:
    """Size updates across the 5-bit boundary: decodes, then a value above it does not fit."""
    decoder = Decoder()
    decoder.decode(encode_integer(value, 5, 0x20))
    entry = literal("n", "v" * max(value - 33, 0), first=0x40)  # exactly `value` octets if >= 33
    decoder.decode(entry)
    if value >= 33:
        assert decoder.decode(b"\xbe") == [("n", "v" * (value - 33))]
    else:
        with pytest.raises(HPACKError):
            decoder.decode(b"\xbe")
    bigger = literal("n", "v" * max(value - 32, 0), first=0x40)  # one octet too many
    decoder.decode(bigger)
    with pytest.raises(HPACKError):
        decoder.decode(b"\xbe")


def test_indexed_field_with_multi_octet_index() -> None:
    """Index 127 and 128 (7-bit prefix boundary) into a dynamic table with enough entries."""
    decoder = Decoder()
    fields = [(f"k{i:03d}", "v") for i in range(70)]
    decoder.decode(b"".join(literal(name, value, first=0x40) for name, value in fields))
    # Newest first: index 62 is k069, index 62 + n is k(069 - n).
    assert decoder.decode(encode_integer(126, 7, 0x80)) == [("k005", "v")]
    assert decoder.decode(encode_integer(127, 7, 0x80)) == [("k004", "v")]
    assert decoder.decode(encode_integer(128, 7, 0x80)) == [("k003", "v")]
    assert decoder.decode(encode_integer(131, 7, 0x80)) == [("k000", "v")]
    with pytest.raises(HPACKError):
        decoder.decode(encode_integer(132, 7, 0x80))


def test_random_bytes_only_ever_raise_hpack_error() -> None:
    rng = random.Random(20261127)
    decoded = 0
    for _ in range(20_000):
        decoder = Decoder()
        try:
            decoder.decode(rng.randbytes(rng.randrange(1, 40)))
            decoded += 1
        except HPACKError:
            pass
    assert decoded > 0  # some random blocks are valid, so both paths ran
