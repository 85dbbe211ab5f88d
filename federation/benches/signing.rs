//! Micro-benchmarks of the per-event cryptography: canonical encoding, signing,
//! verification and event ids, on a typical chat message event.
//!
//! `cargo bench -p hearth-federation` (a quick check: `cargo test --benches`).

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hearth_federation::event::{EVENT_VERSION, EventContent};
use hearth_federation::{ServerKey, SignedEvent, canonical_json, event_id, sign_json, verify_json};

fn message(body_bytes: usize) -> SignedEvent {
    SignedEvent {
        v: EVENT_VERSION,
        channel: "bn_YMnJ7E7pIzfO1@a.example".into(),
        origin: "a.example".into(),
        sender: "alice@a.example".into(),
        seq: 41_234,
        ts: 1_795_907_128_198,
        mver: 2,
        content: EventContent::Message {
            body: "x".repeat(body_bytes),
        },
        signatures: BTreeMap::new(),
    }
}

fn benches(c: &mut Criterion) {
    let key = ServerKey::from_seed(&[7u8; 32]);
    let unsigned = serde_json::to_value(message(64)).expect("event as JSON");
    let signed = sign_json(&unsigned, "a.example", &key).expect("signs");
    let (event, _) = message(64).sign(&key).expect("signs");
    let wire = event.to_json();
    let verifying = key.verifying_key();

    c.bench_function("canonical_json/message_64B", |b| {
        b.iter(|| canonical_json(black_box(&signed)).expect("encodes"))
    });
    let big = sign_json(
        &serde_json::to_value(message(16 * 1024)).expect("event as JSON"),
        "a.example",
        &key,
    )
    .expect("signs");
    c.bench_function("canonical_json/message_16KiB", |b| {
        b.iter(|| canonical_json(black_box(&big)).expect("encodes"))
    });
    c.bench_function("sign_json/message_64B", |b| {
        b.iter(|| sign_json(black_box(&unsigned), "a.example", &key).expect("signs"))
    });
    c.bench_function("verify_json/message_64B", |b| {
        b.iter(|| {
            verify_json(black_box(&signed), "a.example", key.key_id(), &verifying)
                .expect("verifies")
        })
    });
    c.bench_function("event_id/message_64B", |b| {
        b.iter(|| event_id(black_box(&signed)).expect("hashes"))
    });
    c.bench_function("SignedEvent::sign (sign + id)/message_64B", |b| {
        b.iter(|| message(64).sign(black_box(&key)).expect("signs"))
    });
    c.bench_function("SignedEvent::parse + verify/message_64B", |b| {
        b.iter(|| {
            let (e, _) = SignedEvent::parse(black_box(&wire), u64::MAX / 2).expect("parses");
            e.verify(&verifying).expect("verifies")
        })
    });
}

criterion_group!(signing, benches);
criterion_main!(signing);
