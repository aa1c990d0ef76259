"""Just enough protobuf to read and amend a SentencePiece model file (sentencepiece_model.proto)
without the protobuf package: its messages are (field number, wire type, value) entries, a
varint-prefixed key before each."""


class ProtoError(ValueError):
    """Bytes that are not a protobuf message of the wire types a SentencePiece model uses."""


def read_varint(buf, i):
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ProtoError("protobuf message cut inside a varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def write_varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def entries(buf):
    """(field number, wire type, value, raw bytes of the whole entry) of one message: ints for
    varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        start = i
        key, i = read_varint(buf, i)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = read_varint(buf, i)
        elif wire_type == 2:
            size, i = read_varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ProtoError(f"unsupported protobuf wire type {wire_type}")
        yield number, wire_type, value, buf[start:i]


def fields(buf):
    """(field number, value) of one message."""
    for number, _, value, _ in entries(buf):
        yield number, value


NORMALIZER_SPEC, ADD_DUMMY_PREFIX = 3, 3  # ModelProto.normalizer_spec, NormalizerSpec.add_dummy_prefix


def without_dummy_prefix(model_proto):
    """The SentencePiece model's bytes with normalizer_spec.add_dummy_prefix = false, so that
    it encodes a text as a continuation (no '▁' put before its first word)."""
    out, found = bytearray(), False
    for number, wire_type, value, raw in entries(model_proto):
        if number != NORMALIZER_SPEC or wire_type != 2:
            out += raw
            continue
        found = True
        spec = b"".join(r for n, _, _, r in entries(value) if n != ADD_DUMMY_PREFIX)
        out += normalizer_entry(spec)
    if not found:  # every normalizer setting at its default, which adds the prefix
        out += normalizer_entry(b"")
    return bytes(out)


def normalizer_entry(spec):
    """A normalizer_spec entry: the given fields, then add_dummy_prefix = false."""
    spec += write_varint(ADD_DUMMY_PREFIX << 3) + write_varint(0)
    return write_varint(NORMALIZER_SPEC << 3 | 2) + write_varint(len(spec)) + spec
