//! What an operator relies on: health and readiness, metrics, and a graceful shutdown.

use hearth_client_api::close;
use hearth_tests::TestNode;

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    let mut b = bob.connect().await;
    a.send_to("bob", "counted").await;
    b.message().await;

    let http = reqwest::Client::new();
    let health = http
        .get(format!("{}/healthz", node.url()))
        .send()
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let ready = http
        .get(format!("{}/readyz", node.url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(ready.status(), 200);
    let metrics = http
        .get(format!("{}/metrics", node.url()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    for name in [
        "hearth_connections 2",
        "hearth_frames_in_total",
        "hearth_frames_out_total",
        "hearth_messages_total 1",
        "hearth_delivery_seconds_bucket",
        "hearth_store_flush_seconds_count",
    ] {
        assert!(metrics.contains(name), "metrics lack {name}:\n{metrics}");
    }
    // The send was a write applied to the store: its duration is counted.
    let writes = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hearth_store_write_seconds_count "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(
        writes.is_some_and(|n| n >= 1),
        "store writes not counted:\n{metrics}"
    );
}

#[tokio::test]
async fn shutdown_closes_sessions_with_going_away_and_keeps_what_was_acknowledged() {
    let mut node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    let (_, channel) = a.send_to("bob", "kept").await;
    let mut b = bob.connect().await;
    let ((), code) = tokio::join!(node.stop(), b.closed());
    assert_eq!(code, close::GOING_AWAY);

    node.restart().await;
    let page = bob
        .on(&node)
        .api
        .history(&channel, None, None)
        .await
        .expect("history");
    assert_eq!(page.events.len(), 1);
}
