//! The one error type of the domain, and its GraphQL face: every error reaches the client with an
//! `extensions.code` and a message that says what to do. Internal detail goes to the log, never to the client.

use async_graphql::ErrorExtensions;

use crate::buffer::BufferError;
use crate::store::StoreError;

/// Deliberately not `Display`: async-graphql turns any `Display` error into a GraphQL error without a code,
/// and this way `?` can only go through [`From<ApiError>`], which sets one.
#[derive(Clone, Debug)]
pub enum ApiError {
    /// An input value is malformed; `field` names it as the client spelled it.
    InvalidInput {
        field: &'static str,
        reason: String,
    },

    /// Like `InvalidInput`, for an input inside a list (`inputs[3].text`).
    InvalidInputAt {
        field: String,
        reason: String,
    },

    DialogNotFound(String),

    InvalidCursor {
        field: &'static str,
        reason: String,
    },

    /// A change-feed token that is malformed, or ahead of this database's changes.
    InvalidChangeToken {
        field: &'static str,
        reason: String,
    },

    MessageIdConflict {
        dialog_id: String,
        message_id: String,
    },

    CustomerMismatch {
        dialog_id: String,
    },

    StoreUnavailable(StoreError),

    /// The shared buffer (Redis) did not answer in time, or a decision or erasure elsewhere held the dialog
    /// longer than a call may wait; nothing was lost or half-written.
    BufferUnavailable(BufferError),

    /// The buffer cannot take the message; the text says which bound was hit.
    BufferFull(String),

    /// A key has MAX_SUBSCRIPTIONS_PER_KEY subscriptions open already.
    TooManySubscriptions {
        max: usize,
    },

    /// A subscriber fell too far behind the live feed; `last` is the last change it was given or skipped.
    SubscriberTooSlow {
        last: crate::changes::ChangeToken,
    },

    /// No valid API key was sent.
    Unauthenticated,

    /// The key's role may not do this; names the operation and the roles that may.
    Forbidden {
        operation: String,
        allowed: &'static str,
    },
}

impl ApiError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// What the client is told: what is wrong and what to do about it.
    pub fn message(&self) -> String {
        match self {
            Self::InvalidInput { field, reason } => format!("`{field}` {reason}"),
            Self::InvalidInputAt { field, reason } => format!("`{field}` {reason}"),
            Self::DialogNotFound(dialog_id) => format!(
                "no dialog `{dialog_id}` is waiting for consent or has a recorded decision: push its messages \
                 first, and check the dialogId"
            ),
            Self::InvalidCursor { field, reason } => format!(
                "`{field}` is not a cursor of this list: {reason}; use a cursor returned by the same query"
            ),
            Self::TooManySubscriptions { max } => format!(
                "this key has {max} subscriptions open already (MAX_SUBSCRIPTIONS_PER_KEY): end one, or \
                 subscribe to several dialogs with one filter"
            ),
            Self::SubscriberTooSlow { last } => format!(
                "the subscriber fell {} changes behind the live feed and was disconnected: read faster, or \
                 subscribe again with `after: \"{last}\"` to resume where it stopped",
                crate::live::SUBSCRIBER_BACKLOG
            ),
            Self::InvalidChangeToken { field, reason } => format!(
                "`{field}` is not a change token of this database: {reason}; pass the token your last call \
                 returned, or none to read every change from the start (and rebuild your copy from it)"
            ),
            Self::MessageIdConflict {
                dialog_id,
                message_id,
            } => format!(
                "messageId `{message_id}` was already used in dialog `{dialog_id}` for a different message: \
                 use a new messageId for a new message, or resend exactly the original to retry"
            ),
            Self::CustomerMismatch { dialog_id } => format!(
                "dialog `{dialog_id}` belongs to another customer: a dialog has one customerId, send the one \
                 its first message had"
            ),
            Self::StoreUnavailable(_) => {
                "the database is unavailable, nothing was lost or half-written: retry the call"
                    .to_owned()
            }
            Self::BufferUnavailable(_) => {
                "the dialog buffer is unavailable, nothing acknowledged was lost: retry the call in a few \
                 seconds"
                    .to_owned()
            }
            Self::BufferFull(reason) => reason.clone(),
            Self::Unauthenticated => {
                "send a valid API key as `Authorization: Bearer <key>`".to_owned()
            }
            Self::Forbidden { operation, allowed } => format!(
                "`{operation}` needs a key with the {allowed} role; this key's role may not use it"
            ),
        }
    }

    /// Names an input by its place in a list, e.g. `inputs[3].text`.
    pub fn at_index(self, list: &str, index: usize) -> Self {
        match self {
            Self::InvalidInput { field, reason } => Self::InvalidInputAt {
                field: format!("{list}[{index}].{field}"),
                reason,
            },
            other => other,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidInput { .. } | Self::InvalidInputAt { .. } => "BAD_USER_INPUT",
            Self::DialogNotFound(_) => "DIALOG_NOT_FOUND",
            Self::InvalidCursor { .. } => "INVALID_CURSOR",
            Self::InvalidChangeToken { .. } => "INVALID_CHANGE_TOKEN",
            Self::TooManySubscriptions { .. } => "TOO_MANY_SUBSCRIPTIONS",
            Self::SubscriberTooSlow { .. } => "SUBSCRIBER_TOO_SLOW",
            Self::MessageIdConflict { .. } => "MESSAGE_ID_CONFLICT",
            Self::CustomerMismatch { .. } => "CUSTOMER_MISMATCH",
            Self::StoreUnavailable(_) => "STORE_UNAVAILABLE",
            Self::BufferFull(_) => "BUFFER_FULL",
            Self::BufferUnavailable(_) => "BUFFER_UNAVAILABLE",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden { .. } => "FORBIDDEN",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        Self::StoreUnavailable(error)
    }
}

impl From<BufferError> for ApiError {
    fn from(error: BufferError) -> Self {
        Self::BufferUnavailable(error)
    }
}

impl ErrorExtensions for ApiError {
    fn extend(&self) -> async_graphql::Error {
        match self {
            Self::StoreUnavailable(source) => tracing::warn!(error = %source, "store call failed"),
            Self::BufferUnavailable(source) => {
                tracing::warn!(error = %source, "buffer call failed")
            }
            _ => {}
        }
        async_graphql::Error::new(self.message()).extend_with(|_, extensions| {
            extensions.set("code", self.code());
            match self {
                Self::InvalidInput { field, .. }
                | Self::InvalidCursor { field, .. }
                | Self::InvalidChangeToken { field, .. } => extensions.set("field", *field),
                Self::InvalidInputAt { field, .. } => extensions.set("field", field.as_str()),
                Self::DialogNotFound(dialog_id) => extensions.set("dialogId", dialog_id.as_str()),
                _ => {}
            }
        })
    }
}

impl From<ApiError> for async_graphql::Error {
    fn from(error: ApiError) -> Self {
        error.extend()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_carries_its_code_and_field() {
        let error = ApiError::invalid("text", "must not be empty").extend();
        let extensions = error.extensions.expect("extensions");
        assert_eq!(
            extensions.get("code"),
            Some(&async_graphql::Value::from("BAD_USER_INPUT"))
        );
        assert_eq!(
            extensions.get("field"),
            Some(&async_graphql::Value::from("text"))
        );
        assert_eq!(error.message, "`text` must not be empty");
    }
}
