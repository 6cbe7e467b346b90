//! Hand-written byte vectors for every message type (so the encoder is checked against
//! independently written bytes, not against itself), plus error cases.

use super::*;
use bytes::BytesMut;

/// One known-good message: the decoder context, the exact wire bytes and the decoded form.
struct Case {
    name: &'static str,
    proto: u32,
    parallel: bool,
    in_stream: bool,
    wire: Vec<u8>,
    msg: Message,
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

const LSN1: [u8; 8] = [0, 0, 0, 1, 0, 0, 0, 0x28]; // 0x1_0000_0028
const LSN2: [u8; 8] = [0, 0, 0, 1, 0, 0, 0, 0x58]; // 0x1_0000_0058
const TS1: [u8; 8] = [0, 2, 0, 0, 0, 0, 0, 1]; // 0x2_0000_0000_0001
const TS2: [u8; 8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe]; // -2
const XID: [u8; 4] = [0, 0, 0x02, 0xe8]; // 744
const SXID: [u8; 4] = [0, 0, 0x03, 0xe9]; // 1001, the streamed-block xid prefix
const REL: [u8; 4] = [0, 0, 0x40, 0x00]; // 16384

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// TupleData `[t "abc", n, u, b 0xdead]`.
fn tuple4_wire() -> Vec<u8> {
    cat(&[
        &[0, 4],
        b"t",
        &[0, 0, 0, 3],
        b"abc",
        b"n",
        b"u",
        b"b",
        &[0, 0, 0, 2],
        &[0xde, 0xad],
    ])
}
fn tuple4() -> Tuple {
    vec![
        Datum::Text(b("abc")),
        Datum::Null,
        Datum::UnchangedToast,
        Datum::Binary(Bytes::from_static(&[0xde, 0xad])),
    ]
}
/// TupleData `[t "a"]` (an old key).
fn key_wire() -> Vec<u8> {
    cat(&[&[0, 1], b"t", &[0, 0, 0, 1], b"a"])
}
fn key() -> Tuple {
    vec![Datum::Text(b("a"))]
}

fn relation_body_wire() -> Vec<u8> {
    cat(&[
        &REL,
        b"public\0",
        b"stock\0",
        b"d",
        &[0, 2],
        &[1],
        b"sku\0",
        &[0, 0, 0, 25],
        &[0xff, 0xff, 0xff, 0xff],
        &[0],
        b"on_hand\0",
        &[0, 0, 0, 23],
        &[0, 0, 0, 8],
    ])
}
fn relation(xid: Option<Xid>) -> Relation {
    Relation {
        xid,
        oid: 16384,
        namespace: b("public"),
        name: b("stock"),
        replica_identity: b'd',
        columns: vec![
            Column {
                flags: 1,
                name: b("sku"),
                type_oid: 25,
                type_modifier: -1,
            },
            Column {
                flags: 0,
                name: b("on_hand"),
                type_oid: 23,
                type_modifier: 8,
            },
        ],
    }
}

fn case(name: &'static str, proto: u32, wire: Vec<u8>, msg: Message) -> Case {
    Case {
        name,
        proto,
        parallel: false,
        in_stream: false,
        wire,
        msg,
    }
}

fn cases() -> Vec<Case> {
    let gid = || b("gid-7");
    let mut v = vec![
        case(
            "Begin",
            1,
            cat(&[b"B", &LSN1, &TS1, &XID]),
            Message::Begin {
                final_lsn: 0x1_0000_0028,
                commit_ts: 0x2_0000_0000_0001,
                xid: 744,
            },
        ),
        case(
            "Commit",
            1,
            cat(&[b"C", &[0], &LSN1, &LSN2, &TS2]),
            Message::Commit {
                flags: 0,
                commit_lsn: 0x1_0000_0028,
                end_lsn: 0x1_0000_0058,
                commit_ts: -2,
            },
        ),
        case(
            "Origin",
            1,
            cat(&[b"O", &LSN1, b"node_a\0"]),
            Message::Origin {
                commit_lsn: 0x1_0000_0028,
                name: b("node_a"),
            },
        ),
        case(
            "Relation",
            1,
            cat(&[b"R", &relation_body_wire()]),
            Message::Relation(relation(None)),
        ),
        case(
            "Relation empty namespace, no columns",
            1,
            cat(&[b"R", &REL, b"\0", b"t\0", b"n", &[0, 0]]),
            Message::Relation(Relation {
                xid: None,
                oid: 16384,
                namespace: Bytes::new(),
                name: b("t"),
                replica_identity: b'n',
                columns: vec![],
            }),
        ),
        case(
            "Type",
            1,
            cat(&[b"Y", &[0, 0, 0x40, 0x10], b"public\0", b"mood\0"]),
            Message::Type {
                xid: None,
                oid: 0x4010,
                namespace: b("public"),
                name: b("mood"),
            },
        ),
        case(
            "Insert",
            1,
            cat(&[b"I", &REL, b"N", &tuple4_wire()]),
            Message::Insert {
                xid: None,
                rel: 16384,
                new: tuple4(),
            },
        ),
        case(
            "Insert empty tuple",
            1,
            cat(&[b"I", &REL, b"N", &[0, 0]]),
            Message::Insert {
                xid: None,
                rel: 16384,
                new: vec![],
            },
        ),
        case(
            "Update without old",
            1,
            cat(&[b"U", &REL, b"N", &tuple4_wire()]),
            Message::Update {
                xid: None,
                rel: 16384,
                old: None,
                new: tuple4(),
            },
        ),
        case(
            "Update with key",
            1,
            cat(&[b"U", &REL, b"K", &key_wire(), b"N", &tuple4_wire()]),
            Message::Update {
                xid: None,
                rel: 16384,
                old: Some((OldKind::Key, key())),
                new: tuple4(),
            },
        ),
        case(
            "Update with full old row",
            1,
            cat(&[b"U", &REL, b"O", &tuple4_wire(), b"N", &key_wire()]),
            Message::Update {
                xid: None,
                rel: 16384,
                old: Some((OldKind::Full, tuple4())),
                new: key(),
            },
        ),
        case(
            "Delete key",
            1,
            cat(&[b"D", &REL, b"K", &key_wire()]),
            Message::Delete {
                xid: None,
                rel: 16384,
                old: (OldKind::Key, key()),
            },
        ),
        case(
            "Delete full",
            1,
            cat(&[b"D", &REL, b"O", &tuple4_wire()]),
            Message::Delete {
                xid: None,
                rel: 16384,
                old: (OldKind::Full, tuple4()),
            },
        ),
        case(
            "Truncate",
            1,
            cat(&[b"T", &[0, 0, 0, 2], &[3], &REL, &[0, 0, 0x40, 0x01]]),
            Message::Truncate {
                xid: None,
                options: 3,
                rels: vec![16384, 16385],
            },
        ),
        case(
            "Message",
            1,
            cat(&[b"M", &[1], &LSN1, b"pfx\0", &[0, 0, 0, 5], b"hello"]),
            Message::LogicalMessage {
                xid: None,
                transactional: true,
                lsn: 0x1_0000_0028,
                prefix: b("pfx"),
                content: b("hello"),
            },
        ),
        case(
            "Message non-transactional, empty content",
            1,
            cat(&[b"M", &[0], &LSN1, b"\0", &[0, 0, 0, 0]]),
            Message::LogicalMessage {
                xid: None,
                transactional: false,
                lsn: 0x1_0000_0028,
                prefix: Bytes::new(),
                content: Bytes::new(),
            },
        ),
        case(
            "Stream Start",
            2,
            cat(&[b"S", &SXID, &[1]]),
            Message::StreamStart {
                xid: 1001,
                first_segment: true,
            },
        ),
        case("Stream Stop", 2, b"E".to_vec(), Message::StreamStop),
        case(
            "Stream Commit",
            2,
            cat(&[b"c", &SXID, &[0], &LSN1, &LSN2, &TS1]),
            Message::StreamCommit {
                xid: 1001,
                flags: 0,
                commit_lsn: 0x1_0000_0028,
                end_lsn: 0x1_0000_0058,
                commit_ts: 0x2_0000_0000_0001,
            },
        ),
        case(
            "Stream Abort",
            2,
            cat(&[b"A", &SXID, &[0, 0, 0x03, 0xea]]),
            Message::StreamAbort {
                xid: 1001,
                subxid: 1002,
                abort: None,
            },
        ),
        Case {
            parallel: true,
            ..case(
                "Stream Abort parallel",
                4,
                cat(&[b"A", &SXID, &SXID, &LSN2, &TS1]),
                Message::StreamAbort {
                    xid: 1001,
                    subxid: 1001,
                    abort: Some((0x1_0000_0058, 0x2_0000_0000_0001)),
                },
            )
        },
        case(
            "Begin Prepare",
            3,
            cat(&[b"b", &LSN1, &LSN2, &TS1, &XID, b"gid-7\0"]),
            Message::BeginPrepare {
                prepare_lsn: 0x1_0000_0028,
                end_lsn: 0x1_0000_0058,
                prepare_ts: 0x2_0000_0000_0001,
                xid: 744,
                gid: gid(),
            },
        ),
        case(
            "Prepare",
            3,
            cat(&[b"P", &[0], &LSN1, &LSN2, &TS1, &XID, b"gid-7\0"]),
            Message::Prepare {
                flags: 0,
                prepare_lsn: 0x1_0000_0028,
                end_lsn: 0x1_0000_0058,
                prepare_ts: 0x2_0000_0000_0001,
                xid: 744,
                gid: gid(),
            },
        ),
        case(
            "Commit Prepared",
            3,
            cat(&[b"K", &[0], &LSN1, &LSN2, &TS2, &XID, b"gid-7\0"]),
            Message::CommitPrepared {
                flags: 0,
                commit_lsn: 0x1_0000_0028,
                end_lsn: 0x1_0000_0058,
                commit_ts: -2,
                xid: 744,
                gid: gid(),
            },
        ),
        case(
            "Rollback Prepared",
            3,
            cat(&[b"r", &[0], &LSN1, &LSN2, &TS1, &TS2, &XID, b"gid-7\0"]),
            Message::RollbackPrepared {
                flags: 0,
                prepare_end_lsn: 0x1_0000_0028,
                rollback_end_lsn: 0x1_0000_0058,
                prepare_ts: 0x2_0000_0000_0001,
                rollback_ts: -2,
                xid: 744,
                gid: gid(),
            },
        ),
        case(
            "Stream Prepare",
            3,
            cat(&[b"p", &[0], &LSN1, &LSN2, &TS1, &XID, b"\0"]),
            Message::StreamPrepare {
                flags: 0,
                prepare_lsn: 0x1_0000_0028,
                end_lsn: 0x1_0000_0058,
                prepare_ts: 0x2_0000_0000_0001,
                xid: 744,
                gid: Bytes::new(),
            },
        ),
    ];
    // Inside a streamed block (v2+) R/Y/I/U/D/T/M carry the xid prefix right after the tag.
    let streamed = |name, proto, wire, msg| Case {
        in_stream: true,
        ..case(name, proto, wire, msg)
    };
    v.extend([
        streamed(
            "Relation in stream",
            2,
            cat(&[b"R", &SXID, &relation_body_wire()]),
            Message::Relation(relation(Some(1001))),
        ),
        streamed(
            "Type in stream",
            2,
            cat(&[b"Y", &SXID, &[0, 0, 0x40, 0x10], b"\0", b"mood\0"]),
            Message::Type {
                xid: Some(1001),
                oid: 0x4010,
                namespace: Bytes::new(),
                name: b("mood"),
            },
        ),
        streamed(
            "Insert in stream",
            3,
            cat(&[b"I", &SXID, &REL, b"N", &tuple4_wire()]),
            Message::Insert {
                xid: Some(1001),
                rel: 16384,
                new: tuple4(),
            },
        ),
        streamed(
            "Update in stream",
            4,
            cat(&[b"U", &SXID, &REL, b"K", &key_wire(), b"N", &key_wire()]),
            Message::Update {
                xid: Some(1001),
                rel: 16384,
                old: Some((OldKind::Key, key())),
                new: key(),
            },
        ),
        streamed(
            "Delete in stream",
            2,
            cat(&[b"D", &SXID, &REL, b"O", &key_wire()]),
            Message::Delete {
                xid: Some(1001),
                rel: 16384,
                old: (OldKind::Full, key()),
            },
        ),
        streamed(
            "Truncate in stream",
            2,
            cat(&[b"T", &SXID, &[0, 0, 0, 1], &[0], &REL]),
            Message::Truncate {
                xid: Some(1001),
                options: 0,
                rels: vec![16384],
            },
        ),
        streamed(
            "Message in stream",
            2,
            cat(&[b"M", &SXID, &[1], &LSN1, b"p\0", &[0, 0, 0, 1], b"x"]),
            Message::LogicalMessage {
                xid: Some(1001),
                transactional: true,
                lsn: 0x1_0000_0028,
                prefix: b("p"),
                content: b("x"),
            },
        ),
    ]);
    v
}

fn decoder_for(c: &Case) -> Decoder {
    let mut d = Decoder::new(c.proto, c.parallel);
    d.in_stream = c.in_stream;
    d
}

#[test]
fn decodes_hand_written_vectors() {
    for c in cases() {
        let got = decoder_for(&c).decode(&Bytes::from(c.wire.clone()));
        assert_eq!(got.as_ref(), Ok(&c.msg), "{}", c.name);
    }
}

#[test]
fn encodes_to_hand_written_vectors() {
    for c in cases() {
        let mut out = BytesMut::new();
        encode(&c.msg, c.in_stream, c.parallel, &mut out);
        assert_eq!(&out[..], &c.wire[..], "{}", c.name);
    }
}

#[test]
fn decodes_with_every_later_version_too() {
    for c in cases() {
        for proto in c.proto..=4 {
            let mut d = Decoder {
                proto_version: proto,
                ..decoder_for(&c)
            };
            assert_eq!(
                d.decode(&Bytes::from(c.wire.clone())).as_ref(),
                Ok(&c.msg),
                "{}",
                c.name
            );
        }
    }
}

#[test]
fn every_truncation_is_an_error() {
    for c in cases() {
        let full = Bytes::from(c.wire.clone());
        for n in 0..full.len() {
            let mut d = decoder_for(&c);
            let err = d.decode(&full.slice(..n));
            assert!(
                err.is_err(),
                "{} truncated to {n} bytes decoded: {err:?}",
                c.name
            );
            let err = err.unwrap_err();
            assert!(
                err.offset <= n,
                "{}: offset {} beyond prefix {n}",
                c.name,
                err.offset
            );
            assert_eq!(
                d.in_stream, c.in_stream,
                "{}: state changed on error",
                c.name
            );
        }
    }
}

#[test]
fn trailing_bytes_are_an_error() {
    for c in cases() {
        let mut wire = c.wire.clone();
        wire.push(0);
        let err = decoder_for(&c).decode(&Bytes::from(wire)).unwrap_err();
        assert_eq!(err.offset, c.wire.len(), "{}", c.name);
        assert!(err.what.contains("trailing"), "{}: {}", c.name, err.what);
    }
}

#[test]
fn decoded_strings_and_values_share_the_input_buffer() {
    let wire = Bytes::from(cat(&[b"I", &REL, b"N", &tuple4_wire()]));
    let Message::Insert { new, .. } = Decoder::new(1, false).decode(&wire).unwrap() else {
        panic!("not an insert")
    };
    let Datum::Text(v) = &new[0] else {
        panic!("not text")
    };
    let range = wire.as_ptr_range();
    assert!(range.contains(&v.as_ptr()), "value was copied");
}

fn decode_err(proto: u32, wire: &[u8]) -> DecodeError {
    Decoder::new(proto, false)
        .decode(&Bytes::copy_from_slice(wire))
        .unwrap_err()
}

#[test]
fn truncated_field_is_named() {
    let err = decode_err(1, &cat(&[b"C", &[0], &LSN1[..5]]));
    assert_eq!(
        err,
        DecodeError {
            offset: 2,
            what: "truncated Int64 commit_lsn in Commit".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "malformed pgoutput message: truncated Int64 commit_lsn in Commit at offset 2"
    );
}

#[test]
fn empty_message() {
    assert_eq!(decode_err(1, b"").offset, 0);
}

#[test]
fn unknown_tag() {
    let err = decode_err(4, b"Z");
    assert_eq!(
        err,
        DecodeError {
            offset: 0,
            what: "unknown message tag 0x5a".into()
        }
    );
    // 'k' and 'w' belong to the replication CopyData layer, not pgoutput.
    assert!(
        decode_err(4, b"k")
            .what
            .contains("unknown message tag 0x6b")
    );
}

#[test]
fn bad_tuple_kind() {
    let wire = cat(&[b"I", &REL, b"N", &[0, 2], b"n", b"A"]);
    let err = decode_err(1, &wire);
    assert_eq!(err.offset, 9);
    assert_eq!(err.what, "unknown tuple column kind 0x41 in Insert");
}

#[test]
fn bad_tuple_markers() {
    let err = decode_err(1, &cat(&[b"I", &REL, b"X", &[0, 0]]));
    assert_eq!(err.offset, 5);
    assert!(err.what.contains("'N'"), "{}", err.what);
    let err = decode_err(1, &cat(&[b"U", &REL, b"X", &[0, 0]]));
    assert_eq!(err.offset, 5);
    assert!(err.what.contains("0x58"), "{}", err.what);
    // After an old tuple the new tuple must follow with 'N'.
    let err = decode_err(1, &cat(&[b"U", &REL, b"K", &[0, 0], b"K", &[0, 0]]));
    assert_eq!(err.offset, 8);
    let err = decode_err(1, &cat(&[b"D", &REL, b"N", &[0, 0]]));
    assert_eq!(err.offset, 5);
    assert!(err.what.contains("'K' or 'O'"), "{}", err.what);
}

#[test]
fn version_gating() {
    let gated: &[(u8, u32)] = &[
        (b'S', 2),
        (b'E', 2),
        (b'c', 2),
        (b'A', 2),
        (b'b', 3),
        (b'P', 3),
        (b'K', 3),
        (b'r', 3),
        (b'p', 3),
    ];
    for c in cases() {
        let tag = c.wire[0];
        let needed = gated.iter().find(|(t, _)| *t == tag).map_or(1, |(_, v)| *v);
        for proto in 1..needed {
            let mut d = Decoder {
                proto_version: proto,
                ..decoder_for(&c)
            };
            let err = d.decode(&Bytes::from(c.wire.clone())).unwrap_err();
            assert_eq!(err.offset, 0, "{}", c.name);
            assert!(
                err.what.contains("requires protocol version"),
                "{}: {}",
                c.name,
                err.what
            );
        }
    }
    assert!(
        decode_err(1, &cat(&[b"S", &SXID, &[1]]))
            .what
            .contains("version 2")
    );
}

#[test]
fn stream_block_tracks_xid_prefix() {
    let mut d = Decoder::new(2, false);
    let insert_plain = Bytes::from(cat(&[b"I", &REL, b"N", &key_wire()]));
    let insert_streamed = Bytes::from(cat(&[b"I", &SXID, &REL, b"N", &key_wire()]));
    assert_eq!(
        d.decode(&insert_plain).unwrap(),
        Message::Insert {
            xid: None,
            rel: 16384,
            new: key()
        }
    );
    d.decode(&Bytes::from(cat(&[b"S", &SXID, &[0]]))).unwrap();
    assert!(d.in_stream);
    assert_eq!(
        d.decode(&insert_streamed).unwrap(),
        Message::Insert {
            xid: Some(1001),
            rel: 16384,
            new: key()
        }
    );
    // The unprefixed form is misread inside the block (REL taken as the xid), so it fails.
    assert!(d.decode(&insert_plain).is_err());
    d.decode(&Bytes::from_static(b"E")).unwrap();
    assert!(!d.in_stream);
    assert!(d.decode(&insert_streamed).is_err());
    assert_eq!(
        d.decode(&insert_plain).unwrap(),
        Message::Insert {
            xid: None,
            rel: 16384,
            new: key()
        }
    );
    // Begin/Commit never carry the prefix, even if seen while in a block.
    d.in_stream = true;
    assert!(matches!(
        d.decode(&Bytes::from(cat(&[b"B", &LSN1, &TS1, &XID]))),
        Ok(Message::Begin { xid: 744, .. })
    ));
}

#[test]
fn protocol_v1_never_has_xid_prefix() {
    // Streaming cannot be negotiated under v1, so even a forced in_stream adds no prefix.
    let mut d = Decoder::new(1, false);
    d.in_stream = true;
    let wire = Bytes::from(cat(&[b"I", &REL, b"N", &key_wire()]));
    assert_eq!(
        d.decode(&wire).unwrap(),
        Message::Insert {
            xid: None,
            rel: 16384,
            new: key()
        }
    );
}

#[test]
fn stream_abort_extra_fields_only_with_parallel() {
    let short = Bytes::from(cat(&[b"A", &SXID, &SXID]));
    let long = Bytes::from(cat(&[b"A", &SXID, &SXID, &LSN1, &TS1]));
    assert!(Decoder::new(4, false).decode(&short).is_ok());
    assert!(
        Decoder::new(4, false)
            .decode(&long)
            .unwrap_err()
            .what
            .contains("trailing")
    );
    assert!(Decoder::new(4, true).decode(&long).is_ok());
    let err = Decoder::new(4, true).decode(&short).unwrap_err();
    assert_eq!(
        err,
        DecodeError {
            offset: 9,
            what: "truncated Int64 abort_lsn in Stream Abort".into()
        }
    );
}

#[test]
fn missing_nul_is_an_error() {
    let err = decode_err(1, &cat(&[b"O", &LSN1, b"node_a"]));
    assert_eq!(err.offset, 9);
    assert!(err.what.contains("missing NUL"), "{}", err.what);
}

#[test]
fn negative_and_oversized_lengths() {
    let err = decode_err(
        1,
        &cat(&[b"I", &REL, b"N", &[0, 1], b"t", &[0xff, 0xff, 0xff, 0xff]]),
    );
    assert_eq!(err.offset, 9);
    assert!(err.what.contains("negative length -1"), "{}", err.what);
    let err = decode_err(
        1,
        &cat(&[
            b"I",
            &REL,
            b"N",
            &[0, 1],
            b"b",
            &[0x7f, 0xff, 0xff, 0xff],
            b"x",
        ]),
    );
    assert_eq!(err.offset, 13);
    let err = decode_err(
        1,
        &cat(&[b"M", &[0], &LSN1, b"\0", &[0, 0, 0, 9], b"short"]),
    );
    assert!(err.what.contains("content"), "{}", err.what);
}

#[test]
fn absurd_counts_are_rejected_before_allocating() {
    // 65535 tuple columns announced, 1 byte follows.
    let err = decode_err(1, &cat(&[b"I", &REL, b"N", &[0xff, 0xff], b"n"]));
    assert_eq!(err.offset, 6);
    assert!(err.what.contains("tuple ncols 65535"), "{}", err.what);
    // 2^31-1 relations announced.
    let err = decode_err(1, &cat(&[b"T", &[0x7f, 0xff, 0xff, 0xff], &[0], &REL]));
    assert_eq!(err.offset, 1);
    // u32::MAX relations: must not overflow the size computation.
    let err = decode_err(1, &cat(&[b"T", &[0xff; 4], &[0]]));
    assert_eq!(err.offset, 1);
    // Relation with 3 columns announced but room for only one minimal column.
    let err = decode_err(
        1,
        &cat(&[b"R", &REL, b"\0", b"t\0", b"d", &[0, 3], &[0; 10]]),
    );
    assert!(err.what.contains("ncols 3"), "{}", err.what);
}

#[test]
fn invalid_boolean_bytes() {
    let err = decode_err(2, &cat(&[b"S", &SXID, &[2]]));
    assert_eq!(err.offset, 5);
    assert!(err.what.contains("first_segment"), "{}", err.what);
    let err = decode_err(1, &cat(&[b"M", &[3], &LSN1, b"\0", &[0, 0, 0, 0]]));
    assert_eq!(err.offset, 1);
}

#[test]
fn failed_stream_start_keeps_state() {
    let mut d = Decoder::new(2, false);
    assert!(d.decode(&Bytes::from(cat(&[b"S", &SXID]))).is_err());
    assert!(!d.in_stream);
}

/// Regenerates the committed fuzz seeds from the hand-written vectors:
/// `cargo test --lib pgoutput::tests::write_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "writes files; run by hand to refresh fuzz/seeds/decode"]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode");
    std::fs::create_dir_all(&dir).unwrap();
    for c in cases() {
        let file: String = c
            .name
            .chars()
            .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
            .collect();
        std::fs::write(dir.join(file), &c.wire).unwrap();
    }
}
