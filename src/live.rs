//! Live updates: the events of GraphQL subscriptions (`messageStored`, `dialogRemoved`), fed by the change
//! feed (see `changes`). Each replica polls the store's change counter while it has subscribers and hands
//! what is new to each subscriber's queue, so every subscriber sees what every replica wrote, in commit
//! order, and a subscriber can resume from a change token after a disconnection without missing anything.
//! The transport (WebSocket, both protocols) is in `websocket`.
//!
//! Bounded: at most MAX_SUBSCRIPTIONS_PER_KEY subscriptions per key, and a subscriber whose queue of
//! [`SUBSCRIBER_BACKLOG`] changes stays full for [`SLOW_SUBSCRIBER_GRACE`] (it does not read its socket) is
//! dropped, and its connection closed with [`SLOW_SUBSCRIBER_CLOSE`], instead of being buffered without
//! limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use futures::Stream;
use tokio::sync::mpsc;

use crate::changes::ChangeToken;
use crate::error::ApiError;
use crate::model::{Change, CustomerId, DecisionEvent, DialogId, Language};
use crate::store::{SharedStore, StoreResult};

/// How often a replica with subscribers looks for new changes: the latency of live updates.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Changes a subscriber may fall behind by before it is disconnected.
pub const SUBSCRIBER_BACKLOG: usize = 1024;

/// How long the feed waits for a subscriber whose queue is full to make room before it drops it: a burst
/// larger than the backlog (one consent of a long dialog) then reaches every subscriber that keeps reading.
pub const SLOW_SUBSCRIBER_GRACE: Duration = Duration::from_secs(2);

/// The WebSocket close code for a subscriber that fell too far behind.
pub const SLOW_SUBSCRIBER_CLOSE: u16 = 4008;

/// Changes read from the store per query, when catching up.
const BATCH: usize = 1_000;

/// What subscribers hear about: the changes of the feed, and the decision events numbered with them.
#[derive(Clone, Debug, PartialEq)]
pub enum LiveEvent {
    Change(Change),
    Decided(DecisionEvent),
}

impl LiveEvent {
    pub fn number(&self) -> i64 {
        match self {
            Self::Change(change) => change.number(),
            Self::Decided(event) => event.number,
        }
    }
}

/// The events numbered in `(after, through]`, in number order, up to a batch of each kind; and the
/// position they cover (`through`, or less when a batch was full).
async fn read_events(
    store: &SharedStore,
    after: i64,
    through: i64,
) -> StoreResult<(Vec<LiveEvent>, i64)> {
    let changes = store.scan_changes(after, through, BATCH).await?;
    let decisions = store.scan_decisions(after, through, BATCH).await?;
    let mut covered = through;
    if let Some(last) = changes.last().filter(|_| changes.len() == BATCH) {
        covered = covered.min(last.number());
    }
    if let Some(last) = decisions.last().filter(|_| decisions.len() == BATCH) {
        covered = covered.min(last.number);
    }
    let mut events: Vec<LiveEvent> = changes
        .into_iter()
        .map(LiveEvent::Change)
        .chain(decisions.into_iter().map(LiveEvent::Decided))
        .filter(|event| event.number() <= covered)
        .collect();
    events.sort_by_key(LiveEvent::number);
    Ok((events, covered))
}

/// The changes of this replica's subscribers: one poller, and a bounded queue per subscriber.
pub struct LiveFeed {
    store: SharedStore,
    /// The last change handed out, and who listens; the position is `None` while nobody does (the
    /// poller then reads nothing).
    listeners: tokio::sync::Mutex<(Option<i64>, Vec<Listener>)>,
    /// Subscriptions open per caller (a key's name).
    open: Mutex<HashMap<String, usize>>,
    /// Set when the service shuts down: connections close instead of holding the shutdown up.
    stopping: tokio::sync::watch::Sender<bool>,
}

/// One subscription's queue, as the poller holds it.
struct Listener {
    sender: mpsc::Sender<Arc<LiveEvent>>,
    /// Set when the poller dropped it for not making room in time.
    too_slow: Arc<AtomicBool>,
}

impl LiveFeed {
    pub fn new(store: SharedStore) -> Arc<Self> {
        Arc::new(Self {
            store,
            listeners: tokio::sync::Mutex::new((None, Vec::new())),
            open: Mutex::default(),
            stopping: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Tells every connection of subscribers to close.
    pub fn shut_down(&self) {
        self.stopping.send_replace(true);
    }

    /// Completes once [`shut_down`](Self::shut_down) was called.
    pub fn shutting_down(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            if stopping.wait_for(|stopping| *stopping).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Polls for new changes every [`POLL_INTERVAL`] until the feed is dropped elsewhere.
    pub fn spawn_poller(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let feed = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(POLL_INTERVAL);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(feed) = feed.upgrade() else { return };
                if let Err(error) = feed.poll().await {
                    tracing::warn!(%error, "live updates: cannot read the change feed; trying again");
                }
            }
        })
    }

    /// Hands the changes committed since the last poll to every listener, if there are any. (Subscriptions
    /// that start meanwhile wait for the poll: at most [`SLOW_SUBSCRIBER_GRACE`] longer when a listener is
    /// being dropped for being slow.)
    async fn poll(&self) -> StoreResult<()> {
        let mut guard = self.listeners.lock().await;
        let (position, listeners) = &mut *guard;
        listeners.retain(|listener| !listener.sender.is_closed());
        if listeners.is_empty() {
            *position = None;
            return Ok(());
        }
        let Some(mut after) = *position else {
            return Ok(());
        };
        let through = self.store.last_change().await?;
        while after < through && !listeners.is_empty() {
            let (batch, next) = read_events(&self.store, after, through).await?;
            for change in batch {
                let change = Arc::new(change);
                let mut kept = Vec::with_capacity(listeners.len());
                for listener in listeners.drain(..) {
                    if deliver(&listener, change.clone()).await {
                        kept.push(listener);
                    }
                }
                *listeners = kept;
            }
            after = next;
            *position = Some(after);
        }
        *position = Some(through.max(after));
        Ok(())
    }

    /// Starts listening: the queue, the flag set if it is dropped for being slow, and the last change
    /// before what it will receive.
    async fn join(
        &self,
    ) -> Result<(mpsc::Receiver<Arc<LiveEvent>>, Arc<AtomicBool>, i64), ApiError> {
        let mut guard = self.listeners.lock().await;
        let (position, listeners) = &mut *guard;
        let after = match *position {
            Some(after) => after,
            None => {
                let last = self.store.last_change().await?;
                *position = Some(last);
                last
            }
        };
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_BACKLOG);
        let too_slow = Arc::new(AtomicBool::new(false));
        listeners.push(Listener {
            sender,
            too_slow: too_slow.clone(),
        });
        Ok((receiver, too_slow, after))
    }

    /// Counts a subscription of `caller` for as long as the returned slot lives; refused past `max`.
    pub fn reserve(self: &Arc<Self>, caller: &str, max: usize) -> Result<Slot, ApiError> {
        let mut open = self
            .open
            .lock()
            .expect("the subscription counts are never poisoned");
        let count = open.entry(caller.to_owned()).or_default();
        if *count >= max {
            return Err(ApiError::TooManySubscriptions { max });
        }
        *count += 1;
        Ok(Slot {
            feed: self.clone(),
            caller: caller.to_owned(),
        })
    }

    /// Subscriptions open now, over all callers (for tests and metrics).
    pub fn open_subscriptions(&self) -> usize {
        self.open
            .lock()
            .expect("the subscription counts are never poisoned")
            .values()
            .sum()
    }
}

/// Queues `change` for `listener`, waiting up to [`SLOW_SUBSCRIBER_GRACE`] for room. False: the listener is
/// gone, or too slow and now dropped (its subscription ends with `SUBSCRIBER_TOO_SLOW`).
async fn deliver(listener: &Listener, change: Arc<LiveEvent>) -> bool {
    match listener.sender.try_send(change) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Closed(_)) => false,
        Err(mpsc::error::TrySendError::Full(change)) => {
            match listener
                .sender
                .send_timeout(change, SLOW_SUBSCRIBER_GRACE)
                .await
            {
                Ok(()) => true,
                Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
                Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                    listener.too_slow.store(true, Ordering::SeqCst);
                    false
                }
            }
        }
    }
}

/// One open subscription, counted against its caller's bound until dropped.
pub struct Slot {
    feed: Arc<LiveFeed>,
    caller: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.feed.open.lock()
            && let Some(count) = open.get_mut(&self.caller)
        {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

/// Asks the transport to close a subscriber's connection, with a code and a reason.
#[derive(Default)]
pub struct CloseSignal {
    reason: OnceLock<(u16, String)>,
    notify: tokio::sync::Notify,
}

impl CloseSignal {
    pub fn close(&self, code: u16, reason: String) {
        let _ = self.reason.set((code, reason));
        self.notify.notify_one();
    }

    /// Waits until `close` was called; its code and reason.
    pub async fn closed(&self) -> (u16, String) {
        loop {
            if let Some(reason) = self.reason.get() {
                return reason.clone();
            }
            self.notify.notified().await;
        }
    }
}

/// Which changes a subscription wants.
#[derive(Clone, Debug, Default)]
pub enum Interest {
    /// Stored messages, with these filters (set fields combine with AND).
    Messages {
        language: Option<Language>,
        customer_id: Option<CustomerId>,
        dialog_id: Option<DialogId>,
    },
    /// Dialogs removed whole.
    #[default]
    Removals,
    /// Consent decisions that changed a dialog's decision.
    Decisions,
}

impl Interest {
    fn wants(&self, event: &LiveEvent) -> bool {
        let change = match (self, event) {
            (Self::Decisions, LiveEvent::Decided(_)) => return true,
            (_, LiveEvent::Decided(_)) | (Self::Decisions, _) => return false,
            (_, LiveEvent::Change(change)) => change,
        };
        match (self, change) {
            (
                Self::Messages {
                    language,
                    customer_id,
                    dialog_id,
                },
                Change::Stored { message, .. },
            ) => {
                language.as_ref().is_none_or(|l| *l == message.language)
                    && customer_id
                        .as_ref()
                        .is_none_or(|c| *c == message.customer_id)
                    && dialog_id.as_ref().is_none_or(|d| *d == message.dialog_id)
            }
            (Self::Removals, Change::Removed { .. }) => true,
            _ => false,
        }
    }
}

/// Where a subscription's stream stands.
enum Phase {
    /// Reading what was committed between the client's token and joining the live feed.
    CatchingUp {
        through: i64,
    },
    Live,
    Ended,
}

struct Subscription {
    feed: Arc<LiveFeed>,
    receiver: mpsc::Receiver<Arc<LiveEvent>>,
    too_slow: Arc<AtomicBool>,
    interest: Interest,
    phase: Phase,
    /// The last change this subscriber has been given or skipped.
    last: i64,
    ready: std::collections::VecDeque<LiveEvent>,
    close: Option<Arc<CloseSignal>>,
    _slot: Slot,
}

/// The changes `interest` names: those after `after` (resuming from a token), or from now on; in commit
/// order, each once. Ends with an error when the subscriber fell [`SUBSCRIBER_BACKLOG`] changes behind, and
/// asks `close` to close its connection.
pub async fn subscribe(
    feed: Arc<LiveFeed>,
    interest: Interest,
    after: Option<ChangeToken>,
    slot: Slot,
    close: Option<Arc<CloseSignal>>,
) -> Result<impl Stream<Item = Result<LiveEvent, ApiError>>, ApiError> {
    let (receiver, too_slow, joined_after) = feed.join().await?;
    let (phase, last) = match after {
        Some(after) => {
            crate::changes::check_not_ahead("after", after, joined_after)?;
            (
                Phase::CatchingUp {
                    through: joined_after,
                },
                after.0,
            )
        }
        None => (Phase::Live, joined_after),
    };
    let state = Subscription {
        feed,
        receiver,
        too_slow,
        interest,
        phase,
        last,
        ready: Default::default(),
        close,
        _slot: slot,
    };
    Ok(futures::stream::unfold(state, |mut state| async move {
        let item = state.next().await?;
        Some((item, state))
    }))
}

impl Subscription {
    async fn next(&mut self) -> Option<Result<LiveEvent, ApiError>> {
        loop {
            if let Some(change) = self.ready.pop_front() {
                return Some(Ok(change));
            }
            match self.phase {
                Phase::Ended => return None,
                Phase::CatchingUp { through } => {
                    if self.last >= through {
                        self.phase = Phase::Live;
                        continue;
                    }
                    let batch = match read_events(&self.feed.store, self.last, through).await {
                        Ok((batch, covered)) => {
                            self.last = covered;
                            batch
                        }
                        Err(error) => {
                            self.phase = Phase::Ended;
                            return Some(Err(ApiError::StoreUnavailable(error)));
                        }
                    };
                    let interest = &self.interest;
                    self.ready
                        .extend(batch.into_iter().filter(|change| interest.wants(change)));
                }
                Phase::Live => match self.receiver.recv().await {
                    Some(change) => {
                        if change.number() > self.last {
                            self.last = change.number();
                            if self.interest.wants(&change) {
                                return Some(Ok(LiveEvent::clone(&change)));
                            }
                        }
                    }
                    None if self.too_slow.load(Ordering::SeqCst) => {
                        self.phase = Phase::Ended;
                        let error = ApiError::SubscriberTooSlow {
                            last: ChangeToken(self.last),
                        };
                        if let Some(close) = &self.close {
                            // A close frame's reason holds at most 123 bytes.
                            let reason = format!(
                                "too slow: fell {SUBSCRIBER_BACKLOG} changes behind; resume with after={}",
                                self.last
                            );
                            close.close(SLOW_SUBSCRIBER_CLOSE, reason);
                        }
                        return Some(Err(error));
                    }
                    None => return None,
                },
            }
        }
    }
}
