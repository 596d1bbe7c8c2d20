"""HPACK (RFC 7541) header compression, as much as gRPC over HTTP/2 needs.

The decoder is complete: indexed fields, literals with and without indexing,
dynamic table size updates, and Huffman-coded strings (decoded a nibble at a
time through a table built once at import). The encoder never touches the
peer's dynamic table: it sends static-table indexes where a whole field
matches and plain literals without indexing otherwise, so it needs no state
and can pre-encode constant blocks once.

Names and values are `str` decoded as latin-1, so one character is one octet
(the unit the dynamic table is sized in); gRPC metadata values are ASCII, and
binary (``-bin``) values are base64 text at this layer.
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH


class HPACKError(Exception):
    """A header block that cannot be decoded: a connection error (COMPRESSION_ERROR)."""


# RFC 7541 Appendix A.
STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
_STATIC_COUNT = len(STATIC_TABLE)
_STATIC_FIELD_INDEX = {field: i + 1 for i, field in reversed(list(enumerate(STATIC_TABLE)))}
_STATIC_NAME_INDEX = {name: i + 1 for i, (name, _) in reversed(list(enumerate(STATIC_TABLE)))}

_EOS = 256


def _build_huffman_table() -> tuple[list[tuple[int, bytes, bool]], list[bool]]:
    """A state machine over nibbles: state = an inner node of the code tree.

    Entry [state * 16 + nibble] is (next state, octets emitted, failed);
    `accepting[state]` says whether ending there is valid padding (a prefix of
    EOS, i.e. all ones, shorter than eight bits, or the root).
    """
    # Inner nodes; a child is an inner node's index, -1 for none, or
    # -(symbol + 2) for a leaf.
    children: list[list[int]] = [[-1, -1]]
    for symbol in range(257):
        code, length = REQUEST_CODES[symbol], REQUEST_CODES_LENGTH[symbol]
        node = 0
        for shift in range(length - 1, -1, -1):
            bit = (code >> shift) & 1
            if shift == 0:
                children[node][bit] = -(symbol + 2)
            else:
                if children[node][bit] == -1:
                    children.append([-1, -1])
                    children[node][bit] = len(children) - 1
                node = children[node][bit]
    depth = [0] * len(children)
    all_ones = [True] * len(children)
    for node, (zero, one) in enumerate(children):
        for bit, child in ((0, zero), (1, one)):
            if child >= 0:
                depth[child] = depth[node] + 1
                all_ones[child] = all_ones[node] and bit == 1
    accepting = [node == 0 or (all_ones[node] and depth[node] < 8) for node in range(len(children))]
    table: list[tuple[int, bytes, bool]] = []
    for state in range(len(children)):
        for nibble in range(16):
            node, out, failed = state, bytearray(), False
            for shift in (3, 2, 1, 0):
                child = children[node][(nibble >> shift) & 1]
                if child == -1 or child == -(_EOS + 2):
                    failed = True
                    break
                if child < 0:
                    out.append(-child - 2)
                    node = 0
                else:
                    node = child
            table.append((node, bytes(out), failed))
    return table, accepting


_HUFFMAN, _ACCEPTING = _build_huffman_table()


def huffman_decode(data: bytes) -> bytes:
    table = _HUFFMAN
    state = 0
    out: list[bytes] = []
    for octet in data:
        state, emitted, failed = table[(state << 4) | (octet >> 4)]
        if failed:
            raise HPACKError("invalid Huffman code")
        if emitted:
            out.append(emitted)
        state, emitted, failed = table[(state << 4) | (octet & 15)]
        if failed:
            raise HPACKError("invalid Huffman code")
        if emitted:
            out.append(emitted)
    if not _ACCEPTING[state]:
        raise HPACKError("invalid Huffman padding")
    return b"".join(out)


class Decoder:
    """One per connection and direction: the peer's encoder's mirror."""

    __slots__ = ("_limit", "_max_size", "_size", "_strings", "_table")

    def __init__(self, max_table_size: int = 4096) -> None:
        self._table: deque[tuple[str, str]] = deque()
        self._size = 0
        self._max_size = max_table_size  # the size the encoder last chose
        self._limit = max_table_size  # the most we allowed in SETTINGS
        self._strings: dict[bytes, str] = {}  # Huffman strings seen recently

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        pos, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = _integer(block, pos, 7)
                headers.append(self._field(index))
            elif first & 0x40:  # literal with incremental indexing
                index, pos = _integer(block, pos, 6)
                field, pos = self._literal(block, pos, index)
                self._add(field)
                headers.append(field)
            elif first & 0x20:  # dynamic table size update
                size, pos = _integer(block, pos, 5)
                if size > self._limit:
                    raise HPACKError(f"table size {size} above the limit {self._limit}")
                self._max_size = size
                self._evict(0)
            else:  # literal without indexing (0000) or never indexed (0001)
                index, pos = _integer(block, pos, 4)
                field, pos = self._literal(block, pos, index)
                headers.append(field)
        return headers

    def _field(self, index: int) -> tuple[str, str]:
        if 0 < index <= _STATIC_COUNT:
            return STATIC_TABLE[index - 1]
        dynamic = index - _STATIC_COUNT - 1
        if index == 0 or dynamic >= len(self._table):
            raise HPACKError(f"header index {index} out of range")
        return self._table[dynamic]

    def _literal(self, block: bytes, pos: int, index: int) -> tuple[tuple[str, str], int]:
        if index:
            name = self._field(index)[0]
        else:
            name, pos = self._string(block, pos)
        value, pos = self._string(block, pos)
        return (name, value), pos

    def _string(self, block: bytes, pos: int) -> tuple[str, int]:
        if pos >= len(block):
            raise HPACKError("truncated header block")
        huffman = block[pos] & 0x80
        length, pos = _integer(block, pos, 7)
        end = pos + length
        if end > len(block):
            raise HPACKError("truncated header string")
        raw = block[pos:end]
        if not huffman:
            return raw.decode("latin-1"), end
        text = self._strings.get(raw)
        if text is None:
            text = huffman_decode(raw).decode("latin-1")
            if len(self._strings) >= 256:
                self._strings.clear()
            self._strings[raw] = text
        return text, end

    def _add(self, field: tuple[str, str]) -> None:
        size = 32 + len(field[0]) + len(field[1])
        if size > self._max_size:
            self._table.clear()
            self._size = 0
            return
        self._evict(size)
        self._table.appendleft(field)
        self._size += size

    def _evict(self, room: int) -> None:
        while self._table and self._size + room > self._max_size:
            name, value = self._table.pop()
            self._size -= 32 + len(name) + len(value)


def _integer(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    if pos >= len(block):
        raise HPACKError("truncated header block")
    mask = (1 << prefix_bits) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        if pos >= len(block):
            raise HPACKError("truncated header integer")
        octet = block[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if not octet & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HPACKError("header integer too large")


def encode_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(headers: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> bytes:
    """Encode without touching the peer's dynamic table (static indexes and plain literals)."""
    out = bytearray()
    for name, value in headers:
        index = _STATIC_FIELD_INDEX.get((name, value))
        if index is not None:
            out += encode_integer(index, 7, 0x80)
            continue
        name_index = _STATIC_NAME_INDEX.get(name, 0)
        out += encode_integer(name_index, 4, 0x00)
        if not name_index:
            raw_name = name.encode("latin-1")
            out += encode_integer(len(raw_name), 7, 0x00)
            out += raw_name
        raw = value.encode("latin-1")
        out += encode_integer(len(raw), 7, 0x00)
        out += raw
    return bytes(out)
