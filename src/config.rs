//! Settings, read once at startup from the environment (and an optional `.env`) into one typed struct.
//! A bad setting stops startup with a message that names it.

use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// The largest `first`/`last` a listing accepts.
    pub max_page_size: usize,
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

        let bind_text = get("BIND_ADDR").unwrap_or_else(|| DEFAULT_BIND_ADDR.to_owned());
        let bind_addr = bind_text.parse().map_err(|_| {
            error(
                "BIND_ADDR",
                &bind_text,
                "expected IP:PORT, e.g. 127.0.0.1:8000 or 0.0.0.0:8000",
            )
        })?;

        let log = get("LOG").unwrap_or_else(|| "info".to_owned());
        if tracing_subscriber::EnvFilter::try_new(&log).is_err() {
            return Err(error(
                "LOG",
                &log,
                "expected a level (error, warn, info, debug, trace) or a tracing filter such as dataapi=debug,info",
            ));
        }

        let max_page_size = match get("MAX_PAGE_SIZE") {
            None => DEFAULT_MAX_PAGE_SIZE,
            Some(text) => match text.parse::<usize>() {
                Ok(size) if (1..=100_000).contains(&size) => size,
                _ => {
                    return Err(error(
                        "MAX_PAGE_SIZE",
                        &text,
                        "expected a whole number from 1 to 100000",
                    ));
                }
            },
        };

        Ok(Self {
            database,
            bind_addr,
            log,
            max_page_size,
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
        assert_eq!(config.max_page_size, 1000);
        assert_eq!(config.log, "info");
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
    }
}
