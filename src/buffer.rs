//! The dialog buffer: messages of dialogs that have no consent decision yet, held in process memory and never
//! written anywhere. A concurrent map sharded by dialog, so pushes to different dialogs never wait for each
//! other; pushes to one dialog are ordered by that dialog's shard lock, and get their acceptance order there.

use std::collections::HashMap;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

use crate::clock::Clock;
use crate::error::ApiError;
use crate::model::{ClientMessageId, CustomerId, DialogId, IncomingMessage, Message};

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

/// The answer of [`DialogBuffer::push_if_buffered`].
#[derive(Debug)]
pub enum BufferPush {
    Done(Buffered),
    /// The dialog is not in the buffer; the message is handed back untouched.
    NotBuffered(IncomingMessage),
}

/// A copy of one buffered dialog.
#[derive(Clone, Debug)]
pub struct BufferedDialog {
    pub customer_id: CustomerId,
    /// Oldest first.
    pub messages: Vec<Message>,
}

#[derive(Debug)]
struct PendingDialog {
    customer_id: CustomerId,
    /// Oldest first, i.e. in increasing `seq`.
    messages: Vec<Message>,
    /// `seq` of each buffered message that carries a client `messageId`.
    by_client_id: HashMap<ClientMessageId, i64>,
    /// Set once the dialog's consent `true` is committed: the dialog only waits for its last buffered
    /// messages to be written, and new pushes must go to the store instead.
    sealed: bool,
}

impl PendingDialog {
    fn new(customer_id: CustomerId) -> Self {
        Self {
            customer_id,
            messages: Vec::new(),
            by_client_id: HashMap::new(),
            sealed: false,
        }
    }

    fn push(&mut self, incoming: IncomingMessage, clock: &Clock) -> Result<Buffered, ApiError> {
        if incoming.customer_id != self.customer_id {
            return Err(ApiError::CustomerMismatch {
                dialog_id: incoming.dialog_id.to_string(),
            });
        }
        if let Some(client_id) = &incoming.client_id
            && let Some(seq) = self.by_client_id.get(client_id)
            && let Ok(index) = self.messages.binary_search_by_key(seq, |m| m.seq)
        {
            let existing = &self.messages[index];
            if !incoming.same_content_as(existing) {
                return Err(ApiError::MessageIdConflict {
                    dialog_id: incoming.dialog_id.to_string(),
                    message_id: client_id.to_string(),
                });
            }
            return Ok(Buffered::AlreadyThere(existing.clone()));
        }
        let message = Message::accept(incoming, clock.next());
        if let Some(client_id) = &message.client_id {
            self.by_client_id.insert(client_id.clone(), message.seq);
        }
        self.messages.push(message.clone());
        Ok(Buffered::Added(message))
    }
}

#[derive(Debug, Default)]
pub struct DialogBuffer {
    dialogs: DashMap<DialogId, PendingDialog>,
    clock: Clock,
}

impl DialogBuffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends to a dialog that is buffered and still undecided. Refuses a message whose customer differs
    /// from the dialog's, or whose `messageId` was used for a different message.
    pub fn push_if_buffered(&self, incoming: IncomingMessage) -> Result<BufferPush, ApiError> {
        match self.dialogs.get_mut(&incoming.dialog_id) {
            Some(mut entry) if !entry.sealed => {
                entry.push(incoming, &self.clock).map(BufferPush::Done)
            }
            _ => Ok(BufferPush::NotBuffered(incoming)),
        }
    }

    /// Appends, starting the dialog's buffer if it has none. Only for dialogs without a decision.
    pub fn push(&self, incoming: IncomingMessage) -> Result<Buffered, ApiError> {
        let mut entry = self
            .dialogs
            .entry(incoming.dialog_id.clone())
            .or_insert_with(|| PendingDialog::new(incoming.customer_id.clone()));
        entry.push(incoming, &self.clock)
    }

    /// A copy of a dialog's buffered messages.
    pub fn snapshot(&self, dialog_id: &DialogId) -> Option<BufferedDialog> {
        self.dialogs.get(dialog_id).map(|entry| BufferedDialog {
            customer_id: entry.customer_id.clone(),
            messages: entry.messages.clone(),
        })
    }

    /// Called once consent `true` is committed with the messages up to and including `seq`: forgets those,
    /// and seals the dialog so that it accepts no more pushes. Returns the messages pushed meanwhile, which
    /// still have to be stored; the dialog leaves the buffer when none are left.
    pub fn seal_and_remove_through(&self, dialog_id: &DialogId, seq: i64) -> Vec<Message> {
        let Entry::Occupied(mut entry) = self.dialogs.entry(dialog_id.clone()) else {
            return Vec::new();
        };
        let state = entry.get_mut();
        state.sealed = true;
        let done = state.messages.partition_point(|m| m.seq <= seq);
        for message in state.messages.drain(..done) {
            if let Some(client_id) = &message.client_id {
                state.by_client_id.remove(client_id);
            }
        }
        if state.messages.is_empty() {
            entry.remove();
            Vec::new()
        } else {
            state.messages.clone()
        }
    }

    /// Drops a dialog's buffered messages; returns how many there were.
    pub fn discard(&self, dialog_id: &DialogId) -> usize {
        self.dialogs
            .remove(dialog_id)
            .map_or(0, |(_, entry)| entry.messages.len())
    }

    /// The next acceptance order, for messages that bypass the buffer.
    pub fn next_seq(&self) -> i64 {
        self.clock.next()
    }

    /// How many dialogs and messages are buffered.
    pub fn len(&self) -> (usize, usize) {
        self.dialogs
            .iter()
            .fold((0, 0), |(dialogs, messages), entry| {
                (dialogs + 1, messages + entry.messages.len())
            })
    }

    pub fn is_empty(&self) -> bool {
        self.dialogs.is_empty()
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
        let buffer = DialogBuffer::new();
        let pushed = buffer
            .push_if_buffered(incoming("d", "c", "hi", None))
            .unwrap();
        assert!(matches!(pushed, BufferPush::NotBuffered(_)));
        assert!(buffer.is_empty());
        buffer.push(incoming("d", "c", "hi", None)).unwrap();
        let pushed = buffer
            .push_if_buffered(incoming("d", "c", "again", None))
            .unwrap();
        assert!(matches!(pushed, BufferPush::Done(Buffered::Added(_))));
        assert_eq!(buffer.len(), (1, 2));
    }

    #[test]
    fn a_repeated_message_id_is_recorded_once_and_a_conflicting_one_refused() {
        let buffer = DialogBuffer::new();
        let first = buffer.push(incoming("d", "c", "hi", Some("m1"))).unwrap();
        let again = buffer.push(incoming("d", "c", "hi", Some("m1"))).unwrap();
        assert_eq!(again, Buffered::AlreadyThere(first.clone().message()));
        let conflict = buffer
            .push(incoming("d", "c", "other", Some("m1")))
            .unwrap_err();
        assert_eq!(conflict.code(), "MESSAGE_ID_CONFLICT");
        assert_eq!(buffer.len(), (1, 1));
    }

    #[test]
    fn a_dialog_keeps_its_customer() {
        let buffer = DialogBuffer::new();
        buffer.push(incoming("d", "c1", "hi", None)).unwrap();
        let error = buffer.push(incoming("d", "c2", "hi", None)).unwrap_err();
        assert_eq!(error.code(), "CUSTOMER_MISMATCH");
    }

    #[test]
    fn a_sealed_dialog_keeps_what_arrived_after_the_snapshot_and_takes_no_more() {
        let buffer = DialogBuffer::new();
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
        let pushed = buffer
            .push_if_buffered(incoming("d", "c", "a", Some("a")))
            .unwrap();
        assert!(matches!(pushed, BufferPush::NotBuffered(_)));
        assert_eq!(buffer.snapshot(&dialog("d")).unwrap().messages, left);
        assert!(
            buffer
                .seal_and_remove_through(&dialog("d"), left[0].seq)
                .is_empty()
        );
        assert!(buffer.is_empty());
    }

    #[test]
    fn discard_forgets_the_dialog() {
        let buffer = DialogBuffer::new();
        buffer.push(incoming("d", "c", "a", None)).unwrap();
        buffer.push(incoming("d", "c", "b", None)).unwrap();
        assert_eq!(buffer.discard(&dialog("d")), 2);
        assert_eq!(buffer.discard(&dialog("d")), 0);
        assert!(buffer.snapshot(&dialog("d")).is_none());
    }

    #[test]
    fn concurrent_pushes_to_one_dialog_are_all_kept_in_acceptance_order() {
        let buffer = Arc::new(DialogBuffer::new());
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
