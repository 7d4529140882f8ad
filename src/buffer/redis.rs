//! The shared buffer on Redis (`BUFFER_URL`): a standalone Redis (or a primary that Sentinel manages behind
//! a stable address), or a Redis Cluster. Every replica of DataAPI uses the same one, so a push on one
//! replica and the consent on another meet, and undecided dialogs outlive a restart of the service (as long
//! as Redis keeps them: see README's durability notes).
//!
//! Layout. The buffer is split in shards: one on a standalone Redis, 256 on a Cluster. A dialog belongs to
//! the shard its id hashes to, and every key of a shard carries the shard's hash tag, so all keys of a
//! dialog, and the shard's bookkeeping (usage counters, the retention index, the customers' dialog sets),
//! live in one hash slot, on one node. Each step of a dialog is then one Lua script (`redis/*.lua`), atomic
//! on its node: a replica that dies between two steps leaves nothing half-done.
//!
//! What crosses shards: the memory budget (each shard's usage is exact; on a Cluster the other shards'
//! usage is read every 250 ms, so replicas pushing at once may overshoot by what they add meanwhile), and
//! sweeps and erasures (one script per shard, sent concurrently). An erasure closes every shard's part of
//! the erasure gate before it starts, so that no decision begins anywhere, and waits for those in progress.
//!
//! Leases. A decision holds its dialog's lease (no other decision of the dialog begins on any replica) and
//! a place in its shard's erasure gate; an erasure holds every shard's gate exclusively. Leases end by themselves
//! (`lease`, several times the longest a decision's store and buffer calls may take), so a replica that
//! dies cannot block the others for longer; the sweeper finishes what it left half-done, from what the
//! store says was decided.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisFuture, Script, Value};
use async_trait::async_trait;
use futures::future::join_all;

use super::{
    Buffer, BufferError, BufferLimits, BufferResult, BufferStats, Buffered, BufferedDialog,
    DecisionLease, DialogPush, Dropped, DueDialogs, Gate, PushOutcome,
};
use crate::clock::Clock;
use crate::error::ApiError;
use crate::model::{
    ClientMessageId, CustomerId, DialogId, IncomingMessage, Language, Message, MessageText,
};

/// Shards of a Cluster: enough to spread the buffer evenly over dozens of nodes, few enough that a sweep or
/// an erasure (one script per shard) stays cheap.
const CLUSTER_SHARDS: u16 = 256;
/// Estimated bytes of a dialog's own bookkeeping in Redis (its meta hash, index entries, key names), on
/// top of its ids; charged with its first message. Keep in step with `MESSAGE_OVERHEAD` in common.lua.
const DIALOG_OVERHEAD: usize = 320;
/// At most this many dialogs per shard and sweep (a sweep that finds more finishes them next time).
const SWEEP_BATCH: usize = 1_000;
/// How often a Cluster's other shards' usage is read, for the budget.
const USAGE_REFRESH: Duration = Duration::from_millis(250);

/// Settings of a [`RedisBuffer`].
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// One URL, or the seed nodes of a Cluster; whether it is a Cluster is asked of the server.
    pub urls: Vec<String>,
    /// Every key starts with it, so that several deployments (or tests) can share one Redis.
    pub key_prefix: String,
    /// The longest one call may take (connecting included) before it fails with `BUFFER_UNAVAILABLE`.
    pub timeout: Duration,
    /// How long a decision or an erasure holds its lease before another replica may take over; also how
    /// long a dialog emptied by its decision stays marked as such, and the longest a call waits for a lease.
    pub lease: Duration,
    pub limits: BufferLimits,
}

/// A connection to a standalone Redis, a Cluster, or the primary that Sentinel names; all reconnect by
/// themselves.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Arc<SentinelConnection>),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(connection) => connection.req_packed_command(cmd),
            Self::Cluster(connection) => connection.req_packed_command(cmd),
            Self::Sentinel(sentinel) => {
                let sentinel = sentinel.clone();
                Box::pin(async move {
                    let result = sentinel.primary().req_packed_command(cmd).await;
                    sentinel.after(&result);
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
            Self::Sentinel(sentinel) => {
                let sentinel = sentinel.clone();
                Box::pin(async move {
                    let result = sentinel
                        .primary()
                        .req_packed_commands(pipeline, offset, count)
                        .await;
                    sentinel.after(&result);
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(connection) => connection.get_db(),
            Self::Cluster(connection) => connection.get_db(),
            Self::Sentinel(sentinel) => sentinel.primary().get_db(),
        }
    }
}

/// `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/PRIMARY_NAME[/DB]` (`rediss+sentinel://`: TLS
/// to the sentinels and the Redis nodes): where the sentinels are, which primary to ask them for, and how to
/// log in to it.
pub struct SentinelUrl {
    sentinels: Vec<::redis::ConnectionInfo>,
    primary_name: String,
    node: ::redis::RedisConnectionInfo,
    tls: bool,
}

impl SentinelUrl {
    pub fn is_sentinel(url: &str) -> bool {
        url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
    }

    /// `None` unless `url` is a well-formed Sentinel URL.
    pub fn parse(url: &str) -> Option<Self> {
        let (tls, rest) = match url.strip_prefix("rediss+sentinel://") {
            Some(rest) => (true, rest),
            None => (false, url.strip_prefix("redis+sentinel://")?),
        };
        let scheme = if tls { "rediss" } else { "redis" };
        let (authority, path) = rest.split_once('/')?;
        let (user_info, hosts) = match authority.rsplit_once('@') {
            Some((user_info, hosts)) => (Some(user_info), hosts),
            None => (None, authority),
        };
        let sentinels = hosts
            .split(',')
            .map(|host| {
                let host = host.trim();
                (!host.is_empty()).then_some(())?;
                format!("{scheme}://{host}")
                    .as_str()
                    .into_connection_info()
                    .ok()
            })
            .collect::<Option<Vec<_>>>()?;
        let (primary_name, db) = match path.split_once('/') {
            Some((name, db)) => (name, db),
            None => (path, "0"),
        };
        if primary_name.is_empty() || sentinels.is_empty() {
            return None;
        }
        // The login and database for the Redis nodes, read the way a redis:// URL is.
        let node = format!(
            "redis://{}localhost/{db}",
            user_info.map(|info| format!("{info}@")).unwrap_or_default()
        )
        .as_str()
        .into_connection_info()
        .ok()?
        .redis_settings()
        .clone();
        Some(Self {
            sentinels,
            primary_name: primary_name.to_owned(),
            node,
            tls,
        })
    }
}

/// The primary that Sentinel names, found again when it stops answering or turns out to be a replica (a
/// failover happened).
struct SentinelConnection {
    sentinel: tokio::sync::Mutex<::redis::sentinel::SentinelClient>,
    primary: std::sync::RwLock<ConnectionManager>,
    config: ConnectionManagerConfig,
    /// A search for the primary is under way.
    searching: AtomicBool,
}

impl SentinelConnection {
    async fn connect(
        url: SentinelUrl,
        config: ConnectionManagerConfig,
        tcp: ::redis::io::tcp::TcpSettings,
    ) -> BufferResult<Self> {
        let mut node = ::redis::sentinel::SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(url.node)
            .set_tcp_settings(tcp.clone());
        if url.tls {
            node = node.set_tls_mode(::redis::TlsMode::Secure);
        }
        let sentinels: Vec<_> = url
            .sentinels
            .into_iter()
            .map(|info| info.set_tcp_settings(tcp.clone()))
            .collect();
        let mut sentinel = ::redis::sentinel::SentinelClient::build(
            sentinels,
            url.primary_name,
            Some(node),
            ::redis::sentinel::SentinelServerType::Master,
        )
        .map_err(|error| BufferError::new("BUFFER_URL", error))?;
        let primary = Self::find(&mut sentinel, &config).await?;
        Ok(Self {
            sentinel: tokio::sync::Mutex::new(sentinel),
            primary: std::sync::RwLock::new(primary),
            config,
            searching: AtomicBool::new(false),
        })
    }

    async fn find(
        sentinel: &mut ::redis::sentinel::SentinelClient,
        config: &ConnectionManagerConfig,
    ) -> BufferResult<ConnectionManager> {
        let client = sentinel
            .async_get_client()
            .await
            .map_err(|error| BufferError::new("Sentinel names no reachable primary", error))?;
        ConnectionManager::new_with_config(client, config.clone())
            .await
            .map_err(|error| {
                BufferError::new("cannot connect to the primary Sentinel names", error)
            })
    }

    fn primary(&self) -> ConnectionManager {
        self.primary
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// After a failover the old primary is gone or a read-only replica: ask Sentinel again, in the
    /// background (the failed call fails; the next ones use the new primary).
    fn after<T>(self: &Arc<Self>, result: &Result<T, ::redis::RedisError>) {
        let Err(error) = result else { return };
        let moved = error.is_io_error()
            || error.is_connection_dropped()
            || error.is_connection_refusal()
            || error.is_timeout()
            || error.kind() == ErrorKind::Server(::redis::ServerErrorKind::ReadOnly);
        if moved {
            self.search();
        }
    }

    /// Asks the sentinels for the primary, in the background, unless that is under way.
    fn search(self: &Arc<Self>) {
        if self.searching.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut sentinel = this.sentinel.lock().await;
            match Self::find(&mut sentinel, &this.config).await {
                Ok(primary) => {
                    *this
                        .primary
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = primary;
                }
                Err(error) => {
                    tracing::warn!(%error, "Sentinel: no primary yet; trying again on the next call")
                }
            }
            this.searching.store(false, Ordering::Release);
        });
    }
}

/// The Lua scripts, each with the shared prelude (`redis/common.lua`). The shebang line's flags matter:
/// scripts that add data are refused whole when Redis is over `maxmemory` (so a push is never half-done);
/// scripts that free data or manage leases run regardless, so decisions can still drain a full buffer.
struct Scripts {
    push: Script,
    begin: Script,
    seal: Script,
    discard: Script,
    end: Script,
    due: Script,
    expire: Script,
    customer: Script,
    erase: Script,
    claim: Script,
}

macro_rules! shard_script {
    ($flags:literal, $file:literal) => {
        Script::new(concat!(
            $flags,
            "\n",
            include_str!("redis/common.lua"),
            include_str!(concat!("redis/", $file))
        ))
    };
}

impl Scripts {
    fn new() -> Self {
        Self {
            push: shard_script!("#!lua", "push.lua"),
            begin: shard_script!("#!lua flags=allow-oom", "begin.lua"),
            seal: shard_script!("#!lua flags=allow-oom", "seal.lua"),
            discard: shard_script!("#!lua flags=allow-oom", "discard.lua"),
            end: shard_script!("#!lua flags=allow-oom", "end.lua"),
            due: shard_script!("#!lua flags=no-writes", "due.lua"),
            expire: shard_script!("#!lua flags=allow-oom", "expire.lua"),
            customer: shard_script!("#!lua flags=allow-oom", "customer.lua"),
            erase: shard_script!("#!lua flags=allow-oom", "erase.lua"),
            claim: Script::new(concat!(
                "#!lua flags=allow-oom\n",
                include_str!("redis/claim.lua")
            )),
        }
    }
}

/// The state every call shares; the background usage refresh holds it weakly.
struct Shared {
    connection: Connection,
    scripts: Scripts,
    options: RedisOptions,
    shards: u16,
    /// Names this process's leases: `INSTANCE-N`.
    instance: String,
    tokens: AtomicU64,
    /// The acceptance order of messages that bypass the buffer, kept above `seen`.
    clock: Clock,
    /// The latest time (µs) Redis has reported to this process.
    seen: AtomicI64,
    /// Each shard's estimated bytes as last seen (the budget check of a push counts the others' as this).
    shard_bytes: Vec<AtomicI64>,
    description: String,
}

pub struct RedisBuffer {
    shared: Arc<Shared>,
    refresher: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for RedisBuffer {
    fn drop(&mut self) {
        if let Some(refresher) = self.refresher.take() {
            refresher.abort();
        }
    }
}

impl RedisBuffer {
    /// Connects (failing when Redis does not answer within the timeout) and reads what kind of Redis it is.
    pub async fn connect(options: RedisOptions) -> BufferResult<Self> {
        let (connection, kind) = tokio::time::timeout(options.timeout, open(&options))
            .await
            .map_err(|_| {
                BufferError(format!(
                    "no answer from Redis within {:?} (BUFFER_TIMEOUT)",
                    options.timeout
                ))
            })??;
        let shards = match kind {
            Kind::Cluster => CLUSTER_SHARDS,
            Kind::Standalone | Kind::Sentinel => 1,
        };
        let mut probe = connection.clone();
        let version = tokio::time::timeout(options.timeout, server_version(&mut probe))
            .await
            .map_err(|_| BufferError("Redis did not say its version in time".to_owned()))??;
        // Script flags (all-or-nothing under maxmemory) and PEXPIRETIME came with Redis 7.0.
        if version.0 < 7 {
            return Err(BufferError(format!(
                "Redis {}.{} is too old: DataAPI's scripts need Redis 7.0 or later",
                version.0, version.1
            )));
        }
        let mut notes = tokio::time::timeout(options.timeout, server_notes(&mut probe))
            .await
            .unwrap_or_default();
        notes.insert(0, format!("version {}.{}", version.0, version.1));
        let description = format!(
            "{} at {} ({})",
            match kind {
                Kind::Cluster => "Redis Cluster",
                Kind::Standalone => "Redis",
                Kind::Sentinel => "Redis primary named by Sentinel",
            },
            addresses(&options.urls),
            notes.join("; ")
        );
        let shared = Arc::new(Shared {
            connection,
            scripts: Scripts::new(),
            shards,
            instance: uuid::Uuid::now_v7().simple().to_string(),
            tokens: AtomicU64::new(0),
            clock: Clock::default(),
            seen: AtomicI64::new(0),
            shard_bytes: (0..shards).map(|_| AtomicI64::new(0)).collect(),
            description,
            options,
        });
        shared.stats().await?;
        let refresher = (shards > 1).then(|| tokio::spawn(refresh_usage(Arc::downgrade(&shared))));
        Ok(Self { shared, refresher })
    }

    /// A request's pushes: one script call per shard they touch (one on a standalone Redis), all at once.
    async fn push(&self, pushes: Vec<DialogPush>, open: bool) -> BufferResult<Vec<PushOutcome>> {
        let count = pushes.len();
        let mut by_shard: HashMap<u16, (Vec<usize>, ShardPushes)> = HashMap::new();
        for (place, push) in pushes.into_iter().enumerate() {
            let ids = push
                .messages
                .iter()
                .map(|incoming| {
                    Message::server_id(&incoming.dialog_id, incoming.client_id.as_ref())
                })
                .collect();
            let (places, shard_pushes) = by_shard
                .entry(self.shared.dialog_shard(&push.dialog_id))
                .or_default();
            places.push(place);
            shard_pushes.push((push, ids));
        }
        let calls = by_shard
            .into_iter()
            .map(|(shard, (places, pushes))| async move {
                // Each shard's call stands alone: when one fails, only its messages fail.
                let sizes: Vec<usize> =
                    pushes.iter().map(|(push, _)| push.messages.len()).collect();
                let outcomes = match self.shared.push_shard(shard, pushes, open).await {
                    Ok(outcomes) => outcomes,
                    Err(error) => sizes
                        .into_iter()
                        .map(|size| PushOutcome {
                            pushed: (0..size)
                                .map(|_| Err(ApiError::BufferUnavailable(error.clone())))
                                .collect(),
                            ..PushOutcome::default()
                        })
                        .collect(),
                };
                (places, outcomes)
            });
        let mut outcomes: Vec<Option<PushOutcome>> = (0..count).map(|_| None).collect();
        for (places, answers) in join_all(calls).await {
            for (place, outcome) in places.into_iter().zip(answers) {
                outcomes[place] = Some(outcome);
            }
        }
        outcomes
            .into_iter()
            .map(|outcome| outcome.ok_or_else(|| malformed("a push")))
            .collect()
    }
}

/// Reads every shard's usage every [`USAGE_REFRESH`] while the buffer lives.
async fn refresh_usage(shared: Weak<Shared>) {
    let mut ticks = tokio::time::interval(USAGE_REFRESH);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(error) = shared.stats().await {
            tracing::debug!(%error, "cannot read the buffer's usage");
        }
    }
}

enum Kind {
    Standalone,
    Cluster,
    Sentinel,
}

async fn open(options: &RedisOptions) -> BufferResult<(Connection, Kind)> {
    let tcp = tcp_settings(options.timeout);
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.timeout))
        .set_response_timeout(Some(options.timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1));
    if let [url] = &options.urls[..]
        && SentinelUrl::is_sentinel(url)
    {
        let url = SentinelUrl::parse(url)
            .ok_or_else(|| BufferError("BUFFER_URL: not a Sentinel URL".to_owned()))?;
        let sentinel = SentinelConnection::connect(url, manager_config, tcp).await?;
        return Ok((Connection::Sentinel(Arc::new(sentinel)), Kind::Sentinel));
    }
    let infos = options
        .urls
        .iter()
        .map(|url| {
            url.as_str()
                .into_connection_info()
                .map(|info| info.set_tcp_settings(tcp.clone()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| BufferError::new("BUFFER_URL", error))?;
    let client = ::redis::Client::open(infos[0].clone())
        .map_err(|error| BufferError::new("BUFFER_URL", error))?;
    let is_cluster = match options.urls.len() {
        1 => {
            let config = ::redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(options.timeout))
                .set_response_timeout(Some(options.timeout));
            let mut probe = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|error| BufferError::new("cannot connect to Redis", error))?;
            let info: String = ::redis::cmd("INFO")
                .arg("cluster")
                .query_async(&mut probe)
                .await
                .map_err(|error| BufferError::new("Redis refused INFO", error))?;
            info.lines().any(|line| line.trim() == "cluster_enabled:1")
        }
        _ => true,
    };
    if is_cluster {
        let cluster = ClusterClient::builder(infos)
            .tcp_settings(tcp)
            .connection_timeout(options.timeout)
            .response_timeout(options.timeout)
            // A call is never sent twice by the client library: a push without messageId would be
            // recorded twice. The caller's retry (BUFFER_UNAVAILABLE) is the one to make.
            .retries(0)
            .build()
            .map_err(|error| BufferError::new("BUFFER_URL", error))?;
        let connection = cluster
            .get_async_connection()
            .await
            .map_err(|error| BufferError::new("cannot connect to the Redis Cluster", error))?;
        return Ok((Connection::Cluster(connection), Kind::Cluster));
    }
    let manager = ConnectionManager::new_with_config(client, manager_config)
        .await
        .map_err(|error| BufferError::new("cannot connect to Redis", error))?;
    Ok((Connection::Single(manager), Kind::Standalone))
}

/// Every command is a small write that a request waits for: without `TCP_NODELAY` (off by default in the
/// redis crate) Nagle's algorithm holds it back until earlier writes are acknowledged, which made pushes
/// wait for each other. A connection whose writes go unacknowledged for twice the call deadline is
/// dropped (and made again), so a Redis host that vanished without closing its sockets is noticed.
fn tcp_settings(timeout: Duration) -> ::redis::io::tcp::TcpSettings {
    ::redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_user_timeout(timeout * 2)
}

/// Host and port of each URL (of each sentinel, and the primary's name), without credentials.
fn addresses(urls: &[String]) -> String {
    if let [url] = urls
        && let Some(sentinel) = SentinelUrl::parse(url)
    {
        let hosts: Vec<String> = sentinel
            .sentinels
            .iter()
            .map(|info| info.addr().to_string())
            .collect();
        return format!(
            "{} (sentinels), primary `{}`",
            hosts.join(","),
            sentinel.primary_name
        );
    }
    urls.iter()
        .filter_map(|url| url.as_str().into_connection_info().ok())
        .map(|info| info.addr().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A reply as one node gave it: a Cluster connection sends `INFO` and `CONFIG` to every primary and answers
/// with a map of node to reply; any node's will do.
fn one_node(reply: Value) -> Value {
    match reply {
        Value::Map(mut nodes) if !nodes.is_empty() => nodes.swap_remove(0).1,
        reply => reply,
    }
}

/// The server's major and minor version (`INFO server`).
async fn server_version(connection: &mut Connection) -> BufferResult<(u32, u32)> {
    let reply: Value = ::redis::cmd("INFO")
        .arg("server")
        .query_async(connection)
        .await
        .map_err(|error| unavailable("Redis refused INFO", error))?;
    let info = match one_node(reply) {
        Value::VerbatimString { text, .. } => text,
        reply => text(&reply).unwrap_or_default(),
    };
    parse_version(&info).ok_or_else(|| malformed("INFO server"))
}

fn parse_version(info: &str) -> Option<(u32, u32)> {
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// What the server says of its durability and eviction, for the startup log. Managed Redis services often
/// refuse `CONFIG`: then nothing is said.
async fn server_notes(connection: &mut Connection) -> Vec<String> {
    let mut notes = Vec::new();
    let config = |name: &'static str| {
        let mut connection = connection.clone();
        async move {
            let reply: Value = ::redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut connection)
                .await
                .ok()?;
            match one_node(reply) {
                Value::Array(pair) => pair.get(1).and_then(text),
                Value::Map(pairs) => pairs.first().and_then(|(_, value)| text(value)),
                _ => None,
            }
        }
    };
    match (
        config("appendonly").await.as_deref(),
        config("appendfsync").await,
    ) {
        (Some("yes"), Some(fsync)) => notes.push(format!("AOF on, appendfsync {fsync}")),
        (Some(_), _) => notes.push(
            "AOF off: buffered messages live only in Redis's memory (and snapshots, if `save` is set)"
                .to_owned(),
        ),
        _ => {}
    }
    if let Some(policy) = config("maxmemory-policy").await {
        if policy != "noeviction" {
            tracing::warn!(
                policy,
                "Redis may evict keys to make room (maxmemory-policy): buffered messages could vanish \
                 silently; set maxmemory-policy noeviction"
            );
        }
        notes.push(format!("maxmemory-policy {policy}"));
    }
    notes
}

/// The shard a dialog belongs to: FNV-1a of its id. Never change it: it decides where buffered dialogs
/// are, and a Redis that outlives an upgrade still holds them where the old version put them.
fn shard_of(dialog_id: &DialogId, shards: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in dialog_id.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(shards)) as u16
}

fn unavailable(context: &str, error: ::redis::RedisError) -> BufferError {
    BufferError::new(context, error)
}

/// A decision that held its dialog's lease too long: another took it over, and this one must not touch
/// the dialog (its store write is done; the other decision finishes the buffer's side).
fn lost_lease(dialog_id: &DialogId) -> BufferError {
    BufferError(format!(
        "the decision of dialog `{dialog_id}` outlived its lease; another replica took the dialog over"
    ))
}

/// Whether Redis refused a script because it is over `maxmemory`.
fn is_out_of_memory(error: &::redis::RedisError) -> bool {
    error.code() == Some("OOM")
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(number) => Some(*number),
        Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?.parse().ok(),
        Value::SimpleString(text) => text.parse().ok(),
        _ => None,
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn items(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) => items,
        _ => Vec::new(),
    }
}

fn malformed(what: &str) -> BufferError {
    BufferError(format!("unexpected answer from Redis to {what}"))
}

/// Writes into `buffer` what the push script stores for `incoming` after its seq and a space:
/// "LANGUAGE LEN CLIENTID TEXT" (see [`decode_message`]).
fn unsequenced_value(buffer: &mut String, incoming: &IncomingMessage) {
    use std::fmt::Write;
    let client = incoming.client_id.as_ref().map_or("", |id| id.as_str());
    buffer.clear();
    write!(
        buffer,
        "{} {} {client}{}",
        incoming.language.as_str(),
        client.len(),
        incoming.text.as_str()
    )
    .expect("writing to a String");
}

/// A buffered message as the scripts store it: "SEQ LANGUAGE LEN CLIENTID TEXT".
fn decode_message(
    dialog_id: &DialogId,
    customer_id: &CustomerId,
    id: &[u8],
    value: &[u8],
) -> Option<Message> {
    let value = std::str::from_utf8(value).ok()?;
    let (seq, rest) = value.split_once(' ')?;
    let (language, rest) = rest.split_once(' ')?;
    let (len, rest) = rest.split_once(' ')?;
    let len: usize = len.parse().ok()?;
    let seq: i64 = seq.parse().ok()?;
    let client_id = rest.get(..len)?;
    let text = rest.get(len..)?;
    Some(Message {
        id: Message::id_text(uuid::Uuid::from_slice(id).ok()?),
        client_id: (!client_id.is_empty())
            .then(|| ClientMessageId::from_trusted(client_id.to_owned())),
        dialog_id: dialog_id.clone(),
        customer_id: customer_id.clone(),
        text: MessageText::from_trusted(text.to_owned()),
        language: Language::from_trusted(language.to_owned()),
        created_at: seq.div_euclid(1000),
        seq,
    })
}

/// Messages from a script's `{id, message, ...}` answer, oldest first.
fn decode_messages(
    dialog_id: &DialogId,
    customer_id: &CustomerId,
    pairs: Value,
) -> BufferResult<Vec<Message>> {
    let pairs = items(pairs);
    let mut messages = Vec::with_capacity(pairs.len() / 2);
    for pair in pairs.chunks(2) {
        let [Value::BulkString(id), Value::BulkString(value)] = pair else {
            return Err(malformed("a snapshot"));
        };
        messages.push(
            decode_message(dialog_id, customer_id, id, value)
                .ok_or_else(|| malformed("a buffered message"))?,
        );
    }
    messages.sort_unstable_by_key(|message| message.seq);
    Ok(messages)
}

/// What a decision's lease needs to be finished or released.
struct LeaseHolder {
    shared: Arc<Shared>,
    dialog_id: DialogId,
    token: String,
    customer_id: Option<CustomerId>,
    /// The lease is already given back (the dialog left the buffer with it, or the decision ended).
    released: AtomicBool,
}

impl Drop for LeaseHolder {
    fn drop(&mut self) {
        // A decision that ended without `end_decision` (an error on the way): give the lease back in the
        // background; if that fails too, it runs out by itself.
        if self.released.load(Ordering::Acquire) {
            return;
        }
        let shared = self.shared.clone();
        let dialog_id = self.dialog_id.clone();
        let token = std::mem::take(&mut self.token);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = shared.end(&dialog_id, &token, false).await {
                    tracing::warn!(%error, dialog = %dialog_id, "cannot end a decision; its lease will run out");
                }
            });
        }
    }
}

/// One request's pushes to one shard: each dialog's messages, with their server ids.
type ShardPushes = Vec<(DialogPush, Vec<uuid::Uuid>)>;

/// An erasure's hold on every shard's part of the erasure gate, given back when dropped.
struct ErasureHolder {
    shared: Arc<Shared>,
    token: String,
    /// Renews the hold while the erasure runs (see [`renew_erasure_gate`]).
    renewal: Option<tokio::task::JoinHandle<()>>,
}

/// Renews an erasure's hold on the gate every third of the lease, for as long as the erasure runs: its
/// store calls may together outlast one lease, and a gate that opened by itself meanwhile would let a
/// decision store the customer's buffered messages after the erasure's last batch. Ends when the buffer is
/// gone or the holder stops it.
async fn renew_erasure_gate(shared: Weak<Shared>, token: String) {
    let Some(period) = shared.upgrade().map(|shared| shared.options.lease / 3) else {
        return;
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match shared.erasure_gate("close", &token).await {
            Ok(held) if held < 0 => {
                tracing::error!("an erasure lost the erasure gate to another (its lease ran out)")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot renew the erasure gate; trying again"),
        }
    }
}

impl Drop for ErasureHolder {
    fn drop(&mut self) {
        let shared = self.shared.clone();
        let token = std::mem::take(&mut self.token);
        let renewal = self.renewal.take();
        if let Some(renewal) = &renewal {
            renewal.abort();
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // In the background: the caller's answer does not wait for it, and a gate whose opening is lost
            // opens when the erasure's lease runs out.
            runtime.spawn(async move {
                // Opened only once the renewal has stopped: a renewal call it had already sent reaches Redis
                // before the opening, on the same connection, and cannot close the gate again after it.
                if let Some(renewal) = renewal {
                    let _ = renewal.await;
                }
                if let Err(error) = shared.erasure_gate("open", &token).await {
                    tracing::warn!(%error, "cannot open the erasure gate; it opens when its lease runs out");
                }
            });
        }
    }
}

impl Shared {
    fn token(&self) -> String {
        format!(
            "{}-{}",
            self.instance,
            self.tokens.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn prefix(&self) -> &str {
        &self.options.key_prefix
    }

    /// The prefix of every key of a shard; the braces make it the key's hash tag.
    fn shard_prefix(&self, shard: u16) -> String {
        format!("{0}:{{{0}.{shard}}}:", self.prefix())
    }

    fn dialog_shard(&self, dialog_id: &DialogId) -> u16 {
        shard_of(dialog_id, self.shards)
    }

    fn ms(duration: Duration) -> u64 {
        duration.as_millis().try_into().unwrap_or(u64::MAX)
    }

    /// How long after its retention period Redis drops an undecided dialog by itself: long enough that a
    /// running sweeper always gets there first.
    fn grace(&self) -> Duration {
        self.options.lease + (self.options.limits.ttl / 10).min(Duration::from_secs(60)) * 3
    }

    /// Runs a script on a shard: the shard's usage key routes it; the script builds its other keys from
    /// the prefix (all in the same hash slot).
    async fn run(
        &self,
        script: &Script,
        shard: u16,
        args: impl FnOnce(&mut ::redis::ScriptInvocation<'_>),
    ) -> Result<Value, ::redis::RedisError> {
        let prefix = self.shard_prefix(shard);
        let mut invocation = script.key(format!("{prefix}u"));
        invocation.arg(&prefix);
        args(&mut invocation);
        self.call(invocation.invoke_async(&mut self.connection.clone()))
            .await
    }

    /// A call with the buffer's deadline.
    async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, ::redis::RedisError>>,
    ) -> Result<T, ::redis::RedisError> {
        match tokio::time::timeout(self.options.timeout, call).await {
            Ok(result) => result,
            Err(_) => {
                // A primary that vanished without closing its sockets answers nothing at all.
                if let Connection::Sentinel(sentinel) = &self.connection {
                    sentinel.search();
                }
                Err(::redis::RedisError::from((
                    ErrorKind::Io,
                    "no answer within BUFFER_TIMEOUT",
                )))
            }
        }
    }

    fn saw(&self, now: Option<i64>) {
        if let Some(now) = now {
            self.seen.fetch_max(now, Ordering::AcqRel);
        }
    }

    /// The other shards' bytes, as last seen.
    fn others_bytes(&self, shard: u16) -> i64 {
        self.shard_bytes
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != usize::from(shard))
            .map(|(_, bytes)| bytes.load(Ordering::Relaxed))
            .sum()
    }

    /// One script call for a request's pushes to one shard.
    async fn push_shard(
        &self,
        shard: u16,
        pushes: ShardPushes,
        open: bool,
    ) -> BufferResult<Vec<PushOutcome>> {
        let limits = self.options.limits;
        let answer = self
            .run(&self.scripts.push, shard, |invocation| {
                invocation
                    .arg(limits.max_messages_per_dialog.min(i64::MAX as usize) as i64)
                    .arg(limits.max_bytes.min(i64::MAX as usize) as i64)
                    .arg(self.others_bytes(shard))
                    .arg(Self::ms(limits.ttl))
                    .arg(Self::ms(self.grace()));
                let mut unsequenced = String::new();
                for (push, ids) in &pushes {
                    let keyed = push.messages.iter().any(|m| m.client_id.is_some());
                    invocation
                        .arg(push.dialog_id.as_str())
                        .arg(if open { "1" } else { "0" })
                        .arg(push.looked_up_after)
                        .arg(DIALOG_OVERHEAD + push.dialog_id.as_str().len() * 6)
                        .arg(push.messages.len())
                        .arg(if keyed { "1" } else { "0" });
                    for (incoming, id) in push.messages.iter().zip(ids) {
                        unsequenced_value(&mut unsequenced, incoming);
                        invocation
                            .arg(incoming.customer_id.as_str())
                            .arg(id.as_bytes().as_slice())
                            .arg(unsequenced.as_str());
                    }
                }
            })
            .await;
        let answer = match answer {
            Ok(answer) => answer,
            // Over Redis's maxmemory the script was refused whole, nothing was written. Messages that only
            // check whether their dialog is buffered go back to the caller, who sends those of decided
            // dialogs to the store (they need no room here); opening a dialog is what a full buffer refuses.
            Err(error) if is_out_of_memory(&error) && !open => {
                let seen = self.seen.load(Ordering::Acquire);
                return Ok(pushes
                    .into_iter()
                    .map(|(push, _)| PushOutcome::handed_back(push.messages, seen))
                    .collect());
            }
            Err(error) if is_out_of_memory(&error) => {
                let full = ApiError::BufferFull(
                    "the buffer of undecided messages is full (Redis is at its maxmemory): retry later, once \
                     consent decisions have drained it"
                        .to_owned(),
                );
                return Ok(pushes
                    .iter()
                    .map(|(push, _)| PushOutcome {
                        pushed: push.messages.iter().map(|_| Err(full.clone())).collect(),
                        ..PushOutcome::default()
                    })
                    .collect());
            }
            Err(error) => return Err(unavailable("push", error)),
        };
        // {now, shard bytes, then per dialog 0, or 1 and a code and a seq per message}: integers all.
        let answer: Vec<i64> = items(answer).iter().map_while(int).collect();
        let (now, bytes) = match answer[..] {
            [now, bytes, ..] => (now, bytes),
            _ => (0, 0),
        };
        self.saw(Some(now));
        self.shard_bytes[usize::from(shard)].store(bytes, Ordering::Relaxed);
        let mut rest = answer.get(2..).unwrap_or_default().iter().copied();
        pushes
            .into_iter()
            .map(|(push, ids)| match rest.next() {
                Some(1) => {
                    let pushed = push
                        .messages
                        .into_iter()
                        .zip(ids)
                        .map(|(incoming, id)| match (rest.next(), rest.next()) {
                            (Some(code), Some(seq)) => outcome(incoming, id, code, seq, &limits),
                            _ => Err(ApiError::BufferUnavailable(malformed("a push"))),
                        })
                        .collect();
                    Ok(PushOutcome {
                        pushed,
                        handed_back: Vec::new(),
                        checked_at: now,
                    })
                }
                Some(0) => Ok(PushOutcome::handed_back(push.messages, now)),
                _ => Err(malformed("a push")),
            })
            .collect()
    }

    /// Closes (or opens) every shard's part of the erasure gate; returns the largest answer: the most
    /// decisions still in progress on a shard, or -1 while another erasure holds one.
    async fn erasure_gate(&self, op: &str, token: &str) -> BufferResult<i64> {
        let lease = Self::ms(self.options.lease);
        let answers = self
            .on_every_shard("the erasure gate", &self.scripts.erase, |invocation| {
                invocation.arg(op).arg(token).arg(lease);
            })
            .await?;
        Ok(answers.iter().filter_map(int).fold(
            0,
            |most, n| {
                if most < 0 || n < 0 { -1 } else { most.max(n) }
            },
        ))
    }

    /// Runs `step` until it says done, waiting a little longer each time, for at most the lease: whoever
    /// holds what `step` waits for is done by then, or gone and its lease run out.
    async fn wait_for<T, Step>(
        &self,
        what: &str,
        mut step: impl FnMut() -> Step,
    ) -> Result<T, ApiError>
    where
        Step: Future<Output = BufferResult<Option<T>>>,
    {
        // Long enough for any decision that is alive to end; a dead holder's lease may take longer to run
        // out, and the caller's retry gets through then.
        let bound = self.options.lease.min(Duration::from_secs(10));
        let deadline = Instant::now() + bound;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(done) = step().await? {
                return Ok(done);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ApiError::BufferUnavailable(BufferError(format!(
                    "waited {bound:?} for {what}"
                ))));
            }
            // A little jitter, so that two waiters that collided do not keep colliding. The last try is at
            // the deadline itself: a holder that died just before this call began has a lease that runs out
            // just before it, and giving up a pause early would miss it.
            let jitter = Duration::from_micros(u64::from(uuid::Uuid::now_v7().as_bytes()[15]) * 8);
            tokio::time::sleep((pause + jitter).min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// The usage of every shard, read now (and remembered for the budget).
    async fn stats(&self) -> BufferResult<BufferStats> {
        let reads = (0..self.shards).map(|shard| async move {
            let mut connection = self.connection.clone();
            let key = format!("{}u", self.shard_prefix(shard));
            let values: Vec<Option<i64>> = self
                .call(
                    ::redis::cmd("HMGET")
                        .arg(key)
                        .arg("b")
                        .arg("n")
                        .arg("d")
                        .query_async(&mut connection),
                )
                .await
                .map_err(|error| unavailable("the buffer's usage", error))?;
            let value = |index: usize| values.get(index).copied().flatten().unwrap_or(0);
            self.shard_bytes[usize::from(shard)].store(value(0), Ordering::Relaxed);
            Ok::<_, BufferError>((value(0), value(1), value(2)))
        });
        let mut stats = BufferStats::default();
        for usage in join_all(reads).await {
            let (bytes, messages, dialogs) = usage?;
            stats.bytes += bytes.max(0) as usize;
            stats.messages += messages.max(0) as usize;
            stats.dialogs += dialogs.max(0) as usize;
        }
        Ok(stats)
    }

    /// Runs a per-shard script on every shard at once, and returns each answer.
    async fn on_every_shard(
        &self,
        what: &str,
        script: &Script,
        args: impl Fn(&mut ::redis::ScriptInvocation<'_>) + Sync,
    ) -> BufferResult<Vec<Value>> {
        let args = &args;
        let calls = (0..self.shards).map(|shard| self.run(script, shard, args));
        join_all(calls)
            .await
            .into_iter()
            .map(|answer| answer.map_err(|error| unavailable(what, error)))
            .collect()
    }

    async fn customer(&self, customer_id: &CustomerId, mode: &str) -> BufferResult<Dropped> {
        let answers = self
            .on_every_shard("an erasure", &self.scripts.customer, |invocation| {
                invocation.arg(customer_id.as_str()).arg(mode);
            })
            .await?;
        Ok(answers
            .into_iter()
            .enumerate()
            .map(|(shard, answer)| self.dropped(shard as u16, answer))
            .fold(Dropped::default(), |a, b| a + b))
    }

    /// `{dialogs, messages, shard bytes}` from a script that dropped dialogs of `shard`.
    fn dropped(&self, shard: u16, answer: Value) -> Dropped {
        let answer = items(answer);
        let count = |index: usize| answer.get(index).and_then(int).unwrap_or(0).max(0) as usize;
        self.remember_usage(shard, answer.get(2));
        Dropped {
            dialogs: count(0),
            messages: count(1),
        }
    }

    /// Takes a shard's bytes as a script reported them, for the budget.
    fn remember_usage(&self, shard: u16, bytes: Option<&Value>) {
        if let Some(bytes) = bytes.and_then(int) {
            self.shard_bytes[usize::from(shard)].store(bytes, Ordering::Relaxed);
        }
    }

    fn lease_of<'a>(&self, lease: &'a DecisionLease) -> &'a LeaseHolder {
        lease
            .holder
            .downcast_ref::<LeaseHolder>()
            .expect("a lease of this buffer")
    }
}

/// One message's result code from the push script.
fn outcome(
    incoming: IncomingMessage,
    id: uuid::Uuid,
    code: i64,
    seq: i64,
    limits: &BufferLimits,
) -> Result<Buffered, ApiError> {
    let message = |incoming: IncomingMessage| Message {
        id: Message::id_text(id),
        client_id: incoming.client_id,
        dialog_id: incoming.dialog_id,
        customer_id: incoming.customer_id,
        text: incoming.text,
        language: incoming.language,
        created_at: seq.div_euclid(1000),
        seq,
    };
    match code {
        1 => Ok(Buffered::Added(message(incoming))),
        2 => Ok(Buffered::AlreadyThere(message(incoming))),
        3 => Err(ApiError::MessageIdConflict {
            dialog_id: incoming.dialog_id.to_string(),
            message_id: incoming
                .client_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
        }),
        4 => Err(ApiError::BufferFull(format!(
            "dialog `{}` already holds {} undecided messages, the most a dialog may buffer: give its \
             consent decision first",
            incoming.dialog_id, limits.max_messages_per_dialog
        ))),
        5 => Err(ApiError::BufferFull(
            "the buffer of undecided messages is full: retry later, once consent decisions have drained it"
                .to_owned(),
        )),
        6 => Err(ApiError::CustomerMismatch {
            dialog_id: incoming.dialog_id.to_string(),
        }),
        _ => Err(ApiError::BufferUnavailable(malformed("a push"))),
    }
}

#[async_trait]
impl Buffer for RedisBuffer {
    fn describe(&self) -> String {
        self.shared.description.clone()
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn ping(&self) -> BufferResult<()> {
        let shared = &self.shared;
        let answer: String = shared
            .call(::redis::cmd("PING").query_async(&mut shared.connection.clone()))
            .await
            .map_err(|error| unavailable("ping", error))?;
        match answer.as_str() {
            "PONG" => Ok(()),
            _ => Err(malformed("PING")),
        }
    }

    async fn push_if_buffered(&self, pushes: Vec<DialogPush>) -> BufferResult<Vec<PushOutcome>> {
        self.push(pushes, false).await
    }

    async fn open(&self, pushes: Vec<DialogPush>) -> BufferResult<Vec<PushOutcome>> {
        self.push(pushes, true).await
    }

    async fn begin_decision(&self, dialog_id: &DialogId) -> Result<DecisionLease, ApiError> {
        let shared = &self.shared;
        let token = shared.token();
        let shard = shared.dialog_shard(dialog_id);
        let lease_ms = Shared::ms(shared.options.lease);
        // Held from before the first call: a call whose answer is lost (a timeout, a dropped connection)
        // may still have taken the lease, and dropping the holder gives it back instead of leaving every
        // decision of the dialog, and every erasure, to wait for it to run out.
        let mut holder = LeaseHolder {
            shared: shared.clone(),
            token,
            customer_id: None,
            released: AtomicBool::new(false),
            dialog_id: dialog_id.clone(),
        };
        let token = holder.token.clone();
        let answer = shared
            .wait_for(
                "another decision of this dialog, or an erasure, to end",
                || async {
                    let answer = shared
                        .run(&shared.scripts.begin, shard, |invocation| {
                            invocation.arg(dialog_id.as_str()).arg(&token).arg(lease_ms);
                        })
                        .await
                        .map_err(|error| unavailable("a decision", error))?;
                    let answer = items(answer);
                    Ok((answer.first().and_then(int) == Some(1)).then_some(answer))
                },
            )
            .await?;
        let mut answer = answer.into_iter().skip(1);
        shared.saw(answer.next().as_ref().and_then(int));
        let buffered = match answer.next().as_ref().and_then(text) {
            Some(customer) => {
                let customer_id = CustomerId::from_trusted(customer);
                let messages =
                    decode_messages(dialog_id, &customer_id, answer.next().unwrap_or(Value::Nil))?;
                let sealed = answer.next().as_ref().and_then(int) == Some(1);
                Some(BufferedDialog {
                    customer_id,
                    messages,
                    sealed,
                })
            }
            None => None,
        };
        holder.customer_id = buffered.as_ref().map(|b| b.customer_id.clone());
        Ok(DecisionLease {
            dialog_id: dialog_id.clone(),
            buffered,
            holder: Box::new(holder),
        })
    }

    async fn seal_and_remove_through(
        &self,
        lease: &DecisionLease,
        seq: i64,
    ) -> BufferResult<Vec<Message>> {
        let shared = &self.shared;
        let holder = shared.lease_of(lease);
        let shard = shared.dialog_shard(&lease.dialog_id);
        let left = shared
            .run(&shared.scripts.seal, shard, |invocation| {
                invocation
                    .arg(lease.dialog_id.as_str())
                    .arg(seq)
                    .arg(&holder.token)
                    .arg(Shared::ms(shared.options.lease));
            })
            .await
            .map_err(|error| unavailable("sealing a dialog", error))?;
        let mut answer = items(left).into_iter();
        shared.remember_usage(shard, answer.next().as_ref());
        let left = answer.next().unwrap_or(Value::Nil);
        if answer.next().as_ref().and_then(int) != Some(1) {
            return Err(lost_lease(&lease.dialog_id));
        }
        let left = match &holder.customer_id {
            Some(customer_id) => decode_messages(&lease.dialog_id, customer_id, left)?,
            None => Vec::new(),
        };
        if left.is_empty() {
            holder.released.store(true, Ordering::Release);
        }
        Ok(left)
    }

    async fn discard(&self, lease: &DecisionLease) -> BufferResult<usize> {
        let shared = &self.shared;
        let holder = shared.lease_of(lease);
        let shard = shared.dialog_shard(&lease.dialog_id);
        let answer = shared
            .run(&shared.scripts.discard, shard, |invocation| {
                invocation
                    .arg(lease.dialog_id.as_str())
                    .arg(&holder.token)
                    .arg(Shared::ms(shared.options.lease));
            })
            .await
            .map_err(|error| unavailable("discarding a dialog", error))?;
        let answer = items(answer);
        shared.remember_usage(shard, answer.get(1));
        if answer.get(2).and_then(int) != Some(1) {
            return Err(lost_lease(&lease.dialog_id));
        }
        holder.released.store(true, Ordering::Release);
        Ok(answer.first().and_then(int).unwrap_or(0).max(0) as usize)
    }

    async fn end_decision(&self, lease: DecisionLease, settled: bool) {
        let shared = &self.shared;
        let holder = shared.lease_of(&lease);
        if holder.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(error) = shared.end(&lease.dialog_id, &holder.token, settled).await {
            tracing::warn!(%error, dialog = %lease.dialog_id, "cannot end a decision; its lease will run out");
        }
    }

    async fn enter_erasure_gate(&self) -> Result<Gate, ApiError> {
        let shared = &self.shared;
        let token = shared.token();
        // From the first call on, no new decision begins; this waits for those in progress to end.
        let mut holder = ErasureHolder {
            shared: shared.clone(),
            token: token.clone(),
            renewal: None,
        };
        shared
            .wait_for("the decisions in progress to end", || async {
                match shared.erasure_gate("close", &token).await? {
                    0 => Ok(Some(())),
                    // Another erasure holds some shards: give this one's back, so that one of them gets
                    // them all, and try again.
                    held if held < 0 => {
                        shared.erasure_gate("open", &token).await?;
                        Ok(None)
                    }
                    _ => Ok(None),
                }
            })
            .await?;
        holder.renewal = Some(tokio::spawn(renew_erasure_gate(
            Arc::downgrade(shared),
            token,
        )));
        Ok(Gate(Box::new(holder)))
    }

    async fn count_customer(&self, customer_id: &CustomerId) -> BufferResult<Dropped> {
        self.shared.customer(customer_id, "count").await
    }

    async fn discard_customer(&self, customer_id: &CustomerId) -> BufferResult<Dropped> {
        self.shared.customer(customer_id, "drop").await
    }

    async fn due(&self) -> BufferResult<DueDialogs> {
        let shared = &self.shared;
        let ttl = Shared::ms(shared.options.limits.ttl);
        let answers = shared
            .on_every_shard("the retention sweep", &shared.scripts.due, |invocation| {
                invocation.arg(ttl).arg(SWEEP_BATCH);
            })
            .await?;
        let mut due = DueDialogs::default();
        for answer in answers {
            let mut lists = items(answer).into_iter();
            let ids = |list: Option<Value>| -> Vec<DialogId> {
                items(list.unwrap_or(Value::Nil))
                    .iter()
                    .filter_map(text)
                    .map(DialogId::from_trusted)
                    .collect()
            };
            due.expired.extend(ids(lists.next()));
            due.abandoned.extend(ids(lists.next()));
        }
        Ok(due)
    }

    async fn expire(&self, dialogs: &[DialogId]) -> BufferResult<Dropped> {
        let shared = &self.shared;
        let mut by_shard: HashMap<u16, Vec<&DialogId>> = HashMap::new();
        for dialog_id in dialogs {
            by_shard
                .entry(shared.dialog_shard(dialog_id))
                .or_default()
                .push(dialog_id);
        }
        let ttl = Shared::ms(shared.options.limits.ttl);
        let calls = by_shard.into_iter().map(|(shard, dialogs)| async move {
            let answer = shared
                .run(&shared.scripts.expire, shard, move |invocation| {
                    invocation.arg(ttl);
                    for dialog_id in dialogs {
                        invocation.arg(dialog_id.as_str());
                    }
                })
                .await;
            (shard, answer)
        });
        let mut total = Dropped::default();
        for (shard, answer) in join_all(calls).await {
            let answer = answer.map_err(|error| unavailable("expiring dialogs", error))?;
            total = total + shared.dropped(shard, answer);
        }
        Ok(total)
    }

    async fn claim_sweep(&self, period: Duration) -> bool {
        let shared = &self.shared;
        let mut invocation = shared
            .scripts
            .claim
            .key(format!("{0}:{{{0}.sweep}}", shared.prefix()));
        invocation.arg(&shared.instance).arg(Shared::ms(period * 3));
        let answer = shared
            .call(invocation.invoke_async(&mut shared.connection.clone()))
            .await;
        matches!(answer.as_ref().map(int), Ok(Some(1)))
    }

    fn next_seq(&self) -> i64 {
        let shared = &self.shared;
        shared.clock.next_after(shared.seen.load(Ordering::Acquire))
    }

    async fn stats(&self) -> BufferResult<BufferStats> {
        self.shared.stats().await
    }
}

impl Shared {
    async fn end(&self, dialog_id: &DialogId, token: &str, settled: bool) -> BufferResult<()> {
        let shard = self.dialog_shard(dialog_id);
        self.run(&self.scripts.end, shard, |invocation| {
            invocation
                .arg(dialog_id.as_str())
                .arg(token)
                .arg(Self::ms(self.options.limits.ttl))
                .arg(Self::ms(self.grace()))
                .arg(if settled { "1" } else { "0" });
        })
        .await
        .map(|_| ())
        .map_err(|error| unavailable("ending a decision", error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_version_is_read_from_info() {
        assert_eq!(
            parse_version("# Server\r\nredis_version:7.0.15\r\nredis_git_sha1:0\r\n"),
            Some((7, 0))
        );
        assert_eq!(parse_version("redis_version:6.2.6"), Some((6, 2)));
        assert_eq!(parse_version("redis_version:x"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn shards_never_move() {
        // Buffered dialogs are found where an earlier version put them: the function must not change.
        let dialog = |id: &str| DialogId::parse("dialogId", id).unwrap();
        assert_eq!(shard_of(&dialog("dialog-1"), 1), 0);
        assert_eq!(shard_of(&dialog("dialog-1"), 256), 0x77);
        assert_eq!(shard_of(&dialog("d"), 256), 0x73);
    }

    #[test]
    fn buffered_messages_decode_with_their_client_id_and_text() {
        let dialog = DialogId::parse("dialogId", "d").unwrap();
        let customer = CustomerId::parse("customerId", "c").unwrap();
        let id = uuid::Uuid::now_v7();
        let message = decode_message(
            &dialog,
            &customer,
            id.as_bytes(),
            "1795856200123456 pt-br 5 m 1 2line one\nline two".as_bytes(),
        )
        .unwrap();
        assert_eq!(message.seq, 1_795_856_200_123_456);
        assert_eq!(message.created_at, 1_795_856_200_123);
        assert_eq!(message.language.as_str(), "pt-br");
        assert_eq!(message.client_id.unwrap().as_str(), "m 1 2");
        assert_eq!(message.text.as_str(), "line one\nline two");
        assert_eq!(message.id, id.to_string());
        // What the push script stores is its seq, a space and what the service built: it decodes back to
        // the message pushed, with or without a client messageId.
        for client_id in [Some("m 1 2"), None] {
            let incoming = IncomingMessage {
                customer_id: customer.clone(),
                dialog_id: dialog.clone(),
                text: MessageText::from_trusted(" two  spaces ".to_owned()),
                language: Language::from_trusted("pt-br".to_owned()),
                client_id: client_id.map(|id| ClientMessageId::from_trusted(id.to_owned())),
            };
            let mut unsequenced = "left over from the message before".to_owned();
            unsequenced_value(&mut unsequenced, &incoming);
            let stored = format!("1795856200123456 {unsequenced}");
            let message =
                decode_message(&dialog, &customer, id.as_bytes(), stored.as_bytes()).unwrap();
            assert_eq!(message.seq, 1_795_856_200_123_456);
            assert_eq!(message.client_id.as_ref().map(|id| id.as_str()), client_id);
            assert_eq!(message.text, incoming.text);
            assert_eq!(message.language, incoming.language);
        }
        for broken in ["", "12 en", "x en 0 hi", "12 en 9 short"] {
            assert!(
                decode_message(&dialog, &customer, id.as_bytes(), broken.as_bytes()).is_none(),
                "{broken:?}"
            );
        }
    }
}
