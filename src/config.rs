//! Settings, read once at startup from the environment (and an optional `.env`) into one typed struct.
//! A bad setting stops startup with a message that names it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::admission::ClientLimits;
use crate::auth::ApiKeys;
use crate::buffer::redis::SentinelUrl;
use crate::connections::ConnectionLimits;
use crate::hosts::AllowedHosts;
use crate::model::AuditKey;

/// Where the embedded store lives when `DATABASE_URL` is unset.
pub const DEFAULT_SQLITE_PATH: &str = "./data/dataapi.sqlite3";
pub const DEFAULT_DATABASE_NAME: &str = "dataapi";
pub const DEFAULT_BIND_ADDR: &str = "127.0.0.1:8000";
pub const DEFAULT_MAX_PAGE_SIZE: usize = 1000;

/// Which database to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseConfig {
    /// The embedded default: a SQLite file.
    Sqlite { path: PathBuf },
    /// A MongoDB deployment; `url` may hold credentials, so it is never logged.
    Mongo { url: String, database: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub database: DatabaseConfig,
    pub bind_addr: SocketAddr,
    /// A `tracing` filter, e.g. `info` or `dataapi=debug,info`.
    pub log: String,
    pub access: AccessConfig,
    pub limits: LimitsConfig,
    pub buffer: BufferConfig,
    /// How long one store call may take before it fails with `STORE_UNAVAILABLE`.
    pub store_timeout: Duration,
    /// How long in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_timeout: Duration,
    /// The longest one HTTP request may take, reading its body included (slow clients are cut off).
    pub request_timeout: Duration,
    /// Open connections and how long a client may take to send headers (see `connections`).
    pub connections: ConnectionLimits,
    /// Requests per client: rate and in flight (see `admission`).
    pub clients: ClientLimits,
    /// `AUDIT_SECRET`: keys the digests of erasure records; unset, a secret kept in the database.
    pub audit_secret: Option<AuditKey>,
    /// About how many stored messages one erasure batch (one store transaction) deletes.
    pub erasure_batch_messages: usize,
}

/// Who may call, and what is exposed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessConfig {
    pub api_keys: ApiKeys,
    /// Where the keys were read from (`API_KEYS_FILE`), to read them again on SIGHUP.
    pub api_keys_file: Option<PathBuf>,
    /// Without keys, serve a non-loopback address anyway (everyone is admin).
    pub allow_unauthenticated: bool,
    /// Serve GraphiQL at `/` and `GET /graphql`.
    pub graphiql: bool,
    /// Answer introspection queries (GraphiQL needs them).
    pub introspection: bool,
    /// Without keys, the host names served besides loopback ones (see `hosts`).
    pub allowed_hosts: AllowedHosts,
    /// `CORS_ALLOWED_ORIGINS`: browser pages of other origins that may call `/graphql`.
    pub cors_origins: crate::cors::AllowedOrigins,
}

/// Limits that protect the service from expensive or oversized requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// The largest `first`/`last` a listing accepts.
    pub max_page_size: usize,
    /// Operations in one batch request.
    pub max_batch_operations: usize,
    /// Messages in one `pushMessages` call.
    pub max_push_messages: usize,
    /// Bytes of one request body.
    pub max_body_bytes: usize,
    pub max_query_depth: usize,
    pub max_query_complexity: usize,
    /// Store calls one request's queries may make.
    pub max_store_calls: usize,
    /// Messages one request's `Dialog.messages` fields may load together.
    pub max_loaded_messages: usize,
    /// Groups one `stats` or `consentStats` field may return.
    pub max_stats_groups: usize,
    /// Subscriptions one key may have open at once.
    pub max_subscriptions_per_key: usize,
    /// Bytes of one operation's answer.
    pub max_response_bytes: usize,
}

/// Where undecided messages wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BufferBackend {
    /// In the service's memory (the default): one instance, lost when it stops.
    Memory,
    /// A Redis server, or a Redis Cluster reached through any of `urls` (its seed nodes); shared by every
    /// replica. The URLs may hold credentials, so they are never logged. Every key starts with
    /// `key_prefix`.
    Redis {
        urls: Vec<String>,
        key_prefix: String,
    },
}

/// The dialog buffer: which one, and its bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BufferConfig {
    pub backend: BufferBackend,
    /// How long one call to a shared buffer may take before it fails with `BUFFER_UNAVAILABLE`.
    pub timeout: Duration,
    pub max_messages_per_dialog: usize,
    /// Estimated bytes of all buffered messages together.
    pub max_bytes: usize,
    /// An undecided dialog is discarded this long after its first message.
    pub ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            database: DatabaseConfig::Sqlite {
                path: PathBuf::from(DEFAULT_SQLITE_PATH),
            },
            bind_addr: DEFAULT_BIND_ADDR.parse().expect("a valid default address"),
            log: "info".to_owned(),
            access: AccessConfig {
                api_keys: ApiKeys::default(),
                api_keys_file: None,
                allow_unauthenticated: false,
                graphiql: true,
                introspection: true,
                allowed_hosts: AllowedHosts::default(),
                cors_origins: crate::cors::AllowedOrigins::default(),
            },
            limits: LimitsConfig {
                max_page_size: DEFAULT_MAX_PAGE_SIZE,
                max_batch_operations: 20,
                max_push_messages: 1_000,
                max_body_bytes: 2 * 1024 * 1024,
                max_query_depth: 16,
                max_query_complexity: 50_000,
                max_store_calls: 50,
                max_loaded_messages: 20_000,
                max_stats_groups: 10_000,
                max_subscriptions_per_key: 16,
                max_response_bytes: 16 * 1024 * 1024,
            },
            buffer: BufferConfig {
                backend: BufferBackend::Memory,
                timeout: Duration::from_secs(2),
                max_messages_per_dialog: 2_000,
                max_bytes: 512 * 1024 * 1024,
                ttl: Duration::from_secs(24 * 60 * 60),
            },
            store_timeout: Duration::from_secs(10),
            erasure_batch_messages: crate::service::ERASURE_BATCH_MESSAGES,
            shutdown_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            connections: ConnectionLimits {
                header_read_timeout: Duration::from_secs(10),
                max_connections: 4_096,
            },
            clients: ClientLimits {
                requests_per_second: 1_000,
                burst: 2_000,
                concurrent_requests: 64,
            },
            audit_secret: None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid setting {name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl Config {
    /// Reads the settings through `var` (the process environment in production, a map in tests).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let error = |name: &'static str, value: &str, reason: &str| ConfigError {
            name,
            value: value.to_owned(),
            reason: reason.to_owned(),
        };

        let database = match get("DATABASE_URL") {
            None => DatabaseConfig::Sqlite {
                path: PathBuf::from(DEFAULT_SQLITE_PATH),
            },
            Some(url) if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") => {
                DatabaseConfig::Mongo {
                    url,
                    database: get("DATABASE_NAME")
                        .unwrap_or_else(|| DEFAULT_DATABASE_NAME.to_owned()),
                }
            }
            Some(url) => match url.strip_prefix("sqlite://") {
                Some(path) if !path.is_empty() => DatabaseConfig::Sqlite { path: path.into() },
                _ => {
                    // Never echo a URL that may carry a password.
                    let shown = url
                        .split_once("://")
                        .map_or("(unrecognised)", |(scheme, _)| scheme);
                    return Err(error(
                        "DATABASE_URL",
                        shown,
                        "use mongodb://HOST/…, mongodb+srv://HOST/… or sqlite://PATH, or leave it unset for the \
                         embedded store at ./data/dataapi.sqlite3",
                    ));
                }
            },
        };

        let defaults = Self::default();
        let bind_text = get("BIND_ADDR").unwrap_or_else(|| DEFAULT_BIND_ADDR.to_owned());
        let bind_addr: SocketAddr = bind_text.parse().map_err(|_| {
            error(
                "BIND_ADDR",
                &bind_text,
                "expected IP:PORT, e.g. 127.0.0.1:8000 or 0.0.0.0:8000",
            )
        })?;

        let log = get("LOG").unwrap_or_else(|| defaults.log.clone());
        if tracing_subscriber::EnvFilter::try_new(&log).is_err() {
            return Err(error(
                "LOG",
                &log,
                "expected a level (error, warn, info, debug, trace) or a tracing filter such as dataapi=debug,info",
            ));
        }

        let number = |name: &'static str,
                      default: usize,
                      range: std::ops::RangeInclusive<usize>| match get(name) {
            None => Ok(default),
            Some(text) => match text.trim().replace('_', "").parse::<usize>() {
                Ok(value) if range.contains(&value) => Ok(value),
                _ => Err(error(
                    name,
                    &text,
                    &format!(
                        "expected a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )),
            },
        };
        let duration = |name: &'static str, default: Duration| match get(name) {
            None => Ok(default),
            Some(text) => match humantime::parse_duration(text.trim()) {
                Ok(value) if !value.is_zero() => Ok(value),
                _ => Err(error(
                    name,
                    &text,
                    "expected a duration such as 30s, 15m, 24h or 1h 30m",
                )),
            },
        };
        let flag = |name: &'static str, default: bool| match get(name) {
            None => Ok(default),
            Some(text) => match text.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(error(name, &text, "expected true or false")),
            },
        };

        let api_keys_file = get("API_KEYS_FILE").map(PathBuf::from);
        let api_keys = match (var("API_KEYS"), &api_keys_file) {
            (Some(_), Some(_)) => {
                return Err(error(
                    "API_KEYS_FILE",
                    "(hidden)",
                    "set either API_KEYS or API_KEYS_FILE, not both",
                ));
            }
            (None, None) => ApiKeys::default(),
            // Never echo the value: it is a list of key digests.
            (Some(text), None) => {
                ApiKeys::parse(&text).map_err(|reason| error("API_KEYS", "(hidden)", &reason))?
            }
            (None, Some(file)) => ApiKeys::read_file(file)
                .map_err(|reason| error("API_KEYS_FILE", &file.display().to_string(), &reason))?,
        };
        let access = AccessConfig {
            api_keys,
            api_keys_file,
            allow_unauthenticated: flag("ALLOW_UNAUTHENTICATED", false)?,
            graphiql: flag("GRAPHIQL", defaults.access.graphiql)?,
            introspection: flag("INTROSPECTION", defaults.access.introspection)?,
            allowed_hosts: match get("ALLOWED_HOSTS") {
                None => AllowedHosts::default(),
                Some(text) => AllowedHosts::parse(&text)
                    .map_err(|reason| error("ALLOWED_HOSTS", &text, &reason))?,
            },
            cors_origins: match get("CORS_ALLOWED_ORIGINS") {
                None => crate::cors::AllowedOrigins::default(),
                Some(text) => crate::cors::AllowedOrigins::parse(&text)
                    .map_err(|reason| error("CORS_ALLOWED_ORIGINS", &text, &reason))?,
            },
        };
        if access.api_keys.is_empty()
            && !bind_addr.ip().is_loopback()
            && !access.allow_unauthenticated
        {
            return Err(error(
                "API_KEYS",
                "",
                &format!(
                    "no API keys are configured and BIND_ADDR={bind_addr} is reachable from other machines: \
                     configure keys (see `dataapi hash-key`), bind to 127.0.0.1, or set \
                     ALLOW_UNAUTHENTICATED=true to serve everyone as admin"
                ),
            ));
        }

        let d = defaults.limits;
        let limits = LimitsConfig {
            max_page_size: number("MAX_PAGE_SIZE", d.max_page_size, 1..=100_000)?,
            max_batch_operations: number(
                "MAX_BATCH_OPERATIONS",
                d.max_batch_operations,
                1..=1_000,
            )?,
            max_push_messages: number("MAX_PUSH_MESSAGES", d.max_push_messages, 1..=100_000)?,
            max_body_bytes: number("MAX_BODY_BYTES", d.max_body_bytes, 1_024..=1_073_741_824)?,
            max_query_depth: number("MAX_QUERY_DEPTH", d.max_query_depth, 2..=1_000)?,
            max_query_complexity: number(
                "MAX_QUERY_COMPLEXITY",
                d.max_query_complexity,
                10..=10_000_000,
            )?,
            max_store_calls: number("MAX_STORE_CALLS", d.max_store_calls, 1..=100_000)?,
            max_loaded_messages: number(
                "MAX_LOADED_MESSAGES",
                d.max_loaded_messages,
                1..=10_000_000,
            )?,
            max_stats_groups: number("MAX_STATS_GROUPS", d.max_stats_groups, 1..=1_000_000)?,
            max_subscriptions_per_key: number(
                "MAX_SUBSCRIPTIONS_PER_KEY",
                d.max_subscriptions_per_key,
                1..=10_000,
            )?,
            max_response_bytes: number(
                "MAX_RESPONSE_BYTES",
                d.max_response_bytes,
                1_024..=1_073_741_824,
            )?,
        };
        let backend = match get("BUFFER_URL") {
            None => BufferBackend::Memory,
            Some(text) => {
                // A Sentinel URL lists its sentinels with commas; otherwise commas separate the seed nodes
                // of a Cluster.
                let urls: Vec<String> = if SentinelUrl::is_sentinel(text.trim()) {
                    vec![text.trim().to_owned()]
                } else {
                    text.split(',')
                        .map(|url| url.trim().to_owned())
                        .filter(|url| !url.is_empty())
                        .collect()
                };
                let valid = !urls.is_empty()
                    && urls.iter().all(|url| {
                        if SentinelUrl::is_sentinel(url) {
                            return urls.len() == 1 && SentinelUrl::parse(url).is_some();
                        }
                        (url.starts_with("redis://") || url.starts_with("rediss://"))
                            && redis::IntoConnectionInfo::into_connection_info(url.as_str()).is_ok()
                    });
                if !valid {
                    // Never echo a URL that may carry a password.
                    return Err(error(
                        "BUFFER_URL",
                        "(hidden)",
                        "use redis://[USER:PASSWORD@]HOST:PORT or rediss://… (TLS), several of them \
                         separated by commas (the seed nodes of a Redis Cluster), or \
                         redis+sentinel://[USER:PASSWORD@]SENTINEL:PORT[,SENTINEL:PORT…]/PRIMARY_NAME; leave it \
                         unset for the in-process buffer",
                    ));
                }
                let key_prefix = get("BUFFER_KEY_PREFIX").unwrap_or_else(|| "dataapi".to_owned());
                if key_prefix.is_empty()
                    || key_prefix.len() > 64
                    || !key_prefix
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                {
                    return Err(error(
                        "BUFFER_KEY_PREFIX",
                        &key_prefix,
                        "expected 1 to 64 letters, digits, '_', '-' or '.'",
                    ));
                }
                BufferBackend::Redis { urls, key_prefix }
            }
        };
        let b = defaults.buffer;
        let buffer = BufferConfig {
            backend,
            timeout: duration("BUFFER_TIMEOUT", b.timeout)?,
            max_messages_per_dialog: number(
                "BUFFER_MAX_MESSAGES_PER_DIALOG",
                b.max_messages_per_dialog,
                1..=10_000_000,
            )?,
            max_bytes: number("BUFFER_MAX_BYTES", b.max_bytes, 1_024..=usize::MAX)?,
            ttl: duration("BUFFER_TTL", b.ttl)?,
        };

        Ok(Self {
            database,
            bind_addr,
            log,
            access,
            limits,
            buffer,
            store_timeout: duration("STORE_TIMEOUT", defaults.store_timeout)?,
            erasure_batch_messages: number(
                "ERASURE_BATCH_MESSAGES",
                defaults.erasure_batch_messages,
                1..=100_000,
            )?,
            shutdown_timeout: duration("SHUTDOWN_TIMEOUT", defaults.shutdown_timeout)?,
            request_timeout: duration("REQUEST_TIMEOUT", defaults.request_timeout)?,
            connections: ConnectionLimits {
                header_read_timeout: duration(
                    "HEADER_READ_TIMEOUT",
                    defaults.connections.header_read_timeout,
                )?,
                max_connections: number(
                    "MAX_CONNECTIONS",
                    defaults.connections.max_connections,
                    1..=1_000_000,
                )?,
            },
            clients: {
                let requests_per_second = number(
                    "CLIENT_REQUESTS_PER_SECOND",
                    defaults.clients.requests_per_second as usize,
                    0..=10_000_000,
                )? as u32;
                ClientLimits {
                    requests_per_second,
                    // Unset: twice the rate (a second's worth of requests sent at once, and as many again).
                    burst: number(
                        "CLIENT_BURST",
                        (requests_per_second as usize).saturating_mul(2),
                        0..=20_000_000,
                    )? as u32,
                    concurrent_requests: number(
                        "CLIENT_CONCURRENT_REQUESTS",
                        defaults.clients.concurrent_requests,
                        0..=1_000_000,
                    )?,
                }
            },
            audit_secret: match get("AUDIT_SECRET") {
                None => None,
                // Never echo it.
                Some(text) if text.trim().chars().count() < 32 => {
                    return Err(error(
                        "AUDIT_SECRET",
                        "(hidden)",
                        "expected at least 32 characters (e.g. `openssl rand -hex 32`); keep it outside the \
                         database and never change it, or earlier erasure records can no longer be checked",
                    ));
                }
                Some(text) => Some(AuditKey::from_text(text.trim())),
            },
        })
    }

    /// Reads `.env` (if present) and then the process environment, which wins.
    pub fn from_env() -> Result<Self, ConfigError> {
        // A missing .env is normal; a malformed one is reported by the settings it fails to provide.
        let _ = dotenvy::dotenv();
        Self::from_lookup(|name| std::env::var(name).ok())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_run_on_the_embedded_store_on_loopback() {
        let config = config(&[]).unwrap();
        assert_eq!(
            config.database,
            DatabaseConfig::Sqlite {
                path: DEFAULT_SQLITE_PATH.into()
            }
        );
        assert_eq!(config.bind_addr.to_string(), "127.0.0.1:8000");
        assert_eq!(config.limits.max_page_size, 1000);
        assert_eq!(config.log, "info");
        assert!(config.access.api_keys.is_empty() && config.access.graphiql);
        assert_eq!(config.buffer.ttl, Duration::from_secs(86_400));
        assert_eq!(config, Config::default());
    }

    #[test]
    fn database_url_selects_the_store() {
        let mongo = config(&[
            ("DATABASE_URL", "mongodb://db:27017"),
            ("DATABASE_NAME", "chat"),
        ])
        .unwrap();
        assert_eq!(
            mongo.database,
            DatabaseConfig::Mongo {
                url: "mongodb://db:27017".into(),
                database: "chat".into()
            }
        );
        let sqlite = config(&[("DATABASE_URL", "sqlite:///var/lib/dataapi/db.sqlite3")]).unwrap();
        assert_eq!(
            sqlite.database,
            DatabaseConfig::Sqlite {
                path: "/var/lib/dataapi/db.sqlite3".into()
            }
        );
    }

    #[test]
    fn bad_settings_are_named_and_secrets_not_echoed() {
        let error = config(&[("DATABASE_URL", "postgres://user:secret@host/db")]).unwrap_err();
        assert_eq!(error.name, "DATABASE_URL");
        assert!(!error.to_string().contains("secret"));
        assert_eq!(
            config(&[("BIND_ADDR", "localhost")]).unwrap_err().name,
            "BIND_ADDR"
        );
        assert_eq!(
            config(&[("MAX_PAGE_SIZE", "0")]).unwrap_err().name,
            "MAX_PAGE_SIZE"
        );
        assert_eq!(
            config(&[("MAX_PAGE_SIZE", "ten")]).unwrap_err().name,
            "MAX_PAGE_SIZE"
        );
        assert_eq!(config(&[("LOG", "info,[")]).unwrap_err().name, "LOG");
        assert_eq!(
            config(&[("BUFFER_TTL", "soon")]).unwrap_err().name,
            "BUFFER_TTL"
        );
        assert_eq!(
            config(&[("GRAPHIQL", "maybe")]).unwrap_err().name,
            "GRAPHIQL"
        );
        assert_eq!(
            config(&[("ALLOWED_HOSTS", "https://dataapi.internal")])
                .unwrap_err()
                .name,
            "ALLOWED_HOSTS"
        );
        assert!(
            config(&[("ALLOWED_HOSTS", "dataapi.internal, 10.0.0.5")])
                .unwrap()
                .access
                .allowed_hosts
                .admits("dataapi.internal:8000")
        );
        let clients = config(&[("CLIENT_REQUESTS_PER_SECOND", "50")])
            .unwrap()
            .clients;
        assert_eq!((clients.requests_per_second, clients.burst), (50, 100));
        assert_eq!(
            config(&[("CLIENT_CONCURRENT_REQUESTS", "-1")])
                .unwrap_err()
                .name,
            "CLIENT_CONCURRENT_REQUESTS"
        );
        assert_eq!(
            config(&[("HEADER_READ_TIMEOUT", "0s")]).unwrap_err().name,
            "HEADER_READ_TIMEOUT"
        );
        assert_eq!(
            config(&[("MAX_CONNECTIONS", "0")]).unwrap_err().name,
            "MAX_CONNECTIONS"
        );
        assert_eq!(
            config(&[("MAX_STORE_CALLS", "0")]).unwrap_err().name,
            "MAX_STORE_CALLS"
        );
        assert_eq!(
            config(&[("MAX_RESPONSE_BYTES", "10")]).unwrap_err().name,
            "MAX_RESPONSE_BYTES"
        );
        let limits = config(&[
            ("MAX_LOADED_MESSAGES", "500"),
            ("MAX_STORE_CALLS", "7"),
            ("MAX_STATS_GROUPS", "30"),
        ])
        .unwrap()
        .limits;
        assert_eq!(
            (
                limits.max_loaded_messages,
                limits.max_store_calls,
                limits.max_stats_groups
            ),
            (500, 7, 30)
        );
        assert_eq!(
            config(&[("MAX_STATS_GROUPS", "0")]).unwrap_err().name,
            "MAX_STATS_GROUPS"
        );
        for bad in ["0", "10001", "many"] {
            assert_eq!(
                config(&[("MAX_SUBSCRIPTIONS_PER_KEY", bad)])
                    .unwrap_err()
                    .name,
                "MAX_SUBSCRIPTIONS_PER_KEY"
            );
        }
        assert_eq!(
            config(&[("MAX_SUBSCRIPTIONS_PER_KEY", "3")])
                .unwrap()
                .limits
                .max_subscriptions_per_key,
            3
        );
        let missing = config(&[("API_KEYS_FILE", "/nonexistent/keys")]).unwrap_err();
        assert_eq!(missing.name, "API_KEYS_FILE");
        let both = config(&[("API_KEYS_FILE", "/x"), ("API_KEYS", "")]).unwrap_err();
        assert_eq!(both.name, "API_KEYS_FILE");
        let keys = config(&[("API_KEYS", "read:secretsecret")]).unwrap_err();
        assert_eq!(keys.name, "API_KEYS");
        assert!(!keys.to_string().contains("secretsecret"));
    }

    #[test]
    fn without_keys_only_loopback_is_served_unless_explicitly_allowed() {
        assert!(config(&[("BIND_ADDR", "127.0.0.1:9000")]).is_ok());
        assert!(config(&[("BIND_ADDR", "[::1]:9000")]).is_ok());
        let open = config(&[("BIND_ADDR", "0.0.0.0:8000")]).unwrap_err();
        assert_eq!(open.name, "API_KEYS");
        assert!(open.to_string().contains("ALLOW_UNAUTHENTICATED"));
        let allowed = config(&[
            ("BIND_ADDR", "0.0.0.0:8000"),
            ("ALLOW_UNAUTHENTICATED", "true"),
        ])
        .unwrap();
        assert!(allowed.access.allow_unauthenticated);
        let digest = hex::encode(crate::auth::digest("k"));
        let keyed = config(&[
            ("BIND_ADDR", "0.0.0.0:8000"),
            ("API_KEYS", &format!("read:{digest}")),
        ])
        .unwrap();
        assert_eq!(keyed.access.api_keys.len(), 1);
    }

    #[test]
    fn buffer_url_selects_redis_and_is_never_echoed() {
        assert_eq!(config(&[]).unwrap().buffer.backend, BufferBackend::Memory);
        let one = config(&[("BUFFER_URL", "rediss://app:secret@redis:6380/0")]).unwrap();
        assert_eq!(
            one.buffer.backend,
            BufferBackend::Redis {
                urls: vec!["rediss://app:secret@redis:6380/0".into()],
                key_prefix: "dataapi".into()
            }
        );
        let cluster = config(&[
            ("BUFFER_URL", "redis://10.0.0.1:7000, redis://10.0.0.2:7000"),
            ("BUFFER_KEY_PREFIX", "chat-prod"),
        ])
        .unwrap();
        assert_eq!(
            cluster.buffer.backend,
            BufferBackend::Redis {
                urls: vec![
                    "redis://10.0.0.1:7000".into(),
                    "redis://10.0.0.2:7000".into()
                ],
                key_prefix: "chat-prod".into()
            }
        );
        for bad_prefix in ["a{b}", "a b", &"x".repeat(65)] {
            let error = config(&[
                ("BUFFER_URL", "redis://h:1"),
                ("BUFFER_KEY_PREFIX", bad_prefix),
            ])
            .unwrap_err();
            assert_eq!(error.name, "BUFFER_KEY_PREFIX");
        }
        let sentinel = config(&[(
            "BUFFER_URL",
            "redis+sentinel://app:secret@s1:26379,s2:26379/mymaster/2",
        )])
        .unwrap();
        assert_eq!(
            sentinel.buffer.backend,
            BufferBackend::Redis {
                urls: vec!["redis+sentinel://app:secret@s1:26379,s2:26379/mymaster/2".into()],
                key_prefix: "dataapi".into()
            }
        );
        for bad in [
            "redis+sentinel://user:secret@s1:26379",
            "redis+sentinel://user:secret@/mymaster",
            "redis+sentinel://s1:26379/mymaster,redis://user:secret@h:1",
            "http://user:secret@host",
            "redis://user:secret@host:notaport",
            ",",
            "redis://h:1,memcached://user:secret@h",
        ] {
            let error = config(&[("BUFFER_URL", bad)]).unwrap_err();
            assert_eq!(error.name, "BUFFER_URL", "{bad}");
            assert!(!error.to_string().contains("secret"), "{error}");
        }
        assert_eq!(
            config(&[("BUFFER_TIMEOUT", "0s")]).unwrap_err().name,
            "BUFFER_TIMEOUT"
        );
    }

    #[test]
    fn limits_and_durations_are_read() {
        let config = config(&[
            ("BUFFER_TTL", "90m"),
            ("STORE_TIMEOUT", "2s"),
            ("MAX_BATCH_OPERATIONS", "5"),
            ("BUFFER_MAX_BYTES", "1_000_000"),
        ])
        .unwrap();
        assert_eq!(config.buffer.ttl, Duration::from_secs(5400));
        assert_eq!(config.store_timeout, Duration::from_secs(2));
        assert_eq!(config.limits.max_batch_operations, 5);
        assert_eq!(config.buffer.max_bytes, 1_000_000);
    }

    #[test]
    fn cors_origins_are_an_explicit_list() {
        assert!(config(&[]).unwrap().access.cors_origins.is_empty());
        assert!(
            !config(&[("CORS_ALLOWED_ORIGINS", "https://dash.example.com")])
                .unwrap()
                .access
                .cors_origins
                .is_empty()
        );
        for bad in ["*", "https://dash.example.com/", "dash.example.com"] {
            let error = config(&[("CORS_ALLOWED_ORIGINS", bad)]).unwrap_err();
            assert_eq!(error.name, "CORS_ALLOWED_ORIGINS", "{bad}");
        }
    }

    #[test]
    fn an_erasure_batch_is_neither_empty_nor_unbounded() {
        assert_eq!(
            config(&[]).unwrap().erasure_batch_messages,
            crate::service::ERASURE_BATCH_MESSAGES
        );
        assert_eq!(
            config(&[("ERASURE_BATCH_MESSAGES", "250")])
                .unwrap()
                .erasure_batch_messages,
            250
        );
        for bad in ["0", "100001", "-5", "lots", "18446744073709551616"] {
            assert_eq!(
                config(&[("ERASURE_BATCH_MESSAGES", bad)]).unwrap_err().name,
                "ERASURE_BATCH_MESSAGES",
                "{bad}"
            );
        }
    }
}
