//! How many selections a document stands for once its fragments are spread, counted in time linear in its
//! text, before async-graphql's validation walks it.
//!
//! Validation (and the depth and complexity limits with it) visits a fragment again at every place it is
//! spread. A few hundred bytes of fragments that each spread the previous one four times stand for 4^N
//! fields: the walk would take seconds to forever, on a runtime thread, before any limit could refuse it.
//! Here each fragment is sized once (memoised), so the count costs one pass over the text whatever it
//! expands to, and a document that stands for more selections than the complexity limit is refused first:
//! every field costs at least 1 of complexity, so such a document could never run anyway.

use std::collections::{HashMap, HashSet};

use async_graphql::parser::types::{ExecutableDocument, Selection, SelectionSet};

/// The selections (fields, fragment spreads and inline fragments) a document stands for with every fragment
/// spread where it is used: its operations' and its fragment definitions' (validation visits both),
/// saturating at `u64::MAX`. A fragment that spreads itself, directly or not, counts its cycle once
/// (validation refuses it anyway); a spread of an unknown fragment counts 1.
pub fn expanded_selections(document: &ExecutableDocument) -> u64 {
    let fragments: HashMap<&str, Shape<'_>> = document
        .fragments
        .iter()
        .map(|(name, fragment)| (name.as_str(), Shape::of(&fragment.node.selection_set.node)))
        .collect();
    let sizes = fragment_sizes(&fragments);
    let expanded = |shape: &Shape<'_>| {
        shape.spreads.iter().fold(shape.local, |total, name| {
            total.saturating_add(sizes.get(name).copied().unwrap_or(0))
        })
    };
    let operations = document
        .operations
        .iter()
        .map(|(_, operation)| expanded(&Shape::of(&operation.node.selection_set.node)));
    operations
        .chain(sizes.values().copied())
        .fold(0, u64::saturating_add)
}

/// A selection set without its fragments spread: how many selections it holds at every level, and the
/// fragments it spreads (once per spread).
struct Shape<'a> {
    local: u64,
    spreads: Vec<&'a str>,
}

impl<'a> Shape<'a> {
    /// Walks the set with a stack of its own: the nesting is the client's, the thread's stack is not.
    fn of(set: &'a SelectionSet) -> Self {
        let mut shape = Shape {
            local: 0,
            spreads: Vec::new(),
        };
        let mut pending = vec![set];
        while let Some(set) = pending.pop() {
            for selection in &set.items {
                shape.local += 1;
                match &selection.node {
                    Selection::Field(field) => pending.push(&field.node.selection_set.node),
                    Selection::InlineFragment(fragment) => {
                        pending.push(&fragment.node.selection_set.node)
                    }
                    Selection::FragmentSpread(spread) => {
                        shape.spreads.push(spread.node.fragment_name.node.as_str())
                    }
                }
            }
        }
        shape
    }
}

/// Each fragment's expanded size, each computed once, in dependency order (an explicit stack again: a chain
/// of fragments can be as long as the body allows).
fn fragment_sizes<'a>(fragments: &HashMap<&'a str, Shape<'a>>) -> HashMap<&'a str, u64> {
    let mut sizes: HashMap<&'a str, u64> = HashMap::with_capacity(fragments.len());
    let mut on_path: HashSet<&'a str> = HashSet::new();
    for &root in fragments.keys() {
        if sizes.contains_key(root) {
            continue;
        }
        // (fragment, index of the next spread to resolve)
        let mut stack: Vec<(&'a str, usize)> = vec![(root, 0)];
        on_path.insert(root);
        while let Some((name, next)) = stack.last_mut() {
            let shape = &fragments[*name];
            let unresolved = shape.spreads[*next..].iter().position(|child| {
                fragments.contains_key(child)
                    && !sizes.contains_key(child)
                    && !on_path.contains(child)
            });
            match unresolved {
                Some(offset) => {
                    let child = shape.spreads[*next + offset];
                    *next += offset + 1;
                    on_path.insert(child);
                    stack.push((child, 0));
                }
                None => {
                    // A spread still on the path closes a cycle: it counts as its spread alone.
                    let size = shape.spreads.iter().fold(shape.local, |total, child| {
                        total.saturating_add(sizes.get(child).copied().unwrap_or(0))
                    });
                    let name = *name;
                    sizes.insert(name, size);
                    on_path.remove(name);
                    stack.pop();
                }
            }
        }
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(query: &str) -> u64 {
        expanded_selections(&async_graphql::parser::parse_query(query).unwrap())
    }

    #[test]
    fn counts_fields_at_every_level() {
        assert_eq!(count("{ a b { c d { e } } }"), 5);
        assert_eq!(count("{ a: dialogs { x } b: dialogs { x } }"), 4);
    }

    #[test]
    fn counts_a_fragment_once_per_spread_and_once_as_a_definition() {
        // F = 2 selections; the operation holds 2 spreads of it (2 + 2 * 2), and F itself is validated once.
        assert_eq!(count("{ ...F ...F } fragment F on Query { a b }"), 6 + 2);
        assert_eq!(count("{ ... on Query { a } }"), 2);
    }

    #[test]
    fn a_fragment_bomb_is_counted_without_expanding_it() {
        // Each fragment spreads the previous one four times: 4^40 fields, counted instantly.
        let mut query = String::from("{ ...F40 } fragment F0 on Query { a }");
        for level in 1..=40 {
            let previous = format!("...F{} ", level - 1);
            query += &format!(" fragment F{level} on Query {{ {} }}", previous.repeat(4));
        }
        let started = std::time::Instant::now();
        assert_eq!(count(&query), u64::MAX, "saturates instead of overflowing");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn cycles_and_unknown_fragments_end() {
        // Whichever fragment is sized first, the spread that closes the cycle counts 1: 5 or 6 in all.
        let cycle = count("{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }");
        assert!((5..=6).contains(&cycle), "{cycle}");
        assert_eq!(count("{ ...Missing }"), 1);
    }

    #[test]
    fn a_long_chain_of_fragments_needs_no_deep_stack() {
        let mut query = String::from("{ ...F0 }");
        for level in 0..50_000 {
            query += &format!(" fragment F{level} on Query {{ ...F{} }}", level + 1);
        }
        query += " fragment F50000 on Query { a }";
        let document = async_graphql::parser::parse_query(&query).unwrap();
        // Run on a thread with a small stack, as a recursive count would overflow it.
        let total = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(move || expanded_selections(&document))
            .unwrap()
            .join()
            .unwrap();
        assert!(total > 50_000);
    }
}
