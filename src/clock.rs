//! Acceptance order. Every accepted message gets a `seq`: microseconds since the epoch, made strictly
//! increasing within the process, so that messages pushed in the same millisecond keep their order and a
//! restart (later wall-clock time) continues above what was issued before.

use std::sync::atomic::{AtomicI64, Ordering};

#[derive(Debug, Default)]
pub struct Clock {
    last: AtomicI64,
}

impl Clock {
    /// The next acceptance order: the current time in microseconds, or one more than the last one issued.
    pub fn next(&self) -> i64 {
        self.next_after(i64::MIN)
    }

    /// Like [`next`](Self::next), and above `floor` too (an order issued elsewhere, such as by a shared
    /// buffer's clock, that this one must follow).
    pub fn next_after(&self, floor: i64) -> i64 {
        let now = chrono::Utc::now()
            .timestamp_micros()
            .max(floor.saturating_add(1));
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }
}

/// The current time in milliseconds since the epoch, the precision both stores keep.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_strictly_increasing_across_threads() {
        let clock = std::sync::Arc::new(Clock::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let clock = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| clock.next()).collect::<Vec<_>>())
            })
            .collect();
        let per_thread: Vec<Vec<i64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for values in &per_thread {
            assert!(
                values.windows(2).all(|w| w[0] < w[1]),
                "each caller sees increasing values"
            );
        }
        let mut all: Vec<i64> = per_thread.concat();
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), count, "no value is issued twice");
    }
}
