//! The dialog buffer: messages of dialogs that have no consent decision yet. They are never written to the
//! database; they wait here until the decision (stored, or dropped) or until the retention period ends.
//!
//! One small trait, shaped by what [`crate::service`] needs, with two implementations:
//! - [`MemoryBuffer`], the default: process memory, for one instance;
//! - [`RedisBuffer`]: a Redis server or Redis Cluster shared by every replica, so that a push on one replica
//!   and the consent on another meet, and undecided dialogs survive a restart of the service.
//!
//! Every implementation keeps the same guarantees: a dialog belongs to one customer; a `messageId` is
//! recorded once per dialog; a dialog's messages keep the order in which the buffer accepted them; a
//! dialog holds at most `max_messages_per_dialog` messages and all together at most `max_bytes`; nothing
//! accepted is dropped to make room; a decision is exclusive per dialog, and erasures exclude decisions.

use std::time::Duration;

use async_trait::async_trait;

use crate::error::ApiError;
use crate::model::{CustomerId, DialogId, IncomingMessage, Message};

pub mod memory;
pub mod redis;

pub use memory::MemoryBuffer;
pub use redis::RedisBuffer;

/// A buffer that cannot be reached or did not answer in time. The message is for the log, not for clients.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct BufferError(pub String);

impl BufferError {
    pub fn new(context: &str, error: impl std::fmt::Display) -> Self {
        Self(format!("{context}: {error}"))
    }
}

pub type BufferResult<T> = Result<T, BufferError>;

pub type SharedBuffer = std::sync::Arc<dyn Buffer>;

/// What a push did to the buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum Buffered {
    /// The message was appended.
    Added(Message),
    /// A message with the same `messageId` was already buffered: this is it.
    AlreadyThere(Message),
}

impl Buffered {
    pub fn message(self) -> Message {
        match self {
            Self::Added(message) | Self::AlreadyThere(message) => message,
        }
    }
}

/// Messages for one dialog, in the order the client sent them.
#[derive(Debug)]
pub struct DialogPush {
    pub dialog_id: DialogId,
    pub messages: Vec<IncomingMessage>,
    /// For [`Buffer::open`]: the [`PushOutcome::checked_at`] of the call that found the dialog not
    /// buffered before its decision was looked up. A decision that emptied the dialog after that moment
    /// may have been missed by the look-up, so `open` hands the messages back. Ignored elsewhere.
    pub looked_up_after: i64,
}

/// The answer for one [`DialogPush`]: the results of its first messages, and the rest handed back untouched
/// because the dialog is not in the buffer, or no longer takes pushes (its decision is written), so the
/// caller looks the decision up. Either part may be empty.
#[derive(Debug, Default)]
pub struct PushOutcome {
    /// One result per message, in order.
    pub pushed: Vec<Result<Buffered, ApiError>>,
    pub handed_back: Vec<IncomingMessage>,
    /// When the buffer found the dialog not buffered, on the buffer's own clock (see
    /// [`DialogPush::looked_up_after`]).
    pub checked_at: i64,
}

impl PushOutcome {
    pub fn handed_back(messages: Vec<IncomingMessage>, checked_at: i64) -> Self {
        Self {
            pushed: Vec::new(),
            handed_back: messages,
            checked_at,
        }
    }
}

/// A copy of one buffered dialog.
#[derive(Clone, Debug)]
pub struct BufferedDialog {
    pub customer_id: CustomerId,
    /// Oldest first.
    pub messages: Vec<Message>,
    /// A decision `true` was written and the dialog takes no more pushes; these are its last messages.
    pub sealed: bool,
}

/// The buffer's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferLimits {
    pub max_messages_per_dialog: usize,
    pub max_bytes: usize,
    /// An undecided dialog is dropped this long after its first message.
    pub ttl: Duration,
}

impl Default for BufferLimits {
    fn default() -> Self {
        Self {
            max_messages_per_dialog: usize::MAX,
            max_bytes: usize::MAX,
            ttl: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// How much the buffer holds (all of it: with a shared buffer, what every replica buffered).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BufferStats {
    pub dialogs: usize,
    pub messages: usize,
    /// Estimated memory of the buffered messages.
    pub bytes: usize,
}

/// What dropping dialogs from the buffer removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub dialogs: usize,
    pub messages: usize,
}

impl std::ops::Add for Dropped {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            dialogs: self.dialogs + other.dialogs,
            messages: self.messages + other.messages,
        }
    }
}

/// Dialogs the retention sweeper has to look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DueDialogs {
    /// Undecided, not being decided, and older than the retention period.
    pub expired: Vec<DialogId>,
    /// A decision began and its holder went away without finishing it (a replica that died or lost the
    /// buffer mid-consent). The store knows whether the decision was written.
    pub abandoned: Vec<DialogId>,
}

/// A decision in progress: while it is held, no other decision of the dialog can begin (on any replica),
/// no erasure runs, and the sweeper leaves the dialog alone. Release it with [`Buffer::end_decision`]; dropped without
/// that, it is released in the background (or, for a shared buffer, when its lease runs out).
pub struct DecisionLease {
    pub dialog_id: DialogId,
    /// What the buffer held when the decision began.
    pub buffered: Option<BufferedDialog>,
    /// Implementation-specific: what the buffer needs to finish the decision; releases the lease when
    /// dropped.
    pub(crate) holder: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for DecisionLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLease")
            .field("dialog_id", &self.dialog_id)
            .field("buffered", &self.buffered)
            .finish_non_exhaustive()
    }
}

/// An erasure's exclusive access, released when dropped.
pub struct Gate(
    #[allow(dead_code, reason = "held for what its drop releases")] pub(crate) Box<dyn Send + Sync>,
);

#[async_trait]
pub trait Buffer: Send + Sync + 'static {
    /// A short description for the startup log (never includes credentials).
    fn describe(&self) -> String;

    /// Whether buffered dialogs outlive this process (a shared buffer): at shutdown nothing is dropped.
    fn is_shared(&self) -> bool;

    /// Answers when the buffer does.
    async fn ping(&self) -> BufferResult<()>;

    /// Appends each dialog's messages, in order, to that dialog if it is buffered and takes pushes.
    /// Refuses, per message, one whose customer differs from the dialog's, one whose `messageId` was used
    /// for a different message, and one that does not fit.
    async fn push_if_buffered(&self, pushes: Vec<DialogPush>) -> BufferResult<Vec<PushOutcome>>;

    /// Like [`push_if_buffered`](Self::push_if_buffered), opening each dialog that is not buffered yet.
    /// Only for dialogs the store has no decision for; a dialog whose decision was written meanwhile (by
    /// any replica) is handed back, so that the caller looks its decision up again. A dialog whose every
    /// message was refused is not left behind.
    async fn open(&self, pushes: Vec<DialogPush>) -> BufferResult<Vec<PushOutcome>>;

    /// Begins a decision: waits while another decision of the dialog runs, or an erasure (up to a bound,
    /// then `BUFFER_UNAVAILABLE`), and copies what the dialog holds. Until the lease ends, no erasure runs.
    async fn begin_decision(&self, dialog_id: &DialogId) -> Result<DecisionLease, ApiError>;

    /// Consent `true` is written with the messages up to and including `seq`: forgets those, and seals the
    /// dialog so that it takes no more pushes. Returns the messages pushed meanwhile, which still have to
    /// be stored; the dialog leaves the buffer when none are left.
    async fn seal_and_remove_through(
        &self,
        lease: &DecisionLease,
        seq: i64,
    ) -> BufferResult<Vec<Message>>;

    /// Consent `false` is written: drops the dialog's messages; returns how many there were.
    async fn discard(&self, lease: &DecisionLease) -> BufferResult<usize>;

    /// Ends a decision. A dialog still buffered takes pushes and ages as before. `settled` is false when
    /// the decision may have been written although the caller could not tell (the store did not answer in
    /// time): a shared buffer then has the sweeper ask the store soon, instead of waiting for the client's
    /// retry or the retention period.
    async fn end_decision(&self, lease: DecisionLease, settled: bool);

    /// Exclusive access for an erasure: waits until the decisions in progress (on every replica) are done,
    /// and keeps new ones from beginning until the gate is dropped.
    async fn enter_erasure_gate(&self) -> Result<Gate, ApiError>;

    /// How many dialogs and messages of a customer are buffered.
    async fn count_customer(&self, customer_id: &CustomerId) -> BufferResult<Dropped>;

    /// Drops every buffered dialog of a customer (erasure), whatever state it is in.
    async fn discard_customer(&self, customer_id: &CustomerId) -> BufferResult<Dropped>;

    /// The dialogs the retention sweeper must look at.
    async fn due(&self) -> BufferResult<DueDialogs>;

    /// Drops those of `dialogs` that are still undecided, not being decided, and older than the retention
    /// period.
    async fn expire(&self, dialogs: &[DialogId]) -> BufferResult<Dropped>;

    /// Whether the retention sweep should run in this process now (with a shared buffer, one replica at a
    /// time sweeps).
    async fn claim_sweep(&self, period: Duration) -> bool;

    /// The acceptance order for a message that bypasses the buffer: after every message the buffer has
    /// ordered that this process saw, so a dialog's order holds across the buffer and the store.
    fn next_seq(&self) -> i64;

    /// What the buffer holds.
    async fn stats(&self) -> BufferResult<BufferStats>;

    /// Releases connections at shutdown.
    async fn close(&self) {}
}
