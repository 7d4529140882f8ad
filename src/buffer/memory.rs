//! The in-process buffer (the default): messages of undecided dialogs held in process memory and never
//! written anywhere; they are lost when the process stops. A concurrent map sharded by dialog, so pushes to
//! different dialogs never wait for each other; pushes to one dialog are ordered by that dialog's shard
//! lock, and get their acceptance order there.
//!
//! The buffer is bounded: a dialog holds at most `max_messages_per_dialog` messages, and all messages together
//! at most `max_bytes` (an estimate of their memory). A push beyond either is refused with `BUFFER_FULL`;
//! nothing already accepted is ever dropped to make room. Undecided dialogs older than the retention period
//! are dropped by the sweeper.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::RwLock;

use super::{
    Buffer, BufferLimits, BufferResult, BufferStats, Buffered, BufferedDialog, DecisionLease,
    DialogPush, Dropped, DueDialogs, Gate, PushOutcome,
};
use crate::clock::Clock;
use crate::error::ApiError;
use crate::model::{
    ClientMessageId, CustomerId, DialogId, IncomingMessage, Language, Message, MessageText,
};

/// One buffered message, compact: the dialog and customer ids are kept once per dialog, the language as an
/// index into the dialog's languages, the server id as a number, and the creation time is derived from
/// `seq`. A million ~100-byte messages then cost about twice their text.
#[derive(Debug)]
struct Compact {
    seq: i64,
    /// The server id (a UUID), as bytes rather than a `u128` to keep the struct 8-byte aligned.
    id: [u8; 16],
    /// The text, followed by the client's `messageId` if there is one: one allocation instead of two.
    payload: Box<str>,
    text_len: u32,
    language: u8,
}

impl Compact {
    fn text(&self) -> &str {
        &self.payload[..self.text_len as usize]
    }

    fn client_id(&self) -> Option<&str> {
        let rest = &self.payload[self.text_len as usize..];
        (!rest.is_empty()).then_some(rest)
    }
}

/// The allocator's cost of a heap block of `len` bytes: jemalloc's size classes (multiples of 16 up to
/// 128 bytes, then four classes per doubling).
fn heap_block(len: usize) -> usize {
    if len <= 128 {
        return len.max(1).div_ceil(16) * 16;
    }
    let step = len.next_power_of_two() / 8;
    len.div_ceil(step) * step
}

/// Estimated memory of one buffered message: its slot in the dialog's vector (which grows by a quarter,
/// so about an eighth of a slot more on average) and its heap block.
fn footprint(message: &Compact) -> usize {
    std::mem::size_of::<Compact>() * 9 / 8 + heap_block(message.payload.len())
}

#[derive(Debug)]
struct PendingDialog {
    customer_id: CustomerId,
    /// The distinct languages of the dialog; messages refer to them by index.
    languages: Vec<Language>,
    /// Oldest first, i.e. in increasing `seq`.
    messages: Vec<Compact>,
    /// Set once the dialog's consent `true` is committed: the dialog only waits for its last buffered
    /// messages to be written, and new pushes must go to the store instead.
    sealed: bool,
    /// A consent decision for it is being written: the retention sweeper leaves it alone.
    deciding: bool,
    /// When the dialog's first message arrived: the retention period counts from here.
    started: Instant,
    /// Estimated memory of the dialog: its messages and its own bookkeeping.
    bytes: usize,
}

impl PendingDialog {
    fn new(customer_id: CustomerId) -> Self {
        Self {
            customer_id,
            languages: Vec::new(),
            messages: Vec::new(),
            sealed: false,
            deciding: false,
            started: Instant::now(),
            bytes: 0,
        }
    }

    /// The full message of a compact one.
    fn expand(&self, dialog_id: &DialogId, compact: &Compact) -> Message {
        Message {
            id: Message::id_text(uuid::Uuid::from_bytes(compact.id)),
            client_id: compact
                .client_id()
                .map(|id| ClientMessageId::from_trusted(id.to_owned())),
            dialog_id: dialog_id.clone(),
            customer_id: self.customer_id.clone(),
            text: MessageText::from_trusted(compact.text().to_owned()),
            language: self.languages[usize::from(compact.language)].clone(),
            created_at: compact.seq.div_euclid(1000),
            seq: compact.seq,
        }
    }

    fn expand_all(&self, dialog_id: &DialogId) -> Vec<Message> {
        self.messages
            .iter()
            .map(|compact| self.expand(dialog_id, compact))
            .collect()
    }
}

/// Estimated memory of a dialog's own bookkeeping: the map entry, its key, the customer id, the languages.
fn dialog_overhead(dialog_id: &DialogId, customer_id: &CustomerId) -> usize {
    const MAP_OVERHEAD: usize = 64;
    std::mem::size_of::<(DialogId, PendingDialog)>()
        + MAP_OVERHEAD
        + heap_block(dialog_id.as_str().len())
        + heap_block(customer_id.as_str().len())
        + heap_block(4 * std::mem::size_of::<Language>())
}

/// The buffered dialogs: the synchronous core of [`MemoryBuffer`].
#[derive(Debug, Default)]
struct Dialogs {
    dialogs: DashMap<DialogId, PendingDialog>,
    clock: Clock,
    limits: BufferLimits,
    messages: AtomicUsize,
    bytes: AtomicUsize,
}

impl Dialogs {
    fn new(limits: BufferLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Appends to a dialog that is buffered and still undecided. Refuses a message whose customer differs
    /// from the dialog's, or whose `messageId` was used for a different message, or that does not fit.
    /// A dialog's messages, in order, if it is buffered and takes pushes (one look-up of the dialog for
    /// all of them); otherwise all are handed back.
    fn push_group_if_buffered(&self, push: DialogPush) -> PushOutcome {
        match self.dialogs.get_mut(&push.dialog_id) {
            Some(mut entry) if !entry.sealed => {
                let (dialog_id, pending) = entry.pair_mut();
                PushOutcome {
                    pushed: push
                        .messages
                        .into_iter()
                        .map(|incoming| self.append(dialog_id, pending, incoming))
                        .collect(),
                    ..PushOutcome::default()
                }
            }
            _ => PushOutcome::handed_back(push.messages, 0),
        }
    }

    /// A dialog's messages, in order, opening the dialog if it is not buffered; handed back if a decision
    /// sealed it. A new dialog whose every message was refused leaves nothing behind.
    fn open_group(&self, push: DialogPush) -> PushOutcome {
        let Some(customer_id) = push.messages.first().map(|first| first.customer_id.clone()) else {
            return PushOutcome::default();
        };
        let mut entry = self
            .dialogs
            .entry(push.dialog_id)
            .or_insert_with(|| PendingDialog::new(customer_id));
        if entry.sealed {
            return PushOutcome::handed_back(push.messages, 0);
        }
        let (dialog_id, pending) = entry.pair_mut();
        let pushed = push
            .messages
            .into_iter()
            .map(|incoming| {
                if pending.messages.is_empty() {
                    // A new dialog belongs to the customer of its first accepted message.
                    pending.customer_id = incoming.customer_id.clone();
                }
                self.append(dialog_id, pending, incoming)
            })
            .collect();
        if entry.messages.is_empty() {
            let dialog_id = entry.key().clone();
            drop(entry);
            self.dialogs
                .remove_if(&dialog_id, |_, pending| pending.messages.is_empty());
        }
        PushOutcome {
            pushed,
            ..PushOutcome::default()
        }
    }

    /// One message, opening its dialog if need be (for tests).
    #[cfg(test)]
    fn push(&self, incoming: IncomingMessage) -> Result<Buffered, ApiError> {
        let dialog_id = incoming.dialog_id.clone();
        let mut outcome = self.open_group(DialogPush {
            dialog_id,
            messages: vec![incoming],
            looked_up_after: 0,
        });
        outcome.pushed.pop().expect("one result")
    }

    /// One message if its dialog is buffered and takes pushes; `None` if it was handed back (for tests).
    #[cfg(test)]
    fn push_if_buffered(&self, incoming: IncomingMessage) -> Option<Result<Buffered, ApiError>> {
        let dialog_id = incoming.dialog_id.clone();
        self.push_group_if_buffered(DialogPush {
            dialog_id,
            messages: vec![incoming],
            looked_up_after: 0,
        })
        .pushed
        .pop()
    }

    fn append(
        &self,
        dialog_id: &DialogId,
        pending: &mut PendingDialog,
        incoming: IncomingMessage,
    ) -> Result<Buffered, ApiError> {
        if incoming.customer_id != pending.customer_id {
            return Err(ApiError::CustomerMismatch {
                dialog_id: incoming.dialog_id.to_string(),
            });
        }
        let id = Message::server_id(dialog_id, incoming.client_id.as_ref()).into_bytes();
        if let Some(client_id) = &incoming.client_id
            && let Some(existing) = pending.messages.iter().rev().find(|m| m.id == id)
        {
            let existing = pending.expand(dialog_id, existing);
            if !incoming.same_content_as(&existing) {
                return Err(ApiError::MessageIdConflict {
                    dialog_id: incoming.dialog_id.to_string(),
                    message_id: client_id.to_string(),
                });
            }
            return Ok(Buffered::AlreadyThere(existing));
        }
        if pending.messages.len() >= self.limits.max_messages_per_dialog {
            return Err(ApiError::BufferFull(format!(
                "dialog `{}` already holds {} undecided messages, the most a dialog may buffer: give its \
                 consent decision first",
                incoming.dialog_id, self.limits.max_messages_per_dialog
            )));
        }
        let language = match pending
            .languages
            .iter()
            .position(|l| *l == incoming.language)
        {
            Some(index) => index,
            None if pending.languages.len() < usize::from(u8::MAX) => {
                pending.languages.push(incoming.language.clone());
                pending.languages.len() - 1
            }
            None => {
                return Err(ApiError::invalid(
                    "language",
                    "is one language too many: a dialog may use at most 255",
                ));
            }
        };
        let text = incoming.text.as_str();
        let client_id = incoming
            .client_id
            .as_ref()
            .map_or("", ClientMessageId::as_str);
        let mut payload = String::with_capacity(text.len() + client_id.len());
        payload.push_str(text);
        payload.push_str(client_id);
        let text_len = text.len();
        let compact = Compact {
            seq: self.clock.next(),
            id,
            payload: payload.into_boxed_str(),
            text_len: u32::try_from(text_len).expect("texts are capped far below 4 GiB"),
            language: language as u8,
        };
        let mut cost = footprint(&compact);
        if pending.messages.is_empty() && pending.bytes == 0 {
            // A new dialog: its bookkeeping is charged with its first message.
            cost += dialog_overhead(dialog_id, &pending.customer_id);
        }
        let before = self.bytes.fetch_add(cost, Ordering::Relaxed);
        if before.saturating_add(cost) > self.limits.max_bytes {
            self.bytes.fetch_sub(cost, Ordering::Relaxed);
            return Err(ApiError::BufferFull(
                "the buffer of undecided messages is full: retry later, once consent decisions have \
                 drained it"
                    .to_owned(),
            ));
        }
        self.messages.fetch_add(1, Ordering::Relaxed);
        pending.bytes += cost;
        if pending.messages.len() == pending.messages.capacity() {
            // Grow by a quarter, not double: a dialog's vector wastes at most a fifth of itself, and
            // appends stay amortised constant time.
            let more = (pending.messages.capacity() / 4).max(4);
            pending.messages.reserve_exact(more);
        }
        // The answer is made of the incoming message itself rather than expanded from the compact copy:
        // the same values, without copying each of them again.
        let message = Message {
            id: Message::id_text(uuid::Uuid::from_bytes(compact.id)),
            client_id: incoming.client_id,
            dialog_id: incoming.dialog_id,
            customer_id: incoming.customer_id,
            text: incoming.text,
            language: incoming.language,
            created_at: compact.seq.div_euclid(1000),
            seq: compact.seq,
        };
        pending.messages.push(compact);
        Ok(Buffered::Added(message))
    }

    /// Accounts for messages leaving the buffer.
    fn release(&self, messages: usize, bytes: usize) {
        self.messages.fetch_sub(messages, Ordering::Relaxed);
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// A copy of a dialog's buffered messages.
    fn snapshot(&self, dialog_id: &DialogId) -> Option<BufferedDialog> {
        self.dialogs.get(dialog_id).map(|entry| BufferedDialog {
            customer_id: entry.customer_id.clone(),
            messages: entry.expand_all(dialog_id),
            sealed: entry.sealed,
        })
    }

    /// Called once consent `true` is committed with the messages up to and including `seq`: forgets those,
    /// and seals the dialog so that it accepts no more pushes. Returns the messages pushed meanwhile, which
    /// still have to be stored; the dialog leaves the buffer when none are left.
    fn seal_and_remove_through(&self, dialog_id: &DialogId, seq: i64) -> Vec<Message> {
        let Entry::Occupied(mut entry) = self.dialogs.entry(dialog_id.clone()) else {
            return Vec::new();
        };
        let state = entry.get_mut();
        state.sealed = true;
        let done = state.messages.partition_point(|m| m.seq <= seq);
        let freed: usize = state.messages.drain(..done).map(|m| footprint(&m)).sum();
        if state.messages.is_empty() {
            // Gone: release its bookkeeping too.
            let (_, state) = entry.remove_entry();
            self.release(done, state.bytes);
            Vec::new()
        } else {
            state.bytes -= freed;
            self.release(done, freed);
            state.expand_all(dialog_id)
        }
    }

    /// Drops a dialog's buffered messages; returns how many there were.
    fn discard(&self, dialog_id: &DialogId) -> usize {
        match self.dialogs.remove(dialog_id) {
            Some((_, pending)) => {
                self.release(pending.messages.len(), pending.bytes);
                pending.messages.len()
            }
            None => 0,
        }
    }

    /// Drops the dialogs for which `drop` is true.
    fn drop_where(&self, drop: impl Fn(&PendingDialog) -> bool) -> Dropped {
        let mut dropped = Dropped::default();
        self.dialogs.retain(|_, pending| {
            if !drop(pending) {
                return true;
            }
            dropped.dialogs += 1;
            dropped.messages += pending.messages.len();
            self.release(pending.messages.len(), pending.bytes);
            false
        });
        dropped
    }

    /// Drops every buffered dialog of a customer (erasure).
    fn discard_customer(&self, customer_id: &CustomerId) -> Dropped {
        self.drop_where(|pending| &pending.customer_id == customer_id)
    }

    /// How many dialogs and messages of a customer are buffered.
    fn count_customer(&self, customer_id: &CustomerId) -> Dropped {
        self.dialogs
            .iter()
            .filter(|entry| &entry.customer_id == customer_id)
            .fold(Dropped::default(), |count, entry| Dropped {
                dialogs: count.dialogs + 1,
                messages: count.messages + entry.messages.len(),
            })
    }

    /// Drops the undecided dialogs whose first message is older than `ttl`: no decision came in time.
    /// Dialogs whose decision is being written, or is written and only waits for its last messages
    /// (sealed), are not undecided and stay.
    #[cfg(test)]
    fn expire(&self, ttl: Duration) -> Dropped {
        self.drop_where(|pending| Self::is_expired(pending, ttl))
    }

    /// Marks a dialog as being decided, or no longer.
    fn set_deciding(&self, dialog_id: &DialogId, deciding: bool) {
        if let Some(mut pending) = self.dialogs.get_mut(dialog_id) {
            pending.deciding = deciding;
        }
    }

    /// Whether a dialog is undecided, not being decided, and older than `ttl`.
    fn is_expired(pending: &PendingDialog, ttl: Duration) -> bool {
        !pending.sealed && !pending.deciding && pending.started.elapsed() >= ttl
    }

    fn stats(&self) -> BufferStats {
        BufferStats {
            dialogs: self.dialogs.len(),
            messages: self.messages.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.dialogs.is_empty()
    }
}

/// The in-process buffer. Decisions of one dialog are kept apart by the service's own per-dialog lock;
/// erasures exclude decisions with a read-write lock.
#[derive(Debug)]
pub struct MemoryBuffer {
    dialogs: Arc<Dialogs>,
    erasure_gate: Arc<RwLock<()>>,
}

impl MemoryBuffer {
    pub fn new(limits: BufferLimits) -> Self {
        Self {
            dialogs: Arc::new(Dialogs::new(limits)),
            erasure_gate: Arc::new(RwLock::new(())),
        }
    }
}

/// Marks a dialog as being decided for as long as it lives, and keeps erasures out meanwhile.
struct DecidingMark {
    dialogs: Arc<Dialogs>,
    dialog_id: DialogId,
    _shared: tokio::sync::OwnedRwLockReadGuard<()>,
}

impl Drop for DecidingMark {
    fn drop(&mut self) {
        self.dialogs.set_deciding(&self.dialog_id, false);
    }
}

#[async_trait]
impl Buffer for MemoryBuffer {
    fn describe(&self) -> String {
        "in-process (undecided messages live in this process's memory only)".to_owned()
    }

    fn is_shared(&self) -> bool {
        false
    }

    async fn ping(&self) -> BufferResult<()> {
        Ok(())
    }

    async fn push_if_buffered(&self, pushes: Vec<DialogPush>) -> BufferResult<Vec<PushOutcome>> {
        Ok(pushes
            .into_iter()
            .map(|push| self.dialogs.push_group_if_buffered(push))
            .collect())
    }

    async fn open(&self, pushes: Vec<DialogPush>) -> BufferResult<Vec<PushOutcome>> {
        Ok(pushes
            .into_iter()
            .map(|push| self.dialogs.open_group(push))
            .collect())
    }

    async fn begin_decision(&self, dialog_id: &DialogId) -> Result<DecisionLease, ApiError> {
        let shared = self.erasure_gate.clone().read_owned().await;
        self.dialogs.set_deciding(dialog_id, true);
        Ok(DecisionLease {
            dialog_id: dialog_id.clone(),
            buffered: self.dialogs.snapshot(dialog_id),
            holder: Box::new(DecidingMark {
                dialogs: self.dialogs.clone(),
                dialog_id: dialog_id.clone(),
                _shared: shared,
            }),
        })
    }

    async fn seal_and_remove_through(
        &self,
        lease: &DecisionLease,
        seq: i64,
    ) -> BufferResult<Vec<Message>> {
        Ok(self.dialogs.seal_and_remove_through(&lease.dialog_id, seq))
    }

    async fn discard(&self, lease: &DecisionLease) -> BufferResult<usize> {
        Ok(self.dialogs.discard(&lease.dialog_id))
    }

    async fn end_decision(&self, lease: DecisionLease, _settled: bool) {
        // In-process, an unsettled decision waits for the client's retry, or for the sweeper at the end of
        // the retention period (which asks the store before dropping anything).
        drop(lease);
    }

    async fn enter_erasure_gate(&self) -> Result<Gate, ApiError> {
        Ok(Gate(Box::new(
            self.erasure_gate.clone().write_owned().await,
        )))
    }

    async fn count_customer(&self, customer_id: &CustomerId) -> BufferResult<Dropped> {
        Ok(self.dialogs.count_customer(customer_id))
    }

    async fn discard_customer(&self, customer_id: &CustomerId) -> BufferResult<Dropped> {
        Ok(self.dialogs.discard_customer(customer_id))
    }

    async fn due(&self) -> BufferResult<DueDialogs> {
        let ttl = self.dialogs.limits.ttl;
        Ok(DueDialogs {
            expired: self
                .dialogs
                .dialogs
                .iter()
                .filter(|entry| Dialogs::is_expired(entry.value(), ttl))
                .map(|entry| entry.key().clone())
                .collect(),
            // A decision cannot outlive the process that holds it.
            abandoned: Vec::new(),
        })
    }

    async fn expire(&self, dialogs: &[DialogId]) -> BufferResult<Dropped> {
        let ttl = self.dialogs.limits.ttl;
        let mut dropped = Dropped::default();
        for dialog_id in dialogs {
            if let Some((_, pending)) = self
                .dialogs
                .dialogs
                .remove_if(dialog_id, |_, pending| Dialogs::is_expired(pending, ttl))
            {
                self.dialogs.release(pending.messages.len(), pending.bytes);
                dropped.dialogs += 1;
                dropped.messages += pending.messages.len();
            }
        }
        Ok(dropped)
    }

    async fn claim_sweep(&self, _period: Duration) -> bool {
        true
    }

    fn next_seq(&self) -> i64 {
        self.dialogs.clock.next()
    }

    async fn stats(&self) -> BufferResult<BufferStats> {
        Ok(self.dialogs.stats())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Language, MessageText};

    fn incoming(
        dialog: &str,
        customer: &str,
        text: &str,
        client_id: Option<&str>,
    ) -> IncomingMessage {
        IncomingMessage {
            customer_id: CustomerId::parse("customerId", customer).unwrap(),
            dialog_id: DialogId::parse("dialogId", dialog).unwrap(),
            text: MessageText::parse("text", text).unwrap(),
            language: Language::parse("language", "en").unwrap(),
            client_id: client_id.map(|id| ClientMessageId::parse("messageId", id).unwrap()),
        }
    }

    fn dialog(id: &str) -> DialogId {
        DialogId::parse("dialogId", id).unwrap()
    }

    #[test]
    fn push_if_buffered_hands_back_messages_of_unknown_dialogs() {
        let buffer = Dialogs::new(BufferLimits::default());
        let pushed = buffer.push_if_buffered(incoming("d", "c", "hi", None));
        assert!(pushed.is_none(), "handed back");
        assert!(buffer.is_empty());
        buffer.push(incoming("d", "c", "hi", None)).unwrap();
        let pushed = buffer.push_if_buffered(incoming("d", "c", "again", None));
        assert!(matches!(pushed, Some(Ok(Buffered::Added(_)))));
        assert_eq!((buffer.stats().dialogs, buffer.stats().messages), (1, 2));
    }

    #[test]
    fn a_repeated_message_id_is_recorded_once_and_a_conflicting_one_refused() {
        let buffer = Dialogs::new(BufferLimits::default());
        let first = buffer.push(incoming("d", "c", "hi", Some("m1"))).unwrap();
        let again = buffer.push(incoming("d", "c", "hi", Some("m1"))).unwrap();
        assert_eq!(again, Buffered::AlreadyThere(first.clone().message()));
        let conflict = buffer
            .push(incoming("d", "c", "other", Some("m1")))
            .unwrap_err();
        assert_eq!(conflict.code(), "MESSAGE_ID_CONFLICT");
        assert_eq!((buffer.stats().dialogs, buffer.stats().messages), (1, 1));
    }

    #[test]
    fn a_dialog_keeps_its_customer() {
        let buffer = Dialogs::new(BufferLimits::default());
        buffer.push(incoming("d", "c1", "hi", None)).unwrap();
        let error = buffer.push(incoming("d", "c2", "hi", None)).unwrap_err();
        assert_eq!(error.code(), "CUSTOMER_MISMATCH");
    }

    #[test]
    fn a_sealed_dialog_keeps_what_arrived_after_the_snapshot_and_takes_no_more() {
        let buffer = Dialogs::new(BufferLimits::default());
        for text in ["a", "b"] {
            buffer.push(incoming("d", "c", text, Some(text))).unwrap();
        }
        let snapshot = buffer.snapshot(&dialog("d")).unwrap();
        buffer.push(incoming("d", "c", "late", None)).unwrap();
        let left =
            buffer.seal_and_remove_through(&dialog("d"), snapshot.messages.last().unwrap().seq);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].text.as_str(), "late");
        // Sealed: pushes (a retry of a stored messageId too) must go to the store from now on.
        let pushed = buffer.push_if_buffered(incoming("d", "c", "a", Some("a")));
        assert!(pushed.is_none(), "handed back");
        assert_eq!(buffer.snapshot(&dialog("d")).unwrap().messages, left);
        assert!(
            buffer
                .seal_and_remove_through(&dialog("d"), left[0].seq)
                .is_empty()
        );
        assert!(buffer.is_empty());
    }

    fn limited(max_messages_per_dialog: usize, max_bytes: usize) -> Dialogs {
        Dialogs::new(BufferLimits {
            max_messages_per_dialog,
            max_bytes,
            ..BufferLimits::default()
        })
    }

    fn group(id: &str, messages: Vec<IncomingMessage>) -> DialogPush {
        DialogPush {
            dialog_id: dialog(id),
            messages,
            looked_up_after: 0,
        }
    }

    #[test]
    fn groups_are_pushed_in_order_with_one_result_each() {
        let buffer = limited(3, usize::MAX);
        let opened = buffer.open_group(group(
            "d",
            vec![
                incoming("d", "c", "a", Some("a")),
                incoming("d", "c", "b", None),
                incoming("d", "c", "a", Some("a")),
                incoming("d", "x", "from someone else", None),
                incoming("d", "c", "c", None),
                incoming("d", "c", "one too many", None),
            ],
        ));
        let codes: Vec<&str> = opened
            .pushed
            .iter()
            .map(|result| match result {
                Ok(Buffered::Added(_)) => "added",
                Ok(Buffered::AlreadyThere(_)) => "again",
                Err(error) => error.code(),
            })
            .collect();
        assert_eq!(
            codes,
            [
                "added",
                "added",
                "again",
                "CUSTOMER_MISMATCH",
                "added",
                "BUFFER_FULL"
            ]
        );
        let texts: Vec<String> = buffer
            .snapshot(&dialog("d"))
            .unwrap()
            .messages
            .iter()
            .map(|m| m.text.as_str().to_owned())
            .collect();
        assert_eq!(texts, ["a", "b", "c"]);
        // Not buffered: everything is handed back, untouched.
        let missed =
            buffer.push_group_if_buffered(group("other", vec![incoming("other", "c", "x", None)]));
        assert!(missed.pushed.is_empty());
        assert_eq!(missed.handed_back.len(), 1);
    }

    #[test]
    fn a_new_dialog_whose_every_message_is_refused_leaves_nothing_behind() {
        let buffer = limited(usize::MAX, 2_000);
        let big = "x".repeat(5_000);
        let refused = buffer.open_group(group("d", vec![incoming("d", "c1", &big, None)]));
        assert_eq!(
            refused.pushed[0].as_ref().unwrap_err().code(),
            "BUFFER_FULL"
        );
        assert!(buffer.is_empty());
        assert_eq!(buffer.stats(), BufferStats::default());
        // A new dialog belongs to the customer of its first accepted message.
        let opened = buffer.open_group(group(
            "d",
            vec![
                incoming("d", "c1", &big, None),
                incoming("d", "c2", "small", None),
            ],
        ));
        assert!(opened.pushed[0].is_err() && opened.pushed[1].is_ok());
        assert_eq!(
            buffer.snapshot(&dialog("d")).unwrap().customer_id.as_str(),
            "c2"
        );
    }

    #[test]
    fn heap_blocks_follow_the_allocator_size_classes() {
        let cases = [
            (1, 16),
            (16, 16),
            (17, 32),
            (100, 112),
            (128, 128),
            (129, 160),
            (2049, 2560),
            (4096, 4096),
        ];
        for (len, block) in cases {
            assert_eq!(heap_block(len), block, "{len}");
        }
    }

    #[test]
    fn a_full_dialog_refuses_new_messages_but_accepts_retries() {
        let buffer = limited(2, usize::MAX);
        buffer.push(incoming("d", "c", "a", Some("a"))).unwrap();
        buffer.push(incoming("d", "c", "b", None)).unwrap();
        let full = buffer.push(incoming("d", "c", "c", None)).unwrap_err();
        assert_eq!(full.code(), "BUFFER_FULL");
        assert!(full.message().contains("consent decision"));
        // A retry of an accepted message is not a new message.
        assert!(buffer.push(incoming("d", "c", "a", Some("a"))).is_ok());
        assert_eq!(buffer.stats().messages, 2);
        // Other dialogs are not affected.
        assert!(buffer.push(incoming("other", "c", "x", None)).is_ok());
    }

    #[test]
    fn the_memory_budget_refuses_what_does_not_fit_and_frees_what_leaves() {
        let message = Compact {
            seq: 0,
            id: [0; 16],
            payload: "x".into(),
            text_len: 1,
            language: 0,
        };
        let one = footprint(&message)
            + dialog_overhead(
                &dialog("d0"),
                &CustomerId::parse("customerId", "c").unwrap(),
            );
        let buffer = limited(usize::MAX, one * 3 + one / 2);
        for d in 0..3 {
            buffer
                .push(incoming(&format!("d{d}"), "c", "x", None))
                .unwrap();
        }
        assert_eq!(buffer.stats().bytes, one * 3);
        let full = buffer.push(incoming("d3", "c", "x", None)).unwrap_err();
        assert_eq!(full.code(), "BUFFER_FULL");
        assert!(
            buffer.snapshot(&dialog("d3")).is_none(),
            "a refused first message leaves no dialog behind"
        );
        assert_eq!(
            buffer.stats(),
            BufferStats {
                dialogs: 3,
                messages: 3,
                bytes: one * 3
            }
        );
        // Nothing accepted was dropped to make room; a decision frees room.
        buffer.discard(&dialog("d0"));
        assert!(buffer.push(incoming("d3", "c", "x", None)).is_ok());
        buffer.seal_and_remove_through(&dialog("d1"), i64::MAX);
        buffer.discard_customer(&CustomerId::parse("customerId", "c").unwrap());
        assert_eq!(buffer.stats(), BufferStats::default());
    }

    #[test]
    fn expiry_spares_dialogs_being_decided_or_sealed() {
        let buffer = Dialogs::new(BufferLimits::default());
        for d in ["deciding", "sealed", "idle"] {
            buffer.push(incoming(d, "c", "a", None)).unwrap();
            buffer.push(incoming(d, "c", "b", None)).unwrap();
        }
        let first = buffer.snapshot(&dialog("sealed")).unwrap().messages[0].seq;
        assert_eq!(
            buffer
                .seal_and_remove_through(&dialog("sealed"), first)
                .len(),
            1
        );
        buffer.set_deciding(&dialog("deciding"), true);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            buffer.expire(Duration::ZERO),
            Dropped {
                dialogs: 1,
                messages: 2
            }
        );
        assert!(buffer.snapshot(&dialog("idle")).is_none());
        buffer.set_deciding(&dialog("deciding"), false);
        assert_eq!(
            buffer.expire(Duration::ZERO).dialogs,
            1,
            "no longer being decided"
        );
        assert!(buffer.snapshot(&dialog("sealed")).is_some());
    }

    #[test]
    fn expiry_drops_only_dialogs_older_than_the_retention_period() {
        let buffer = Dialogs::new(BufferLimits::default());
        buffer.push(incoming("old", "c", "a", None)).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        buffer.push(incoming("new", "c", "b", None)).unwrap();
        buffer.push(incoming("old", "c", "late", None)).unwrap();
        let dropped = buffer.expire(Duration::from_millis(25));
        assert_eq!(
            dropped,
            Dropped {
                dialogs: 1,
                messages: 2
            }
        );
        assert!(buffer.snapshot(&dialog("old")).is_none());
        assert!(buffer.snapshot(&dialog("new")).is_some());
        assert_eq!(buffer.stats().messages, 1);
    }

    #[test]
    fn erasure_drops_every_dialog_of_the_customer_only() {
        let buffer = Dialogs::new(BufferLimits::default());
        buffer.push(incoming("a1", "alice", "x", None)).unwrap();
        buffer.push(incoming("a2", "alice", "y", None)).unwrap();
        buffer.push(incoming("a2", "alice", "z", None)).unwrap();
        buffer.push(incoming("b1", "bob", "x", None)).unwrap();
        let dropped = buffer.discard_customer(&CustomerId::parse("customerId", "alice").unwrap());
        assert_eq!(
            dropped,
            Dropped {
                dialogs: 2,
                messages: 3
            }
        );
        assert_eq!(buffer.stats().dialogs, 1);
    }

    #[test]
    fn discard_forgets_the_dialog() {
        let buffer = Dialogs::new(BufferLimits::default());
        buffer.push(incoming("d", "c", "a", None)).unwrap();
        buffer.push(incoming("d", "c", "b", None)).unwrap();
        assert_eq!(buffer.discard(&dialog("d")), 2);
        assert_eq!(buffer.discard(&dialog("d")), 0);
        assert!(buffer.snapshot(&dialog("d")).is_none());
    }

    #[test]
    fn concurrent_pushes_to_one_dialog_are_all_kept_in_acceptance_order() {
        let buffer = Arc::new(Dialogs::new(BufferLimits::default()));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let buffer = buffer.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        buffer
                            .push(incoming("d", "c", &format!("{t}-{i}"), None))
                            .unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let messages = buffer.snapshot(&dialog("d")).unwrap().messages;
        assert_eq!(messages.len(), 2000);
        assert!(messages.windows(2).all(|w| w[0].seq < w[1].seq));
        // Each pusher's own messages appear in the order it sent them.
        for t in 0..4 {
            let mine: Vec<usize> = messages
                .iter()
                .filter_map(|m| m.text.as_str().strip_prefix(&format!("{t}-")))
                .map(|i| i.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..500).collect::<Vec<_>>());
        }
    }
}
