//! The consent rules, between the buffer and the store. Transport-free: the GraphQL layer only parses
//! inputs and calls these methods; the service does not care which buffer it has.
//!
//! - A message of an undecided dialog waits in the buffer (`BUFFERED`), costing no database call when the
//!   dialog is already buffered.
//! - Consent `true` writes the buffered messages and the decision in one store transaction, then drops them
//!   from the buffer; if the write fails they stay buffered and the caller retries.
//! - Consent `false` records the decision, deletes anything stored earlier, and drops the buffer.
//! - Messages of decided dialogs go straight to the store (`STORED`) or nowhere (`DISCARDED`).
//!
//! The slow paths (a dialog's first message, a decision) of one dialog are serialised by a per-dialog lock in
//! this process; a decision is also exclusive across replicas (the buffer's decision lease), and a first
//! message that raced a decision of another replica is handed back by the buffer to look the decision up
//! again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::buffer::{DecisionLease, DialogPush, Dropped, PushOutcome, SharedBuffer};
use crate::changes::{ChangePage, ChangeToken};
use crate::clock::now_millis;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::model::{
    AuditKey, ConsentHistory, ConsentRecord, CustomerId, Dialog, DialogId, Erased, ErasureAudit,
    IncomingMessage, Message, MessageFate,
};
use crate::paging::{Page, PageRequest, fetch_page};
use crate::store::{
    Appended, Decision, DialogFilter, MessageFilter, SharedStore, StoreError, dialog_key,
    message_key,
};

/// A pushed message as recorded, and what happened to it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pushed {
    pub message: Message,
    pub fate: MessageFate,
}

/// What a consent decision did.
#[derive(Clone, Debug, PartialEq)]
pub struct ConsentOutcome {
    pub record: ConsentRecord,
    /// Buffered messages written to the store by this call.
    pub stored: u64,
    /// Buffered messages dropped by this call.
    pub discarded: u64,
    /// Previously stored messages deleted by this call (consent withdrawn).
    pub deleted: u64,
}

/// How many times a first message may find its dialog decided by another replica in the middle of its
/// look-up before it gives up with `BUFFER_UNAVAILABLE` (each time it looks the decision up again).
const MAX_OPEN_ROUNDS: usize = 4;

pub struct DialogService {
    store: SharedStore,
    buffer: SharedBuffer,
    locks: DialogLocks,
    /// How many decisions this process has written, bumped after each write and before its dialog's lock
    /// is released: a "no decision" read before a bump may be stale (see [`Undecided`]).
    decisions_written: AtomicU64,
    metrics: Arc<Metrics>,
    /// Keys the customer digests of erasure audit records.
    audit_key: AuditKey,
    /// The erasures running in this process, by customer: a second call waits for the first.
    erasures: std::sync::Mutex<HashMap<CustomerId, ErasureTask>>,
    /// About how many stored messages one erasure batch deletes (one store transaction).
    erasure_batch_messages: usize,
    /// The runtime the service was made on, where erasures run: not the heavy lane (see `execution`),
    /// which may get no CPU time while the cores are busy, whereas an erasure holds up every decision at
    /// its end.
    runtime: Option<tokio::runtime::Handle>,
    /// What subscribers hear about: the change feed, polled while anyone listens.
    live: Arc<crate::live::LiveFeed>,
}

/// The outcome of an erasure running in a task of its own, for every caller waiting for it.
type ErasureTask = Shared<BoxFuture<'static, Result<Erased, ApiError>>>;

/// Removes a finished erasure from [`DialogService::erasures`].
struct ForgetErasure(Arc<DialogService>, CustomerId);

impl Drop for ForgetErasure {
    fn drop(&mut self) {
        if let Ok(mut running) = self.0.erasures.lock() {
            running.remove(&self.1);
        }
    }
}

/// The default of [`DialogService::with_erasure_batch_messages`].
pub const ERASURE_BATCH_MESSAGES: usize = 5_000;

/// Dialogs that one look-up for a whole batch found without a decision, and the decision count when it
/// started. Trusted only while that count is unchanged: then no decision of this process can have slipped
/// in between, just as if each dialog had been looked up under its lock. (A decision of another replica is
/// caught by the buffer, which hands the messages back instead of opening a dialog decided meanwhile.)
struct Undecided {
    dialogs: HashSet<DialogId>,
    as_of: u64,
}

/// Messages of one dialog within a push request that the buffer handed back, with their places in the
/// request.
struct Group {
    dialog_id: DialogId,
    places: Vec<usize>,
    messages: Vec<IncomingMessage>,
    /// When the buffer found the dialog not buffered ([`PushOutcome::checked_at`]).
    checked_at: i64,
}

/// Why a decision is being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// A client's `giveConsent`.
    Client,
    /// The sweeper finishing a decision that is already in the store (its writer went away half-way, or
    /// messages reached the buffer after it).
    Recovery,
}

impl DialogService {
    pub fn new(
        store: SharedStore,
        buffer: SharedBuffer,
        metrics: Arc<Metrics>,
        audit_key: AuditKey,
    ) -> Self {
        let store_for_live = store.clone();
        Self {
            store,
            buffer,
            locks: DialogLocks::default(),
            decisions_written: AtomicU64::new(0),
            metrics,
            audit_key,
            erasures: std::sync::Mutex::default(),
            erasure_batch_messages: ERASURE_BATCH_MESSAGES,
            runtime: tokio::runtime::Handle::try_current().ok(),
            live: crate::live::LiveFeed::new(store_for_live),
        }
    }

    /// The live updates of subscriptions.
    pub fn live(&self) -> &Arc<crate::live::LiveFeed> {
        &self.live
    }

    /// About how many stored messages one erasure batch deletes, in one store transaction that must end
    /// within `STORE_TIMEOUT`.
    pub fn with_erasure_batch_messages(mut self, messages: usize) -> Self {
        self.erasure_batch_messages = messages.max(1);
        self
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    pub fn buffer(&self) -> &SharedBuffer {
        &self.buffer
    }

    /// One pass of the retention sweeper: drops undecided dialogs older than the retention period, and
    /// finishes decisions that their writer left half-done (the store says what was decided). Returns what
    /// was dropped. With a shared buffer, only one replica at a time sweeps.
    pub async fn sweep(&self, period: Duration) -> Dropped {
        if !self.buffer.claim_sweep(period).await {
            return Dropped::default();
        }
        let due = match self.buffer.due().await {
            Ok(due) => due,
            Err(error) => {
                tracing::warn!(%error, "retention sweep: the buffer does not answer");
                return Dropped::default();
            }
        };
        if due.expired.is_empty() && due.abandoned.is_empty() {
            return Dropped::default();
        }
        let candidates: Vec<DialogId> = due.expired.iter().chain(&due.abandoned).cloned().collect();
        // The store says which of them have a decision. Without it, abandoned decisions wait for the next
        // sweep, but expired dialogs are dropped all the same: the retention period is a promise.
        let decided: Option<HashMap<DialogId, bool>> = match self.store.consents(&candidates).await
        {
            Ok(records) => Some(
                records
                    .into_iter()
                    .map(|record| (record.dialog_id, record.value))
                    .collect(),
            ),
            Err(error) => {
                tracing::warn!(%error, "retention sweep: cannot look decisions up");
                None
            }
        };
        let mut undecided = Vec::new();
        for dialog_id in due.expired {
            match decided.as_ref().and_then(|decided| decided.get(&dialog_id)) {
                Some(_) => self.recover(dialog_id).await,
                None => undecided.push(dialog_id),
            }
        }
        if decided.is_some() {
            for dialog_id in due.abandoned {
                self.recover(dialog_id).await;
            }
        }
        let dropped = match self.buffer.expire(&undecided).await {
            Ok(dropped) => dropped,
            Err(error) => {
                tracing::warn!(%error, "retention sweep: the buffer does not answer");
                return Dropped::default();
            }
        };
        if dropped.dialogs > 0 {
            self.metrics.expired_dialogs.inc_by(dropped.dialogs as u64);
            self.metrics
                .expired_messages
                .inc_by(dropped.messages as u64);
            tracing::info!(
                dialogs = dropped.dialogs,
                messages = dropped.messages,
                "discarded undecided dialogs older than BUFFER_TTL"
            );
        }
        dropped
    }

    /// Finishes what the store says was decided for a dialog still in the buffer, read under the dialog's
    /// lease (so that no decision can change it meanwhile): `true` stores what is buffered, `false` drops
    /// it. No decision at all: one was never written, and the dialog goes back to waiting for one; or, if a
    /// decision `true` had sealed it, the decision was erased since, and so are its last messages.
    async fn recover(&self, dialog_id: DialogId) {
        let outcome = async {
            let _lock = self.locks.lock(&dialog_id).await;
            let _written = CountOnDrop(&self.decisions_written);
            let mut lease = self.buffer.begin_decision(&dialog_id).await?;
            let outcome = match self.store.consent(&dialog_id).await {
                Ok(Some(record)) => self
                    .decide_leased(&mut lease, record.value, Origin::Recovery)
                    .await
                    .map(|outcome| (Some(record.value), outcome.stored, outcome.discarded)),
                Ok(None) if lease.buffered.as_ref().is_some_and(|b| b.sealed) => self
                    .buffer
                    .discard(&lease)
                    .await
                    .map(|discarded| (None, 0, discarded as u64))
                    .map_err(ApiError::from),
                Ok(None) => Ok((None, 0, 0)),
                Err(error) => Err(error.into()),
            };
            self.buffer
                .end_decision(lease, settled(&outcome.as_ref().map(drop)))
                .await;
            outcome
        };
        match outcome.await {
            Ok((decision, stored, discarded)) => tracing::info!(
                dialog = %dialog_id,
                ?decision,
                stored,
                discarded,
                "finished a decision left half-done in the buffer"
            ),
            Err(error) => tracing::warn!(
                dialog = %dialog_id,
                code = error.code(),
                "could not finish a decision left half-done; the next sweep tries again"
            ),
        }
    }

    /// Runs [`sweep`](Self::sweep) every `period` until the task is aborted.
    pub fn spawn_sweeper(self: &Arc<Self>, period: Duration) -> tokio::task::JoinHandle<()> {
        self.spawn_every(period, move |service| async move {
            service.sweep(period).await;
        })
    }

    /// Runs `work` now and then every `period` until the task is aborted or the service is dropped (the
    /// task holds it weakly, so that it does not keep the service alive).
    fn spawn_every<F, Fut>(
        self: &Arc<Self>,
        period: Duration,
        work: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Arc<Self>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match service.upgrade() {
                    Some(service) => work(service).await,
                    None => return,
                }
            }
        })
    }

    /// Erases everything of a customer: buffered messages, stored dialogs and messages, consent records.
    /// Leaves an audit record of the erasure (counts and the customer's digest, no content).
    /// `erased_by` names the caller in the audit record (see [`ErasureAudit`]).
    ///
    /// The erasure runs in a task of its own, in batches of whole dialogs: a caller that gives up (its
    /// request timed out, its client went away) leaves it running, a second call for the same customer
    /// waits for the same erasure, and one cut short by a crash is resumed ([`resume_erasures`](Self::resume_erasures)).
    pub async fn erase_customer(
        self: &Arc<Self>,
        customer_id: CustomerId,
        erased_by: String,
    ) -> Result<Erased, ApiError> {
        self.erasure_of(customer_id, Some(erased_by)).await
    }

    /// The running erasure of `customer_id` in this process, or a new one. `erased_by`: `None` resumes an
    /// erasure the store has begun (its record names who asked for it).
    fn erasure_of(
        self: &Arc<Self>,
        customer_id: CustomerId,
        erased_by: Option<String>,
    ) -> ErasureTask {
        let mut running = self
            .erasures
            .lock()
            .expect("the erasure list is never poisoned");
        if let Some(task) = running.get(&customer_id) {
            return task.clone();
        }
        let service = self.clone();
        let customer = customer_id.clone();
        let erasure = async move {
            // Forgotten however the task ends, so that a later call starts afresh.
            let _forget = ForgetErasure(service.clone(), customer.clone());
            let outcome = service.run_erasure(&customer, erased_by).await;
            if let Err(error) = &outcome {
                tracing::warn!(
                    code = error.code(),
                    "an erasure stopped before it finished; it is resumed later"
                );
            }
            outcome
        };
        let handle = match &self.runtime {
            Some(runtime) => runtime.spawn(erasure),
            None => tokio::spawn(erasure),
        };
        let task = async move {
            handle.await.unwrap_or_else(|error| {
                Err(ApiError::StoreUnavailable(StoreError(format!(
                    "the erasure task stopped before it finished ({error})"
                ))))
            })
        }
        .boxed()
        .shared();
        running.insert(customer_id, task.clone());
        task
    }

    async fn run_erasure(
        &self,
        customer_id: &CustomerId,
        erased_by: Option<String>,
    ) -> Result<Erased, ApiError> {
        if let Some(erased_by) = erased_by {
            let audit = ErasureAudit {
                at: now_millis(),
                buffered_messages: 0,
                customer_digest: self.audit_key.digest(customer_id),
                digest_scheme: AuditKey::SCHEME.to_owned(),
                erased_by,
            };
            // Recorded first: from here on, any replica can finish it. Resuming (no `erased_by`) only joins
            // a begun erasure: its batches find no record if it finished meanwhile.
            self.store.begin_erasure(customer_id, &audit).await?;
        }
        // Most of the data goes without holding up anyone's decisions; each batch takes whole dialogs, so
        // a reader never sees a dialog with part of its messages.
        if !self.erase_batches(customer_id).await? {
            return Ok(Erased::default());
        }
        // No decision runs meanwhile, on any replica: none can write the customer's data after this. What
        // the decisions that were running wrote is in the store now, and goes too.
        let _exclusive = self.buffer.enter_erasure_gate().await?;
        if !self.erase_batches(customer_id).await? {
            return Ok(Erased::default());
        }
        // The buffer is emptied while the erasure is still recorded as running, so that a failure on the
        // way leaves it to be resumed, never finished with the customer's messages still buffered (where a
        // consent would store them). Its count is noted first: a resumed erasure finds fewer, or none.
        let buffered = self.buffer.count_customer(customer_id).await?;
        if !self
            .store
            .note_buffered_messages(customer_id, buffered.messages as u64)
            .await?
        {
            return Ok(Erased::default());
        }
        self.buffer.discard_customer(customer_id).await?;
        let Some(erased) = self.store.finish_erasure(customer_id, now_millis()).await? else {
            return Ok(Erased::default());
        };
        tracing::info!(
            dialogs = erased.dialogs,
            messages = erased.messages,
            consents = erased.consents,
            buffered_messages = erased.buffered_messages,
            "erased a customer's data"
        );
        Ok(erased)
    }

    /// Erases batches until none is left: true. False when another caller finished the erasure.
    async fn erase_batches(&self, customer_id: &CustomerId) -> Result<bool, ApiError> {
        loop {
            match self
                .store
                .erase_batch(customer_id, self.erasure_batch_messages)
                .await?
            {
                None => return Ok(false),
                Some(batch) if batch == Erased::default() => return Ok(true),
                Some(_) => {}
            }
        }
    }

    /// Resumes the erasures the store holds as begun and not finished, in tasks of their own: at startup,
    /// and then periodically. With a shared buffer other replicas may be running some of them: only those
    /// whose last batch is older than `stale_after` are taken over (running one twice is safe, only wasted).
    pub async fn resume_erasures(self: &Arc<Self>, stale_after: Duration) {
        let unfinished = match self.store.unfinished_erasures().await {
            Ok(unfinished) => unfinished,
            Err(error) => {
                tracing::warn!(%error, "cannot look up unfinished erasures; trying again later");
                return;
            }
        };
        let stale_before = now_millis() - stale_after.as_millis() as i64;
        for (customer_id, last_batch_at) in unfinished {
            let running_here = self
                .erasures
                .lock()
                .expect("the erasure list is never poisoned")
                .contains_key(&customer_id);
            if running_here || (self.buffer.is_shared() && last_batch_at > stale_before) {
                continue;
            }
            tracing::info!("resuming an erasure that was begun and not finished");
            // Runs in its own task; its outcome is logged there.
            drop(self.erasure_of(customer_id, None));
        }
    }

    /// Runs [`resume_erasures`](Self::resume_erasures) now and every `period` until the task is aborted.
    pub fn spawn_erasure_resumer(
        self: &Arc<Self>,
        period: Duration,
        stale_after: Duration,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_every(period, move |service| async move {
            service.resume_erasures(stale_after).await;
        })
    }

    /// The recorded decision of a dialog and its changes, for audits.
    pub async fn consent_history(
        &self,
        dialog_id: &DialogId,
    ) -> Result<Option<ConsentHistory>, ApiError> {
        Ok(self.store.consent_history(dialog_id).await?)
    }

    pub async fn push(&self, incoming: IncomingMessage) -> Result<Pushed, ApiError> {
        // push_many's bookkeeping of places and groups, without the groups.
        let push = DialogPush {
            dialog_id: incoming.dialog_id.clone(),
            messages: vec![incoming],
            looked_up_after: 0,
        };
        let mut outcome = self
            .buffer
            .push_if_buffered(vec![push])
            .await?
            .pop()
            .unwrap_or_default();
        if let Some(result) = outcome.pushed.pop() {
            return result.map(|buffered| Pushed::buffered(buffered.message()));
        }
        let group = Group {
            dialog_id: outcome
                .handed_back
                .first()
                .map(|incoming| incoming.dialog_id.clone())
                .ok_or_else(|| {
                    ApiError::BufferUnavailable(crate::buffer::BufferError(
                        "the buffer lost a message".to_owned(),
                    ))
                })?,
            places: vec![0],
            messages: outcome.handed_back,
            checked_at: outcome.checked_at,
        };
        self.push_slow(group)
            .await
            .pop()
            .map(|(_, result)| result)
            .expect("one result per message")
    }

    /// Pushes messages, each exactly as [`push`](Self::push) would, with one result each, in order; a
    /// dialog's messages are recorded in the order given. The messages of dialogs already buffered cost one
    /// buffer call for the whole request; the dialogs not buffered yet have their decisions looked up in one
    /// store call and are opened in one more buffer call, not one call each.
    pub async fn push_many(
        &self,
        incomings: Vec<IncomingMessage>,
    ) -> Vec<Result<Pushed, ApiError>> {
        let count = incomings.len();
        let (places, pushes): (Vec<Vec<usize>>, Vec<DialogPush>) =
            group_by_dialog(incomings).into_iter().unzip();
        // Hot path: dialogs that are buffered already.
        let outcomes = match self.buffer.push_if_buffered(pushes).await {
            Ok(outcomes) => outcomes,
            Err(error) => return vec![Err(ApiError::from(error)); count],
        };
        let mut recorded = Vec::with_capacity(count);
        let slow: Vec<Group> = places
            .into_iter()
            .zip(outcomes)
            .filter_map(|(places, outcome)| record_pushed(&mut recorded, places, outcome))
            .collect();
        if !slow.is_empty() {
            let undecided = self.undecided_among(&slow).await;
            let (opening, others): (Vec<Group>, Vec<Group>) = match &undecided {
                Some(undecided) => slow
                    .into_iter()
                    .partition(|group| undecided.dialogs.contains(&group.dialog_id)),
                None => (Vec::new(), slow),
            };
            // Dialogs are independent: the undecided ones open together while the others (decided, or
            // looked up alone) take the per-dialog path, each under its own lock.
            let (left, others) = futures::join!(
                async {
                    match &undecided {
                        Some(undecided) => {
                            self.open_undecided(opening, undecided, &mut recorded).await
                        }
                        None => opening,
                    }
                },
                futures::future::join_all(others.into_iter().map(|group| self.push_slow(group)))
            );
            recorded.extend(others.into_iter().flatten());
            // Dialogs the batch could not open together look their decisions up again, one by one.
            let left = left.into_iter().map(|group| self.push_slow(group));
            recorded.extend(futures::future::join_all(left).await.into_iter().flatten());
        }
        let mut results: Vec<Option<Result<Pushed, ApiError>>> = (0..count).map(|_| None).collect();
        for (place, result) in recorded {
            results[place] = Some(result);
        }
        results
            .into_iter()
            .map(|result| result.expect("every message has a result"))
            .collect()
    }

    /// The decisions of the dialogs of `groups`, looked up in one store call when there are several.
    async fn undecided_among(&self, groups: &[Group]) -> Option<Undecided> {
        if groups.len() < 2 {
            return None;
        }
        let dialogs: Vec<DialogId> = groups.iter().map(|group| group.dialog_id.clone()).collect();
        let as_of = self.decisions_written.load(Ordering::Acquire);
        // If this fails, each dialog looks its decision up alone, and reports its own error.
        let decided: HashSet<DialogId> = self
            .store
            .consents(&dialogs)
            .await
            .ok()?
            .into_iter()
            .map(|record| record.dialog_id)
            .collect();
        Some(Undecided {
            dialogs: dialogs
                .into_iter()
                .filter(|dialog| !decided.contains(dialog))
                .collect(),
            as_of,
        })
    }

    /// Opens, in one buffer call, the dialogs of `groups` (all found undecided by the batch's look-up),
    /// each under its lock. A lock held by someone else (a decision, another push) is not waited for: that
    /// dialog is returned, with any the buffer handed back (decided by another replica meanwhile), or all
    /// of them if a decision of this process may have slipped in since the look-up; the caller sends them
    /// down the per-dialog path, which looks the decision up again.
    async fn open_undecided(
        &self,
        groups: Vec<Group>,
        undecided: &Undecided,
        results: &mut Vec<(usize, Result<Pushed, ApiError>)>,
    ) -> Vec<Group> {
        let mut locks = Vec::with_capacity(groups.len());
        let (mut opening, mut left) = (Vec::with_capacity(groups.len()), Vec::new());
        for group in groups {
            match self.locks.try_lock(&group.dialog_id) {
                Some(lock) => {
                    locks.push(lock);
                    opening.push(group);
                }
                None => left.push(group),
            }
        }
        if opening.is_empty() || undecided.as_of != self.decisions_written.load(Ordering::Acquire) {
            left.append(&mut opening);
            return left;
        }
        let (places, pushes): (Vec<Vec<usize>>, Vec<DialogPush>) = opening
            .into_iter()
            .map(|group| {
                let push = DialogPush {
                    dialog_id: group.dialog_id,
                    messages: group.messages,
                    // Every look-up happened after the buffer's check that handed the messages back.
                    looked_up_after: group.checked_at,
                };
                (group.places, push)
            })
            .unzip();
        match self.buffer.open(pushes).await {
            Ok(outcomes) => left.extend(
                places
                    .into_iter()
                    .zip(outcomes)
                    .filter_map(|(places, outcome)| record_pushed(results, places, outcome)),
            ),
            Err(error) => {
                let error = ApiError::from(error);
                results.extend(
                    places
                        .iter()
                        .flatten()
                        .map(|&place| (place, Err(error.clone()))),
                );
            }
        }
        left
    }

    /// The messages of one dialog that is not buffered: under the dialog's lock, look its decision up and
    /// open it in the buffer (which appends, if another push opened it meanwhile), or store or discard
    /// them as the decision says.
    async fn push_slow(&self, group: Group) -> Vec<(usize, Result<Pushed, ApiError>)> {
        let mut results = Vec::with_capacity(group.places.len());
        let Group {
            dialog_id,
            mut places,
            mut messages,
            // Every look-up below happens after this: the buffer's check of the dialog that handed the
            // messages back.
            checked_at: mut looked_up_after,
        } = group;
        let _lock = self.locks.lock(&dialog_id).await;
        for _ in 0..MAX_OPEN_ROUNDS {
            let consent = match self.store.consent(&dialog_id).await {
                Ok(consent) => consent,
                Err(error) => return fill(results, &places, &error.into()),
            };
            if let Some(consent) = consent {
                for (place, incoming) in places.into_iter().zip(messages) {
                    results.push((place, self.push_decided(incoming, &consent).await));
                }
                return results;
            }
            let push = DialogPush {
                dialog_id: dialog_id.clone(),
                messages,
                looked_up_after,
            };
            let outcome = match self.buffer.open(vec![push]).await {
                Ok(mut outcomes) => outcomes.pop().unwrap_or_default(),
                Err(error) => return fill(results, &places, &error.into()),
            };
            let Some(rest) = record_pushed(&mut results, places, outcome) else {
                return results;
            };
            // Decided meanwhile, by another replica or before this one took the lock: look again.
            (places, messages, looked_up_after) = (rest.places, rest.messages, rest.checked_at);
        }
        let error = ApiError::BufferUnavailable(crate::buffer::BufferError(format!(
            "dialog `{dialog_id}` kept being decided elsewhere while its first message was pushed"
        )));
        fill(results, &places, &error)
    }

    /// One message of a dialog whose decision is recorded: stored, or discarded.
    async fn push_decided(
        &self,
        incoming: IncomingMessage,
        consent: &ConsentRecord,
    ) -> Result<Pushed, ApiError> {
        if consent.customer_id != incoming.customer_id {
            return Err(ApiError::CustomerMismatch {
                dialog_id: incoming.dialog_id.to_string(),
            });
        }
        let message = Message::accept(incoming.clone(), self.buffer.next_seq());
        if !consent.value {
            return Ok(Pushed {
                message,
                fate: MessageFate::Discarded,
            });
        }
        match self.store.append_consented(&message).await? {
            Appended::Stored {
                message: recorded,
                newly,
            } => {
                if !newly && !incoming.same_content_as(&recorded) {
                    return Err(ApiError::MessageIdConflict {
                        dialog_id: recorded.dialog_id.to_string(),
                        message_id: recorded
                            .client_id
                            .map(|id| id.to_string())
                            .unwrap_or_default(),
                    });
                }
                Ok(Pushed {
                    message: recorded,
                    fate: MessageFate::Stored,
                })
            }
            // The decision changed meanwhile (another process withdrew it); either way, it is not `true`.
            Appended::NotConsented => Ok(Pushed {
                message,
                fate: MessageFate::Discarded,
            }),
        }
    }

    /// Records a decision. Runs to completion even if the caller goes away (a dropped HTTP request must not
    /// leave a committed decision with its buffer half cleaned up).
    pub async fn give_consent(
        self: &Arc<Self>,
        dialog_id: DialogId,
        value: bool,
    ) -> Result<ConsentOutcome, ApiError> {
        let service = self.clone();
        tokio::spawn(async move { service.decide(dialog_id, value).await })
            .await
            .unwrap_or_else(|join_error| std::panic::resume_unwind(join_error.into_panic()))
    }

    async fn decide(&self, dialog_id: DialogId, value: bool) -> Result<ConsentOutcome, ApiError> {
        let outcome = self.decide_locked(dialog_id, value, Origin::Client).await?;
        self.metrics
            .consents
            .with_label_values(&[if value { "true" } else { "false" }])
            .inc();
        Ok(outcome)
    }

    async fn decide_locked(
        &self,
        dialog_id: DialogId,
        value: bool,
        origin: Origin,
    ) -> Result<ConsentOutcome, ApiError> {
        let _lock = self.locks.lock(&dialog_id).await;
        // Dropped before the lock, on every way out: after any write of the decision.
        let _written = CountOnDrop(&self.decisions_written);
        // While the lease is held no other decision of the dialog runs, no erasure either, and the sweeper
        // leaves the dialog alone.
        let mut lease = self.buffer.begin_decision(&dialog_id).await?;
        let outcome = self.decide_leased(&mut lease, value, origin).await;
        self.buffer
            .end_decision(lease, settled(&outcome.as_ref().map(drop)))
            .await;
        outcome
    }

    async fn decide_leased(
        &self,
        lease: &mut DecisionLease,
        value: bool,
        origin: Origin,
    ) -> Result<ConsentOutcome, ApiError> {
        let dialog_id = lease.dialog_id.clone();
        let buffered = lease.buffered.take();
        let customer_id = match &buffered {
            Some(buffered) => buffered.customer_id.clone(),
            None => match self.store.consent(&dialog_id).await? {
                Some(record) => record.customer_id,
                None => return Err(ApiError::DialogNotFound(dialog_id.to_string())),
            },
        };
        let decision = Decision {
            dialog_id: dialog_id.clone(),
            customer_id,
            value,
            at: now_millis(),
        };

        if !value {
            let written = self.store.record_decision(&decision, Vec::new()).await?;
            let discarded = self.buffer.discard(lease).await? as u64;
            return Ok(ConsentOutcome {
                record: written.record,
                stored: 0,
                discarded,
                deleted: written.deleted,
            });
        }

        // On failure the messages stay buffered: a retry writes them, and the store skips those that an
        // earlier, partly acknowledged attempt did write.
        let in_buffer = buffered.is_some();
        let mut pending = buffered
            .map(|buffered| buffered.messages)
            .unwrap_or_default();
        let mut stored = 0;
        loop {
            let last_seq = pending.last().map(|message| message.seq);
            let written = self.store.record_decision(&decision, pending).await?;
            stored += written.inserted;
            // Messages pushed while the write ran are still buffered; sealing the dialog sends later pushes
            // to the store, so at most one more pass writes these and the dialog leaves the buffer. (A
            // dialog in the buffer with no messages left, which Redis expired by itself, leaves it too.)
            let more = match (last_seq, in_buffer) {
                (Some(seq), _) => self.buffer.seal_and_remove_through(lease, seq).await?,
                (None, true) => self.buffer.seal_and_remove_through(lease, 0).await?,
                (None, false) => Vec::new(),
            };
            if more.is_empty() {
                if origin == Origin::Recovery && stored > 0 {
                    tracing::info!(dialog = %dialog_id, stored, "stored messages of a consented dialog");
                }
                return Ok(ConsentOutcome {
                    record: written.record,
                    stored,
                    discarded: 0,
                    deleted: 0,
                });
            }
            pending = more;
        }
    }

    pub async fn consent(&self, dialog_id: &DialogId) -> Result<Option<ConsentRecord>, ApiError> {
        Ok(self.store.consent(dialog_id).await?)
    }

    pub async fn dialog(&self, dialog_id: &DialogId) -> Result<Option<Dialog>, ApiError> {
        Ok(self.store.dialog(dialog_id).await?)
    }

    pub async fn dialogs(
        &self,
        filter: &DialogFilter,
        request: &PageRequest,
    ) -> Result<Page<Dialog>, ApiError> {
        let page = fetch_page(request, dialog_key, |range, order, limit| async move {
            self.store.scan_dialogs(filter, &range, order, limit).await
        })
        .await?;
        Ok(page)
    }

    pub async fn messages(
        &self,
        filter: &MessageFilter,
        request: &PageRequest,
    ) -> Result<Page<Message>, ApiError> {
        let page = fetch_page(request, message_key, |range, order, limit| async move {
            self.store.scan_messages(filter, &range, order, limit).await
        })
        .await?;
        Ok(page)
    }

    pub async fn count_dialogs(&self, filter: &DialogFilter) -> Result<u64, ApiError> {
        Ok(self.store.count_dialogs(filter).await?)
    }

    pub async fn count_messages(&self, filter: &MessageFilter) -> Result<u64, ApiError> {
        Ok(self.store.count_messages(filter).await?)
    }

    /// One batch of an export: at most `limit` stored messages after `after` (a sort key) in `order`,
    /// read by one indexed query.
    pub async fn export_batch(
        &self,
        filter: &MessageFilter,
        after: Option<&crate::paging::SortKey>,
        order: crate::paging::ListOrder,
        limit: usize,
    ) -> Result<Vec<Message>, ApiError> {
        use crate::paging::{KeyRange, ListOrder, ScanOrder};
        let (range, scan) = match order {
            ListOrder::NewestFirst => (
                KeyRange {
                    older_than: after.cloned(),
                    newer_than: None,
                },
                ScanOrder::NewestFirst,
            ),
            ListOrder::OldestFirst => (
                KeyRange {
                    older_than: None,
                    newer_than: after.cloned(),
                },
                ScanOrder::OldestFirst,
            ),
        };
        Ok(self
            .store
            .scan_messages(filter, &range, scan, limit)
            .await?)
    }

    /// One page of the change feed after `after`, at most `limit` changes (see `changes`).
    pub async fn changes(
        &self,
        field: &'static str,
        after: ChangeToken,
        limit: usize,
    ) -> Result<ChangePage, ApiError> {
        let through = self.change_horizon(field, after).await?;
        let changes = self
            .store
            .scan_changes(after.0, through, limit.saturating_add(1))
            .await?;
        Ok(ChangePage::new(changes, through, limit))
    }

    /// The last change committed, which a read of the feed after `after` goes up to; refuses a token ahead
    /// of it.
    pub async fn change_horizon(
        &self,
        field: &'static str,
        after: ChangeToken,
    ) -> Result<i64, ApiError> {
        let through = self.store.last_change().await?;
        crate::changes::check_not_ahead(field, after, through)?;
        Ok(through)
    }

    /// Changes numbered in `(after, through]`, at most `limit`, for exports.
    pub async fn change_batch(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> Result<Vec<crate::model::Change>, ApiError> {
        Ok(self.store.scan_changes(after, through, limit).await?)
    }

    pub async fn message_stats(
        &self,
        filter: &MessageFilter,
        grouping: &crate::stats::Grouping,
        limit: usize,
    ) -> Result<Vec<crate::stats::MessageStats>, ApiError> {
        Ok(self.store.message_stats(filter, grouping, limit).await?)
    }

    pub async fn consent_stats(
        &self,
        filter: &crate::store::ConsentFilter,
        buckets: Option<&crate::stats::Buckets>,
        limit: usize,
    ) -> Result<Vec<crate::stats::ConsentStats>, ApiError> {
        Ok(self.store.consent_stats(filter, buckets, limit).await?)
    }

    pub async fn messages_of_dialogs(
        &self,
        dialog_ids: &[DialogId],
        limit: usize,
    ) -> Result<Vec<Message>, ApiError> {
        Ok(self.store.messages_of_dialogs(dialog_ids, limit).await?)
    }
}

impl Pushed {
    fn buffered(message: Message) -> Self {
        Self {
            message,
            fate: MessageFate::Buffered,
        }
    }
}

/// Whether a decision's outcome is known: it was written, or there was nothing to decide. Any other error
/// may have come after the store wrote the decision (a timeout, the buffer failing while it was cleaned
/// up): the sweeper then asks the store soon.
fn settled(outcome: &Result<(), &ApiError>) -> bool {
    matches!(outcome, Ok(()) | Err(ApiError::DialogNotFound(_)))
}

/// The messages of a request grouped by dialog, each group in the request's order, the groups in the order
/// of their first message; with each message's place in the request.
fn group_by_dialog(incomings: Vec<IncomingMessage>) -> Vec<(Vec<usize>, DialogPush)> {
    /// Past this many dialogs a request's groups are found through a map instead of one by one.
    const FEW: usize = 16;
    let mut groups: Vec<(Vec<usize>, DialogPush)> = Vec::new();
    let mut by_dialog: HashMap<DialogId, usize> = HashMap::new();
    for (place, incoming) in incomings.into_iter().enumerate() {
        let dialog_id = &incoming.dialog_id;
        // A dialog's messages usually come one after another, and requests name few dialogs.
        let found = match groups.last() {
            Some((_, last)) if last.dialog_id == *dialog_id => Some(groups.len() - 1),
            _ if groups.len() <= FEW => groups
                .iter()
                .position(|(_, push)| push.dialog_id == *dialog_id),
            _ => by_dialog.get(dialog_id).copied(),
        };
        let group = found.unwrap_or_else(|| {
            groups.push((
                Vec::new(),
                DialogPush {
                    dialog_id: dialog_id.clone(),
                    messages: Vec::new(),
                    looked_up_after: 0,
                },
            ));
            if groups.len() == FEW + 1 {
                by_dialog.extend(
                    groups
                        .iter()
                        .enumerate()
                        .map(|(index, (_, push))| (push.dialog_id.clone(), index)),
                );
            } else if groups.len() > FEW + 1 {
                by_dialog.insert(dialog_id.clone(), groups.len() - 1);
            }
            groups.len() - 1
        });
        groups[group].0.push(place);
        groups[group].1.messages.push(incoming);
    }
    groups
}

/// Records the results of a buffer push with the messages' places; returns the messages handed back, with
/// their places (the last ones of `places`), if there are any.
fn record_pushed(
    results: &mut impl Extend<(usize, Result<Pushed, ApiError>)>,
    mut places: Vec<usize>,
    outcome: PushOutcome,
) -> Option<Group> {
    let rest = places.split_off(outcome.pushed.len());
    results.extend(
        places
            .into_iter()
            .zip(outcome.pushed)
            .map(|(place, result)| {
                (
                    place,
                    result.map(|buffered| Pushed::buffered(buffered.message())),
                )
            }),
    );
    let dialog_id = outcome.handed_back.first()?.dialog_id.clone();
    Some(Group {
        dialog_id,
        places: rest,
        messages: outcome.handed_back,
        checked_at: outcome.checked_at,
    })
}

/// The results so far, and the same error for every one of the messages at `places`.
fn fill(
    mut results: Vec<(usize, Result<Pushed, ApiError>)>,
    places: &[usize],
    error: &ApiError,
) -> Vec<(usize, Result<Pushed, ApiError>)> {
    results.extend(places.iter().map(|&place| (place, Err(error.clone()))));
    results
}

/// Bumps a counter when dropped.
struct CountOnDrop<'a>(&'a AtomicU64);

impl Drop for CountOnDrop<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// One async mutex per dialog, created on demand and dropped when nobody holds or waits for it.
#[derive(Default)]
struct DialogLocks {
    locks: DashMap<DialogId, Arc<Mutex<()>>>,
}

struct DialogLock<'a> {
    locks: &'a DialogLocks,
    dialog_id: DialogId,
    guard: Option<OwnedMutexGuard<()>>,
}

impl DialogLocks {
    async fn lock(&self, dialog_id: &DialogId) -> DialogLock<'_> {
        let mutex = self.locks.entry(dialog_id.clone()).or_default().clone();
        DialogLock {
            locks: self,
            dialog_id: dialog_id.clone(),
            guard: Some(mutex.lock_owned().await),
        }
    }

    /// The dialog's lock, if nobody holds it right now.
    fn try_lock(&self, dialog_id: &DialogId) -> Option<DialogLock<'_>> {
        let mutex = self.locks.entry(dialog_id.clone()).or_default().clone();
        match mutex.try_lock_owned() {
            Ok(guard) => Some(DialogLock {
                locks: self,
                dialog_id: dialog_id.clone(),
                guard: Some(guard),
            }),
            Err(_) => {
                // The holder may have let go after this looked (and left the entry, seeing this reference):
                // an entry nobody but the map refers to is removed here then.
                self.locks
                    .remove_if(dialog_id, |_, mutex| Arc::strong_count(mutex) == 1);
                None
            }
        }
    }
}

impl Drop for DialogLock<'_> {
    fn drop(&mut self) {
        // Two references (the map's and this guard's) mean nobody else holds or waits for the lock; the
        // check runs under the map's shard lock, so nobody can pick it up meanwhile.
        self.locks
            .locks
            .remove_if(&self.dialog_id, |_, mutex| Arc::strong_count(mutex) == 2);
        self.guard.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Language, MessageText};

    fn incoming(dialog: &str, text: &str) -> IncomingMessage {
        IncomingMessage {
            customer_id: CustomerId::parse("customerId", "c").unwrap(),
            dialog_id: DialogId::parse("dialogId", dialog).unwrap(),
            text: MessageText::parse("text", text).unwrap(),
            language: Language::parse("language", "en").unwrap(),
            client_id: None,
        }
    }

    #[test]
    fn messages_are_grouped_by_dialog_in_order_however_many_dialogs() {
        // Below, at and above the number of dialogs past which groups are found through a map.
        for dialogs in [1, 3, 16, 17, 40] {
            let incomings = (0..dialogs * 3)
                .map(|i| incoming(&format!("d{}", i % dialogs), &format!("t{i}")))
                .collect();
            let groups = group_by_dialog(incomings);
            assert_eq!(groups.len(), dialogs, "{dialogs} dialogs");
            for (g, (places, push)) in groups.iter().enumerate() {
                assert_eq!(push.dialog_id.as_str(), format!("d{g}"));
                assert_eq!(*places, [g, g + dialogs, g + 2 * dialogs]);
                let texts: Vec<&str> = push.messages.iter().map(|m| m.text.as_str()).collect();
                assert_eq!(
                    texts,
                    [
                        format!("t{g}"),
                        format!("t{}", g + dialogs),
                        format!("t{}", g + 2 * dialogs)
                    ]
                );
            }
        }
        // Consecutive messages of one dialog, then another, then the first again.
        let groups = group_by_dialog(vec![
            incoming("a", "1"),
            incoming("a", "2"),
            incoming("b", "3"),
            incoming("a", "4"),
        ]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].0, [0, 1, 3]);
        assert_eq!(groups[1].0, [2]);
    }

    #[tokio::test]
    async fn dialog_locks_are_exclusive_and_cleaned_up() {
        let locks = Arc::new(DialogLocks::default());
        let dialog = DialogId::parse("dialogId", "d").unwrap();
        let first = locks.lock(&dialog).await;
        let waiter = {
            let locks = locks.clone();
            let dialog = dialog.clone();
            tokio::spawn(async move {
                let _second = locks.lock(&dialog).await;
            })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.unwrap();
        assert!(locks.locks.is_empty());
    }

    #[tokio::test]
    async fn a_dialog_lock_tried_while_held_is_refused_and_leaves_nothing_behind() {
        let locks = DialogLocks::default();
        let dialog = DialogId::parse("dialogId", "d").unwrap();
        let held = locks.lock(&dialog).await;
        assert!(locks.try_lock(&dialog).is_none());
        drop(held);
        assert!(locks.locks.is_empty(), "the refused attempt left no entry");
        let taken = locks.try_lock(&dialog).expect("free again");
        assert!(locks.try_lock(&dialog).is_none());
        drop(taken);
        assert!(locks.locks.is_empty());
        // An entry left by such a race (another reference alive when its holder let go) is removed by the
        // next lock taken on it.
        let held = locks.lock(&dialog).await;
        let mutex = locks.locks.get(&dialog).unwrap().clone();
        drop(held);
        assert_eq!(locks.locks.len(), 1, "the extra reference kept the entry");
        drop(mutex);
        assert!(locks.try_lock(&dialog).is_some());
        assert!(locks.locks.is_empty());
    }
}
