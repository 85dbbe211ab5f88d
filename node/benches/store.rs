//! Micro-benchmarks of the store through its public API: appending a 1:1 message
//! as the node does (the event, two inbox entries, the sender's idempotency
//! record, in one atomic batch), with and without the flush that makes it durable,
//! and reading a backlog page.
//!
//! `cargo bench -p hearth-node --bench store` (a quick check: `cargo test --benches`).

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use hearth_federation::ServerKey;
use hearth_federation::SignedEvent;
use hearth_federation::event::{EVENT_VERSION, EventContent};
use hearth_node::store::{AckRecord, ChannelPos, Store, StoredEvent, WriteSet};

const CHANNEL: &str = "bn_YMnJ7E7pIzfO1@localhost";

/// Signed message events, made up front (signing is benchmarked in hearth-federation).
fn events(n: u64, key: &ServerKey) -> Vec<StoredEvent> {
    (0..n)
        .map(|seq| {
            let (event, id) = SignedEvent {
                v: EVENT_VERSION,
                channel: CHANNEL.into(),
                origin: "localhost".into(),
                sender: "alice@localhost".into(),
                seq,
                ts: 1_795_907_128_198 + seq,
                mver: 2,
                content: EventContent::Message {
                    body: format!("{seq:>64}"),
                },
                signatures: BTreeMap::new(),
            }
            .sign(key)
            .expect("signs");
            StoredEvent { id, event }
        })
        .collect()
}

/// What the node writes for one 1:1 message.
fn send_write(e: &StoredEvent, pos: u64) -> WriteSet {
    let cpos = ChannelPos {
        ts: e.event.ts,
        origin: e.event.origin.clone(),
        seq: e.event.seq,
    };
    WriteSet {
        events: vec![e.clone()],
        inbox: vec![
            ("alice@localhost".into(), pos, CHANNEL.into(), cpos.clone()),
            ("bob@localhost".into(), pos + 1, CHANNEL.into(), cpos),
        ],
        acks: vec![(
            "alice@localhost".into(),
            format!("key-{pos}"),
            AckRecord {
                event_id: e.id.clone(),
                channel: CHANNEL.into(),
                ts: e.event.ts,
            },
        )],
        stream_pos: Some(pos + 1),
        ..WriteSet::default()
    }
}

fn benches(c: &mut Criterion) {
    let key = ServerKey::from_seed(&[3u8; 32]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("temporary folder");
    let store = Store::open(dir.path()).expect("store opens");
    let pool = events(20_000, &key);
    let mut next = 0usize;
    let mut pos = 1u64;
    let mut take = move || {
        let e = pool[next % pool.len()].clone();
        // Later rounds reuse events under new stream positions: the same keys are
        // overwritten, which is still one transaction of the same shape.
        next += 1;
        pos += 2;
        send_write(&e, pos)
    };

    c.bench_function("store/append 1:1 message (no flush)", |b| {
        b.iter_batched(
            &mut take,
            |w| store.apply(black_box(&w)).expect("applies"),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("store/append 1:1 message + flush (durable)", |b| {
        b.iter_batched(
            &mut take,
            |w| {
                store.apply(black_box(&w)).expect("applies");
                runtime.block_on(store.flush()).expect("flushes");
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function(
        "store/append 100 messages + one flush (group commit)",
        |b| {
            b.iter_batched(
                || (0..100).map(|_| take()).collect::<Vec<_>>(),
                |ws| {
                    for w in &ws {
                        store.apply(black_box(w)).expect("applies");
                    }
                    runtime.block_on(store.flush()).expect("flushes");
                },
                BatchSize::SmallInput,
            )
        },
    );
    c.bench_function(
        "store/append 100 messages as one write set + one flush (merged group commit)",
        |b| {
            b.iter_batched(
                || {
                    let mut merged = WriteSet::default();
                    for _ in 0..100 {
                        let w = take();
                        merged.events.extend(w.events);
                        merged.inbox.extend(w.inbox);
                        merged.acks.extend(w.acks);
                        merged.stream_pos = w.stream_pos;
                    }
                    merged
                },
                |w| {
                    store.apply(black_box(&w)).expect("applies");
                    runtime.block_on(store.flush()).expect("flushes");
                },
                BatchSize::SmallInput,
            )
        },
    );
    // A backlog page as a reconnecting device reads it.
    for _ in 0..600 {
        store.apply(&take()).expect("applies");
    }
    let upto = store.stream_pos().expect("position");
    c.bench_function("store/read 500 inbox entries", |b| {
        b.iter(|| {
            let page = store
                .inbox("bob@localhost", 0, black_box(upto), 500)
                .expect("reads");
            assert_eq!(page.len(), 500);
            page
        })
    });
}

criterion_group!(store, benches);
criterion_main!(store);
