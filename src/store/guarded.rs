//! Wraps any store so that every call has a deadline and is timed: a slow or dead database turns into
//! `STORE_UNAVAILABLE` after `STORE_TIMEOUT` instead of hanging the request, and its latency is a metric.
//!
//! Calls made from the heavy lane (see `execution`) share a few permits: the database's connections are a
//! pool, and a storm of counts from one client must not leave a push's decision look-up queueing behind
//! hundreds of them.
//!
//! A call cut off by the deadline may still complete in the database (a SQLite write runs on its own
//! thread; a MongoDB commit may already be on the wire). That is safe: every write is idempotent, so the
//! client's retry finds it done.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{
    Appended, ConsentFilter, Decision, DecisionWritten, DialogFilter, Erased, ErasureAudit,
    MessageFilter, SharedStore, Store, StoreError, StoreResult,
};
use crate::metrics::Metrics;
use crate::model::{
    Change, ConsentHistory, ConsentRecord, CustomerId, DecisionEvent, Dialog, DialogId, Message,
};
use crate::paging::{KeyRange, ScanOrder};
use crate::stats::{Buckets, ConsentStats, Grouping, MessageStats};

pub struct GuardedStore {
    inner: SharedStore,
    timeout: Duration,
    metrics: Arc<Metrics>,
    heavy_calls: tokio::sync::Semaphore,
}

/// Store calls from the heavy lane at once: half of the smaller connection pool (SQLite's 8 readers;
/// MongoDB's default pool holds 10), so that the other half stays free for pushes and consents.
pub const HEAVY_STORE_CALLS: usize = 4;

impl GuardedStore {
    pub fn new(inner: SharedStore, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            timeout,
            metrics,
            heavy_calls: tokio::sync::Semaphore::new(HEAVY_STORE_CALLS),
        }
    }

    async fn call<T>(
        &self,
        name: &'static str,
        call: impl Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        // Outside the deadline: waiting for a permit is the heavy lane queueing, not the database failing.
        let _permit = match crate::execution::on_heavy_lane() {
            true => Some(
                self.heavy_calls
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            ),
            false => None,
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, call).await;
        self.metrics
            .store_seconds
            .with_label_values(&[name])
            .observe(started.elapsed().as_secs_f64());
        result.unwrap_or_else(|_| {
            Err(StoreError(format!(
                "{name} timed out after {:?} (STORE_TIMEOUT)",
                self.timeout
            )))
        })
    }
}

#[async_trait]
impl Store for GuardedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn scrub_status(&self) -> super::ScrubStatus {
        self.inner.scrub_status()
    }

    async fn ping(&self) -> StoreResult<()> {
        self.call("ping", self.inner.ping()).await
    }

    async fn close(&self) {
        // Closing gets the same deadline; a store that cannot close in time is abandoned.
        let _ = tokio::time::timeout(self.timeout, self.inner.close()).await;
    }

    async fn consent(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentRecord>> {
        self.call("consent", self.inner.consent(dialog_id)).await
    }

    async fn consents(&self, dialog_ids: &[DialogId]) -> StoreResult<Vec<ConsentRecord>> {
        self.call("consents", self.inner.consents(dialog_ids)).await
    }

    async fn consent_history(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentHistory>> {
        self.call("consent_history", self.inner.consent_history(dialog_id))
            .await
    }

    async fn record_decision(
        &self,
        decision: &Decision,
        messages: Vec<Message>,
    ) -> StoreResult<DecisionWritten> {
        self.call(
            "record_decision",
            self.inner.record_decision(decision, messages),
        )
        .await
    }

    async fn append_consented(&self, message: &Message) -> StoreResult<Appended> {
        self.call("append_consented", self.inner.append_consented(message))
            .await
    }

    async fn begin_erasure(
        &self,
        customer_id: &CustomerId,
        audit: &ErasureAudit,
    ) -> StoreResult<ErasureAudit> {
        self.call(
            "begin_erasure",
            self.inner.begin_erasure(customer_id, audit),
        )
        .await
    }

    async fn erase_batch(
        &self,
        customer_id: &CustomerId,
        max_messages: usize,
    ) -> StoreResult<Option<Erased>> {
        self.call(
            "erase_batch",
            self.inner.erase_batch(customer_id, max_messages),
        )
        .await
    }

    async fn note_buffered_messages(
        &self,
        customer_id: &CustomerId,
        count: u64,
    ) -> StoreResult<bool> {
        self.call(
            "note_buffered_messages",
            self.inner.note_buffered_messages(customer_id, count),
        )
        .await
    }

    async fn finish_erasure(
        &self,
        customer_id: &CustomerId,
        at: i64,
    ) -> StoreResult<Option<Erased>> {
        self.call("finish_erasure", self.inner.finish_erasure(customer_id, at))
            .await
    }

    async fn unfinished_erasures(&self) -> StoreResult<Vec<(CustomerId, i64)>> {
        self.call("unfinished_erasures", self.inner.unfinished_erasures())
            .await
    }

    async fn audit_secret(&self, proposed: [u8; 32]) -> StoreResult<[u8; 32]> {
        self.call("audit_secret", self.inner.audit_secret(proposed))
            .await
    }

    async fn dialog(&self, dialog_id: &DialogId) -> StoreResult<Option<Dialog>> {
        self.call("dialog", self.inner.dialog(dialog_id)).await
    }

    async fn scan_dialogs(
        &self,
        filter: &DialogFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Dialog>> {
        self.call(
            "scan_dialogs",
            self.inner.scan_dialogs(filter, range, order, limit),
        )
        .await
    }

    async fn count_dialogs(&self, filter: &DialogFilter) -> StoreResult<u64> {
        self.call("count_dialogs", self.inner.count_dialogs(filter))
            .await
    }

    async fn scan_messages(
        &self,
        filter: &MessageFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        self.call(
            "scan_messages",
            self.inner.scan_messages(filter, range, order, limit),
        )
        .await
    }

    async fn count_messages(&self, filter: &MessageFilter) -> StoreResult<u64> {
        self.call("count_messages", self.inner.count_messages(filter))
            .await
    }

    async fn message_stats(
        &self,
        filter: &MessageFilter,
        grouping: &Grouping,
        limit: usize,
    ) -> StoreResult<Vec<MessageStats>> {
        self.call(
            "message_stats",
            self.inner.message_stats(filter, grouping, limit),
        )
        .await
    }

    async fn consent_stats(
        &self,
        filter: &ConsentFilter,
        buckets: Option<&Buckets>,
        limit: usize,
    ) -> StoreResult<Vec<ConsentStats>> {
        self.call(
            "consent_stats",
            self.inner.consent_stats(filter, buckets, limit),
        )
        .await
    }

    async fn messages_of_dialogs(
        &self,
        dialog_ids: &[DialogId],
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        self.call(
            "messages_of_dialogs",
            self.inner.messages_of_dialogs(dialog_ids, limit),
        )
        .await
    }

    async fn last_change(&self) -> StoreResult<i64> {
        self.call("last_change", self.inner.last_change()).await
    }

    async fn scan_decisions(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<DecisionEvent>> {
        self.call(
            "scan_decisions",
            self.inner.scan_decisions(after, through, limit),
        )
        .await
    }

    async fn scan_changes(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<Change>> {
        self.call(
            "scan_changes",
            self.inner.scan_changes(after, through, limit),
        )
        .await
    }
}
