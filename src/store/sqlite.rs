//! The embedded store: SQLite (bundled) in WAL mode, so `cargo run` works on a bare machine. Nothing blocks
//! the async runtime: reads run on pooled connections inside `spawn_blocking` (deadpool-sqlite's
//! `interact`), and writes on one writer thread that owns the writing connection, serialises them (so a
//! consent cannot interleave with a withdrawal) and commits the writes that queued together (group commit).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool::managed::{self, Hook, HookError, Metrics, RecycleError, RecycleResult};
use deadpool_sqlite::Runtime;
use deadpool_sqlite::rusqlite::{
    self, Connection, OptionalExtension, Row, params, params_from_iter, types::Value,
};

use super::{
    Appended, ConsentFilter, Decision, DecisionWritten, DialogFilter, Erased, ErasureAudit,
    MAX_DIALOGS_PER_ERASE_BATCH, MessageFilter, Store, StoreError, StoreResult, merge_changes,
    scan_bounds,
};
use crate::clock::now_millis;
use crate::model::{
    Change, ClientMessageId, ConsentHistory, ConsentRecord, CustomerId, DecisionEvent,
    DecisionKind, Dialog, DialogId, Language, Message, MessageText, Removal,
};
use crate::paging::{KeyRange, ScanOrder};
use crate::stats::{BucketUnit, Buckets, ConsentStats, Grouping, MessageStats};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS consents (
    dialog_id   TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    value       INTEGER NOT NULL,
    decided_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS consent_events (
    id          INTEGER PRIMARY KEY,
    dialog_id   TEXT NOT NULL,
    value       INTEGER NOT NULL,
    decided_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS consent_events_dialog ON consent_events (dialog_id, id);
CREATE TABLE IF NOT EXISTS dialogs (
    id               TEXT PRIMARY KEY,
    customer_id      TEXT NOT NULL,
    message_count    INTEGER NOT NULL,
    first_message_at INTEGER NOT NULL,
    last_message_at  INTEGER NOT NULL,
    consented_at     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dialogs_recent ON dialogs (last_message_at, id);
CREATE INDEX IF NOT EXISTS dialogs_customer_recent ON dialogs (customer_id, last_message_at, id);
-- One row per language of a dialog, with the dialog's sort key copied in, so that a language-filtered
-- listing walks one index in order instead of sorting.
CREATE TABLE IF NOT EXISTS dialog_languages (
    dialog_id       TEXT NOT NULL,
    language        TEXT NOT NULL,
    last_message_at INTEGER NOT NULL,
    PRIMARY KEY (dialog_id, language)
);
CREATE INDEX IF NOT EXISTS dialog_languages_recent ON dialog_languages (language, last_message_at, dialog_id);
-- Messages are unique per (dialog, id): a retried write is ignored. Not a primary key on `id` alone: ids
-- derived from a client `messageId` are hashes, and an index in hash order takes each consent's rows to
-- as many random pages (one WAL frame each per commit); keyed by dialog first, a consent touches a few.
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT NOT NULL,
    dialog_id   TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    client_id   TEXT,
    text        TEXT NOT NULL,
    language    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    -- Its number in the change feed (see `change_counter`); 0 only while a migration numbers old rows.
    change_seq  INTEGER NOT NULL DEFAULT 0,
    UNIQUE (dialog_id, id)
);
-- With `id` last, as the others: a dialog's messages listed by page are read in index order, not sorted
-- (it replaced `messages_dialog (dialog_id, seq)`, dropped here).
CREATE INDEX IF NOT EXISTS messages_dialog_recent ON messages (dialog_id, seq, id);
DROP INDEX IF EXISTS messages_dialog;
CREATE INDEX IF NOT EXISTS messages_recent ON messages (seq, id);
CREATE INDEX IF NOT EXISTS messages_language_recent ON messages (language, seq, id);
CREATE INDEX IF NOT EXISTS messages_customer_recent ON messages (customer_id, seq, id);
CREATE INDEX IF NOT EXISTS consents_customer ON consents (customer_id);
-- Proof that an erasure happened: when, how much, whose (a digest of the customer id, by digest_scheme:
-- hmac-sha256 with the audit secret; sha256 in records written before version 2), and by whom.
CREATE TABLE IF NOT EXISTS erasures (
    id                INTEGER PRIMARY KEY,
    customer_digest   TEXT NOT NULL,
    erased_at         INTEGER NOT NULL,
    dialogs           INTEGER NOT NULL,
    messages          INTEGER NOT NULL,
    consents          INTEGER NOT NULL,
    buffered_messages INTEGER NOT NULL,
    digest_scheme     TEXT NOT NULL DEFAULT 'sha256',
    erased_by         TEXT
);
-- Erasures begun and not finished (see Store::begin_erasure): the customer id stays only until the audit
-- record replaces it.
CREATE TABLE IF NOT EXISTS erasures_running (
    customer_id     TEXT PRIMARY KEY,
    customer_digest TEXT NOT NULL,
    digest_scheme   TEXT NOT NULL,
    erased_by       TEXT NOT NULL,
    started_at      INTEGER NOT NULL,
    last_batch_at   INTEGER NOT NULL,
    dialogs         INTEGER NOT NULL DEFAULT 0,
    messages        INTEGER NOT NULL DEFAULT 0,
    consents        INTEGER NOT NULL DEFAULT 0,
    -- The most of the customer's messages the buffer was seen to hold (Store::note_buffered_messages).
    buffered_messages INTEGER NOT NULL DEFAULT 0
);
-- The last change number taken: every write that stores messages or removes dialogs takes its numbers
-- from here, inside its transaction; one writer at a time, so numbers become visible in order.
CREATE TABLE IF NOT EXISTS change_counter (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
-- Dialogs removed whole (withdrawn, erased), for copies kept by the change feed: only the dialog id.
CREATE TABLE IF NOT EXISTS tombstones (
    change    INTEGER PRIMARY KEY,
    dialog_id TEXT NOT NULL,
    reason    TEXT NOT NULL,
    at        INTEGER NOT NULL
);
-- Decisions that changed a dialog's decision, numbered with the changes, for live updates: the dialog id
-- only, deleted with the dialog's other records when its customer is erased.
CREATE TABLE IF NOT EXISTS decision_events (
    change    INTEGER PRIMARY KEY,
    dialog_id TEXT NOT NULL,
    kind      TEXT NOT NULL,
    at        INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS decision_events_dialog ON decision_events (dialog_id);
-- Values the service keeps for itself, such as the audit secret when AUDIT_SECRET is unset.
CREATE TABLE IF NOT EXISTS settings (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"#;

/// Version 1 to 2: erasure records say which digest they hold and who erased.
const MIGRATE_ERASURES_TO_2: &str = "
ALTER TABLE erasures ADD COLUMN digest_scheme TEXT NOT NULL DEFAULT 'sha256';
ALTER TABLE erasures ADD COLUMN erased_by TEXT;
";

/// The layout `SCHEMA` creates, kept in `PRAGMA user_version`. Version 3 added `erasures_running` (an
/// earlier version would not resume the erasures it lists); version 4 the change feed (an earlier version
/// would store messages without a change number); version 5 the buffered messages an unfinished erasure
/// counted (an earlier version would finish it without emptying the buffer first).
const SCHEMA_VERSION: i64 = 5;

/// Versions 3 and 4: unfinished erasures get their count of buffered messages.
const MIGRATE_ERASURES_RUNNING_TO_5: &str =
    "ALTER TABLE erasures_running ADD COLUMN buffered_messages INTEGER NOT NULL DEFAULT 0;";

/// Versions 1 to 3: messages get their change number column before `SCHEMA` indexes it.
const MIGRATE_MESSAGES_TO_4: &str =
    "ALTER TABLE messages ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;";

/// After `SCHEMA`: messages stored before version 4 are numbered in the order they were inserted (their
/// rowid, already unique and increasing), and the counter starts after them.
const NUMBER_CHANGES: &str = "
UPDATE messages SET change_seq = rowid WHERE change_seq = 0;
CREATE UNIQUE INDEX IF NOT EXISTS messages_changes ON messages (change_seq);
INSERT OR IGNORE INTO change_counter (id, last) VALUES (1, (SELECT coalesce(max(change_seq), 0) FROM messages));
";

/// From the first layout (version 0, `messages` keyed by `id` alone) to version 1: the table is rebuilt
/// under its new key, in the same transaction as the rest of `SCHEMA`.
const MIGRATE_FROM_0: &str = r#"
DROP INDEX IF EXISTS messages_dialog;
DROP INDEX IF EXISTS messages_recent;
DROP INDEX IF EXISTS messages_language_recent;
DROP INDEX IF EXISTS messages_customer_recent;
ALTER TABLE messages RENAME TO messages_v0;
"#;
const MIGRATE_FROM_0_COPY: &str = r#"
INSERT INTO messages (id, dialog_id, customer_id, client_id, text, language, created_at, seq)
    SELECT id, dialog_id, customer_id, client_id, text, language, created_at, seq FROM messages_v0 ORDER BY rowid;
DROP TABLE messages_v0;
"#;

/// SQLite caps the parameters of one statement (32766), and a list of ids (a page, a batch) may exceed that.
const IDS_PER_STATEMENT: usize = 10_000;

const MESSAGE_COLUMNS: &str =
    "id, dialog_id, customer_id, client_id, text, language, created_at, seq";
const DIALOG_COLUMNS: &str = "d.id, d.customer_id, d.message_count, d.first_message_at, d.last_message_at, \
     d.consented_at, (SELECT group_concat(language, ',') FROM dialog_languages WHERE dialog_id = d.id)";

/// deadpool-sqlite's connections, handed out without first running a `SELECT` on each through the
/// blocking pool (its check for a broken connection): that hop cost as much as a point read itself, e.g.
/// when a push to a new dialog looks its decision up. A connection to a local file does not go stale like
/// a network one; a connection whose lock a panic poisoned is still thrown away, and an error while using
/// one reaches the caller as `STORE_UNAVAILABLE` as before.
struct ReadConnections(deadpool_sqlite::Manager);

impl managed::Manager for ReadConnections {
    type Type = <deadpool_sqlite::Manager as managed::Manager>::Type;
    type Error = rusqlite::Error;

    async fn create(&self) -> Result<Self::Type, Self::Error> {
        managed::Manager::create(&self.0).await
    }

    async fn recycle(
        &self,
        connection: &mut Self::Type,
        _: &Metrics,
    ) -> RecycleResult<Self::Error> {
        if connection.is_mutex_poisoned() {
            return Err(RecycleError::message(
                "a panic poisoned this connection's lock",
            ));
        }
        Ok(())
    }
}

type ReadPool = managed::Pool<ReadConnections>;

/// Runs `f` on a connection of `pool`, off the async runtime.
async fn on_pooled<T, F>(pool: &ReadPool, f: F) -> StoreResult<T>
where
    F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    T: Send + 'static,
{
    let connection = pool
        .get()
        .await
        .map_err(|e| StoreError::new("sqlite connection", e))?;
    connection
        .interact(f)
        .await
        .map_err(|e| StoreError::new("sqlite call", e))?
}

/// Makes deleted rows leave the disk. `secure_delete` overwrites them in the database file, but the
/// write-ahead log still holds the pages as they were before the delete until it is checkpointed and
/// truncated. After every withdrawal and erasure the log is truncated (`wal_checkpoint(TRUNCATE)`, its
/// result checked): the call waits for that for up to `WAIT`, and if readers keep it from finishing, it is
/// retried in the background until it does (logged, and counted in `/metrics`).
struct LogScrubber {
    pool: ReadPool,
    /// A removal whose old pages may still be in the log.
    pending: AtomicBool,
    failures: AtomicU64,
}

impl LogScrubber {
    /// How long a withdrawal or an erasure waits for the log to be truncated before it answers anyway.
    const WAIT: Duration = Duration::from_secs(3);
    const RETRY: Duration = Duration::from_millis(50);
    const BACKGROUND_RETRY: Duration = Duration::from_secs(1);

    /// One attempt: whether the whole log was copied into the database and the file truncated.
    async fn truncate(&self) -> StoreResult<bool> {
        on_pooled(&self.pool, |c| {
            // Short: the checkpoint holds the write lock while it waits for readers. Then the pool's
            // usual patience again.
            let truncated = (|| {
                c.busy_timeout(Duration::from_millis(500))?;
                let outcome = c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?))
                });
                c.busy_timeout(Duration::from_secs(10))?;
                // (busy, frames left in the log): 0 and 0 once it is empty.
                outcome.map(|(busy, frames)| busy == 0 && frames <= 0)
            })();
            truncated.map_err(sqlite_error("truncate the write-ahead log"))
        })
        .await
    }

    /// Truncates the log after a removal; see the type's comment.
    async fn scrub(self: &Arc<Self>) {
        let deadline = Instant::now() + Self::WAIT;
        loop {
            if self.attempt().await {
                return;
            }
            if Instant::now() + Self::RETRY > deadline {
                break;
            }
            tokio::time::sleep(Self::RETRY).await;
        }
        if self.pending.swap(true, Ordering::AcqRel) {
            return; // a background retry is already on it
        }
        tracing::warn!(
            "the write-ahead log still holds removed data: readers kept it from being truncated; retrying \
             in the background"
        );
        let scrubber = self.clone();
        tokio::spawn(async move {
            while !scrubber.attempt().await {
                tokio::time::sleep(Self::BACKGROUND_RETRY).await;
            }
            scrubber.pending.store(false, Ordering::Release);
            tracing::info!("the write-ahead log is truncated: removed data has left the disk");
        });
    }

    async fn attempt(&self) -> bool {
        match self.truncate().await {
            Ok(true) => true,
            Ok(false) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(error) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "cannot truncate the write-ahead log");
                false
            }
        }
    }
}

pub struct SqliteStore {
    /// Connections for reads; in WAL mode they never wait for the writer.
    pool: ReadPool,
    /// The one writing connection, on a thread of its own (see [`Writer`]).
    writer: Writer,
    path: PathBuf,
    /// A write not started this long after it was asked for is abandoned: its caller has given up (see
    /// `STORE_TIMEOUT`), and a late commit could land after an erasure it should have preceded.
    write_deadline: Duration,
    scrubber: Arc<LogScrubber>,
}

fn sqlite_error(context: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |error| StoreError::new(context, error)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and its schema.
    pub async fn open(path: &Path) -> StoreResult<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::new(&format!("cannot create directory {}", parent.display()), e)
            })?;
        }
        let connections = deadpool_sqlite::Manager::from_config(
            &deadpool_sqlite::Config::new(path),
            Runtime::Tokio1,
        );
        let pool = ReadPool::builder(ReadConnections(connections))
            .runtime(Runtime::Tokio1)
            .max_size(8)
            .post_create(Hook::<ReadConnections>::sync_fn(|connection, _| {
                let connection = connection
                    .lock()
                    .map_err(|_| HookError::message("sqlite connection mutex poisoned"))?;
                // Readers never block the writer in WAL mode; a writer waits for another one instead of failing.
                // FULL: a committed consent (the audit record, and messages the client was told are stored)
                // survives a power loss, not only a crash of the process.
                connection
                    .busy_timeout(std::time::Duration::from_secs(10))
                    .and_then(|_| {
                        connection.execute_batch(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
                             PRAGMA secure_delete = ON;",
                        )
                    })
                    .map_err(HookError::Backend)
            }))
            .build()
            .map_err(|e| StoreError::new("sqlite pool", e))?;
        let store = Self {
            scrubber: Arc::new(LogScrubber {
                pool: pool.clone(),
                pending: AtomicBool::new(false),
                failures: AtomicU64::new(0),
            }),
            pool,
            writer: Writer::start(path)?,
            path: path.to_owned(),
            write_deadline: Duration::from_secs(8),
        };
        store.with_connection(create_or_migrate_schema).await?;
        // A removal the previous run could not scrub from the log (it stopped first) leaves it now.
        store.scrubber.scrub().await;
        Ok(store)
    }

    /// Runs `f` on a pooled connection, off the async runtime.
    async fn with_connection<T, F>(&self, f: F) -> StoreResult<T>
    where
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
        T: Send + 'static,
    {
        on_pooled(&self.pool, f).await
    }

    /// Runs a `SELECT count(*)` query.
    async fn count(&self, sql: String, params: Vec<Value>) -> StoreResult<u64> {
        self.with_connection(move |c| {
            c.query_row(&sql, params_from_iter(params), |row| row.get::<_, i64>(0))
                .map(|n| n.unsigned_abs())
                .map_err(sqlite_error("count"))
        })
        .await
    }

    /// Runs `f` in a write transaction that commits only if `f` succeeds.
    /// Sets how long after it is asked for a write may still start; give it less than the store call's
    /// deadline, so that a write either commits while its caller waits or not at all.
    pub fn with_write_deadline(mut self, deadline: Duration) -> Self {
        self.write_deadline = deadline;
        self
    }

    /// Runs `f` as one atomic write on the writer thread, in a transaction it may share with other writes
    /// that arrived meanwhile (group commit: one durable commit for many consents). `f` failing undoes its
    /// own changes only. A write that would finish past its deadline is undone instead: its caller has
    /// given up. `f` may run more than once (see [`Writer::commit_some`]); only its last run counts.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        F: FnMut(&Connection) -> StoreResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel::<StoreResult<T>>();
        let job: Job = Box::new(PendingWrite {
            write: f,
            deadline: Instant::now() + self.write_deadline,
            outcome: None,
            reply,
        });
        self.writer
            .jobs
            .send(job)
            .map_err(|_| StoreError("the SQLite writer is not running".to_owned()))?;
        answer
            .await
            .map_err(|_| StoreError("the SQLite writer dropped the write; retry".to_owned()))?
    }
}

/// See [`Store::erase_batch`].
fn erase_batch_in(
    tx: &Connection,
    customer: &str,
    max_messages: usize,
    now: i64,
) -> rusqlite::Result<Option<Erased>> {
    let running: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM erasures_running WHERE customer_id = ?1)",
        [customer],
        |row| row.get(0),
    )?;
    if !running {
        return Ok(None);
    }
    let limit = MAX_DIALOGS_PER_ERASE_BATCH as i64;
    let mut dialog_ids = Vec::new();
    let mut messages_in_batch = 0;
    {
        let mut dialogs = tx.prepare_cached(
            "SELECT id, message_count FROM dialogs WHERE customer_id = ?1 LIMIT ?2",
        )?;
        let mut rows = dialogs.query(params![customer, limit])?;
        while let Some(row) = rows.next()? {
            let count = usize::try_from(row.get::<_, i64>(1)?).unwrap_or(0);
            if !dialog_ids.is_empty() && messages_in_batch + count > max_messages {
                break;
            }
            dialog_ids.push(row.get::<_, String>(0)?);
            messages_in_batch += count;
        }
    }
    if dialog_ids.is_empty() {
        // Consent records without a dialog: refusals and withdrawals.
        let mut consents =
            tx.prepare_cached("SELECT dialog_id FROM consents WHERE customer_id = ?1 LIMIT ?2")?;
        dialog_ids = consents
            .query_map(params![customer, limit], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
    }
    let mut erased = Erased::default();
    if dialog_ids.is_empty() {
        // Messages without their dialog break an invariant, but if there are any they go too.
        erased.messages = tx.execute(
            "DELETE FROM messages WHERE rowid IN
                 (SELECT rowid FROM messages WHERE customer_id = ?1 LIMIT ?2)",
            params![customer, max_messages.max(1) as i64],
        )? as u64;
    } else {
        let placeholders = vec!["?"; dialog_ids.len()].join(", ");
        let delete = |sql: &str| {
            tx.execute(
                &sql.replace("{ids}", &placeholders),
                rusqlite::params_from_iter(&dialog_ids),
            )
            .map(|n| n as u64)
        };
        erased.messages = delete("DELETE FROM messages WHERE dialog_id IN ({ids})")?;
        delete("DELETE FROM dialog_languages WHERE dialog_id IN ({ids})")?;
        erased.dialogs = delete("DELETE FROM dialogs WHERE id IN ({ids})")?;
        if erased.dialogs > 0 {
            // The ids came from `dialogs`: each was a stored dialog, now removed.
            add_tombstones(tx, &dialog_ids, Removal::Erased, now)?;
        }
        delete("DELETE FROM consent_events WHERE dialog_id IN ({ids})")?;
        delete("DELETE FROM decision_events WHERE dialog_id IN ({ids})")?;
        erased.consents = delete("DELETE FROM consents WHERE dialog_id IN ({ids})")?;
    }
    tx.execute(
        "UPDATE erasures_running SET dialogs = dialogs + ?2, messages = messages + ?3,
                                     consents = consents + ?4, last_batch_at = ?5
         WHERE customer_id = ?1",
        params![
            customer,
            erased.dialogs as i64,
            erased.messages as i64,
            erased.consents as i64,
            now
        ],
    )?;
    Ok(Some(erased))
}

/// See [`Store::finish_erasure`].
fn finish_erasure_in(tx: &Connection, customer: &str, at: i64) -> rusqlite::Result<Option<Erased>> {
    let running = tx
        .query_row(
            "SELECT customer_digest, digest_scheme, erased_by, dialogs, messages, consents, buffered_messages
             FROM erasures_running WHERE customer_id = ?1",
            [customer],
            |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    Erased {
                        dialogs: row.get::<_, i64>(3)? as u64,
                        messages: row.get::<_, i64>(4)? as u64,
                        consents: row.get::<_, i64>(5)? as u64,
                        buffered_messages: row.get::<_, i64>(6)? as u64,
                    },
                ))
            },
        )
        .optional()?;
    let Some((digest, scheme, erased_by, erased)) = running else {
        return Ok(None);
    };
    tx.execute(
        "INSERT INTO erasures (customer_digest, erased_at, dialogs, messages, consents, buffered_messages,
                               digest_scheme, erased_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            digest,
            at,
            erased.dialogs as i64,
            erased.messages as i64,
            erased.consents as i64,
            erased.buffered_messages as i64,
            scheme,
            erased_by,
        ],
    )?;
    tx.execute(
        "DELETE FROM erasures_running WHERE customer_id = ?1",
        [customer],
    )?;
    Ok(Some(erased))
}

/// Creates the schema, or brings a database written by an earlier version up to [`SCHEMA_VERSION`], in one
/// transaction: a failed migration leaves the file as it was.
fn create_or_migrate_schema(connection: &mut Connection) -> StoreResult<()> {
    let tx = connection
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sqlite_error("begin the schema transaction"))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(sqlite_error("read the schema version"))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "the database has schema version {version}, written by a newer DataAPI (this one knows up to \
             {SCHEMA_VERSION}); run that version, or point DATABASE_URL at another file"
        )));
    }
    let has_messages = tx
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'messages'",
            [],
            |row| row.get::<_, i64>(0),
        )
        .map_err(sqlite_error("read the schema"))?
        > 0;
    let migrate = version == 0 && has_messages;
    if migrate {
        tx.execute_batch(MIGRATE_FROM_0)
            .map_err(sqlite_error("migrate the schema"))?;
    }
    let unnumbered = has_messages
        && (1..4).contains(&version)
        && tx
            .query_row(
                "SELECT count(*) FROM pragma_table_info('messages') WHERE name = 'change_seq'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .map_err(sqlite_error("read the schema"))?
            == 0;
    if unnumbered {
        tx.execute_batch(MIGRATE_MESSAGES_TO_4)
            .map_err(sqlite_error("add change numbers to the messages"))?;
    }
    // An erasures table of version 0 or 1 (SCHEMA below leaves an existing table as it is).
    let old_erasures = tx
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'erasures'",
            [],
            |row| row.get::<_, i64>(0),
        )
        .map_err(sqlite_error("read the schema"))?
        > 0
        && version < 2;
    if old_erasures {
        tx.execute_batch(MIGRATE_ERASURES_TO_2)
            .map_err(sqlite_error("migrate the erasure records"))?;
    }
    let uncounted = (3..5).contains(&version)
        && tx
            .query_row(
                "SELECT count(*) FROM pragma_table_info('erasures_running') WHERE name = 'buffered_messages'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .map_err(sqlite_error("read the schema"))?
            == 0;
    if uncounted {
        tx.execute_batch(MIGRATE_ERASURES_RUNNING_TO_5)
            .map_err(sqlite_error("migrate the unfinished erasures"))?;
    }
    tx.execute_batch(SCHEMA)
        .map_err(sqlite_error("create schema"))?;
    if migrate {
        tx.execute_batch(MIGRATE_FROM_0_COPY)
            .map_err(sqlite_error("migrate the schema"))?;
    }
    tx.execute_batch(NUMBER_CHANGES)
        .map_err(sqlite_error("number the stored messages"))?;
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)
        .map_err(sqlite_error("write the schema version"))?;
    tx.commit().map_err(sqlite_error("commit the schema"))?;
    if migrate || old_erasures || unnumbered || uncounted {
        tracing::info!(
            from = version,
            to = SCHEMA_VERSION,
            "migrated the SQLite database to the current schema"
        );
    }
    Ok(())
}

/// A write must not start once its caller has given up.
fn not_past(deadline: Instant) -> StoreResult<()> {
    if Instant::now() >= deadline {
        return Err(StoreError(
            "write abandoned: not started before its deadline".to_owned(),
        ));
    }
    Ok(())
}

/// Runs `f` as it is, in the open transaction: the fast way, when no write of the transaction fails. Fails
/// if `f` fails, panics, or ends past `deadline`; the caller must then roll the whole transaction back.
fn run_unguarded<T>(
    connection: &Connection,
    deadline: Instant,
    f: &mut impl FnMut(&Connection) -> StoreResult<T>,
) -> StoreResult<T> {
    not_past(deadline)?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(connection)))
        .unwrap_or_else(|_| {
            Err(StoreError(
                "the write failed unexpectedly (a bug); retry".to_owned(),
            ))
        })
        .and_then(|value| {
            if Instant::now() >= deadline {
                Err(StoreError(
                    "write abandoned: not done before its deadline".to_owned(),
                ))
            } else {
                Ok(value)
            }
        })
}

/// Runs `f` inside a savepoint, released when it succeeds and rolled back when it fails, panics, or would
/// end past `deadline`. If SQLite itself rolled the whole transaction back (disk full, I/O error), there is
/// no savepoint left to touch: `f`'s error is returned and the writer starts a new transaction.
fn in_savepoint<T>(
    connection: &Connection,
    deadline: Instant,
    f: &mut impl FnMut(&Connection) -> StoreResult<T>,
) -> StoreResult<T> {
    not_past(deadline)?;
    run_cached(connection, "SAVEPOINT write").map_err(sqlite_error("savepoint"))?;
    let result = run_unguarded(connection, deadline, f);
    if connection.is_autocommit() {
        return result.and(Err(StoreError(
            "the transaction was rolled back".to_owned(),
        )));
    }
    let end = if result.is_ok() {
        run_cached(connection, "RELEASE write")
    } else {
        run_cached(connection, "ROLLBACK TO write")
            .and_then(|_| run_cached(connection, "RELEASE write"))
    };
    end.map_err(sqlite_error("savepoint"))?;
    result
}

/// Runs a parameterless statement through the connection's statement cache: the writer runs the same few
/// statements for every write, and parsing them each time cost more than running them.
fn run_cached(connection: &Connection, sql: &str) -> rusqlite::Result<usize> {
    connection.prepare_cached(sql)?.execute([])
}

/// A write waiting for the writer.
type Job = Box<dyn WriterJob>;

trait WriterJob: Send {
    /// Runs the write in the writer's open transaction, in a savepoint of its own when `isolated`;
    /// returns whether it succeeded. May be called again after a rollback; the last run counts.
    fn run(&mut self, connection: &Connection, isolated: bool) -> bool;
    /// Answers the caller once the transaction committed (or did not).
    fn finish(self: Box<Self>, committed: Result<(), String>);
}

/// A write and where its answer goes.
struct PendingWrite<T, F> {
    write: F,
    deadline: Instant,
    outcome: Option<StoreResult<T>>,
    reply: tokio::sync::oneshot::Sender<StoreResult<T>>,
}

impl<T, F> WriterJob for PendingWrite<T, F>
where
    F: FnMut(&Connection) -> StoreResult<T> + Send,
    T: Send,
{
    fn run(&mut self, connection: &Connection, isolated: bool) -> bool {
        let outcome = if isolated {
            in_savepoint(connection, self.deadline, &mut self.write)
        } else {
            run_unguarded(connection, self.deadline, &mut self.write)
        };
        let succeeded = outcome.is_ok();
        self.outcome = Some(outcome);
        succeeded
    }

    fn finish(self: Box<Self>, committed: Result<(), String>) {
        let result = match (self.outcome, committed) {
            (Some(Err(error)), _) => Err(error),
            (Some(Ok(value)), Ok(())) => Ok(value),
            (Some(Ok(_)), Err(error)) => Err(StoreError(format!("commit: {error}"))),
            (None, Err(error)) => Err(StoreError(format!("begin: {error}"))),
            (None, Ok(())) => Err(StoreError("the write did not run; retry".to_owned())),
        };
        // The caller may have given up waiting; the write's outcome stands either way.
        let _ = self.reply.send(result);
    }
}

/// The single writing connection, on a thread of its own. SQLite allows one writer at a time anyway; with
/// one thread owning it, writes queue without lock contention, and the writes that queued while a commit
/// was on disk share the next transaction: one fsync for many consents (`synchronous = FULL` makes every
/// commit durable, and a commit per consent would cost one fsync each).
struct Writer {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Writer {
    /// The most writes one transaction takes.
    const BATCH: usize = 64;
    /// How long one transaction may keep taking writes before it commits, so that no write waits long
    /// behind others.
    const BATCH_TIME: Duration = Duration::from_millis(50);

    fn start(path: &Path) -> StoreResult<Self> {
        let connection = Connection::open(path).map_err(sqlite_error("open the writer"))?;
        connection
            .busy_timeout(std::time::Duration::from_secs(5))
            .and_then(|_| {
                connection.execute_batch(
                    // temp_store: each write's savepoint journals the pages it changes; on disk, that was a
                    // temporary file written (and opened and closed) per consent.
                    // wal_autocheckpoint: the checkpointer thread copies the log into the database; the
                    // writer does it itself only if that falls far behind (4,000 pages, 16 MiB).
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
                     PRAGMA secure_delete = ON; PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 4000;",
                )
            })
            .map_err(sqlite_error("configure the writer"))?;
        // Room for every statement the writer repeats (see `run_cached`), so none is parsed twice.
        connection.set_prepared_statement_cache_capacity(32);
        let checkpointer = Connection::open(path).map_err(sqlite_error("open the checkpointer"))?;
        let (commits, committed) = std::sync::mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("sqlite-checkpoint".to_owned())
            .spawn(move || Self::checkpoint(checkpointer, committed))
            .map_err(|e| StoreError::new("start the SQLite checkpointer", e))?;
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || Self::run(connection, queue, commits))
            .map_err(|e| StoreError::new("start the SQLite writer", e))?;
        Ok(Self { jobs })
    }

    /// How often, at most, the checkpointer copies the write-ahead log into the database.
    const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

    /// Copies committed pages from the write-ahead log into the database, off the writer's thread (the
    /// copy is I/O the writer would otherwise do between two transactions). PASSIVE: it neither waits for
    /// nor blocks the writer or readers, and what it cannot copy yet waits for the next round. Ends when
    /// the writer does.
    fn checkpoint(connection: Connection, committed: std::sync::mpsc::Receiver<()>) {
        while committed.recv().is_ok() {
            let _ = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            std::thread::sleep(Self::CHECKPOINT_INTERVAL);
        }
    }

    fn run(
        connection: Connection,
        queue: std::sync::mpsc::Receiver<Job>,
        commits: std::sync::mpsc::SyncSender<()>,
    ) {
        let mut pending: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
        loop {
            if pending.is_empty() {
                match queue.recv() {
                    Ok(job) => pending.push_back(job),
                    Err(_) => return,
                }
            }
            while pending.len() < Self::BATCH {
                match queue.try_recv() {
                    Ok(job) => pending.push_back(job),
                    Err(_) => break,
                }
            }
            Self::commit_some(&connection, &mut pending);
            // Full means a checkpoint is already due; the checkpointer may also be gone (then the writer's
            // own automatic checkpoint takes over).
            let _ = commits.try_send(());
        }
    }

    /// Runs writes from the front of `pending` in one transaction, until the batch is full, its time is up,
    /// or a write failed; then commits and answers them.
    ///
    /// First the fast way: the writes run one after the other as they are. If one fails, the transaction
    /// is rolled back and the same writes run again, each in a savepoint of its own, so that the failing
    /// one is undone alone. (A savepoint journals every page its write touches, which cost more than a
    /// tenth of a consent; writes almost never fail, so they pay for it only when one does.)
    fn commit_some(connection: &Connection, pending: &mut std::collections::VecDeque<Job>) {
        if let Err(error) = Self::begin(connection) {
            // The database is busy or broken: answer the oldest write so that its caller sees the cause,
            // and try the others again (their deadlines bound how long).
            if let Some(job) = pending.pop_front() {
                job.finish(Err(error));
            }
            return;
        }
        let started = Instant::now();
        let mut group: Vec<Job> = Vec::new();
        let mut all_succeeded = true;
        while all_succeeded
            && group.len() < Self::BATCH
            && started.elapsed() < Self::BATCH_TIME
            && let Some(mut job) = pending.pop_front()
        {
            all_succeeded = job.run(connection, false) && !connection.is_autocommit();
            group.push(job);
        }
        let committed = match all_succeeded {
            true => Self::commit(connection),
            false => {
                let _ = connection.execute_batch("ROLLBACK");
                Self::begin(connection).and_then(|()| {
                    for job in &mut group {
                        job.run(connection, true);
                        if connection.is_autocommit() {
                            return Err("the transaction was rolled back; retry".to_owned());
                        }
                    }
                    Self::commit(connection)
                })
            }
        };
        for job in group {
            job.finish(committed.clone());
        }
    }

    fn begin(connection: &Connection) -> Result<(), String> {
        if !connection.is_autocommit() {
            // Left over from a failure: nothing of it was acknowledged.
            let _ = connection.execute_batch("ROLLBACK");
        }
        run_cached(connection, "BEGIN IMMEDIATE")
            .map(|_| ())
            .map_err(|error| error.to_string())
    }

    fn commit(connection: &Connection) -> Result<(), String> {
        run_cached(connection, "COMMIT")
            .map(|_| ())
            .map_err(|error| {
                let _ = connection.execute_batch("ROLLBACK");
                error.to_string()
            })
    }
}

fn read_consent(tx: &Connection, dialog_id: &str) -> rusqlite::Result<Option<ConsentRecord>> {
    tx.prepare_cached(
        "SELECT dialog_id, customer_id, value, decided_at FROM consents WHERE dialog_id = ?1",
    )?
    .query_row([dialog_id], consent_from_row)
    .optional()
}

fn consent_from_row(row: &Row<'_>) -> rusqlite::Result<ConsentRecord> {
    Ok(ConsentRecord {
        dialog_id: DialogId::from_trusted(row.get(0)?),
        customer_id: CustomerId::from_trusted(row.get(1)?),
        value: row.get(2)?,
        decided_at: row.get(3)?,
    })
}

/// Makes `decision` the one in force, unless it already is (then its original time stands); numbers what
/// it did as a decision event.
fn write_consent(tx: &Connection, decision: &Decision) -> rusqlite::Result<ConsentRecord> {
    let existing = read_consent(tx, decision.dialog_id.as_str())?;
    if let Some(existing) = existing.as_ref().filter(|e| e.value == decision.value) {
        return Ok(existing.clone());
    }
    let kind = DecisionKind::of(existing.map(|record| record.value), decision.value);
    let change = last_change_in(tx)? + 1;
    tx.prepare_cached(
        "INSERT INTO decision_events (change, dialog_id, kind, at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        change,
        decision.dialog_id.as_str(),
        kind.as_str(),
        decision.at
    ])?;
    set_last_change(tx, change)?;
    tx.prepare_cached(
        "INSERT INTO consent_events (dialog_id, value, decided_at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![
        decision.dialog_id.as_str(),
        decision.value,
        decision.at
    ])?;
    tx.prepare_cached(
        "INSERT INTO consents (dialog_id, customer_id, value, decided_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (dialog_id) DO UPDATE SET value = excluded.value, decided_at = excluded.decided_at
         RETURNING dialog_id, customer_id, value, decided_at",
    )?
    .query_row(
        params![
            decision.dialog_id.as_str(),
            decision.customer_id.as_str(),
            decision.value,
            decision.at
        ],
        consent_from_row,
    )
}

/// Inserts the messages not yet stored and folds them into their dialog's summary; returns how many were new.
fn insert_messages(
    tx: &Connection,
    messages: &[Message],
    consented_at: i64,
) -> rusqlite::Result<u64> {
    let Some(first) = messages.first() else {
        return Ok(0);
    };
    // Only a conflict on the key means "stored already": any other (a change number taken twice) is an error.
    let mut insert = tx.prepare_cached(
        "INSERT INTO messages (id, dialog_id, customer_id, client_id, text, language, created_at, seq, change_seq)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (dialog_id, id) DO NOTHING",
    )?;
    let first_change = last_change_in(tx)? + 1;
    let mut inserted = 0u64;
    let mut first_at = i64::MAX;
    let mut last_at = i64::MIN;
    let mut languages = BTreeSet::new();
    for message in messages {
        let changed = insert.execute(params![
            message.id,
            message.dialog_id.as_str(),
            message.customer_id.as_str(),
            message.client_id.as_ref().map(ClientMessageId::as_str),
            message.text.as_str(),
            message.language.as_str(),
            message.created_at,
            message.seq,
            first_change + inserted as i64,
        ])?;
        if changed == 1 {
            inserted += 1;
            first_at = first_at.min(message.created_at);
            last_at = last_at.max(message.created_at);
            languages.insert(message.language.as_str());
        }
    }
    if inserted == 0 {
        return Ok(0);
    }
    set_last_change(tx, first_change + inserted as i64 - 1)?;
    let dialog_id = first.dialog_id.as_str();
    let (last_message_at, message_count): (i64, i64) = tx
        .prepare_cached(
            "INSERT INTO dialogs (id, customer_id, message_count, first_message_at, last_message_at, consented_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (id) DO UPDATE SET
                 message_count = message_count + excluded.message_count,
                 first_message_at = min(first_message_at, excluded.first_message_at),
                 last_message_at = max(last_message_at, excluded.last_message_at)
             RETURNING last_message_at, message_count",
        )?
        .query_row(
            params![
                dialog_id,
                first.customer_id.as_str(),
                inserted as i64,
                first_at,
                last_at,
                consented_at
            ],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
    // Every language row carries the dialog's sort key, so a dialog that moved moves in each of them. (A
    // dialog row created just now has no language rows yet: they go with it when it is deleted.)
    if message_count > inserted as i64 {
        tx.prepare_cached(
            "UPDATE dialog_languages SET last_message_at = ?2 WHERE dialog_id = ?1 AND last_message_at <> ?2",
        )?
        .execute(params![dialog_id, last_message_at])?;
    }
    let mut add_language = tx.prepare_cached(
        "INSERT OR IGNORE INTO dialog_languages (dialog_id, language, last_message_at) VALUES (?1, ?2, ?3)",
    )?;
    for language in languages {
        add_language.execute(params![dialog_id, language, last_message_at])?;
    }
    Ok(inserted)
}

/// Stored messages numbered in `(?1, ?2]`, at most ?3, in number order.
fn stored_changes_sql() -> String {
    format!(
        "SELECT {MESSAGE_COLUMNS}, change_seq FROM messages
         WHERE change_seq > ?1 AND change_seq <= ?2 ORDER BY change_seq LIMIT ?3"
    )
}

/// Decision events numbered in `(?1, ?2]`, at most ?3, in number order.
const DECISION_EVENTS_SQL: &str = "SELECT change, dialog_id, kind, at FROM decision_events
     WHERE change > ?1 AND change <= ?2 ORDER BY change LIMIT ?3";

/// Removals numbered in `(?1, ?2]`, at most ?3, in number order.
const REMOVED_CHANGES_SQL: &str = "SELECT change, dialog_id, reason, at FROM tombstones
     WHERE change > ?1 AND change <= ?2 ORDER BY change LIMIT ?3";

fn last_change_in(tx: &Connection) -> rusqlite::Result<i64> {
    tx.prepare_cached("SELECT last FROM change_counter WHERE id = 1")?
        .query_row([], |row| row.get(0))
}

fn set_last_change(tx: &Connection, last: i64) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE change_counter SET last = ?1 WHERE id = 1")?
        .execute([last])
        .map(drop)
}

/// Numbers the removal of each of `dialog_ids` as a change (a tombstone), in the removing transaction.
fn add_tombstones(
    tx: &Connection,
    dialog_ids: &[String],
    reason: Removal,
    at: i64,
) -> rusqlite::Result<()> {
    let mut change = last_change_in(tx)?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO tombstones (change, dialog_id, reason, at) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for dialog_id in dialog_ids {
        change += 1;
        insert.execute(params![change, dialog_id, reason.as_str(), at])?;
    }
    set_last_change(tx, change)
}

fn message_from_row(row: &Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        id: row.get(0)?,
        dialog_id: DialogId::from_trusted(row.get(1)?),
        customer_id: CustomerId::from_trusted(row.get(2)?),
        client_id: row
            .get::<_, Option<String>>(3)?
            .map(ClientMessageId::from_trusted),
        text: MessageText::from_trusted(row.get(4)?),
        language: Language::from_trusted(row.get(5)?),
        created_at: row.get(6)?,
        seq: row.get(7)?,
    })
}

fn dialog_from_row(row: &Row<'_>) -> rusqlite::Result<Dialog> {
    let languages: Option<String> = row.get(6)?;
    let mut languages: Vec<Language> = languages
        .unwrap_or_default()
        .split(',')
        .filter(|l| !l.is_empty())
        .map(|l| Language::from_trusted(l.to_owned()))
        .collect();
    languages.sort();
    Ok(Dialog {
        id: DialogId::from_trusted(row.get(0)?),
        customer_id: CustomerId::from_trusted(row.get(1)?),
        message_count: row.get(2)?,
        first_message_at: row.get(3)?,
        last_message_at: row.get(4)?,
        consented_at: row.get(5)?,
        languages,
    })
}

/// A WHERE clause under construction, with its positional parameters.
#[derive(Default)]
struct Conditions {
    clauses: Vec<String>,
    params: Vec<Value>,
}

impl Conditions {
    fn add(&mut self, clause: &str, values: impl IntoIterator<Item = Value>) {
        self.clauses.push(clause.to_owned());
        self.params.extend(values);
    }

    /// Adds the keyset bounds of `range` on the sort columns `(at, id)`. Spelled out rather than as a row
    /// value (`(at, id) < (?, ?)`): the plain `at <= ?` term lets SQLite seek the index to the cursor, where
    /// the row value alone made it walk the index from the top (a page at 90% depth of 50,000 dialogs took
    /// 1.6 times the first page; now they cost the same).
    fn add_range(&mut self, at: &str, id: &str, range: &KeyRange) {
        let mut bound = |inclusive: &str, strict: &str, key: &crate::paging::SortKey| {
            self.add(
                &format!("{at} {inclusive} ? AND ({at} {strict} ? OR {id} {strict} ?)"),
                [
                    Value::Integer(key.at),
                    Value::Integer(key.at),
                    Value::Text(key.id.clone()),
                ],
            );
        };
        if let Some(key) = &range.older_than {
            bound("<=", "<", key);
        }
        if let Some(key) = &range.newer_than {
            bound(">=", ">", key);
        }
    }

    /// `since <= at < until` on the column `at`, each end when set.
    fn add_window(&mut self, at: &str, (since, until): (Option<i64>, Option<i64>)) {
        if let Some(since) = since {
            self.add(&format!("{at} >= ?"), [Value::Integer(since)]);
        }
        if let Some(until) = until {
            self.add(&format!("{at} < ?"), [Value::Integer(until)]);
        }
    }

    fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }
}

fn text(value: &str) -> Value {
    Value::Text(value.to_owned())
}

fn direction(order: ScanOrder) -> &'static str {
    match order {
        ScanOrder::NewestFirst => "DESC",
        ScanOrder::OldestFirst => "ASC",
    }
}

/// The FROM clause and conditions for dialogs matching `filter`. With a language, the scan is driven by
/// `dialog_languages` and its copy of the sort key.
/// The FROM clause and conditions of `filter`, with `window` (in ms) in place of the filter's own.
fn dialog_source(
    filter: &DialogFilter,
    window: (Option<i64>, Option<i64>),
) -> (&'static str, &'static str, &'static str, Conditions) {
    let mut conditions = Conditions::default();
    let (from, at, id) = match &filter.language {
        Some(language) => {
            conditions.add("l.language = ?", [text(language.as_str())]);
            (
                "dialog_languages l JOIN dialogs d ON d.id = l.dialog_id",
                "l.last_message_at",
                "l.dialog_id",
            )
        }
        None => ("dialogs d", "d.last_message_at", "d.id"),
    };
    if let Some(customer_id) = &filter.customer_id {
        conditions.add("d.customer_id = ?", [text(customer_id.as_str())]);
    }
    conditions.add_window(at, window);
    (from, at, id, conditions)
}

/// The statement and parameters of a page of dialogs.
fn dialog_scan(
    filter: &DialogFilter,
    range: &KeyRange,
    order: ScanOrder,
    limit: usize,
) -> (String, Vec<Value>) {
    let (window, range) = scan_bounds(filter.window.scaled(1), range);
    let (from, at, id, mut conditions) = dialog_source(filter, window);
    conditions.add_range(at, id, &range);
    let sql = format!(
        "SELECT {DIALOG_COLUMNS} FROM {from}{} ORDER BY {at} {dir}, {id} {dir} LIMIT ?",
        conditions.sql(),
        dir = direction(order),
    );
    let mut params = conditions.params;
    params.push(limit_value(limit));
    (sql, params)
}

/// The statement and parameters of a page of messages.
fn message_scan(
    filter: &MessageFilter,
    range: &KeyRange,
    order: ScanOrder,
    limit: usize,
) -> (String, Vec<Value>) {
    let (window, range) = scan_bounds(filter.window.scaled(1000), range);
    let mut conditions = message_conditions(filter, window);
    conditions.add_range("seq", "id", &range);
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages{} ORDER BY seq {dir}, id {dir} LIMIT ?",
        conditions.sql(),
        dir = direction(order),
    );
    let mut params = conditions.params;
    params.push(limit_value(limit));
    (sql, params)
}

/// The conditions of `filter`, with `window` (in µs of `seq`) in place of the filter's own.
fn message_conditions(filter: &MessageFilter, window: (Option<i64>, Option<i64>)) -> Conditions {
    let mut conditions = Conditions::default();
    if let Some(language) = &filter.language {
        conditions.add("language = ?", [text(language.as_str())]);
    }
    if let Some(customer_id) = &filter.customer_id {
        conditions.add("customer_id = ?", [text(customer_id.as_str())]);
    }
    if let Some(dialog_id) = &filter.dialog_id {
        conditions.add("dialog_id = ?", [text(dialog_id.as_str())]);
    }
    // On the sort key itself, so that a range narrows the same index scan that orders the page.
    conditions.add_window("seq", window);
    conditions
}

/// A column's local time in a zone, as SQL: `local_ms` (the column plus the zone's offset) and
/// `offset_ms`, both with the parameters of the offset expression (`params`, once per use).
struct LocalTime {
    local_ms: String,
    offset_ms: String,
    params: Vec<Value>,
}

/// The zone's offsets over the period the rows can span (the window, or else the table's first and last
/// rows: two index look-ups), as one CASE expression on `column` (ms since the epoch). SQLite has no zone
/// database; a zone changes its offset a few times a year, so the expression stays short.
fn local_time(
    c: &Connection,
    buckets: &Buckets,
    period_sql: &str,
    column: &str,
    window: crate::model::TimeWindow,
) -> StoreResult<LocalTime> {
    let (first, last): (Option<i64>, Option<i64>) = c
        .query_row(period_sql, [], |row| Ok((row.get(0)?, row.get(1)?)))
        .map_err(sqlite_error("statistics period"))?;
    let from = window.since.or(first).unwrap_or(0);
    let to = window.until.or(last).unwrap_or(from).max(from);
    let segments = crate::stats::offsets(buckets.zone, from, to);
    let mut case = String::from("CASE");
    let mut params = Vec::new();
    for (since, _) in segments.iter().skip(1) {
        case.push_str(&format!(" WHEN {column} < ? THEN ?"));
        params.push(Value::Integer(*since));
        params.push(Value::Null);
    }
    // Each WHEN's value is the offset before its change; the last offset holds after.
    for (n, (_, offset)) in segments.iter().enumerate().take(segments.len() - 1) {
        params[n * 2 + 1] = Value::Integer(*offset);
    }
    let last_offset = segments.last().map_or(0, |(_, offset)| *offset);
    case.push_str(&format!(" ELSE {last_offset} END"));
    let offset_ms = if segments.len() == 1 {
        last_offset.to_string()
    } else {
        format!("({case})")
    };
    Ok(LocalTime {
        local_ms: format!("({column} + {offset_ms})"),
        offset_ms,
        params: if segments.len() == 1 {
            Vec::new()
        } else {
            params
        },
    })
}

impl LocalTime {
    /// The two grouping columns of a bucket: its label, and the offset that hour buckets are also grouped
    /// by (a repeated local hour is two buckets); with the parameters of both, in order.
    fn bucket_columns(&self, unit: BucketUnit) -> (String, String, Vec<Value>) {
        let label = bucket_label(unit, &self.local_ms);
        let mut params = self.params.clone();
        if unit == BucketUnit::Hour {
            params.extend(self.params.iter().cloned());
            (label, self.offset_ms.clone(), params)
        } else {
            (label, "0".to_owned(), params)
        }
    }
}

/// The label of the local bucket a local time (ms) falls in, as [`Buckets::start_of`] reads it.
fn bucket_label(unit: BucketUnit, local_ms: &str) -> String {
    let seconds = format!("{local_ms} / 1000, 'unixepoch'");
    match unit {
        BucketUnit::Hour => format!("strftime('%Y-%m-%dT%H:00:00', {seconds})"),
        BucketUnit::Day => format!("date({seconds})"),
        // The Monday on or before the day.
        BucketUnit::Week => format!("date({seconds}, '-6 days', 'weekday 1')"),
        BucketUnit::Month => format!("strftime('%Y-%m-01', {seconds})"),
    }
}

/// Runs a query on `c` and maps every row.
fn select<T>(
    c: &Connection,
    context: &'static str,
    sql: &str,
    params: impl IntoIterator<Item = impl rusqlite::ToSql>,
    row: fn(&Row<'_>) -> rusqlite::Result<T>,
) -> StoreResult<Vec<T>> {
    let mut statement = c.prepare_cached(sql).map_err(sqlite_error(context))?;
    statement
        .query_map(params_from_iter(params), row)
        .and_then(|rows| rows.collect())
        .map_err(sqlite_error(context))
}

fn limit_value(limit: usize) -> Value {
    Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX))
}

#[async_trait]
impl Store for SqliteStore {
    fn describe(&self) -> String {
        format!("embedded SQLite at {}", self.path.display())
    }

    fn scrub_status(&self) -> super::ScrubStatus {
        super::ScrubStatus {
            pending: self.scrubber.pending.load(Ordering::Acquire),
            failures: self.scrubber.failures.load(Ordering::Relaxed),
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        self.with_connection(|c| {
            c.query_row("SELECT 1", [], |_| Ok(()))
                .map_err(sqlite_error("ping"))
        })
        .await
    }

    async fn close(&self) {
        self.pool.close();
    }

    async fn consent_history(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentHistory>> {
        let dialog_id = dialog_id.to_string();
        self.with_connection(move |c| {
            let Some(record) = read_consent(c, &dialog_id).map_err(sqlite_error("read consent"))?
            else {
                return Ok(None);
            };
            let changes = select(
                c,
                "read consent history",
                "SELECT value, decided_at FROM consent_events WHERE dialog_id = ?1 ORDER BY id",
                [&dialog_id],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?;
            Ok(Some(ConsentHistory { record, changes }))
        })
        .await
    }

    async fn begin_erasure(
        &self,
        customer_id: &CustomerId,
        audit: &ErasureAudit,
    ) -> StoreResult<ErasureAudit> {
        let customer = customer_id.to_string();
        let audit = audit.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO erasures_running (customer_id, customer_digest, digest_scheme, erased_by,
                                               started_at, last_batch_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (customer_id) DO NOTHING",
                params![
                    customer,
                    audit.customer_digest,
                    audit.digest_scheme,
                    audit.erased_by,
                    audit.at
                ],
            )
            .and_then(|_| {
                tx.query_row(
                    "SELECT customer_digest, digest_scheme, erased_by, started_at
                     FROM erasures_running WHERE customer_id = ?1",
                    [&customer],
                    |row| {
                        Ok(ErasureAudit {
                            customer_digest: row.get(0)?,
                            digest_scheme: row.get(1)?,
                            erased_by: row.get(2)?,
                            at: row.get(3)?,
                            buffered_messages: 0,
                        })
                    },
                )
            })
            .map_err(sqlite_error("begin an erasure"))
        })
        .await
    }

    async fn erase_batch(
        &self,
        customer_id: &CustomerId,
        max_messages: usize,
    ) -> StoreResult<Option<Erased>> {
        let customer = customer_id.to_string();
        self.write(move |tx| {
            erase_batch_in(tx, &customer, max_messages, now_millis())
                .map_err(sqlite_error("erase a batch"))
        })
        .await
    }

    async fn note_buffered_messages(
        &self,
        customer_id: &CustomerId,
        count: u64,
    ) -> StoreResult<bool> {
        let customer = customer_id.to_string();
        self.write(move |tx| {
            tx.execute(
                "UPDATE erasures_running SET buffered_messages = max(buffered_messages, ?2)
                 WHERE customer_id = ?1",
                params![customer, count as i64],
            )
            .map(|running| running > 0)
            .map_err(sqlite_error("note an erasure's buffered messages"))
        })
        .await
    }

    async fn finish_erasure(
        &self,
        customer_id: &CustomerId,
        at: i64,
    ) -> StoreResult<Option<Erased>> {
        let customer = customer_id.to_string();
        let erased = self
            .write(move |tx| {
                finish_erasure_in(tx, &customer, at).map_err(sqlite_error("finish an erasure"))
            })
            .await?;
        // Deleted rows are overwritten (secure_delete); truncating the log drops their old copies.
        self.scrubber.scrub().await;
        Ok(erased)
    }

    async fn unfinished_erasures(&self) -> StoreResult<Vec<(CustomerId, i64)>> {
        self.with_connection(|c| {
            let mut statement = c
                .prepare("SELECT customer_id, last_batch_at FROM erasures_running")
                .map_err(sqlite_error("list unfinished erasures"))?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .and_then(Iterator::collect::<rusqlite::Result<Vec<_>>>)
                .map_err(sqlite_error("list unfinished erasures"))?;
            rows.into_iter()
                .map(|(customer, at)| {
                    CustomerId::parse("customerId", customer)
                        .map(|customer| (customer, at))
                        .map_err(|_| {
                            StoreError("an unfinished erasure names an invalid customer id".into())
                        })
                })
                .collect()
        })
        .await
    }

    async fn audit_secret(&self, proposed: [u8; 32]) -> StoreResult<[u8; 32]> {
        self.write(move |tx| {
            tx.execute(
                "INSERT OR IGNORE INTO settings (name, value) VALUES ('audit_secret', ?1)",
                [&proposed[..]],
            )
            .and_then(|_| {
                tx.query_row(
                    "SELECT value FROM settings WHERE name = 'audit_secret'",
                    [],
                    |row| row.get::<_, Vec<u8>>(0),
                )
            })
            .map_err(sqlite_error("read the audit secret"))?
            .try_into()
            .map_err(|_| StoreError("the stored audit secret is not 32 bytes".to_owned()))
        })
        .await
    }

    async fn consent(&self, dialog_id: &DialogId) -> StoreResult<Option<ConsentRecord>> {
        let dialog_id = dialog_id.to_string();
        self.with_connection(move |c| {
            read_consent(c, &dialog_id).map_err(sqlite_error("read consent"))
        })
        .await
    }

    async fn consents(&self, dialog_ids: &[DialogId]) -> StoreResult<Vec<ConsentRecord>> {
        if dialog_ids.is_empty() {
            return Ok(Vec::new());
        }
        let dialog_ids: Vec<String> = dialog_ids.iter().map(ToString::to_string).collect();
        self.with_connection(move |c| {
            let mut records = Vec::new();
            for chunk in dialog_ids.chunks(IDS_PER_STATEMENT) {
                let placeholders = vec!["?"; chunk.len()].join(", ");
                let sql = format!(
                    "SELECT dialog_id, customer_id, value, decided_at FROM consents \
                     WHERE dialog_id IN ({placeholders})"
                );
                records.extend(select(c, "read consents", &sql, chunk, consent_from_row)?);
            }
            Ok(records)
        })
        .await
    }

    async fn record_decision(
        &self,
        decision: &Decision,
        messages: Vec<Message>,
    ) -> StoreResult<DecisionWritten> {
        let decision = decision.clone();
        let messages = if decision.value { messages } else { Vec::new() };
        let written = self
            .write(move |tx| {
                let record = write_consent(tx, &decision).map_err(sqlite_error("write consent"))?;
                if decision.value {
                    let inserted = insert_messages(tx, &messages, record.decided_at)
                        .map_err(sqlite_error("insert messages"))?;
                    Ok(DecisionWritten {
                        record,
                        inserted,
                        deleted: 0,
                    })
                } else {
                    let dialog_id = decision.dialog_id.as_str();
                    let deleted = tx
                        .execute("DELETE FROM messages WHERE dialog_id = ?1", [dialog_id])
                        .and_then(|deleted| {
                            tx.execute(
                                "DELETE FROM dialog_languages WHERE dialog_id = ?1",
                                [dialog_id],
                            )?;
                            let removed =
                                tx.execute("DELETE FROM dialogs WHERE id = ?1", [dialog_id])?;
                            if removed > 0 {
                                add_tombstones(
                                    tx,
                                    &[dialog_id.to_owned()],
                                    Removal::Withdrawn,
                                    decision.at,
                                )?;
                            }
                            Ok(deleted)
                        })
                        .map_err(sqlite_error("delete withdrawn dialog"))?;
                    Ok(DecisionWritten {
                        record,
                        inserted: 0,
                        deleted: deleted as u64,
                    })
                }
            })
            .await?;
        if written.deleted > 0 {
            self.scrubber.scrub().await;
        }
        Ok(written)
    }

    async fn append_consented(&self, message: &Message) -> StoreResult<Appended> {
        let message = message.clone();
        self.write(move |tx| {
            let consent = read_consent(tx, message.dialog_id.as_str())
                .map_err(sqlite_error("read consent"))?;
            let Some(consent) = consent.filter(|c| c.value) else {
                return Ok(Appended::NotConsented);
            };
            let existing = tx
                .prepare_cached(&format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE dialog_id = ?1 AND id = ?2"
                ))
                .and_then(|mut select| {
                    select.query_row([message.dialog_id.as_str(), &message.id], message_from_row)
                })
                .optional()
                .map_err(sqlite_error("read message"))?;
            if let Some(existing) = existing {
                return Ok(Appended::Stored {
                    message: existing,
                    newly: false,
                });
            }
            insert_messages(tx, std::slice::from_ref(&message), consent.decided_at)
                .map_err(sqlite_error("insert message"))?;
            Ok(Appended::Stored {
                message: message.clone(),
                newly: true,
            })
        })
        .await
    }

    async fn dialog(&self, dialog_id: &DialogId) -> StoreResult<Option<Dialog>> {
        let dialog_id = dialog_id.to_string();
        self.with_connection(move |c| {
            c.query_row(
                &format!("SELECT {DIALOG_COLUMNS} FROM dialogs d WHERE d.id = ?1"),
                [dialog_id],
                dialog_from_row,
            )
            .optional()
            .map_err(sqlite_error("read dialog"))
        })
        .await
    }

    async fn scan_dialogs(
        &self,
        filter: &DialogFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Dialog>> {
        let (sql, params) = dialog_scan(filter, range, order, limit);
        self.with_connection(move |c| select(c, "scan dialogs", &sql, params, dialog_from_row))
            .await
    }

    async fn count_dialogs(&self, filter: &DialogFilter) -> StoreResult<u64> {
        let (from, _, _, conditions) = dialog_source(filter, filter.window.scaled(1));
        self.count(
            format!("SELECT count(*) FROM {from}{}", conditions.sql()),
            conditions.params,
        )
        .await
    }

    async fn scan_messages(
        &self,
        filter: &MessageFilter,
        range: &KeyRange,
        order: ScanOrder,
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let (sql, params) = message_scan(filter, range, order, limit);
        self.with_connection(move |c| select(c, "scan messages", &sql, params, message_from_row))
            .await
    }

    async fn count_messages(&self, filter: &MessageFilter) -> StoreResult<u64> {
        let conditions = message_conditions(filter, filter.window.scaled(1000));
        self.count(
            format!("SELECT count(*) FROM messages{}", conditions.sql()),
            conditions.params,
        )
        .await
    }

    async fn message_stats(
        &self,
        filter: &MessageFilter,
        grouping: &Grouping,
        limit: usize,
    ) -> StoreResult<Vec<MessageStats>> {
        let filter = filter.clone();
        let grouping = *grouping;
        self.with_connection(move |c| {
            let bucket = match grouping.buckets {
                Some(buckets) => Some((
                    buckets,
                    // By `seq`, whose index answers min and max at once (µs, so /1000).
                    local_time(
                        c,
                        &buckets,
                        "SELECT (SELECT min(seq) FROM messages) / 1000, \
                                (SELECT max(seq) FROM messages) / 1000",
                        "created_at",
                        filter.window,
                    )?,
                )),
                None => None,
            };
            let conditions = message_conditions(&filter, filter.window.scaled(1000));
            let mut columns = vec![
                if grouping.language {
                    "language"
                } else {
                    "NULL"
                }
                .to_owned(),
                if grouping.customer {
                    "customer_id"
                } else {
                    "NULL"
                }
                .to_owned(),
            ];
            let mut params = Vec::new();
            match &bucket {
                Some((buckets, local)) => {
                    let (label, offset, bucket_params) = local.bucket_columns(buckets.unit);
                    columns.extend([label, offset]);
                    params = bucket_params;
                }
                None => columns.extend(["NULL".to_owned(), "0".to_owned()]),
            }
            params.extend(conditions.params.iter().cloned());
            // In time order: a local hour that repeats comes first with the larger offset.
            let sql = format!(
                "SELECT {columns}, count(*), count(DISTINCT dialog_id) FROM messages{where_} \
                 GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 DESC LIMIT ?",
                columns = columns.join(", "),
                where_ = conditions.sql(),
            );
            params.push(limit_value(limit));
            let rows = select(c, "message statistics", &sql, params, |row| {
                Ok((
                    row.get::<_, Option<String>>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, i64>(4)?,
                    row.get::<_, i64>(5)?,
                ))
            })?;
            rows.into_iter()
                .map(|(language, customer, label, offset, messages, dialogs)| {
                    let bucket = match (&bucket, label) {
                        (Some((buckets, _)), Some(label)) => {
                            Some(buckets.start_of(&label, offset).ok_or_else(|| {
                                StoreError(format!("message statistics: bucket label {label:?}"))
                            })?)
                        }
                        _ => None,
                    };
                    Ok(MessageStats {
                        language: language.map(Language::from_trusted),
                        customer_id: customer.map(CustomerId::from_trusted),
                        bucket,
                        messages: messages as u64,
                        dialogs: dialogs as u64,
                    })
                })
                .collect()
        })
        .await
    }

    async fn consent_stats(
        &self,
        filter: &ConsentFilter,
        buckets: Option<&Buckets>,
        limit: usize,
    ) -> StoreResult<Vec<ConsentStats>> {
        let filter = filter.clone();
        let buckets = buckets.copied();
        self.with_connection(move |c| {
            // Each change of decision, with the one before it (a `false` after a `true` is a withdrawal).
            let mut inner = Conditions::default();
            if let Some(customer_id) = &filter.customer_id {
                inner.add("c.customer_id = ?", [text(customer_id.as_str())]);
            }
            let changes = format!(
                "SELECT e.value AS value, e.decided_at AS decided_at, \
                        lag(e.value) OVER (PARTITION BY e.dialog_id ORDER BY e.id) AS previous \
                 FROM consent_events e JOIN consents c ON c.dialog_id = e.dialog_id{}",
                inner.sql()
            );
            let mut outer = Conditions::default();
            outer.add_window("decided_at", filter.window.scaled(1));
            let mut params = inner.params;
            let (label, offset) = match &buckets {
                Some(buckets) => {
                    let local = local_time(
                        c,
                        buckets,
                        "SELECT min(decided_at), max(decided_at) FROM consent_events",
                        "decided_at",
                        filter.window,
                    )?;
                    let (label, offset, bucket_params) = local.bucket_columns(buckets.unit);
                    params = bucket_params.into_iter().chain(params).collect();
                    (label, offset)
                }
                None => ("NULL".to_owned(), "0".to_owned()),
            };
            params.extend(outer.params.iter().cloned());
            params.push(limit_value(limit));
            let sql = format!(
                "SELECT {label}, {offset}, \
                        sum(value = 1), sum(value = 0 AND coalesce(previous, 0) = 0), \
                        sum(value = 0 AND previous = 1) \
                 FROM ({changes}){where_} GROUP BY 1, 2 ORDER BY 1, 2 DESC LIMIT ?",
                where_ = outer.sql(),
            );
            let rows = select(c, "consent statistics", &sql, params, |row| {
                Ok((
                    row.get::<_, Option<String>>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, Option<i64>>(2)?,
                    row.get::<_, Option<i64>>(3)?,
                    row.get::<_, Option<i64>>(4)?,
                ))
            })?;
            rows.into_iter()
                // Without buckets, no decision at all is one row of NULL sums: no group.
                .filter(|(_, _, granted, _, _)| granted.is_some())
                .map(|(label, offset, granted, refused, withdrawn)| {
                    let bucket = match (&buckets, label) {
                        (Some(buckets), Some(label)) => {
                            Some(buckets.start_of(&label, offset).ok_or_else(|| {
                                StoreError(format!("consent statistics: bucket label {label:?}"))
                            })?)
                        }
                        _ => None,
                    };
                    Ok(ConsentStats {
                        bucket,
                        granted: granted.unwrap_or(0) as u64,
                        refused: refused.unwrap_or(0) as u64,
                        withdrawn: withdrawn.unwrap_or(0) as u64,
                    })
                })
                .collect()
        })
        .await
    }

    async fn last_change(&self) -> StoreResult<i64> {
        self.with_connection(|c| last_change_in(c).map_err(sqlite_error("read the last change")))
            .await
    }

    async fn scan_changes(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<Change>> {
        self.with_connection(move |c| {
            let bounds = [
                Value::Integer(after),
                Value::Integer(through),
                limit_value(limit),
            ];
            let stored = select(
                c,
                "read stored changes",
                &stored_changes_sql(),
                &bounds,
                |row| {
                    Ok(Change::Stored {
                        number: row.get(8)?,
                        message: message_from_row(row)?,
                    })
                },
            )?;
            let removed = select(c, "read removals", REMOVED_CHANGES_SQL, &bounds, |row| {
                let reason: String = row.get(2)?;
                Ok(Change::Removed {
                    number: row.get(0)?,
                    dialog_id: DialogId::from_trusted(row.get(1)?),
                    reason: Removal::from_stored(&reason).unwrap_or(Removal::Erased),
                    at: row.get(3)?,
                })
            })?;
            Ok(merge_changes(stored, removed, limit))
        })
        .await
    }

    async fn scan_decisions(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> StoreResult<Vec<DecisionEvent>> {
        self.with_connection(move |c| {
            select(
                c,
                "read decision events",
                DECISION_EVENTS_SQL,
                [
                    Value::Integer(after),
                    Value::Integer(through),
                    limit_value(limit),
                ],
                |row| {
                    let kind: String = row.get(2)?;
                    Ok(DecisionEvent {
                        number: row.get(0)?,
                        dialog_id: DialogId::from_trusted(row.get(1)?),
                        // Only this code writes kinds; an unknown one reads as a refusal.
                        kind: DecisionKind::from_stored(&kind).unwrap_or(DecisionKind::Refused),
                        at: row.get(3)?,
                    })
                },
            )
        })
        .await
    }

    async fn messages_of_dialogs(
        &self,
        dialog_ids: &[DialogId],
        limit: usize,
    ) -> StoreResult<Vec<Message>> {
        let dialog_ids: Vec<String> = dialog_ids.iter().map(ToString::to_string).collect();
        self.with_connection(move |c| {
            let mut messages = Vec::new();
            for chunk in dialog_ids.chunks(IDS_PER_STATEMENT) {
                let left = limit.saturating_sub(messages.len());
                if left == 0 {
                    break;
                }
                let placeholders = vec!["?"; chunk.len()].join(", ");
                let sql = format!(
                    "SELECT {MESSAGE_COLUMNS} FROM messages WHERE dialog_id IN ({placeholders}) \
                     ORDER BY dialog_id, seq LIMIT {left}"
                );
                messages.extend(select(c, "load messages", &sql, chunk, message_from_row)?);
            }
            Ok(messages)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    async fn scratch_store(dir: &tempfile::TempDir) -> SqliteStore {
        let store = SqliteStore::open(&dir.path().join("store.sqlite3"))
            .await
            .unwrap();
        store
            .write(|c| {
                c.execute_batch("CREATE TABLE scratch (x INTEGER)")
                    .map_err(sqlite_error("create"))
            })
            .await
            .unwrap();
        store
    }

    /// Every listing, with any filter, time window and cursor bound, in either order, reads an index in its
    /// order: no sort of the matching rows, so that a deep page or a narrow window costs what the first
    /// page does.
    #[tokio::test]
    async fn every_listing_seeks_an_index_in_its_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir).await;
        let key = crate::paging::SortKey {
            at: 5,
            id: "x".into(),
        };
        let ranges = [
            KeyRange::default(),
            KeyRange {
                older_than: Some(key.clone()),
                newer_than: None,
            },
            KeyRange {
                older_than: None,
                newer_than: Some(key.clone()),
            },
        ];
        let windows = [
            crate::model::TimeWindow::default(),
            crate::model::TimeWindow {
                since: Some(1),
                until: None,
            },
            crate::model::TimeWindow {
                since: Some(1),
                until: Some(9),
            },
        ];
        let language = Some(Language::from_trusted("en".into()));
        let customer_id = Some(CustomerId::from_trusted("c".into()));
        let mut statements = Vec::new();
        for window in windows {
            for range in &ranges {
                for order in [ScanOrder::NewestFirst, ScanOrder::OldestFirst] {
                    for (language, customer_id) in [
                        (None, None),
                        (language.clone(), None),
                        (None, customer_id.clone()),
                        (language.clone(), customer_id.clone()),
                    ] {
                        let dialogs = DialogFilter {
                            language: language.clone(),
                            customer_id: customer_id.clone(),
                            window,
                        };
                        statements.push(dialog_scan(&dialogs, range, order, 10));
                        let messages = MessageFilter {
                            language,
                            customer_id,
                            dialog_id: Some(DialogId::from_trusted("d".into())),
                            window,
                        };
                        statements.push(message_scan(&messages, range, order, 10));
                    }
                }
            }
        }
        // The change feed's two reads.
        let bounds = vec![Value::Integer(1), Value::Integer(9), Value::Integer(10)];
        statements.push((stored_changes_sql(), bounds.clone()));
        statements.push((REMOVED_CHANGES_SQL.to_owned(), bounds.clone()));
        statements.push((DECISION_EVENTS_SQL.to_owned(), bounds));
        let plans = store
            .with_connection(move |c| {
                let mut plans = Vec::new();
                for (sql, params) in statements {
                    let mut explain = c
                        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                        .map_err(sqlite_error("explain"))?;
                    let steps: Vec<String> = explain
                        .query_map(params_from_iter(params), |row| row.get::<_, String>(3))
                        .and_then(|rows| rows.collect())
                        .map_err(sqlite_error("explain"))?;
                    plans.push((sql, steps.join(" / ")));
                }
                Ok(plans)
            })
            .await
            .unwrap();
        for (sql, plan) in plans {
            assert!(
                !plan.contains("TEMP B-TREE")
                    && (plan.contains("INDEX") || plan.contains("PRIMARY KEY")),
                "{sql}\n  {plan}"
            );
        }
    }

    /// A write that inserts `x`, counting its runs, then fails, panics or succeeds as `how` says.
    fn insert(
        x: i64,
        runs: &Arc<AtomicUsize>,
        how: &'static str,
    ) -> impl FnMut(&Connection) -> StoreResult<i64> + Send + 'static {
        let runs = runs.clone();
        move |c| {
            runs.fetch_add(1, Ordering::SeqCst);
            c.execute("INSERT INTO scratch (x) VALUES (?1)", [x])
                .map_err(sqlite_error("insert"))?;
            match how {
                "fail" => Err(StoreError("refused".to_owned())),
                "panic" => panic!("a bug in a write"),
                _ => Ok(x),
            }
        }
    }

    async fn stored(store: &SqliteStore) -> Vec<i64> {
        store
            .with_connection(|c| {
                let mut select = c.prepare("SELECT x FROM scratch ORDER BY x").unwrap();
                Ok(select
                    .query_map([], |row| row.get(0))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect())
            })
            .await
            .unwrap()
    }

    /// Queues `writes` behind a write that holds the writer, so that they share one transaction.
    async fn as_one_group<T: Send + 'static>(
        store: &SqliteStore,
        writes: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>,
    ) -> Vec<T> {
        let hold = store.write(|_| {
            std::thread::sleep(Duration::from_millis(200));
            Ok(())
        });
        let (held, results) = tokio::join!(hold, futures::future::join_all(writes));
        held.unwrap();
        results
    }

    #[tokio::test]
    async fn a_read_connection_a_panic_poisoned_is_never_handed_out_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir).await;
        // The pool holds one connection while nothing is in flight: the poisoned one, unless dropped.
        let failed = store
            .with_connection(|_| -> StoreResult<()> { panic!("a bug in a read") })
            .await;
        assert!(failed.is_err());
        for _ in 0..20 {
            let count = store
                .count("SELECT count(*) FROM scratch".to_owned(), Vec::new())
                .await;
            assert_eq!(count.unwrap(), 0);
        }
        assert_eq!(
            store.pool.status().size,
            1,
            "one healthy connection, reused"
        );
    }

    #[tokio::test]
    async fn a_failing_write_in_a_group_is_undone_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let results = as_one_group(
            &store,
            vec![
                Box::pin(store.write(insert(1, &runs, "ok"))),
                Box::pin(store.write(insert(2, &runs, "fail"))),
                Box::pin(store.write(insert(3, &runs, "ok"))),
                Box::pin(store.write(insert(4, &runs, "panic"))),
                Box::pin(store.write(insert(5, &runs, "ok"))),
            ],
        )
        .await;
        let answers: Vec<Result<i64, String>> = results
            .into_iter()
            .map(|r| r.map_err(|e| e.to_string()))
            .collect();
        assert_eq!(answers[0], Ok(1));
        assert!(answers[1].as_ref().unwrap_err().contains("refused"));
        assert_eq!(answers[2], Ok(3));
        assert!(answers[3].as_ref().unwrap_err().contains("a bug"));
        assert_eq!(answers[4], Ok(5));
        assert_eq!(stored(&store).await, vec![1, 3, 5]);
        // A transaction ends at its first failing write and is redone in savepoints: writes 1 and 2 ran
        // twice, then 3 and 4, then 5 once.
        assert_eq!(runs.load(Ordering::SeqCst), 2 * 2 + 2 * 2 + 1);
    }

    #[tokio::test]
    async fn a_group_without_failures_runs_each_write_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let writes = (1..=20)
            .map(|x| Box::pin(store.write(insert(x, &runs, "ok"))) as _)
            .collect();
        let results = as_one_group(&store, writes).await;
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(stored(&store).await, (1..=20).collect::<Vec<_>>());
        assert_eq!(runs.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_write_that_overruns_its_deadline_is_undone_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir)
            .await
            .with_write_deadline(Duration::from_millis(300));
        let runs = Arc::new(AtomicUsize::new(0));
        let mut slow = insert(1, &runs, "ok");
        let overrun = store
            .write(move |c| {
                let x = slow(c)?;
                std::thread::sleep(Duration::from_millis(400));
                Ok(x)
            })
            .await;
        assert!(
            overrun.unwrap_err().to_string().contains("deadline"),
            "the write ended past its deadline"
        );
        assert_eq!(store.write(insert(2, &runs, "ok")).await.unwrap(), 2);
        assert_eq!(stored(&store).await, vec![2]);
    }

    #[tokio::test]
    async fn committed_pages_reach_the_database_file_without_waiting_for_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = scratch_store(&dir).await;
        let file = dir.path().join("store.sqlite3");
        let before = std::fs::metadata(&file).unwrap().len();
        // 2 MiB: far below the writer's own checkpoint threshold (16 MiB).
        store
            .write(|c| {
                c.execute(
                    "INSERT INTO scratch (x) SELECT zeroblob(2 * 1024 * 1024)",
                    [],
                )
                .map_err(sqlite_error("insert"))
            })
            .await
            .unwrap();
        let copied = async {
            while std::fs::metadata(&file).unwrap().len() < before + 2 * 1024 * 1024 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), copied)
            .await
            .expect("the checkpointer copied the log into the database file");
    }

    fn message(dialog: &str, text: &str, language: &str, seq: i64) -> Message {
        Message {
            id: uuid::Uuid::now_v7().to_string(),
            dialog_id: DialogId::from_trusted(dialog.to_owned()),
            customer_id: CustomerId::from_trusted("c".to_owned()),
            client_id: None,
            text: MessageText::from_trusted(text.to_owned()),
            language: Language::from_trusted(language.to_owned()),
            created_at: seq / 1000,
            seq,
        }
    }

    async fn language_sort_keys(store: &SqliteStore, dialog: &str) -> Vec<(String, i64)> {
        let dialog = dialog.to_owned();
        store
            .with_connection(move |c| {
                let mut select = c
                    .prepare("SELECT language, last_message_at FROM dialog_languages WHERE dialog_id = ?1 ORDER BY language")
                    .unwrap();
                Ok(select
                    .query_map([dialog], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect())
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn every_language_row_of_a_dialog_follows_its_latest_message() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("store.sqlite3"))
            .await
            .unwrap();
        let decision = Decision {
            dialog_id: DialogId::from_trusted("d".to_owned()),
            customer_id: CustomerId::from_trusted("c".to_owned()),
            value: true,
            at: 5,
        };
        let written = store
            .record_decision(
                &decision,
                vec![
                    message("d", "hi", "en", 1_000),
                    message("d", "hallo", "de", 2_000),
                ],
            )
            .await
            .unwrap();
        assert_eq!(written.inserted, 2);
        assert_eq!(
            language_sort_keys(&store, "d").await,
            [("de".to_owned(), 2), ("en".to_owned(), 2)]
        );
        // A late message in a third language moves the dialog in all three listings.
        store
            .append_consented(&message("d", "salut", "fr", 9_000))
            .await
            .unwrap();
        assert_eq!(
            language_sort_keys(&store, "d").await,
            [
                ("de".to_owned(), 9),
                ("en".to_owned(), 9),
                ("fr".to_owned(), 9)
            ]
        );
    }

    /// The first layout, before `user_version` was kept: `messages` keyed by `id` alone.
    const LAYOUT_0_MESSAGES: &str = "CREATE TABLE messages (
        id TEXT PRIMARY KEY, dialog_id TEXT NOT NULL, customer_id TEXT NOT NULL, client_id TEXT,
        text TEXT NOT NULL, language TEXT NOT NULL, created_at INTEGER NOT NULL, seq INTEGER NOT NULL);
        CREATE INDEX messages_dialog ON messages (dialog_id, seq);
        CREATE INDEX messages_recent ON messages (seq, id);
        INSERT INTO messages VALUES ('m-1', 'd-1', 'c-1', 'a', 'hello', 'en', 1, 10);
        INSERT INTO messages VALUES ('m-2', 'd-1', 'c-1', NULL, 'again', 'en', 2, 20);";

    #[tokio::test]
    async fn erasure_records_of_version_1_keep_their_plain_digest_and_the_secret_is_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.sqlite3");
        drop(SqliteStore::open(&path).await.unwrap());
        // Back to version 1's erasures table, with one record.
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "DROP TABLE erasures; DROP TABLE settings;
                 CREATE TABLE erasures (id INTEGER PRIMARY KEY, customer_digest TEXT NOT NULL,
                     erased_at INTEGER NOT NULL, dialogs INTEGER NOT NULL, messages INTEGER NOT NULL,
                     consents INTEGER NOT NULL, buffered_messages INTEGER NOT NULL);
                 INSERT INTO erasures VALUES (1, 'abc', 5, 1, 2, 1, 0);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        let store = SqliteStore::open(&path).await.unwrap();
        let (version, scheme, by) = store
            .with_connection(|c| {
                let version: i64 = c
                    .query_row("PRAGMA user_version", [], |r| r.get(0))
                    .unwrap();
                let (scheme, by) = c
                    .query_row("SELECT digest_scheme, erased_by FROM erasures", [], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
                    })
                    .unwrap();
                Ok((version, scheme, by))
            })
            .await
            .unwrap();
        assert_eq!(
            (version, scheme.as_str(), by),
            (SCHEMA_VERSION, "sha256", None)
        );
        // The first secret proposed is kept; later proposals get it back.
        let first = store.audit_secret([1; 32]).await.unwrap();
        assert_eq!(first, [1; 32]);
        assert_eq!(store.audit_secret([2; 32]).await.unwrap(), [1; 32]);
        drop(store);
        let reopened = SqliteStore::open(&path).await.unwrap();
        assert_eq!(reopened.audit_secret([3; 32]).await.unwrap(), [1; 32]);
    }

    #[tokio::test]
    async fn a_database_of_the_first_layout_is_migrated_with_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite3");
        Connection::open(&path)
            .unwrap()
            .execute_batch(LAYOUT_0_MESSAGES)
            .unwrap();
        let store = SqliteStore::open(&path).await.unwrap();
        let (version, messages, duplicate) = store
            .with_connection(|c| {
                let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
                let messages: Vec<(String, String)> = c
                    .prepare("SELECT id, text FROM messages ORDER BY seq")
                    .unwrap()
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
                let duplicate = c
                    .execute(
                        "INSERT OR IGNORE INTO messages
                             (id, dialog_id, customer_id, client_id, text, language, created_at, seq, change_seq)
                         VALUES ('m-1', 'd-1', 'c-1', 'a', 'x', 'en', 3, 30, 3)",
                        [],
                    )
                    .unwrap();
                Ok((version, messages, duplicate))
            })
            .await
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(
            messages,
            [
                ("m-1".into(), "hello".into()),
                ("m-2".into(), "again".into())
            ]
        );
        assert_eq!(duplicate, 0, "a stored message is still unique per dialog");
        // The old messages are the first changes, in the order they were stored.
        assert_eq!(store.last_change().await.unwrap(), 2);
        let numbers: Vec<(i64, String)> = store
            .scan_changes(0, 2, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|change| match change {
                Change::Stored { number, message } => (number, message.id),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(numbers, [(1, "m-1".into()), (2, "m-2".into())]);
        drop(store);
        // Opening it again is a no-op.
        SqliteStore::open(&path).await.unwrap();
    }

    /// A database of version 3 (messages without change numbers) is numbered in the order its messages were
    /// stored, and the next consent's messages follow them.
    #[tokio::test]
    async fn messages_stored_before_the_change_feed_are_numbered_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.sqlite3");
        let store = SqliteStore::open(&path).await.unwrap();
        let decide = |dialog: &str| Decision {
            dialog_id: DialogId::from_trusted(dialog.into()),
            customer_id: CustomerId::from_trusted("c".into()),
            value: true,
            at: 1,
        };
        for (dialog, texts) in [("d1", ["a", "b"]), ("d2", ["c", "d"])] {
            let messages = texts
                .iter()
                .enumerate()
                .map(|(n, text)| message(dialog, text, "en", n as i64 + 1))
                .collect();
            store
                .record_decision(&decide(dialog), messages)
                .await
                .unwrap();
        }
        drop(store);
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "DROP INDEX messages_changes; ALTER TABLE messages DROP COLUMN change_seq;
                 DROP TABLE change_counter; DROP TABLE tombstones; PRAGMA user_version = 3;",
            )
            .unwrap();
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.last_change().await.unwrap(), 4);
        let texts = |changes: Vec<Change>| -> Vec<(i64, String)> {
            changes
                .into_iter()
                .map(|change| match change {
                    Change::Stored { number, message } => {
                        (number, message.text.as_str().to_owned())
                    }
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(
            texts(store.scan_changes(0, 4, 10).await.unwrap()),
            [
                (1, "a".into()),
                (2, "b".into()),
                (3, "c".into()),
                (4, "d".into())
            ]
        );
        store
            .record_decision(&decide("d3"), vec![message("d3", "e", "en", 9)])
            .await
            .unwrap();
        // Its decision is change 5 (a decision event), its message 6.
        assert_eq!(
            texts(store.scan_changes(4, 6, 10).await.unwrap()),
            [(6, "e".into())]
        );
        let decisions = store.scan_decisions(4, 6, 10).await.unwrap();
        assert_eq!(
            decisions
                .iter()
                .map(|event| (event.number, event.kind))
                .collect::<Vec<_>>(),
            [(5, DecisionKind::Granted)]
        );
    }

    #[tokio::test]
    async fn a_database_from_a_newer_version_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.sqlite3");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99; CREATE TABLE future (x);")
            .unwrap();
        let error = SqliteStore::open(&path).await.err().unwrap().to_string();
        assert!(error.contains("newer DataAPI"), "{error}");
        let tables: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_log_a_reader_keeps_from_truncation_is_truncated_once_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite3");
        let store = scratch_store(&dir).await;
        let runs = Arc::new(AtomicUsize::new(0));
        store.write(insert(1, &runs, "ok")).await.unwrap();
        let log = || std::fs::metadata(dir.path().join("store.sqlite3-wal")).map_or(0, |m| m.len());
        // A reader outside the store holds a snapshot: the log cannot be emptied under it.
        let reader = Connection::open(&path).unwrap();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM scratch;")
            .unwrap();
        store.write(insert(2, &runs, "ok")).await.unwrap();
        store.scrubber.scrub().await;
        assert!(store.scrub_status().pending, "{:?}", store.scrub_status());
        assert!(store.scrub_status().failures > 0);
        assert!(log() > 0);
        // Once the reader is done, the background retry empties it.
        reader.execute_batch("COMMIT;").unwrap();
        drop(reader);
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.scrub_status().pending {
            assert!(Instant::now() < deadline, "the log was never truncated");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(log(), 0);
    }
}
