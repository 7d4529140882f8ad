//! The domain's values. Inputs are parsed into these newtypes once, at the edge, so every other module can rely
//! on them being valid (non-empty, length-capped, normalised).

use std::fmt;

use chrono::{DateTime, TimeZone, Utc};

use crate::error::ApiError;

/// Longest id (customer, dialog, message) accepted, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest message text accepted, in characters.
pub const MAX_TEXT_CHARS: usize = 10_000;
/// Longest language tag accepted (BCP 47 allows 35 for the forms we accept).
pub const MAX_LANGUAGE_CHARS: usize = 35;

/// Rejects what no id, tag or text should contain: control characters other than ordinary whitespace.
fn has_forbidden_control(value: &str, allow_newlines: bool) -> bool {
    value
        .chars()
        .any(|c| c.is_control() && !(allow_newlines && matches!(c, '\n' | '\r' | '\t')))
}

/// Checks a client-supplied id; takes it over without a copy when it is an owned `String`.
fn parse_id<S: AsRef<str> + Into<String>>(field: &'static str, id: S) -> Result<String, ApiError> {
    let value = id.as_ref();
    if value.trim().is_empty() {
        return Err(ApiError::invalid(field, "must not be empty"));
    }
    if value.chars().count() > MAX_ID_CHARS {
        return Err(ApiError::invalid(
            field,
            format!("must be at most {MAX_ID_CHARS} characters"),
        ));
    }
    if has_forbidden_control(value, false) {
        return Err(ApiError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(id.into())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Parses a client-supplied id; `field` names the input in the error.
            pub fn parse<S: AsRef<str> + Into<String>>(field: &'static str, value: S) -> Result<Self, ApiError> {
                parse_id(field, value).map(Self)
            }

            /// Wraps an id read back from the store, which only ever holds parsed ids.
            pub fn from_trusted(value: String) -> Self {
                Self(value)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The chatbot's id for a customer.
    CustomerId
);
id_type!(
    /// The chatbot's id for one conversation.
    DialogId
);
id_type!(
    /// A client's idempotency key for a message, unique within its dialog.
    ClientMessageId
);

/// A language tag such as `en` or `pt-BR`, stored lowercase so that `EN` and `en` are one language.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Language(String);

impl Language {
    /// Accepts the common BCP 47 shapes: a 2-3 letter primary tag, then subtags of 1-8 letters or digits.
    pub fn parse(field: &'static str, value: impl AsRef<str>) -> Result<Self, ApiError> {
        let value = value.as_ref();
        let invalid = || {
            ApiError::invalid(
                field,
                format!(
                    "must be a language tag such as \"en\" or \"pt-BR\" (got {value:?}); \
                     letters, digits and '-', at most {MAX_LANGUAGE_CHARS} characters"
                ),
            )
        };
        if value.is_empty() || value.len() > MAX_LANGUAGE_CHARS {
            return Err(invalid());
        }
        let lower = value.to_ascii_lowercase();
        let mut subtags = lower.split('-');
        let primary = subtags.next().unwrap_or_default();
        if !(2..=3).contains(&primary.len()) || !primary.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(invalid());
        }
        for subtag in subtags {
            if !(1..=8).contains(&subtag.len())
                || !subtag.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                return Err(invalid());
            }
        }
        Ok(Self(lower))
    }

    pub fn from_trusted(value: String) -> Self {
        Self(value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message's text: not blank, at most [`MAX_TEXT_CHARS`] characters, no NUL or other control characters
/// except newlines and tabs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageText(String);

impl MessageText {
    /// Checks a client-supplied text; takes it over without a copy when it is an owned `String`.
    pub fn parse<S: AsRef<str> + Into<String>>(
        field: &'static str,
        text: S,
    ) -> Result<Self, ApiError> {
        let value = text.as_ref();
        if value.trim().is_empty() {
            return Err(ApiError::invalid(field, "must not be empty"));
        }
        if value.chars().count() > MAX_TEXT_CHARS {
            return Err(ApiError::invalid(
                field,
                format!("must be at most {MAX_TEXT_CHARS} characters"),
            ));
        }
        if has_forbidden_control(value, true) {
            return Err(ApiError::invalid(
                field,
                "must not contain control characters other than newlines and tabs",
            ));
        }
        Ok(Self(text.into()))
    }

    pub fn from_trusted(value: String) -> Self {
        Self(value)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A message as the background job sends it, already validated.
#[derive(Clone, Debug)]
pub struct IncomingMessage {
    pub customer_id: CustomerId,
    pub dialog_id: DialogId,
    pub text: MessageText,
    pub language: Language,
    pub client_id: Option<ClientMessageId>,
}

impl IncomingMessage {
    /// Whether a retry with the same `messageId` carries the same message.
    pub fn same_content_as(&self, recorded: &Message) -> bool {
        self.customer_id == recorded.customer_id
            && self.text == recorded.text
            && self.language == recorded.language
    }
}

/// Server time with the millisecond precision that both stores keep (BSON dates are milliseconds).
pub fn millis_to_time(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A server time as clients see it, in GraphQL and REST alike: RFC 3339 in UTC with milliseconds, e.g.
/// `2026-11-28T09:30:00.123Z`.
pub fn rfc3339(millis: i64) -> String {
    millis_to_time(millis).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A time range `[since, until)` in milliseconds since the epoch; either end may be open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TimeWindow {
    /// Inclusive.
    pub since: Option<i64>,
    /// Exclusive.
    pub until: Option<i64>,
}

impl TimeWindow {
    /// Checks a window a client asked for: `until_field` names its end in the error when it is not later
    /// than its start (the window would be empty, which is never what was meant).
    pub fn parse(
        since: Option<i64>,
        until: Option<i64>,
        until_field: &'static str,
    ) -> Result<Self, ApiError> {
        if let (Some(since), Some(until)) = (since, until)
            && until <= since
        {
            return Err(ApiError::invalid(
                until_field,
                "must be later than `since` (the window is since <= t < until)",
            ));
        }
        Ok(Self { since, until })
    }

    /// The window in the unit of another clock: `scale` of its ticks per millisecond (messages are ordered
    /// by `seq`, in microseconds). Exact: `t >= since` in ms is `seq >= since * 1000` for `seq` in µs.
    pub fn scaled(self, scale: i64) -> (Option<i64>, Option<i64>) {
        (
            self.since.map(|since| since.saturating_mul(scale)),
            self.until.map(|until| until.saturating_mul(scale)),
        )
    }
}

/// A message as recorded by the server, buffered or stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Server-assigned id: deterministic when the client sent a `messageId`, time-ordered otherwise.
    pub id: String,
    pub client_id: Option<ClientMessageId>,
    pub dialog_id: DialogId,
    pub customer_id: CustomerId,
    pub text: MessageText,
    pub language: Language,
    /// When the server accepted the message, in milliseconds since the epoch.
    pub created_at: i64,
    /// Strictly increasing acceptance order (microseconds); orders messages within a dialog and the flat list.
    pub seq: i64,
}

/// Namespace for the deterministic ids of messages that carry a client `messageId`.
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::uuid!("8f7c2b1e-5d3a-4c6f-9b0e-2a1d4e6f8c3b");

impl Message {
    /// The server id of a new message: deterministic when the client sent a `messageId` (the same
    /// (dialog, messageId) always maps to the same id, so a retried write is an upsert), time-ordered
    /// otherwise.
    pub fn server_id(dialog_id: &DialogId, client_id: Option<&ClientMessageId>) -> uuid::Uuid {
        match client_id {
            Some(client_id) => {
                let mut key =
                    Vec::with_capacity(dialog_id.as_str().len() + client_id.as_str().len() + 1);
                key.extend_from_slice(dialog_id.as_str().as_bytes());
                key.push(0x1f);
                key.extend_from_slice(client_id.as_str().as_bytes());
                uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &key)
            }
            None => uuid::Uuid::now_v7(),
        }
    }

    /// A message id as text: the hyphenated lowercase UUID. (Encoded directly: `to_string` goes through
    /// the formatting machinery, once per pushed message.)
    pub fn id_text(id: uuid::Uuid) -> String {
        id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .to_owned()
    }

    /// Records an incoming message at acceptance order `seq` (microseconds since the epoch).
    pub fn accept(incoming: IncomingMessage, seq: i64) -> Self {
        let id = Self::id_text(Self::server_id(
            &incoming.dialog_id,
            incoming.client_id.as_ref(),
        ));
        Self {
            id,
            client_id: incoming.client_id,
            dialog_id: incoming.dialog_id,
            customer_id: incoming.customer_id,
            text: incoming.text,
            language: incoming.language,
            created_at: seq.div_euclid(1000),
            seq,
        }
    }
}

/// Why a stored dialog was removed whole, as the change feed tells copies of the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Removal {
    /// Its consent was withdrawn.
    Withdrawn,
    /// Its customer was erased.
    Erased,
}

impl Removal {
    /// The name stored in the database and shown in exports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Withdrawn => "withdrawn",
            Self::Erased => "erased",
        }
    }

    pub fn from_stored(name: &str) -> Option<Self> {
        match name {
            "withdrawn" => Some(Self::Withdrawn),
            "erased" => Some(Self::Erased),
            _ => None,
        }
    }
}

/// What a consent decision did to its dialog (a repeated decision does nothing, and is no event).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecisionKind {
    /// `true`: a first consent, or consent given again after a withdrawal.
    Granted,
    /// `false` for a dialog that never had consent.
    Refused,
    /// `false` for a dialog that had consent.
    Withdrawn,
}

impl DecisionKind {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Refused => "refused",
            Self::Withdrawn => "withdrawn",
        }
    }

    pub fn from_stored(name: &str) -> Option<Self> {
        match name {
            "granted" => Some(Self::Granted),
            "refused" => Some(Self::Refused),
            "withdrawn" => Some(Self::Withdrawn),
            _ => None,
        }
    }

    /// What deciding `value` does to a dialog whose decision in force was `previous` (none, or the other
    /// value: deciding the value in force again changes nothing and is no event).
    pub fn of(previous: Option<bool>, value: bool) -> Self {
        match (previous, value) {
            (_, true) => Self::Granted,
            (Some(true), false) => Self::Withdrawn,
            (_, false) => Self::Refused,
        }
    }
}

/// A consent decision that changed its dialog's decision, numbered with the changes (in the same order
/// as they commit) for live updates.
#[derive(Clone, Debug, PartialEq)]
pub struct DecisionEvent {
    pub number: i64,
    pub dialog_id: DialogId,
    pub kind: DecisionKind,
    /// When it was decided, ms since the epoch.
    pub at: i64,
}

/// One entry of the change feed. Entries are numbered store-wide in the order their writes committed,
/// so that "everything after number N" is exact (see docs/decisions.md, "The change feed").
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A message was stored: its dialog's consent arrived, or it was pushed to a consented dialog.
    Stored { number: i64, message: Message },
    /// A stored dialog was removed whole: every message of it numbered before this entry is gone.
    Removed {
        number: i64,
        dialog_id: DialogId,
        reason: Removal,
        /// Milliseconds since the epoch.
        at: i64,
    },
}

impl Change {
    pub fn number(&self) -> i64 {
        match self {
            Self::Stored { number, .. } | Self::Removed { number, .. } => *number,
        }
    }
}

/// What happened to a pushed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageFate {
    /// Waiting in the buffer for the dialog's consent decision.
    Buffered,
    /// The dialog has consent: the message is in the database.
    Stored,
    /// The dialog's consent was refused: the message was dropped.
    Discarded,
}

/// A dialog's recorded consent decision: the audit record.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsentRecord {
    pub dialog_id: DialogId,
    pub customer_id: CustomerId,
    pub value: bool,
    /// When the current decision was first given (repeating it does not move it), in milliseconds.
    pub decided_at: i64,
}

/// A dialog's decision in force and every change of decision, oldest first: the audit trail.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsentHistory {
    pub record: ConsentRecord,
    /// `(value, decided_at)` of each change, oldest first.
    pub changes: Vec<(bool, i64)>,
}

/// How much an erasure removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Erased {
    pub dialogs: u64,
    pub messages: u64,
    pub consents: u64,
    /// Messages dropped from the buffer (never stored).
    pub buffered_messages: u64,
}

/// The plain SHA-256 digest under which erasures were audited before audit digests were keyed (records
/// say which scheme they use): anyone can compute it for a guessed id.
pub fn customer_digest(customer_id: &CustomerId) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(customer_id.as_str().as_bytes()))
}

/// The server secret erasures are audited with: the record keeps HMAC-SHA256(secret, customer id), which
/// proves that a given id was erased to whoever holds the secret, and tells nobody else anything (a plain
/// hash of an id can be checked against guesses by anyone who reads the records).
#[derive(Clone, PartialEq, Eq)]
pub struct AuditKey([u8; 32]);

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey(hidden)")
    }
}

impl AuditKey {
    /// The scheme name kept with every record.
    pub const SCHEME: &'static str = "hmac-sha256";

    pub fn from_bytes(secret: [u8; 32]) -> Self {
        Self(secret)
    }

    /// From `AUDIT_SECRET`: any text of at least 32 characters, hashed down to 32 bytes.
    pub fn from_text(text: &str) -> Self {
        use sha2::{Digest, Sha256};
        Self(Sha256::digest(text.as_bytes()).into())
    }

    pub fn digest(&self, customer_id: &CustomerId) -> String {
        use hmac::{Hmac, Mac};
        let mut mac =
            Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(customer_id.as_str().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// What the audit record of an erasure holds besides the counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErasureAudit {
    /// When, in milliseconds since the epoch.
    pub at: i64,
    /// Messages dropped from the buffer (never stored).
    pub buffered_messages: u64,
    /// The customer id's digest, by `digest_scheme`.
    pub customer_digest: String,
    pub digest_scheme: String,
    /// Who erased: `open` without keys, else the key's role and id (the first 16 hex digits of its
    /// configured SHA-256 digest; never the key).
    pub erased_by: String,
}

/// A stored (consented) dialog, as summarised by the store.
#[derive(Clone, Debug, PartialEq)]
pub struct Dialog {
    pub id: DialogId,
    pub customer_id: CustomerId,
    /// Sorted, distinct.
    pub languages: Vec<Language>,
    pub message_count: i64,
    pub first_message_at: i64,
    pub last_message_at: i64,
    pub consented_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_keep_their_text_form() {
        // Stored ids were written in `Uuid`'s display form, from this derivation: a retry of a stored message
        // must map to the same text.
        let dialog = DialogId::parse("dialogId", "d").unwrap();
        let client = ClientMessageId::parse("messageId", "m1").unwrap();
        for id in [
            Message::server_id(&dialog, Some(&client)),
            Message::server_id(&dialog, None),
        ] {
            assert_eq!(Message::id_text(id), id.to_string());
        }
        assert_eq!(
            Message::id_text(Message::server_id(&dialog, Some(&client))),
            "ae6cb8e8-a82e-5071-b9ae-4e53ebe2924a"
        );
    }

    #[test]
    fn language_tags_are_case_insensitive() {
        assert_eq!(Language::parse("language", "EN").unwrap().as_str(), "en");
        assert_eq!(
            Language::parse("language", "pt-BR").unwrap().as_str(),
            "pt-br"
        );
        assert_eq!(
            Language::parse("language", "zh-Hant-TW").unwrap().as_str(),
            "zh-hant-tw"
        );
    }

    #[test]
    fn malformed_language_tags_are_rejected() {
        for bad in [
            "",
            "e",
            "english",
            "en_US",
            "en-",
            "-en",
            "e1",
            "en-toolongsubtag",
            "en us",
            "ен",
        ] {
            let err = Language::parse("language", bad).unwrap_err();
            assert!(err.message().contains("language"), "{bad:?}: {err:?}");
        }
    }

    #[test]
    fn ids_must_be_non_empty_short_and_printable() {
        assert!(DialogId::parse("dialogId", "d-1").is_ok());
        assert!(DialogId::parse("dialogId", "").is_err());
        assert!(DialogId::parse("dialogId", "   ").is_err());
        assert!(DialogId::parse("dialogId", "a\0b").is_err());
        assert!(DialogId::parse("dialogId", "x".repeat(MAX_ID_CHARS)).is_ok());
        assert!(DialogId::parse("dialogId", "x".repeat(MAX_ID_CHARS + 1)).is_err());
    }

    #[test]
    fn text_allows_newlines_but_not_nul_or_blank() {
        assert!(MessageText::parse("text", "hello\nworld\t!").is_ok());
        assert!(MessageText::parse("text", " \n ").is_err());
        assert!(MessageText::parse("text", "a\0").is_err());
        assert!(MessageText::parse("text", "é".repeat(MAX_TEXT_CHARS)).is_ok());
        assert!(MessageText::parse("text", "é".repeat(MAX_TEXT_CHARS + 1)).is_err());
    }

    fn incoming(client_id: Option<&str>) -> IncomingMessage {
        IncomingMessage {
            customer_id: CustomerId::parse("customerId", "c").unwrap(),
            dialog_id: DialogId::parse("dialogId", "d").unwrap(),
            text: MessageText::parse("text", "hi").unwrap(),
            language: Language::parse("language", "en").unwrap(),
            client_id: client_id.map(|id| ClientMessageId::parse("messageId", id).unwrap()),
        }
    }

    #[test]
    fn client_message_ids_map_to_the_same_server_id() {
        let a = Message::accept(incoming(Some("m1")), 1_000_000);
        let b = Message::accept(incoming(Some("m1")), 2_000_000);
        let c = Message::accept(incoming(Some("m2")), 1_000_000);
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        let x = Message::accept(incoming(None), 1_000_000);
        let y = Message::accept(incoming(None), 1_000_000);
        assert_ne!(x.id, y.id);
        assert_eq!(a.created_at, 1_000);
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn language_parsing_never_panics_and_normalises(text in "\\PC{0,50}") {
                if let Ok(language) = Language::parse("language", &text) {
                    let tag = language.as_str();
                    prop_assert!(tag.len() <= MAX_LANGUAGE_CHARS);
                    prop_assert_eq!(tag, text.to_ascii_lowercase());
                    prop_assert!(tag.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                    let upper = Language::parse("language", text.to_ascii_uppercase()).unwrap();
                    prop_assert_eq!(upper, language);
                }
            }

            #[test]
            fn language_like_tags_are_accepted(primary in "[a-zA-Z]{2,3}", region in proptest::option::of("[a-zA-Z0-9]{1,8}")) {
                let tag = match region {
                    Some(region) => format!("{primary}-{region}"),
                    None => primary,
                };
                prop_assert!(Language::parse("language", &tag).is_ok(), "{}", tag);
            }

            #[test]
            fn ids_and_texts_accept_only_what_they_promise(text in "(?s).{0,300}") {
                if let Ok(id) = DialogId::parse("dialogId", &text) {
                    prop_assert!(!id.as_str().trim().is_empty());
                    prop_assert!(id.as_str().chars().count() <= MAX_ID_CHARS);
                    prop_assert!(!id.as_str().chars().any(char::is_control));
                }
                if let Ok(message) = MessageText::parse("text", &text) {
                    prop_assert!(!message.as_str().trim().is_empty());
                    prop_assert!(!message.as_str().contains('\0'));
                }
            }
        }
    }
}
