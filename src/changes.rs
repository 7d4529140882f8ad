//! The change feed: everything stored or removed since a token, so that a copy of the data (a Parquet
//! dataset, a warehouse table) can be kept in step with the store, and kept lawful when consent is withdrawn
//! or a customer erased.
//!
//! Every stored message and every dialog removed whole gets a change number, store-wide, taken inside the
//! writing transaction from one counter (see `store`): a write that took number N commits before any write
//! that took a higher one becomes visible. A read first takes the counter (`through`) and then returns what
//! is numbered up to it, so nothing numbered below a token can appear after the token was handed out: a
//! token is exact, whichever replica wrote and however late a consent arrived.

use crate::error::ApiError;
use crate::model::Change;

/// A position in the change feed: the number of the last change a reader has seen (0: none). Text of
/// decimal digits on the wire, so that it survives JSON and GraphQL (whose `Int` has 32 bits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ChangeToken(pub i64);

impl ChangeToken {
    /// Digits only, as the feed hands them out; anything else is refused rather than guessed at.
    pub fn parse(field: &'static str, text: &str) -> Result<Self, ApiError> {
        let invalid = |reason: &str| ApiError::InvalidChangeToken {
            field,
            reason: reason.to_owned(),
        };
        if text.is_empty() || text.len() > 18 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("a token is a number of at most 18 decimal digits"));
        }
        text.parse()
            .map(Self)
            .map_err(|_| invalid("a token is a number of at most 18 decimal digits"))
    }
}

impl std::fmt::Display for ChangeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One read of the feed.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangePage {
    /// In number order.
    pub changes: Vec<Change>,
    /// What to pass next time: after the last change of the page, or, when the page holds everything up
    /// to the moment of the read, after that moment (so that an idle feed does not re-read anything).
    pub token: ChangeToken,
    /// More changes were committed up to the moment of the read than this page holds: read again now.
    pub has_more: bool,
}

impl ChangePage {
    /// A page from `changes` read up to `through` with room for `limit` (one more was asked for, to tell
    /// that there are more).
    pub fn new(mut changes: Vec<Change>, through: i64, limit: usize) -> Self {
        let has_more = changes.len() > limit;
        changes.truncate(limit);
        let token = match (has_more, changes.last()) {
            (true, Some(last)) => last.number(),
            _ => through,
        };
        Self {
            changes,
            token: ChangeToken(token),
            has_more,
        }
    }
}

/// Refuses a token ahead of the store's last change: the database was restored from an older backup, or the
/// token is another deployment's. Reading on would silently skip every change until the counter caught up.
pub fn check_not_ahead(
    field: &'static str,
    after: ChangeToken,
    through: i64,
) -> Result<(), ApiError> {
    if after.0 > through {
        return Err(ApiError::InvalidChangeToken {
            field,
            reason: format!(
                "it is ahead of the last change this database holds ({through}): the database was restored \
                 from an older backup or replaced, or the token is another deployment's"
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DialogId, Removal};

    fn removed(number: i64) -> Change {
        Change::Removed {
            number,
            dialog_id: DialogId::from_trusted(format!("d{number}")),
            reason: Removal::Withdrawn,
            at: 0,
        }
    }

    #[test]
    fn tokens_are_decimal_digits_and_nothing_else() {
        assert_eq!(ChangeToken::parse("after", "0").unwrap(), ChangeToken(0));
        assert_eq!(
            ChangeToken::parse("after", "123456789012345678").unwrap(),
            ChangeToken(123_456_789_012_345_678)
        );
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "0x10",
            "1e3",
            "१",
            "1234567890123456789",
        ] {
            let error = ChangeToken::parse("after", bad).unwrap_err();
            assert_eq!(error.code(), "INVALID_CHANGE_TOKEN", "{bad:?}");
        }
    }

    #[test]
    fn a_full_page_points_after_its_last_change_and_a_short_one_after_the_read() {
        let page = ChangePage::new(vec![removed(3), removed(5), removed(9)], 12, 2);
        assert_eq!(page.changes, vec![removed(3), removed(5)]);
        assert_eq!(page.token, ChangeToken(5));
        assert!(page.has_more);

        let page = ChangePage::new(vec![removed(3)], 12, 2);
        assert_eq!(page.token, ChangeToken(12));
        assert!(!page.has_more);

        let page = ChangePage::new(Vec::new(), 12, 2);
        assert_eq!((page.token, page.has_more), (ChangeToken(12), false));
    }

    #[test]
    fn a_token_ahead_of_the_store_is_refused_with_advice() {
        assert!(check_not_ahead("after", ChangeToken(12), 12).is_ok());
        let error = check_not_ahead("after", ChangeToken(13), 12).unwrap_err();
        assert_eq!(error.code(), "INVALID_CHANGE_TOKEN");
        assert!(error.message().contains("restored"), "{}", error.message());
    }
}
