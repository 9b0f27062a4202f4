//! A node's counters through the [`metrics`] facade, so an application's exporter (Prometheus,
//! StatsD, OpenTelemetry: any `metrics` recorder) publishes them.
//!
//! Every counter of [`Stats`](crate::Stats) is exported as `quicseal_<name>_total` (totals over
//! all sessions of the node, past and present), and the node's current state as gauges:
//! `quicseal_open_connections` and `quicseal_buffered_bytes`. Values are copied from the node's
//! own atomics when [`Node::record_metrics`](crate::Node::record_metrics) runs (on each scrape, or every interval of
//! [`Node::export_metrics`](crate::Node::export_metrics)), so the message path pays nothing for them.

use std::time::Duration;

use tokio::task::JoinHandle;

use crate::stats::Stats;

/// The periodic export started by [`Node::export_metrics`](crate::Node::export_metrics); dropping it stops it.
#[derive(Debug)]
pub struct MetricsExporter {
    task: JoinHandle<()>,
}

impl Drop for MetricsExporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl crate::Node {
    /// Copies this node's counters and gauges to the `metrics` recorder in force now (the
    /// global one, or a local one of [`metrics::with_local_recorder`]). Call it before an
    /// exporter renders, or let [`Node::export_metrics`](crate::Node::export_metrics) call it periodically.
    pub fn record_metrics(&self) {
        let stats = self.stats();
        for (name, value) in stats.iter().filter(|(name, _)| !Stats::is_gauge(name)) {
            metrics::counter!(format!("quicseal_{name}_total")).absolute(value);
        }
        metrics::gauge!("quicseal_open_connections").set(self.open_connections() as f64);
        metrics::gauge!("quicseal_buffered_bytes").set(self.buffered_bytes() as f64);
    }

    /// Records this node's metrics ([`Node::record_metrics`](crate::Node::record_metrics)) now and every `interval` (at
    /// least 10 ms) until the returned handle is dropped or the node is dropped. Must be called
    /// inside a tokio runtime; the exporter does not keep the node open.
    pub fn export_metrics(&self, interval: Duration) -> MetricsExporter {
        let node = self.downgrade();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(node) = crate::Node::upgrade(&node) else { return };
                node.record_metrics();
            }
        });
        MetricsExporter { task }
    }
}
