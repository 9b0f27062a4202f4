//! The node's counters through the `metrics` facade, as an application's exporter sees them.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;

use crate::common::*;

/// The value of `name` in Prometheus text, if present.
fn value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn node_counters_reach_a_metrics_recorder() {
    let pki = Pki::new("ca");
    let (a, b, sa, sb) = session_pair(&pki, Default::default(), Default::default()).await;
    for i in 0..3u32 {
        sa.send(0, &i).await.unwrap();
    }
    for _ in 0..3 {
        sb.recv().await.unwrap();
    }
    sa.delivered(0).await.unwrap();

    // A local recorder: what an application installs globally, scoped to this test.
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        a.record_metrics();
    });
    let text = handle.render();
    assert_eq!(value(&text, "quicseal_messages_sent_total"), Some(3.0), "{text}");
    assert_eq!(value(&text, "quicseal_acked_total"), Some(3.0), "{text}");
    assert_eq!(value(&text, "quicseal_tag_failures_total"), Some(0.0), "{text}");
    assert_eq!(value(&text, "quicseal_open_connections"), Some(1.0), "{text}");
    assert!(value(&text, "quicseal_buffered_bytes").is_some(), "{text}");
    // Gauges of a session (in flight, rtt) are not node metrics.
    assert!(!text.contains("quicseal_rtt_ms"), "{text}");

    // The receiving node counts what it delivered; recording again replaces, never adds.
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        b.record_metrics();
        b.record_metrics();
    });
    assert_eq!(value(&handle.render(), "quicseal_messages_delivered_total"), Some(3.0));
}

/// `export_metrics` records periodically into the global recorder (the only test of this
/// binary that installs one).
#[tokio::test]
async fn periodic_export_reaches_the_global_recorder() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).expect("no other test installs a global recorder");
    let pki = Pki::new("ca");
    let (a, _b, sa, sb) = session_pair(&pki, Default::default(), Default::default()).await;
    let _exporter = a.export_metrics(Duration::from_millis(10));
    sa.send(0, &"one").await.unwrap();
    sb.recv().await.unwrap();
    // Polls the rendered text until the exporter's task has recorded the send.
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while value(&handle.render(), "quicseal_messages_sent_total") != Some(1.0) {
            poll.tick().await;
        }
    })
    .await;
    assert!(seen.is_ok(), "{}", handle.render());
}
