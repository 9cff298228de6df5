"""A small TFRecord reader for ``tf.train.Example`` records, without TensorFlow.

Framing of a TFRecord file, record after record::

    uint64 length (little-endian) | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

Both CRCs of every record are checked (CRC32C through ``google-crc32c``'s C implementation, about 10 GB/s, with a
pure-Python table as a fallback); a wrong CRC or a file that ends inside a record raises :class:`TFRecordError`
naming the file, the record number and its byte offset.

``tf.train.Example`` is decoded straight from the protobuf wire format (:func:`parse_example`): a map from feature
name to one of ``bytes_list`` / ``float_list`` / ``int64_list``. :func:`decode_features` then turns the raw lists
into Python values following a seqio ``info.<split>.json`` feature spec: ``string`` → ``str``, ``int32``/``int64``
→ ``int``, ``bool`` → ``bool``, ``float32`` → ``float``; shape ``[]`` → a scalar (the list must hold exactly one
value), any other shape → a list. The spec is needed because TFRecord itself cannot tell a one-element list from
a scalar.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from data_prep.runner import PrepError

try:  # C implementation (hardware CRC32C where the CPU has it)
    import google_crc32c as _gcrc

    if _gcrc.implementation != "c":  # pragma: no cover - only without a wheel for this platform
        raise ImportError
    _crc32c_c = _gcrc.value
except ImportError:  # pragma: no cover - exercised through crc32c_python in the tests
    _crc32c_c = None

_CRC_TABLE: list[int] = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1
    _CRC_TABLE.append(_crc)
del _byte, _crc

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")


class TFRecordError(PrepError):
    """A TFRecord file is corrupt (CRC mismatch, truncation) or a record does not decode as declared."""


def crc32c_python(data: bytes) -> int:
    """CRC32C (Castagnoli) in pure Python: the fallback when ``google-crc32c`` has no C build (a few MB/s)."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


crc32c = _crc32c_c or crc32c_python


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate the CRC32C right by 15 bits and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def iter_records(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """``(record number, data)`` of every record of ``path``, both CRCs of each checked."""
    path = Path(path)
    with open(path, "rb") as handle:
        index = 0
        offset = 0
        while True:
            header = handle.read(_HEADER.size)
            if not header:
                return
            where = f"{path}: record {index} (byte offset {offset})"
            if len(header) < _HEADER.size:
                raise TFRecordError(f"{where}: truncated file (the record header is cut off)")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                raise TFRecordError(f"{where}: CRC mismatch in the length header (corrupt file)")
            data = handle.read(length)
            footer = handle.read(_FOOTER.size)
            if len(data) < length or len(footer) < _FOOTER.size:
                raise TFRecordError(f"{where}: truncated file (record of {length} bytes is cut off)")
            if masked_crc32c(data) != _FOOTER.unpack(footer)[0]:
                raise TFRecordError(f"{where}: CRC mismatch in the record data (corrupt file)")
            yield index, data
            index += 1
            offset += _HEADER.size + length + _FOOTER.size


# --------------------------------------------------------------------------------------------------
# tf.train.Example wire format
# --------------------------------------------------------------------------------------------------


class _WireError(ValueError):
    pass


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode one varint at ``pos``; raises IndexError when ``buf`` ends inside it."""
    byte = buf[pos]
    if byte < 0x80:  # fast path: field keys, lengths and small values
        return byte, pos + 1
    result = byte & 0x7F
    shift = 7
    while True:
        pos += 1
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos + 1
        shift += 7
        if shift > 63:
            raise _WireError("varint longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, Any]]:
    """``(field number, wire type, value)``; length-delimited values are ``(start, end)`` offsets into ``buf``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value = (pos, pos + length)
            pos += length
        elif wire == 5:
            value = (pos, pos + 4)
            pos += 4
        elif wire == 1:
            value = (pos, pos + 8)
            pos += 8
        else:
            raise _WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise _WireError("field runs past the end of its message")
        yield number, wire, value


def _packed_varints(buf: bytes, start: int, end: int) -> list[int]:
    out: list[int] = []
    append = out.append
    value = 0
    shift = 0
    for byte in buf[start:end]:
        if byte < 0x80:
            append(value | (byte << shift))
            value = 0
            shift = 0
        else:
            value |= (byte & 0x7F) << shift
            shift += 7
    if shift:
        raise _WireError("truncated packed varint")
    return out


def _signed(values: list[int]) -> list[int]:
    """int64 values are varints of their two's complement: map >= 2**63 back to negatives."""
    if values and max(values) >= 1 << 63:
        return [v - (1 << 64) if v >= 1 << 63 else v for v in values]
    return values


_KIND_OF_FIELD = {1: "bytes", 2: "float", 3: "int64"}
_FAST_KINDS = {0x0A: "bytes", 0x1A: "int64"}  # Feature fields 1 and 3, length-delimited


def _decode_list(buf: bytes, kind: str, start: int, end: int) -> list[Any]:
    """The values of a ``BytesList`` / ``FloatList`` / ``Int64List`` message at ``buf[start:end]``."""
    values: list[Any] = []
    for number, wire, value in _fields(buf, start, end):
        if number != 1:
            continue
        if kind == "bytes" and wire == 2:
            values.append(buf[value[0] : value[1]])
        elif kind == "int64" and wire == 2:
            values.extend(_packed_varints(buf, *value))
        elif kind == "int64" and wire == 0:
            values.append(value)
        elif kind == "float" and wire == 2:
            if (value[1] - value[0]) % 4:
                raise _WireError("packed float list length is not a multiple of 4")
            values.extend(struct.unpack(f"<{(value[1] - value[0]) // 4}f", buf[value[0] : value[1]]))
        elif kind == "float" and wire == 5:
            values.append(struct.unpack("<f", buf[value[0] : value[1]])[0])
        else:
            raise _WireError(f"{kind}_list value has wire type {wire}")
    return _signed(values) if kind == "int64" else values


def _decode_feature(buf: bytes, start: int, end: int) -> tuple[str | None, list[Any]]:
    """A ``Feature`` message: its kind and values (the last list set wins, as in protobuf's oneof)."""
    if end - start > 2 and buf[start] in _FAST_KINDS:  # fast path: one list whose one field fills it
        length, pos = _varint(buf, start + 1)
        if pos + length == end and pos < end and buf[pos] == 0x0A:
            inner, value_start = _varint(buf, pos + 1)
            if value_start + inner == end:
                kind = _FAST_KINDS[buf[start]]
                if kind == "int64":
                    return kind, _signed(_packed_varints(buf, value_start, end))
                if kind == "bytes":
                    return kind, [buf[value_start:end]]
    kind: str | None = None
    values: list[Any] = []
    for number, wire, span in _fields(buf, start, end):
        if wire == 2 and number in _KIND_OF_FIELD:
            kind = _KIND_OF_FIELD[number]
            values = _decode_list(buf, kind, *span)
    return kind, values


def _map_entry(buf: bytes, start: int, end: int) -> tuple[bytes | None, tuple[int, int] | None]:
    """Key and value span of a ``Features.feature`` map entry; fast path for the usual key-then-value order."""
    if end - start > 2 and buf[start] == 0x0A and buf[start + 1] < 0x80:
        pos = start + 2 + buf[start + 1]
        if pos < end and buf[pos] == 0x12:
            length, value_start = _varint(buf, pos + 1)
            if value_start + length == end:
                return buf[start + 2 : pos], (value_start, end)
    name = span = None
    for number, wire, value in _fields(buf, start, end):
        if wire == 2 and number == 1:
            name = buf[value[0] : value[1]]
        elif wire == 2 and number == 2:
            span = value
    return name, span


def parse_example(
    data: bytes, wanted: Collection[str] | None = None
) -> dict[str, tuple[str | None, list[Any]]]:
    """Decode a serialized ``tf.train.Example`` into ``{name: (kind, values)}``.

    ``kind`` is ``bytes``, ``float``, ``int64`` or None for a feature with no list set. Only features named in
    ``wanted`` are decoded (the others are skipped cheaply). Raises ``ValueError`` on malformed data.
    """
    keys = None if wanted is None else {name.encode() for name in wanted}
    out: dict[str, tuple[str | None, list[Any]]] = {}
    try:
        for number, wire, features in _fields(data, 0, len(data)):
            if number != 1 or wire != 2:
                continue
            for entry_number, entry_wire, entry in _fields(data, *features):
                if entry_number != 1 or entry_wire != 2:
                    continue
                key, span = _map_entry(data, *entry)
                if key is None or (keys is not None and key not in keys):
                    continue
                out[key.decode("utf-8")] = _decode_feature(data, *span) if span else (None, [])
    except IndexError:
        raise ValueError("not a valid tf.train.Example (truncated varint)") from None
    except (_WireError, UnicodeDecodeError, struct.error) as err:
        raise ValueError(f"not a valid tf.train.Example ({err})") from err
    return out


_KINDS = {
    "string": "bytes",
    "int32": "int64",
    "int64": "int64",
    "bool": "int64",
    "float32": "float",
    "float64": "float",
}


def decode_features(
    raw: Mapping[str, tuple[str | None, list[Any]]], spec: Mapping[str, Mapping[str, Any]], where: str
) -> dict[str, Any]:
    """Typed values of the features in ``spec`` (``{name: {"dtype", "shape"}}``, from ``info.<split>.json``).

    A declared feature missing from the record, a list of the wrong kind, or a scalar feature without exactly
    one value raises :class:`TFRecordError` naming ``where`` and the feature.
    """
    row: dict[str, Any] = {}
    for name, feature in spec.items():
        dtype = feature.get("dtype")
        if name not in raw:
            raise TFRecordError(
                f"{where}: feature {name!r} is declared in info.json but missing from the record"
            )
        kind, values = raw[name]
        expected = _KINDS.get(dtype)  # type: ignore[arg-type]
        if expected is None:
            raise TFRecordError(f"{where}: feature {name!r} has unsupported dtype {dtype!r} in info.json")
        if kind is not None and kind != expected:
            raise TFRecordError(f"{where}: feature {name!r} is declared {dtype} but holds a {kind}_list")
        try:
            if dtype == "string":
                values = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError as err:
            raise TFRecordError(f"{where}: feature {name!r} is not valid UTF-8 ({err.reason})") from err
        if dtype == "bool":
            values = [bool(v) for v in values]
        if list(feature.get("shape") or []) == []:
            if len(values) != 1:
                raise TFRecordError(f"{where}: scalar feature {name!r} holds {len(values)} values")
            row[name] = values[0]
        else:
            row[name] = values
    return row


# --------------------------------------------------------------------------------------------------
# Writing (test fixtures and benchmarks)
# --------------------------------------------------------------------------------------------------


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64: two's complement, 10 bytes
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def encode_example(features: Mapping[str, tuple[str, Sequence[Any]]]) -> bytes:
    """Serialize ``{name: (kind, values)}`` (kind ``bytes``/``float``/``int64``) as a ``tf.train.Example``
    with packed numeric lists, as TensorFlow writes them."""
    entries = b""
    for name, (kind, values) in features.items():
        if kind == "bytes":
            inner = b"".join(_length_delimited(1, v.encode() if isinstance(v, str) else v) for v in values)
            feature = _length_delimited(1, inner)
        elif kind == "float":
            feature = _length_delimited(2, _length_delimited(1, struct.pack(f"<{len(values)}f", *values)))
        elif kind == "int64":
            feature = _length_delimited(
                3, _length_delimited(1, b"".join(_encode_varint(int(v)) for v in values))
            )
        else:
            raise ValueError(f"unknown feature kind {kind!r}")
        entry = _length_delimited(1, name.encode()) + _length_delimited(2, feature)
        entries += _length_delimited(1, entry)
    return _length_delimited(1, entries)


def frame_record(data: bytes) -> bytes:
    """One record in TFRecord framing (length, its masked CRC, data, its masked CRC)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))
