//! Property tests: encode/decode round trips of random valid messages, and arbitrary or
//! mutated bytes never panicking the decoder.

use super::*;
use bytes::BytesMut;
use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Union};

/// Decoder context a message is generated for.
#[derive(Clone, Copy, Debug)]
struct Ctx {
    proto: u32,
    in_stream: bool,
    parallel: bool,
}

impl Ctx {
    /// Whether R/Y/I/U/D/T/M carry the xid prefix in this context.
    fn prefixed(self) -> bool {
        self.in_stream && self.proto >= 2
    }
    fn decoder(self) -> Decoder {
        Decoder {
            proto_version: self.proto,
            parallel_streaming: self.parallel,
            in_stream: self.in_stream,
        }
    }
}

fn ctx() -> impl Strategy<Value = Ctx> {
    (1u32..=4, any::<bool>(), any::<bool>()).prop_map(|(proto, in_stream, parallel)| Ctx {
        proto,
        // The server only streams with v2+ and only parallel-streams with v4.
        in_stream: in_stream && proto >= 2,
        parallel: parallel && proto >= 4,
    })
}

/// A pgoutput String: any bytes except NUL.
fn cstr() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(1u8..=255, 0..12).prop_map(Bytes::from)
}

fn value() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn datum() -> impl Strategy<Value = Datum> {
    prop_oneof![
        Just(Datum::Null),
        Just(Datum::UnchangedToast),
        value().prop_map(Datum::Text),
        value().prop_map(Datum::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = Tuple> {
    prop::collection::vec(datum(), 0..8)
}

fn old_kind() -> impl Strategy<Value = OldKind> {
    prop_oneof![Just(OldKind::Key), Just(OldKind::Full)]
}

fn column() -> impl Strategy<Value = Column> {
    (any::<u8>(), cstr(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    )
}

/// A valid message for `ctx`: only tags its version allows, the xid prefix exactly when
/// streaming, abort info exactly when parallel.
fn message(ctx: Ctx) -> BoxedStrategy<Message> {
    let x = move || -> BoxedStrategy<Option<Xid>> {
        if ctx.prefixed() {
            any::<u32>().prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        }
    };
    let mut arms: Vec<BoxedStrategy<Message>> = vec![
        (any::<u64>(), any::<i64>(), any::<u32>())
            .prop_map(|(final_lsn, commit_ts, xid)| Message::Begin {
                final_lsn,
                commit_ts,
                xid,
            })
            .boxed(),
        (any::<u8>(), any::<u64>(), any::<u64>(), any::<i64>())
            .prop_map(|(flags, commit_lsn, end_lsn, commit_ts)| Message::Commit {
                flags,
                commit_lsn,
                end_lsn,
                commit_ts,
            })
            .boxed(),
        (any::<u64>(), cstr())
            .prop_map(|(commit_lsn, name)| Message::Origin { commit_lsn, name })
            .boxed(),
        (
            x(),
            any::<u32>(),
            cstr(),
            cstr(),
            any::<u8>(),
            prop::collection::vec(column(), 0..6),
        )
            .prop_map(|(xid, oid, namespace, name, replica_identity, columns)| {
                Message::Relation(Relation {
                    xid,
                    oid,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            })
            .boxed(),
        (x(), any::<u32>(), cstr(), cstr())
            .prop_map(|(xid, oid, namespace, name)| Message::Type {
                xid,
                oid,
                namespace,
                name,
            })
            .boxed(),
        (x(), any::<u32>(), tuple())
            .prop_map(|(xid, rel, new)| Message::Insert { xid, rel, new })
            .boxed(),
        (
            x(),
            any::<u32>(),
            prop::option::of((old_kind(), tuple())),
            tuple(),
        )
            .prop_map(|(xid, rel, old, new)| Message::Update { xid, rel, old, new })
            .boxed(),
        (x(), any::<u32>(), old_kind(), tuple())
            .prop_map(|(xid, rel, k, t)| Message::Delete {
                xid,
                rel,
                old: (k, t),
            })
            .boxed(),
        (x(), any::<u8>(), prop::collection::vec(any::<u32>(), 0..6))
            .prop_map(|(xid, options, rels)| Message::Truncate { xid, options, rels })
            .boxed(),
        (x(), any::<bool>(), any::<u64>(), cstr(), value())
            .prop_map(
                |(xid, transactional, lsn, prefix, content)| Message::LogicalMessage {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content,
                },
            )
            .boxed(),
    ];
    if ctx.proto >= 2 {
        let abort: BoxedStrategy<Option<(u64, i64)>> = if ctx.parallel {
            any::<(u64, i64)>().prop_map(Some).boxed()
        } else {
            Just(None).boxed()
        };
        arms.extend([
            (any::<u32>(), any::<bool>())
                .prop_map(|(xid, first_segment)| Message::StreamStart { xid, first_segment })
                .boxed(),
            Just(Message::StreamStop).boxed(),
            (
                any::<u32>(),
                any::<u8>(),
                any::<u64>(),
                any::<u64>(),
                any::<i64>(),
            )
                .prop_map(
                    |(xid, flags, commit_lsn, end_lsn, commit_ts)| Message::StreamCommit {
                        xid,
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_ts,
                    },
                )
                .boxed(),
            (any::<u32>(), any::<u32>(), abort)
                .prop_map(|(xid, subxid, abort)| Message::StreamAbort { xid, subxid, abort })
                .boxed(),
        ]);
    }
    if ctx.proto >= 3 {
        let common = || {
            (
                any::<u8>(),
                any::<u64>(),
                any::<u64>(),
                any::<i64>(),
                any::<u32>(),
                cstr(),
            )
        };
        arms.extend([
            (
                any::<u64>(),
                any::<u64>(),
                any::<i64>(),
                any::<u32>(),
                cstr(),
            )
                .prop_map(
                    |(prepare_lsn, end_lsn, prepare_ts, xid, gid)| Message::BeginPrepare {
                        prepare_lsn,
                        end_lsn,
                        prepare_ts,
                        xid,
                        gid,
                    },
                )
                .boxed(),
            common()
                .prop_map(
                    |(flags, prepare_lsn, end_lsn, prepare_ts, xid, gid)| Message::Prepare {
                        flags,
                        prepare_lsn,
                        end_lsn,
                        prepare_ts,
                        xid,
                        gid,
                    },
                )
                .boxed(),
            common()
                .prop_map(|(flags, commit_lsn, end_lsn, commit_ts, xid, gid)| {
                    Message::CommitPrepared {
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_ts,
                        xid,
                        gid,
                    }
                })
                .boxed(),
            (common(), any::<i64>())
                .prop_map(
                    |((flags, pe, re, pts, xid, gid), rts)| Message::RollbackPrepared {
                        flags,
                        prepare_end_lsn: pe,
                        rollback_end_lsn: re,
                        prepare_ts: pts,
                        rollback_ts: rts,
                        xid,
                        gid,
                    },
                )
                .boxed(),
            common()
                .prop_map(|(flags, prepare_lsn, end_lsn, prepare_ts, xid, gid)| {
                    Message::StreamPrepare {
                        flags,
                        prepare_lsn,
                        end_lsn,
                        prepare_ts,
                        xid,
                        gid,
                    }
                })
                .boxed(),
        ]);
    }
    Union::new(arms).boxed()
}

fn ctx_and_message() -> impl Strategy<Value = (Ctx, Message)> {
    ctx().prop_flat_map(|c| (Just(c), message(c)))
}

fn encoded(ctx: Ctx, msg: &Message) -> Bytes {
    let mut out = BytesMut::new();
    encode(msg, ctx.prefixed(), ctx.parallel, &mut out);
    out.freeze()
}

/// Decode `data` in every context; whatever decodes must re-encode to the same bytes.
fn decode_everywhere(data: &Bytes) {
    for proto in 1..=4 {
        for in_stream in [false, true] {
            for parallel in [false, true] {
                let c = Ctx {
                    proto,
                    in_stream,
                    parallel,
                };
                if let Ok(msg) = c.decoder().decode(data) {
                    assert_eq!(&encoded(c, &msg), data, "{c:?} {msg:?}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn encode_then_decode_round_trips((c, msg) in ctx_and_message()) {
        let wire = encoded(c, &msg);
        let mut d = c.decoder();
        prop_assert_eq!(d.decode(&wire), Ok(msg.clone()));
        let want_stream = match msg {
            Message::StreamStart { .. } => true,
            Message::StreamStop => false,
            _ => c.in_stream,
        };
        prop_assert_eq!(d.in_stream, want_stream);
        // Every strict prefix is incomplete.
        for n in 0..wire.len() {
            prop_assert!(c.decoder().decode(&wire.slice(..n)).is_err());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..64)) {
        decode_everywhere(&Bytes::from(data));
    }

    #[test]
    fn arbitrary_bytes_after_a_known_tag_never_panic(
        tag in prop::sample::select(b"BCORYIUDTMSEcAbPKrp".to_vec()),
        rest in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut data = vec![tag];
        data.extend(rest);
        decode_everywhere(&Bytes::from(data));
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        (c, msg) in ctx_and_message(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut wire = encoded(c, &msg).to_vec();
        for (i, byte) in edits {
            let i = i.index(wire.len());
            wire[i] = byte;
        }
        decode_everywhere(&Bytes::from(wire));
    }
}
