//! Relay cursor pagination by keyset: a page is "the next N items after this sort key", never an offset, so
//! cursors stay valid while new data arrives and a deep page costs what the first one does.
//!
//! Lists are shown most recent first, by a sort key `(at, id)`: for dialogs `at` is the time of the latest
//! message, for messages it is the acceptance order. Cursors are opaque base64url strings that name the list
//! they belong to, so a cursor of another list is refused instead of silently paging the wrong thing.

use std::future::Future;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::error::ApiError;

/// The longest cursor accepted, in bytes.
const MAX_CURSOR_LEN: usize = 1024;

/// Page size when the client gives neither `first` nor `last`.
pub const DEFAULT_PAGE_SIZE: usize = 20;

/// The position of an item in its list; larger keys are more recent and come first.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SortKey {
    pub at: i64,
    pub id: String,
}

/// Which list a cursor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    Dialogs,
    Messages,
}

impl ListKind {
    fn tag(self) -> &'static str {
        match self {
            Self::Dialogs => "dialogs.v1",
            Self::Messages => "messages.v1",
        }
    }
}

/// Encodes a sort key as the opaque cursor of `kind`.
pub fn encode_cursor(kind: ListKind, key: &SortKey) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}:{}", kind.tag(), key.at, key.id))
}

/// Decodes a cursor of `kind`; anything else (garbage, another list's cursor) is `INVALID_CURSOR`.
pub fn decode_cursor(
    kind: ListKind,
    field: &'static str,
    cursor: &str,
) -> Result<SortKey, ApiError> {
    let invalid = |reason: &str| ApiError::InvalidCursor {
        field,
        reason: reason.to_owned(),
    };
    // Ours are far shorter (an id is at most 128 characters); a huge one is not worth decoding.
    if cursor.len() > MAX_CURSOR_LEN {
        return Err(invalid("it is longer than any cursor this service issues"));
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| invalid("it is not a cursor issued by this service"))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| invalid("it is not a cursor issued by this service"))?;
    let mut parts = text.splitn(3, ':');
    let (Some(tag), Some(at), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid("it is not a cursor issued by this service"));
    };
    if tag != kind.tag() {
        return Err(invalid("it belongs to another list"));
    }
    let at = at
        .parse::<i64>()
        .map_err(|_| invalid("it is not a cursor issued by this service"))?;
    if id.is_empty() {
        return Err(invalid("it is not a cursor issued by this service"));
    }
    Ok(SortKey {
        at,
        id: id.to_owned(),
    })
}

/// Bounds on sort keys, both exclusive: `older_than` keeps keys below it, `newer_than` keys above it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyRange {
    pub older_than: Option<SortKey>,
    pub newer_than: Option<SortKey>,
}

impl KeyRange {
    pub fn contains(&self, key: &SortKey) -> bool {
        self.older_than.as_ref().is_none_or(|bound| key < bound)
            && self.newer_than.as_ref().is_none_or(|bound| key > bound)
    }
}

/// The order a store scans in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanOrder {
    NewestFirst,
    OldestFirst,
}

/// The order a list is shown in, by sort key. `after` a cursor means further along in this order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ListOrder {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// Which end of the cursor range the page is taken from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `first`: the first items of the range in the list's order.
    Forward,
    /// `last`: the last items of the range in the list's order.
    Backward,
}

/// A validated page request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    pub direction: Direction,
    pub size: usize,
    /// The cursors' bounds, in sort-key terms (which one `after` sets depends on `order`).
    pub range: KeyRange,
    pub order: ListOrder,
}

/// The Relay arguments as the client sent them.
#[derive(Clone, Debug, Default)]
pub struct PageArgs {
    pub first: Option<i32>,
    pub after: Option<String>,
    pub last: Option<i32>,
    pub before: Option<String>,
    pub order: ListOrder,
}

impl PageArgs {
    /// Validates the arguments of a `kind` list. `first` and `last` together are refused (the Relay spec
    /// discourages it and the result is confusing); with neither, the page holds [`DEFAULT_PAGE_SIZE`] items
    /// from the start, or from the `before` cursor backwards when only `before` is given.
    pub fn parse(self, kind: ListKind, max_page_size: usize) -> Result<PageRequest, ApiError> {
        let size = |field: &'static str, value: i32| -> Result<usize, ApiError> {
            match usize::try_from(value) {
                Ok(size) if size <= max_page_size => Ok(size),
                Ok(_) => Err(ApiError::invalid(
                    field,
                    format!(
                        "is {value}, above the page-size limit of {max_page_size}: ask for fewer items and \
                         follow pageInfo.endCursor for the rest"
                    ),
                )),
                Err(_) => Err(ApiError::invalid(
                    field,
                    format!("must not be negative (got {value})"),
                )),
            }
        };
        let (direction, size) = match (self.first, self.last) {
            (Some(_), Some(_)) => {
                return Err(ApiError::invalid(
                    "first",
                    "cannot be combined with `last`: page forwards with first/after or backwards with last/before",
                ));
            }
            (Some(first), None) => (Direction::Forward, size("first", first)?),
            (None, Some(last)) => (Direction::Backward, size("last", last)?),
            (None, None) if self.before.is_some() && self.after.is_none() => {
                (Direction::Backward, DEFAULT_PAGE_SIZE.min(max_page_size))
            }
            (None, None) => (Direction::Forward, DEFAULT_PAGE_SIZE.min(max_page_size)),
        };
        let after = self
            .after
            .map(|cursor| decode_cursor(kind, "after", &cursor))
            .transpose()?;
        let before = self
            .before
            .map(|cursor| decode_cursor(kind, "before", &cursor))
            .transpose()?;
        let range = match self.order {
            ListOrder::NewestFirst => KeyRange {
                older_than: after,
                newer_than: before,
            },
            ListOrder::OldestFirst => KeyRange {
                older_than: before,
                newer_than: after,
            },
        };
        Ok(PageRequest {
            direction,
            size,
            range,
            order: self.order,
        })
    }
}

/// One page, newest first, and whether items exist on either side of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_previous_page: bool,
    pub has_next_page: bool,
}

/// Fetches one page through `scan(range, order, limit)`, the only thing a store has to provide: one scan for
/// the page (one item more than asked, to learn whether there is a next page) and, when the page starts at a
/// cursor, one single-item scan for whether anything lies before it. Either list order is a scan in one
/// direction of the same index: a page costs the same at any depth, in both orders.
pub async fn fetch_page<T, E, F, Fut>(
    request: &PageRequest,
    key_of: impl Fn(&T) -> SortKey,
    scan: F,
) -> Result<Page<T>, E>
where
    F: Fn(KeyRange, ScanOrder, usize) -> Fut,
    Fut: Future<Output = Result<Vec<T>, E>>,
{
    // The scan runs the list's way for `first`, against it for `last`; it starts at the cursor on its side.
    let order = match (request.order, request.direction) {
        (ListOrder::NewestFirst, Direction::Forward)
        | (ListOrder::OldestFirst, Direction::Backward) => ScanOrder::NewestFirst,
        _ => ScanOrder::OldestFirst,
    };
    let starting_cursor = match order {
        ScanOrder::NewestFirst => &request.range.older_than,
        ScanOrder::OldestFirst => &request.range.newer_than,
    };
    let mut items = scan(request.range.clone(), order, request.size + 1).await?;
    let more_in_direction = items.len() > request.size;
    items.truncate(request.size);

    // Anything on the other side of the page? Only possible when the page starts at a cursor.
    let more_behind = match starting_cursor {
        None => false,
        Some(cursor) => {
            let edge = items.first().map(&key_of).unwrap_or_else(|| cursor.clone());
            let (behind, behind_order) = match order {
                ScanOrder::NewestFirst => (
                    KeyRange {
                        newer_than: Some(edge),
                        older_than: None,
                    },
                    ScanOrder::OldestFirst,
                ),
                ScanOrder::OldestFirst => (
                    KeyRange {
                        older_than: Some(edge),
                        newer_than: None,
                    },
                    ScanOrder::NewestFirst,
                ),
            };
            let beyond_the_edge = !scan(behind, behind_order, 1).await?.is_empty();
            // An empty page's edge is the cursor's own item, which lies before the page too: with nothing
            // beyond it, the item at that end of the whole list is it, if it is still there.
            if items.is_empty() && !beyond_the_edge {
                scan(KeyRange::default(), order, 1)
                    .await?
                    .first()
                    .is_some_and(|item| key_of(item) == *cursor)
            } else {
                beyond_the_edge
            }
        }
    };

    Ok(match request.direction {
        Direction::Forward => Page {
            items,
            has_previous_page: more_behind,
            has_next_page: more_in_direction,
        },
        Direction::Backward => {
            items.reverse();
            Page {
                items,
                has_previous_page: more_in_direction,
                has_next_page: more_behind,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(at: i64, id: &str) -> SortKey {
        SortKey {
            at,
            id: id.to_owned(),
        }
    }

    #[test]
    fn cursors_round_trip_even_with_colons_in_ids() {
        for k in [key(0, "a"), key(-5, "x:y:z"), key(i64::MAX, "é 😀")] {
            let cursor = encode_cursor(ListKind::Dialogs, &k);
            assert_eq!(
                decode_cursor(ListKind::Dialogs, "after", &cursor).unwrap(),
                k
            );
        }
    }

    #[test]
    fn foreign_and_malformed_cursors_are_invalid() {
        let message_cursor = encode_cursor(ListKind::Messages, &key(1, "m"));
        let err = decode_cursor(ListKind::Dialogs, "after", &message_cursor).unwrap_err();
        assert_eq!(err.code(), "INVALID_CURSOR");
        assert!(err.message().contains("another list"));
        for bad in [
            "",
            "!!!",
            "bm90IGEgY3Vyc29y",
            &URL_SAFE_NO_PAD.encode("dialogs.v1:x:id"),
            &URL_SAFE_NO_PAD.encode("dialogs.v1:5:"),
            &URL_SAFE_NO_PAD.encode([0xff, 0xfe]),
        ] {
            let err = decode_cursor(ListKind::Dialogs, "before", bad).unwrap_err();
            assert_eq!(err.code(), "INVALID_CURSOR", "{bad:?}");
        }
    }

    #[test]
    fn page_arguments_are_validated() {
        let parse = |args: PageArgs| args.parse(ListKind::Dialogs, 100);
        let default = parse(PageArgs::default()).unwrap();
        assert_eq!(
            (default.direction, default.size),
            (Direction::Forward, DEFAULT_PAGE_SIZE)
        );
        let before_only = parse(PageArgs {
            before: Some(encode_cursor(ListKind::Dialogs, &key(1, "a"))),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(before_only.direction, Direction::Backward);
        assert!(
            parse(PageArgs {
                first: Some(100),
                ..Default::default()
            })
            .is_ok()
        );
        let too_big = parse(PageArgs {
            first: Some(101),
            ..Default::default()
        })
        .unwrap_err();
        assert!(too_big.message().contains("page-size limit of 100"));
        assert!(
            parse(PageArgs {
                last: Some(-1),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            parse(PageArgs {
                first: Some(1),
                last: Some(1),
                ..Default::default()
            })
            .is_err()
        );
    }

    /// An in-memory list that scans like a store does.
    fn scan_of(
        keys: &[SortKey],
    ) -> impl Fn(KeyRange, ScanOrder, usize) -> std::future::Ready<Result<Vec<SortKey>, ()>> + '_
    {
        move |range, order, limit| {
            let mut hits: Vec<SortKey> =
                keys.iter().filter(|k| range.contains(k)).cloned().collect();
            hits.sort();
            if order == ScanOrder::NewestFirst {
                hits.reverse();
            }
            hits.truncate(limit);
            std::future::ready(Ok(hits))
        }
    }

    async fn page(keys: &[SortKey], args: PageArgs) -> Page<SortKey> {
        let request = args.parse(ListKind::Dialogs, 100).unwrap();
        fetch_page(&request, SortKey::clone, scan_of(keys))
            .await
            .unwrap()
    }

    fn run<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    #[test]
    fn paging_forwards_then_backwards_visits_everything_once() {
        // Ties on `at` are broken by id.
        let keys: Vec<SortKey> = (0..23).map(|i| key(i / 3, &format!("id{i:02}"))).collect();
        run(async {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let p = page(
                    &keys,
                    PageArgs {
                        first: Some(5),
                        after: after.clone(),
                        ..Default::default()
                    },
                )
                .await;
                assert_eq!(p.has_previous_page, after.is_some());
                seen.extend(p.items.iter().cloned());
                if !p.has_next_page {
                    break;
                }
                after = Some(encode_cursor(ListKind::Dialogs, p.items.last().unwrap()));
            }
            let mut expected = keys.clone();
            expected.sort();
            expected.reverse();
            assert_eq!(seen, expected);

            let mut back = Vec::new();
            let mut before = None;
            loop {
                let p = page(
                    &keys,
                    PageArgs {
                        last: Some(4),
                        before: before.clone(),
                        ..Default::default()
                    },
                )
                .await;
                assert_eq!(p.has_next_page, before.is_some());
                back.splice(0..0, p.items.iter().cloned());
                if !p.has_previous_page {
                    break;
                }
                before = Some(encode_cursor(ListKind::Dialogs, p.items.first().unwrap()));
            }
            assert_eq!(back, expected);
        });
    }

    /// Every item once, in the list's order, forwards with `first`/`after` and backwards with
    /// `last`/`before`, with exact flags at every step, for both orders.
    #[test]
    fn both_orders_page_through_everything_once_in_both_directions() {
        let keys: Vec<SortKey> = (0..23).map(|i| key(i / 3, &format!("id{i:02}"))).collect();
        run(async {
            for order in [ListOrder::NewestFirst, ListOrder::OldestFirst] {
                let mut expected = keys.clone();
                expected.sort();
                if order == ListOrder::NewestFirst {
                    expected.reverse();
                }
                for size in [1, 4, 5, 23, 30] {
                    let mut seen = Vec::new();
                    let mut after = None;
                    loop {
                        let p = page(
                            &keys,
                            PageArgs {
                                first: Some(size),
                                after: after.clone(),
                                order,
                                ..Default::default()
                            },
                        )
                        .await;
                        assert_eq!(p.has_previous_page, after.is_some(), "{order:?} {size}");
                        seen.extend(p.items.iter().cloned());
                        assert_eq!(p.has_next_page, seen.len() < keys.len(), "{order:?} {size}");
                        if !p.has_next_page {
                            break;
                        }
                        after = Some(encode_cursor(ListKind::Dialogs, p.items.last().unwrap()));
                    }
                    assert_eq!(seen, expected, "{order:?} forwards by {size}");

                    let mut back = Vec::new();
                    let mut before = None;
                    loop {
                        let p = page(
                            &keys,
                            PageArgs {
                                last: Some(size),
                                before: before.clone(),
                                order,
                                ..Default::default()
                            },
                        )
                        .await;
                        assert_eq!(p.has_next_page, before.is_some(), "{order:?} {size}");
                        back.splice(0..0, p.items.iter().cloned());
                        if !p.has_previous_page {
                            break;
                        }
                        before = Some(encode_cursor(ListKind::Dialogs, p.items.first().unwrap()));
                    }
                    assert_eq!(back, expected, "{order:?} backwards by {size}");
                }
            }
        });
    }

    #[test]
    fn an_empty_oldest_first_page_at_a_cursor_counts_the_cursors_own_item() {
        let keys = [key(1, "a"), key(2, "b"), key(3, "c")];
        let at = |k: &SortKey| Some(encode_cursor(ListKind::Dialogs, k));
        run(async {
            // Oldest first: a, b, c. After c (the last) nothing follows, but c itself precedes the page.
            let past = page(
                &keys,
                PageArgs {
                    first: Some(5),
                    after: at(&keys[2]),
                    order: ListOrder::OldestFirst,
                    ..Default::default()
                },
            )
            .await;
            assert!(past.items.is_empty() && past.has_previous_page && !past.has_next_page);
            let middle = page(
                &keys,
                PageArgs {
                    first: Some(1),
                    after: at(&keys[0]),
                    order: ListOrder::OldestFirst,
                    ..Default::default()
                },
            )
            .await;
            assert_eq!(middle.items, [keys[1].clone()]);
            assert!(middle.has_previous_page && middle.has_next_page);
        });
    }

    #[test]
    fn empty_and_zero_size_pages_report_their_neighbours() {
        run(async {
            let empty = page(&[], PageArgs::default()).await;
            assert!(empty.items.is_empty() && !empty.has_next_page && !empty.has_previous_page);
            // An empty page still says whether items lie beyond it.
            let zero = page(
                &[key(1, "a")],
                PageArgs {
                    first: Some(0),
                    ..Default::default()
                },
            )
            .await;
            assert!(zero.items.is_empty() && zero.has_next_page && !zero.has_previous_page);
        });
    }

    #[test]
    fn an_empty_page_at_a_cursor_counts_the_cursors_own_item() {
        let keys = [key(1, "a"), key(2, "b"), key(3, "c")];
        let at = |k: &SortKey| Some(encode_cursor(ListKind::Dialogs, k));
        run(async {
            for (cursor, before_it) in [(&keys[2], true), (&keys[1], true), (&keys[0], true)] {
                let forward = page(
                    &keys,
                    PageArgs {
                        first: Some(0),
                        after: at(cursor),
                        ..Default::default()
                    },
                )
                .await;
                assert!(forward.items.is_empty());
                assert_eq!(forward.has_previous_page, before_it, "after {cursor:?}");
                let backward = page(
                    &keys,
                    PageArgs {
                        last: Some(0),
                        before: at(cursor),
                        ..Default::default()
                    },
                )
                .await;
                assert_eq!(backward.has_next_page, before_it, "before {cursor:?}");
            }
            // Past the end: the last item's cursor still has it before the (empty) next page.
            let past = page(
                &keys,
                PageArgs {
                    first: Some(5),
                    after: at(&keys[0]),
                    ..Default::default()
                },
            )
            .await;
            assert!(past.items.is_empty() && past.has_previous_page && !past.has_next_page);
            // A cursor whose item is gone, with nothing beyond it: nothing lies before the page.
            let gone = page(
                &keys[..2],
                PageArgs {
                    first: Some(0),
                    after: at(&keys[2]),
                    ..Default::default()
                },
            )
            .await;
            assert!(!gone.has_previous_page);
        });
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn decoding_any_string_never_panics_and_accepts_only_its_own_kind(text in ".{0,200}") {
                if let Ok(key) = decode_cursor(ListKind::Dialogs, "after", &text) {
                    // Whatever decodes re-encodes to a cursor that decodes to the same key.
                    let again = encode_cursor(ListKind::Dialogs, &key);
                    prop_assert_eq!(decode_cursor(ListKind::Dialogs, "after", &again).unwrap(), key);
                    prop_assert!(decode_cursor(ListKind::Messages, "after", &text).is_err());
                }
            }

            #[test]
            fn a_mutated_cursor_is_refused_or_decodes_to_some_key_of_its_own_kind(
                at in any::<i64>(),
                id in "[a-z0-9:-]{1,40}",
                position in any::<prop::sample::Index>(),
                replacement in any::<char>(),
            ) {
                let cursor = encode_cursor(ListKind::Dialogs, &SortKey { at, id });
                let mut chars: Vec<char> = cursor.chars().collect();
                let index = position.index(chars.len());
                chars[index] = replacement;
                let mutated: String = chars.into_iter().collect();
                if let Ok(key) = decode_cursor(ListKind::Dialogs, "after", &mutated) {
                    prop_assert!(!key.id.is_empty());
                }
                // Whatever it became, it is never a cursor of the other list.
                prop_assert!(decode_cursor(ListKind::Messages, "after", &mutated).is_err());
            }

            #[test]
            fn decoding_any_bytes_as_base64_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
                let cursor = URL_SAFE_NO_PAD.encode(&bytes);
                let _ = decode_cursor(ListKind::Messages, "before", &cursor);
            }

            #[test]
            fn every_sort_key_round_trips(at in any::<i64>(), id in "\\PC{1,60}") {
                let key = SortKey { at, id };
                for kind in [ListKind::Dialogs, ListKind::Messages] {
                    let cursor = encode_cursor(kind, &key);
                    prop_assert_eq!(&decode_cursor(kind, "after", &cursor).unwrap(), &key);
                }
            }

            #[test]
            fn page_arguments_never_panic(
                first in proptest::option::of(any::<i32>()),
                last in proptest::option::of(any::<i32>()),
                after in proptest::option::of(".{0,40}"),
                before in proptest::option::of(".{0,40}"),
                max in 1usize..5000,
            ) {
                if let Ok(request) = (PageArgs { first, after, last, before, order: ListOrder::default() }).parse(ListKind::Dialogs, max) {
                    prop_assert!(request.size <= max);
                }
            }
        }
    }
}
