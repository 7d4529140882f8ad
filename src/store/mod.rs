//! Durable storage of consented dialogs and of consent decisions, behind one small trait shaped by what the
//! service needs. Two implementations: MongoDB for production, SQLite as the embedded default.
//!
//! Invariants every implementation keeps:
//! - only dialogs whose current decision is `true` have messages in the store;
//! - each write is atomic (a transaction): a failure leaves nothing half-written;
//! - writes are idempotent: message ids are decided before the write, so a retry inserts nothing twice;
//! - every stored message, every dialog removed whole (a withdrawal, an erasure) and every decision that
//!   changes a dialog's decision gets a change number, store-wide, in the order the writes commit: a write's numbers are taken inside its transaction from
//!   one counter that serializes writers, so no change numbered below the counter can become visible later.

use std::sync::Arc;

use async_trait::async_trait;

use crate::model::{
    Change, ConsentHistory, ConsentRecord, CustomerId, DecisionEvent, Dialog, DialogId, Language,
    Message,
};
pub use crate::model::{Erased, ErasureAudit, TimeWindow};
use crate::paging::{KeyRange, ScanOrder, SortKey};
use crate::stats::{Buckets, ConsentStats, Grouping, MessageStats};

pub mod guarded;
pub mod mongo;
pub mod sqlite;

pub use guarded::GuardedStore;
pub use mongo::MongoStore;
pub use sqlite::SqliteStore;

/// A failed store call. The message is for the log, not for clients.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl StoreError {
    pub fn new(context: &str, error: impl std::fmt::Display) -> Self {
        Self(format!("{context}: {error}"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The bounds of a scan on its sort key, from a time window (already in the sort key's unit) and a cursor
/// range: on each side, only the tighter of the two, since the other then excludes nothing. Given two lower
/// (or upper) bounds on one column, SQL planners take one of them as the start of the index range and check
/// the other row by row; when they took the window's, a page deep in a range read every row before it
/// (measured: the page at 90% of a range cost twice its first page).
pub fn scan_bounds(
    (since, until): (Option<i64>, Option<i64>),
    range: &KeyRange,
) -> ((Option<i64>, Option<i64>), KeyRange) {
    let mut range = range.clone();
    // `at >= since` against `(at, id) > newer_than`: whichever starts later.
    let since = match (since, &range.newer_than) {
        (Some(since), Some(cursor)) if since > cursor.at => {
            range.newer_than = None;
            Some(since)
        }
        (Some(_), Some(_)) => None,
        (since, _) => since,
    };
    // `at < until` against `(at, id) < older_than`: whichever ends earlier.
    let until = match (until, &range.older_than) {
        (Some(until), Some(cursor)) if until <= cursor.at => {
            range.older_than = None;
            Some(until)
        }
        (Some(_), Some(_)) => None,
        (until, _) => until,
    };
    ((since, until), range)
}

/// Which dialogs a listing returns; set fields combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DialogFilter {
    /// Dialogs with at least one message in this language.
    pub language: Option<Language>,
    pub customer_id: Option<CustomerId>,
    /// Dialogs whose latest message falls in this window.
    pub window: TimeWindow,
}

/// Which messages a listing returns; set fields combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct MessageFilter {
    pub language: Option<Language>,
    pub customer_id: Option<CustomerId>,
    pub dialog_id: Option<DialogId>,
    /// Messages accepted in this window.
    pub window: TimeWindow,
}

/// Which consent decisions the consent statistics count; set fields combine with AND.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConsentFilter {
    pub customer_id: Option<CustomerId>,
    /// Decisions made in this window.
    pub window: TimeWindow,
}

/// A consent decision to record.
#[derive(Clone, Debug)]
pub struct Decision {
    pub dialog_id: DialogId,
    pub customer_id: CustomerId,
    pub value: bool,
    /// Milliseconds since the epoch.
    pub at: i64,
}

/// What recording a decision did.
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionWritten {
    /// The decision now in force; repeating a decision keeps its original time.
    pub record: ConsentRecord,
    /// Messages newly inserted by this write (a retry inserts none of those already there).
    pub inserted: u64,
    /// Previously stored messages deleted because consent was withdrawn.
    pub deleted: u64,
}

/// What appending a message to an already decided dialog did.
#[derive(Clone, Debug, PartialEq)]
pub enum Appended {
    /// The message is stored; `Stored(existing)` when that id was already there (a retry).
    Stored { message: Message, newly: bool },
    /// The dialog's decision is no longer `true`; nothing was written.
    NotConsented,
}

/// The sort key of a dialog in listings: its latest message, then its id.
pub fn dialog_key(dialog: &Dialog) -> SortKey {
    SortKey {
        at: dialog.last_message_at,
        id: dialog.id.to_string(),
    }
}

/// The sort key of a message in listings: its acceptance order, then its id.
pub fn message_key(message: &Message) -> SortKey {
    SortKey {
        at: message.seq,
        id: message.id.clone(),
    }
}

/// See [`Store::scrub_status`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScrubStatus {
    /// Removed data may still be on disk: truncating the log is being retried.
    pub pending: bool,
    /// Attempts to truncate the log that did not finish, since the start.
    pub failures: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// A short description for the startup log (never includes credentials).
    fn describe(&self) -> String;

    /// Answers when the database does.
    async fn ping(&self) -> StoreResult<()>;

    /// Releases connections at shutdown. Calls after this may fail.
    async fn close(&self) {}

    /// Whether removed data may still sit on the store's disk, for `/metrics` (SQLite: its write-ahead
    /// log, until it is truncated after a withdrawal or an erasure).
    fn scrub_status(&self) -> ScrubStatus {
        ScrubStatus::default()
    }

    /// The recorded decision for a dialog, if any.
    async fn consent(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentRecord>>;

    /// The recorded decisions of many dialogs at once (one round trip), in no particular order; dialogs
    /// without a decision are left out.
    async fn consents(&self, dialog_ids: &[DialogId]) -> StoreResult<Vec<ConsentRecord>>;

    /// The recorded decision and every change of it, for audits.
    async fn consent_history(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentHistory>>;

    /// Records `decision` atomically. `true`: `messages` (all of this dialog) are inserted, those already
    /// present are skipped. `false`: the dialog's stored messages are deleted and `messages` is ignored.
    async fn record_decision(
        &self,
        decision: &Decision,
        messages: Vec<Message>,
    ) -> StoreResult<DecisionWritten>;

    /// Stores one message of a dialog whose decision is `true`, checking that decision in the same
    /// transaction so that a concurrent withdrawal cannot be overtaken.
    async fn append_consented(&self, message: &Message) -> StoreResult<Appended>;

    /// Records that an erasure of the customer has begun (durably, so that any replica can finish it after a
    /// crash) and returns its audit details: `audit`, or those of the erasure already running for the customer,
    /// which this call then joins.
    async fn begin_erasure(
        &self,
        customer_id: &CustomerId,
        audit: &ErasureAudit,
    ) -> StoreResult<ErasureAudit>;

    /// Deletes, in one transaction, some of the customer's stored dialogs (each whole: its messages, its
    /// consent record and history) up to about `max_messages` messages (a larger dialog goes alone), or,
    /// once no dialog is left, up to as many consent records without a dialog; and adds the counts to the
    /// running erasure. All zero: nothing is left. `None`: no erasure of the customer is running (another
    /// caller finished it), and nothing was deleted.
    async fn erase_batch(
        &self,
        customer_id: &CustomerId,
        max_messages: usize,
    ) -> StoreResult<Option<Erased>>;

    /// Records in the running erasure of the customer how many of its messages the buffer holds, before the
    /// erasure empties the buffer; the most ever recorded is kept, so that an erasure resumed after the
    /// buffer was emptied (wholly or in part) still counts them. False: no erasure of the customer is running.
    async fn note_buffered_messages(
        &self,
        customer_id: &CustomerId,
        count: u64,
    ) -> StoreResult<bool>;

    /// Ends the running erasure of the customer: writes its audit record (the counts of every batch, and of
    /// the buffered messages as noted, erased `at` ms since the epoch) and forgets the customer id. `None`:
    /// none was running.
    async fn finish_erasure(
        &self,
        customer_id: &CustomerId,
        at: i64,
    ) -> StoreResult<Option<Erased>>;

    /// Erasures begun and not finished, with the time (ms since the epoch) their last batch was written.
    async fn unfinished_erasures(&self) -> StoreResult<Vec<(CustomerId, i64)>>;

    /// The secret erasures are audited with when `AUDIT_SECRET` is unset, the same for every replica: the
    /// one stored, or `proposed`, stored now if there was none.
    async fn audit_secret(&self, proposed: [u8; 32]) -> StoreResult<[u8; 32]>;

    /// One stored dialog.
    async fn dialog(&self, dialog_id: &DialogId) -> StoreResult<Option<Dialog>>;

    /// Stored dialogs within `range`, in `order`, at most `limit`.
    async fn scan_dialogs(
        &self,
        filter: &DialogFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Dialog>>;

    async fn count_dialogs(&self, filter: &DialogFilter) -> StoreResult<u64>;

    /// Stored messages within `range`, in `order`, at most `limit`.
    async fn scan_messages(
        &self,
        filter: &MessageFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Message>>;

    async fn count_messages(&self, filter: &MessageFilter) -> StoreResult<u64>;

    /// Stored messages matching `filter`, and their distinct dialogs, counted per group of `grouping`
    /// (one query), ordered by group; at most `limit` groups.
    async fn message_stats(
        &self,
        filter: &MessageFilter,
        grouping: &Grouping,
        limit: usize,
    ) -> StoreResult<Vec<MessageStats>>;

    /// Consent decisions matching `filter`, counted per time bucket (or in all without `buckets`), in time
    /// order; at most `limit` buckets. Counts the changes of decision each dialog's history holds.
    async fn consent_stats(
        &self,
        filter: &ConsentFilter,
        buckets: Option<&Buckets>,
        limit: usize,
    ) -> StoreResult<Vec<ConsentStats>>;

    /// The number of the latest change committed, 0 before any. Every change numbered up to it is visible to
    /// the reads that start after this call returns, and no change numbered up to it can appear later.
    async fn last_change(&self) -> StoreResult<i64>;

    /// Changes numbered after `after` and up to `through`, in number order, at most `limit`.
    async fn scan_changes(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<Change>>;

    /// Decision events (numbered with the changes) after `after` and up to `through`, in number order, at
    /// most `limit`.
    async fn scan_decisions(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<DecisionEvent>>;

    /// The messages of many dialogs at once (one round trip), each dialog's oldest first; at most `limit`
    /// of them (callers ask for one more than they accept, to tell that there were more).
    async fn messages_of_dialogs(
        &self,
        dialog_ids: &[DialogId],
        limit: usize,
    ) -> StoreResult<Vec<Message>>;
}

pub type SharedStore = Arc<dyn Store>;

/// Two runs of changes, each in number order, as one in number order; at most `limit`.
pub fn merge_changes(stored: Vec<Change>, removed: Vec<Change>, limit: usize) -> Vec<Change> {
    let mut changes = Vec::with_capacity((stored.len() + removed.len()).min(limit));
    let (mut stored, mut removed) = (
        stored.into_iter().peekable(),
        removed.into_iter().peekable(),
    );
    while changes.len() < limit {
        let next = match (stored.peek(), removed.peek()) {
            (Some(a), Some(b)) if a.number() < b.number() => stored.next(),
            (Some(_), Some(_)) | (None, Some(_)) => removed.next(),
            (Some(_), None) => stored.next(),
            (None, None) => None,
        };
        match next {
            Some(change) => changes.push(change),
            None => break,
        }
    }
    changes
}

/// At most this many dialogs (or consent records) go in one erasure batch, whatever their size.
pub const MAX_DIALOGS_PER_ERASE_BATCH: usize = 1_000;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::paging::SortKey;

    fn inside(window: (Option<i64>, Option<i64>), range: &KeyRange, key: &SortKey) -> bool {
        window.0.is_none_or(|since| key.at >= since)
            && window.1.is_none_or(|until| key.at < until)
            && range.contains(key)
    }

    fn key(at: i64, id: u8) -> SortKey {
        SortKey {
            at,
            id: format!("{id}"),
        }
    }

    proptest! {
        /// Dropping the looser bound of each side keeps exactly the same keys, and leaves one bound per side.
        #[test]
        fn scan_bounds_keep_exactly_the_same_keys(
            since in proptest::option::of(0i64..12),
            until in proptest::option::of(0i64..12),
            newer in proptest::option::of((0i64..12, 0u8..3)),
            older in proptest::option::of((0i64..12, 0u8..3)),
        ) {
            let range = KeyRange {
                newer_than: newer.map(|(at, id)| key(at, id)),
                older_than: older.map(|(at, id)| key(at, id)),
            };
            let (window, tightened) = scan_bounds((since, until), &range);
            prop_assert!(window.0.is_none() || tightened.newer_than.is_none());
            prop_assert!(window.1.is_none() || tightened.older_than.is_none());
            for at in -1..14 {
                for id in 0..3 {
                    let k = key(at, id);
                    prop_assert_eq!(
                        inside((since, until), &range, &k),
                        inside(window, &tightened, &k),
                        "{:?}", k
                    );
                }
            }
        }
    }
}
