//! The consent rules, between the buffer and the store. Transport-free: the GraphQL layer only parses
//! inputs and calls these methods.
//!
//! - A message of an undecided dialog waits in the buffer (`BUFFERED`), costing no database call when the
//!   dialog is already buffered.
//! - Consent `true` writes the buffered messages and the decision in one store transaction, then drops them
//!   from the buffer; if the write fails they stay buffered and the caller retries.
//! - Consent `false` records the decision, deletes anything stored earlier, and drops the buffer.
//! - Messages of decided dialogs go straight to the store (`STORED`) or nowhere (`DISCARDED`).
//!
//! The slow paths (a dialog's first message, a decision) of one dialog are serialised by a per-dialog lock,
//! so that a decision can never slip between a push's look-up of the decision and its use.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::{Mutex, OwnedMutexGuard, RwLock};

use crate::buffer::{BufferLimits, BufferPush, DialogBuffer, Dropped};
use crate::clock::now_millis;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::{
    ConsentHistory, ConsentRecord, CustomerId, Dialog, DialogId, Erased, IncomingMessage, Message,
    MessageFate,
};
use crate::paging::{Page, PageRequest, fetch_page};
use crate::store::{
    Appended, Decision, DialogFilter, MessageFilter, SharedStore, dialog_key, message_key,
};

/// A pushed message as recorded, and what happened to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pushed {
    pub message: Message,
    pub fate: MessageFate,
}

/// What a consent decision did.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsentOutcome {
    pub record: ConsentRecord,
    /// Buffered messages written to the store by this call.
    pub stored: u64,
    /// Buffered messages dropped by this call.
    pub discarded: u64,
    /// Previously stored messages deleted by this call (consent withdrawn).
    pub deleted: u64,
}

pub struct DialogService {
    store: SharedStore,
    buffer: DialogBuffer,
    locks: DialogLocks,
    /// Shared by the slow paths (first message, decision), exclusive for an erasure, so that no write of a
    /// customer's data can be in flight while their data is erased. The hot path does not take it.
    erasure_gate: RwLock<()>,
    /// How many decisions this process has written, bumped after each write and before its dialog's lock
    /// is released: a "no decision" read before a bump may be stale (see [`Undecided`]).
    decisions_written: AtomicU64,
    metrics: Arc<Metrics>,
}

/// Dialogs that one look-up for a whole batch found without a decision, and the decision count when it
/// started. Trusted only while that count is unchanged: then no decision of this process can have slipped
/// in between, just as if each dialog had been looked up under its lock. (Decisions written by other
/// processes are no better covered by a look-up under the lock: the buffer is per process.)
struct Undecided {
    dialogs: HashSet<DialogId>,
    as_of: u64,
}

impl DialogService {
    pub fn new(store: SharedStore, limits: BufferLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            buffer: DialogBuffer::new(limits),
            locks: DialogLocks::default(),
            erasure_gate: RwLock::new(()),
            decisions_written: AtomicU64::new(0),
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Drops undecided dialogs older than `ttl` from the buffer; returns what was dropped.
    pub fn expire(&self, ttl: Duration) -> Dropped {
        let dropped = self.buffer.expire(ttl);
        if dropped.dialogs > 0 {
            self.metrics.expired_dialogs.inc_by(dropped.dialogs as u64);
            self.metrics
                .expired_messages
                .inc_by(dropped.messages as u64);
            tracing::info!(
                dialogs = dropped.dialogs,
                messages = dropped.messages,
                "discarded undecided dialogs older than BUFFER_TTL"
            );
        }
        dropped
    }

    /// Runs [`expire`](Self::expire) every `ttl / 10` (at least every minute) until the task is aborted.
    pub fn spawn_sweeper(self: &Arc<Self>, ttl: Duration) -> tokio::task::JoinHandle<()> {
        let period = (ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(60));
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match service.upgrade() {
                    Some(service) => {
                        service.expire(ttl);
                    }
                    None => return,
                }
            }
        })
    }

    /// Erases everything of a customer: buffered messages, stored dialogs and messages, consent records.
    /// Leaves an audit record of the erasure (counts and the customer's digest, no content).
    pub async fn erase_customer(&self, customer_id: CustomerId) -> Result<Erased, ApiError> {
        let _exclusive = self.erasure_gate.write().await;
        // The buffer is emptied only once the store has erased: if the store fails, the caller retries an
        // erasure that has not started.
        let buffered = self.buffer.count_customer(&customer_id);
        let mut erased = self
            .store
            .erase_customer(&customer_id, now_millis(), buffered.messages as u64)
            .await?;
        erased.buffered_messages = self.buffer.discard_customer(&customer_id).messages as u64;
        tracing::info!(
            dialogs = erased.dialogs,
            messages = erased.messages,
            consents = erased.consents,
            buffered_messages = erased.buffered_messages,
            "erased a customer's data"
        );
        Ok(erased)
    }

    /// The recorded decision of a dialog and its changes, for audits.
    pub async fn consent_history(
        &self,
        dialog_id: &DialogId,
    ) -> Result<Option<ConsentHistory>, ApiError> {
        Ok(self.store.consent_history(dialog_id).await?)
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    pub fn buffer(&self) -> &DialogBuffer {
        &self.buffer
    }

    pub async fn push(&self, incoming: IncomingMessage) -> Result<Pushed, ApiError> {
        self.push_knowing(incoming, None).await
    }

    /// Pushes messages in order, each exactly as [`push`](Self::push) would, with one result each. The
    /// dialogs not buffered yet have their decisions looked up in one store call, not one call each.
    pub async fn push_many(
        &self,
        incomings: Vec<IncomingMessage>,
    ) -> Vec<Result<Pushed, ApiError>> {
        let undecided = self.undecided_among(&incomings).await;
        let mut results = Vec::with_capacity(incomings.len());
        for incoming in incomings {
            results.push(self.push_knowing(incoming, undecided.as_ref()).await);
        }
        results
    }

    async fn undecided_among(&self, incomings: &[IncomingMessage]) -> Option<Undecided> {
        let mut dialogs: Vec<DialogId> = incomings
            .iter()
            .filter(|incoming| !self.buffer.accepts(&incoming.dialog_id))
            .map(|incoming| incoming.dialog_id.clone())
            .collect();
        dialogs.sort_unstable();
        dialogs.dedup();
        if dialogs.len() < 2 {
            return None;
        }
        let as_of = self.decisions_written.load(Ordering::Acquire);
        // If this fails, each message looks its dialog up alone, and reports its own error.
        let decided: HashSet<DialogId> = self
            .store
            .consents(&dialogs)
            .await
            .ok()?
            .into_iter()
            .map(|record| record.dialog_id)
            .collect();
        Some(Undecided {
            dialogs: dialogs
                .into_iter()
                .filter(|dialog| !decided.contains(dialog))
                .collect(),
            as_of,
        })
    }

    async fn push_knowing(
        &self,
        incoming: IncomingMessage,
        undecided: Option<&Undecided>,
    ) -> Result<Pushed, ApiError> {
        // Hot path: the dialog is buffered already.
        let incoming = match self.buffer.push_if_buffered(incoming)? {
            BufferPush::Done(buffered) => return Ok(Pushed::buffered(buffered.message())),
            BufferPush::NotBuffered(incoming) => incoming,
        };
        let _shared = self.erasure_gate.read().await;
        let _lock = self.locks.lock(&incoming.dialog_id).await;
        // Another push may have opened the buffer while this one waited.
        let incoming = match self.buffer.push_if_buffered(incoming)? {
            BufferPush::Done(buffered) => return Ok(Pushed::buffered(buffered.message())),
            BufferPush::NotBuffered(incoming) => incoming,
        };
        let known_undecided = undecided.is_some_and(|undecided| {
            undecided.dialogs.contains(&incoming.dialog_id)
                && undecided.as_of == self.decisions_written.load(Ordering::Acquire)
        });
        let consent = match known_undecided {
            true => None,
            false => self.store.consent(&incoming.dialog_id).await?,
        };
        let Some(consent) = consent else {
            return Ok(Pushed::buffered(self.buffer.push(incoming)?.message()));
        };
        if consent.customer_id != incoming.customer_id {
            return Err(ApiError::CustomerMismatch {
                dialog_id: incoming.dialog_id.to_string(),
            });
        }
        let message = Message::accept(incoming.clone(), self.buffer.next_seq());
        if !consent.value {
            return Ok(Pushed {
                message,
                fate: MessageFate::Discarded,
            });
        }
        match self.store.append_consented(&message).await? {
            Appended::Stored {
                message: recorded,
                newly,
            } => {
                if !newly && !incoming.same_content_as(&recorded) {
                    return Err(ApiError::MessageIdConflict {
                        dialog_id: recorded.dialog_id.to_string(),
                        message_id: recorded
                            .client_id
                            .map(|id| id.to_string())
                            .unwrap_or_default(),
                    });
                }
                Ok(Pushed {
                    message: recorded,
                    fate: MessageFate::Stored,
                })
            }
            // Only another process could have changed the decision meanwhile; either way, it is not `true`.
            Appended::NotConsented => Ok(Pushed {
                message,
                fate: MessageFate::Discarded,
            }),
        }
    }

    /// Records a decision. Runs to completion even if the caller goes away (a dropped HTTP request must not
    /// leave a committed decision with its buffer half cleaned up).
    pub async fn give_consent(
        self: &Arc<Self>,
        dialog_id: DialogId,
        value: bool,
    ) -> Result<ConsentOutcome, ApiError> {
        let service = self.clone();
        tokio::spawn(async move { service.decide(dialog_id, value).await })
            .await
            .unwrap_or_else(|join_error| std::panic::resume_unwind(join_error.into_panic()))
    }

    async fn decide(&self, dialog_id: DialogId, value: bool) -> Result<ConsentOutcome, ApiError> {
        let outcome = self.decide_locked(dialog_id, value).await?;
        self.metrics
            .consents
            .with_label_values(&[if value { "true" } else { "false" }])
            .inc();
        Ok(outcome)
    }

    async fn decide_locked(
        &self,
        dialog_id: DialogId,
        value: bool,
    ) -> Result<ConsentOutcome, ApiError> {
        let _shared = self.erasure_gate.read().await;
        let _lock = self.locks.lock(&dialog_id).await;
        // Dropped before the lock, on every way out: after any write of the decision.
        let _written = CountOnDrop(&self.decisions_written);
        // While the decision is being written the sweeper leaves the dialog alone.
        let _deciding = self.buffer.begin_decision(&dialog_id);
        let buffered = self.buffer.snapshot(&dialog_id);
        let customer_id = match &buffered {
            Some(buffered) => buffered.customer_id.clone(),
            None => match self.store.consent(&dialog_id).await? {
                Some(record) => record.customer_id,
                None => return Err(ApiError::DialogNotFound(dialog_id.to_string())),
            },
        };
        let decision = Decision {
            dialog_id: dialog_id.clone(),
            customer_id,
            value,
            at: now_millis(),
        };

        if !value {
            let written = self.store.record_decision(&decision, Vec::new()).await?;
            let discarded = self.buffer.discard(&dialog_id) as u64;
            return Ok(ConsentOutcome {
                record: written.record,
                stored: 0,
                discarded,
                deleted: written.deleted,
            });
        }

        // On failure the messages stay buffered: a retry writes them, and the store skips those that an
        // earlier, partly acknowledged attempt did write.
        let mut pending = buffered.map(|b| b.messages).unwrap_or_default();
        let mut stored = 0;
        loop {
            let last_seq = pending.last().map(|message| message.seq);
            let written = self.store.record_decision(&decision, pending).await?;
            stored += written.inserted;
            // Messages pushed while the write ran are still buffered; sealing the dialog sends later pushes
            // to the store, so at most one more pass writes these and the dialog leaves the buffer.
            let more = match last_seq {
                Some(seq) => self.buffer.seal_and_remove_through(&dialog_id, seq),
                None => Vec::new(),
            };
            if more.is_empty() {
                return Ok(ConsentOutcome {
                    record: written.record,
                    stored,
                    discarded: 0,
                    deleted: 0,
                });
            }
            pending = more;
        }
    }

    pub async fn consent(&self, dialog_id: &DialogId) -> Result<Option<ConsentRecord>, ApiError> {
        Ok(self.store.consent(dialog_id).await?)
    }

    pub async fn dialog(&self, dialog_id: &DialogId) -> Result<Option<Dialog>, ApiError> {
        Ok(self.store.dialog(dialog_id).await?)
    }

    pub async fn dialogs(
        &self,
        filter: &DialogFilter,
        request: &PageRequest,
    ) -> Result<Page<Dialog>, ApiError> {
        let page = fetch_page(request, dialog_key, |range, order, limit| async move {
            self.store.scan_dialogs(filter, &range, order, limit).await
        })
        .await?;
        Ok(page)
    }

    pub async fn messages(
        &self,
        filter: &MessageFilter,
        request: &PageRequest,
    ) -> Result<Page<Message>, ApiError> {
        let page = fetch_page(request, message_key, |range, order, limit| async move {
            self.store.scan_messages(filter, &range, order, limit).await
        })
        .await?;
        Ok(page)
    }

    pub async fn count_dialogs(&self, filter: &DialogFilter) -> Result<u64, ApiError> {
        Ok(self.store.count_dialogs(filter).await?)
    }

    pub async fn count_messages(&self, filter: &MessageFilter) -> Result<u64, ApiError> {
        Ok(self.store.count_messages(filter).await?)
    }

    pub async fn messages_of_dialogs(
        &self,
        dialog_ids: &[DialogId],
    ) -> Result<Vec<Message>, ApiError> {
        Ok(self.store.messages_of_dialogs(dialog_ids).await?)
    }
}

impl Pushed {
    fn buffered(message: Message) -> Self {
        Self {
            message,
            fate: MessageFate::Buffered,
        }
    }
}

/// Bumps a counter when dropped.
struct CountOnDrop<'a>(&'a AtomicU64);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// One async mutex per dialog, created on demand and dropped when nobody holds or waits for it.
#[derive(Default)]
struct DialogLocks {
    locks: DashMap<DialogId, Arc<Mutex<()>>>,
}

struct DialogLock<'a> {
    locks: &'a DialogLocks,
    dialog_id: DialogId,
    guard: Option<OwnedMutexGuard<()>>,
}

impl DialogLocks {
    async fn lock(&self, dialog_id: &DialogId) -> DialogLock<'_> {
        let mutex = self.locks.entry(dialog_id.clone()).or_default().clone();
        DialogLock {
            locks: self,
            dialog_id: dialog_id.clone(),
            guard: Some(mutex.lock_owned().await),
        }
    }
}

impl Drop for DialogLock<'_> {
    fn drop(&mut self) {
        // Two references (the map's and this guard's) mean nobody else holds or waits for the lock; the
        // check runs under the map's shard lock, so nobody can pick it up meanwhile.
        self.locks
            .locks
            .remove_if(&self.dialog_id, |_, mutex| Arc::strong_count(mutex) == 2);
        self.guard.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dialog_locks_are_exclusive_and_cleaned_up() {
        let locks = Arc::new(DialogLocks::default());
        let dialog = DialogId::parse("dialogId", "d").unwrap();
        let first = locks.lock(&dialog).await;
        let waiter = {
            let locks = locks.clone();
            let dialog = dialog.clone();
            tokio::spawn(async move {
                let _second = locks.lock(&dialog).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap();
        assert!(locks.locks.is_empty());
    }
}
