//! The benchmark tool (`hearth-bench`) runs every scenario once, at a tiny size,
//! against the `hearth` binary built for these tests. Benchmarks are not tests:
//! this only proves the tool works and that what it measures adds up (nothing
//! lost or duplicated on a single node).

use hearth_bench::Report;
use hearth_tests::hearth_bin;

async fn bench(args: &[&str]) -> Report {
    let out = tempfile::tempdir().expect("temporary folder");
    let mut argv = vec![
        "hearth-bench".to_string(),
        "--quiet".into(),
        "--hearth".into(),
        hearth_bin!().display().to_string(),
        "--out".into(),
        out.path().display().to_string(),
    ];
    argv.extend(args.iter().map(|a| a.to_string()));
    let report = hearth_bench::cli::run_args(argv)
        .await
        .unwrap_or_else(|e| panic!("hearth-bench {args:?} failed: {e:?}"));
    let written = std::fs::read_dir(out.path())
        .expect("output folder")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect::<Vec<_>>();
    assert!(
        written.iter().any(|f| f.ends_with(".json")),
        "a JSON report in {written:?}"
    );
    if report.plot.is_some() {
        assert!(written.iter().any(|f| f.ends_with(".svg")), "the plot");
    }
    assert!(report.machine.cores >= 1);
    assert!(report.durability.contains("durable"));
    report
}

/// A number from the report's results, by JSON pointer.
fn num(report: &Report, pointer: &str) -> f64 {
    report
        .results
        .pointer(pointer)
        .and_then(serde_json::Value::as_f64)
        .unwrap_or_else(|| panic!("{pointer} in {}", report.results))
}

fn nothing_lost(report: &Report, at: &str) {
    assert!(
        num(report, &format!("{at}/sent")) > 0.0,
        "{}",
        report.table()
    );
    assert_eq!(
        num(report, &format!("{at}/lost")),
        0.0,
        "{}",
        report.table()
    );
    assert_eq!(
        num(report, &format!("{at}/duplicates")),
        0.0,
        "{}",
        report.table()
    );
    assert_eq!(
        num(report, &format!("{at}/delivered")),
        num(report, &format!("{at}/expected_deliveries")),
        "{}",
        report.table()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_holds_sessions_and_measures_memory() {
    let r = bench(&["idle", "--connections", "20", "--hold-secs", "0.2"]).await;
    assert_eq!(num(&r, "/still_open"), 20.0, "{}", r.table());
    assert!(num(&r, "/rss_after_kib") > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_pairs_lose_nothing() {
    let r = bench(&["direct", "--pairs", "2", "--rate", "40", "--secs", "1"]).await;
    nothing_lost(&r, "/counts");
    assert!(r.cpu.as_ref().and_then(|c| c.node_cpu_s).is_some());
    // How long the node's threads waited for a core is read too (it may be zero).
    assert!(
        r.cpu
            .as_ref()
            .and_then(|c| c.node_cpu_wait_s)
            .is_some_and(|w| w >= 0.0)
    );
    // The report says how many threads the tool's runtime had.
    assert!(r.tool_threads >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_with_a_window_loses_nothing() {
    let r = bench(&["max", "--pairs", "2", "--window", "4", "--secs", "1"]).await;
    nothing_lost(&r, "/counts");
}

#[tokio::test(flavor = "multi_thread")]
async fn group_reaches_every_member() {
    let r = bench(&["group", "--members", "4", "--rate", "20", "--secs", "1"]).await;
    nothing_lost(&r, "/counts");
    assert_eq!(
        num(&r, "/complete_messages"),
        num(&r, "/counts/acked"),
        "{}",
        r.table()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn devices_each_get_each_message_once() {
    let r = bench(&[
        "devices",
        "--users",
        "2",
        "--devices",
        "2",
        "--rate",
        "20",
        "--secs",
        "1",
    ])
    .await;
    nothing_lost(&r, "/counts");
    assert_eq!(num(&r, "/devices_exact"), 4.0, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread")]
async fn catchup_gets_every_missed_message() {
    let r = bench(&["catchup", "--messages", "200", "--rounds", "1"]).await;
    assert!(num(&r, "/median_ms") > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn federation_between_two_child_nodes() {
    let r = bench(&[
        "federation",
        "--pairs",
        "2",
        "--rate",
        "20",
        "--secs",
        "1",
        "--max-secs",
        "1",
        "--window",
        "4",
        "--group-members",
        "4",
        "--group-rate",
        "8",
        "--group-secs",
        "1",
        "--catchup-secs",
        "1",
        "--drain-secs",
        "10",
    ])
    .await;
    assert!(num(&r, "/first_message_ms") > 0.0);
    // Only that the phases ran and were answered: cross-server delivery is the
    // federation tests' business, and its figures are what the benchmark reports.
    for phase in ["/direct/counts", "/max/counts", "/group/counts"] {
        assert!(num(&r, &format!("{phase}/sent")) > 0.0, "{}", r.table());
        assert_eq!(
            num(&r, &format!("{phase}/acked")),
            num(&r, &format!("{phase}/sent")),
            "{}",
            r.table()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_reopens_a_filled_store() {
    let r = bench(&[
        "restart",
        "--messages",
        "200",
        "--pairs",
        "2",
        "--rounds",
        "1",
    ])
    .await;
    assert_eq!(num(&r, "/messages"), 200.0);
    assert!(num(&r, "/data_bytes") > 0.0);
}
