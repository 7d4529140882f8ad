//! The `dataapi` binary: `dataapi` (or `dataapi serve`) runs the service; `dataapi print-schema` prints the
//! GraphQL schema that `schema.graphql` holds; `dataapi print-openapi` the REST routes' OpenAPI document
//! (`openapi.json`); `dataapi hash-key` makes API keys; `dataapi health` asks a
//! running service whether it is ready (for container health checks).

use std::process::ExitCode;

/// jemalloc instead of glibc's allocator: a `pushMessages` request allocates and frees thousands of small
/// GraphQL values, and the buffer keeps millions of small strings among them; glibc spent a third of the
/// time of such a request in malloc and free (see BENCHMARKS.md).
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::{Parser, Subcommand};
use dataapi::app::Application;
use dataapi::config::Config;

#[derive(Parser)]
#[command(
    version,
    about = "Collects chatbot dialogs with the customer's consent and serves them over GraphQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default). Settings come from the environment and `.env`; see README.
    Serve,
    /// Print the GraphQL schema (SDL) to standard output.
    PrintSchema,
    /// Print the OpenAPI document of the REST routes (what `openapi.json` holds) to standard output.
    PrintOpenapi,
    /// Make an API key for ROLE (ingest, read or admin) and print it with its `API_KEYS` entry. With
    /// --stdin, hash a key read from standard input instead of making a new one.
    HashKey {
        /// ingest (pushMessage, giveConsent), read (queries) or admin (everything).
        role: String,
        /// Read the key from standard input instead of generating one.
        #[arg(long)]
        stdin: bool,
    },
    /// Ask the service listening on BIND_ADDR (an unspecified address is asked on loopback) whether it is
    /// ready: exit status 0 when `/ready` answers 200 within 3 s, 1 otherwise. For container health checks.
    Health {
        /// Ask this address instead of BIND_ADDR's (e.g. 127.0.0.1:8000).
        #[arg(long)]
        addr: Option<std::net::SocketAddr>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::PrintSchema => {
            print!("{}", dataapi::schema::sdl());
            ExitCode::SUCCESS
        }
        Command::PrintOpenapi => {
            print!("{}", dataapi::rest::openapi_json());
            ExitCode::SUCCESS
        }
        Command::Serve => serve().await,
        Command::HashKey { role, stdin } => hash_key(&role, stdin),
        Command::Health { addr } => health(addr).await,
    }
}

async fn health(addr: Option<std::net::SocketAddr>) -> ExitCode {
    let addr = match addr {
        Some(addr) => addr,
        // Only BIND_ADDR: the check must not fail because some other setting of the service is unset.
        None => match std::env::var("BIND_ADDR")
            .unwrap_or_else(|_| dataapi::config::DEFAULT_BIND_ADDR.to_owned())
            .parse()
        {
            Ok(bind) => dataapi::probe::probe_addr(bind),
            Err(error) => {
                eprintln!("dataapi health: BIND_ADDR is not an address: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    match dataapi::probe::ready(addr).await {
        Ok(answer) => {
            println!("ready: {answer}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("dataapi health: not ready: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn hash_key(role: &str, from_stdin: bool) -> ExitCode {
    let Some(role) = dataapi::auth::Role::parse(role) else {
        eprintln!("dataapi hash-key: the role must be ingest, read or admin (got {role:?})");
        return ExitCode::FAILURE;
    };
    let key = if from_stdin {
        let mut key = String::new();
        if std::io::stdin().read_line(&mut key).is_err() || key.trim().is_empty() {
            eprintln!("dataapi hash-key: no key on standard input");
            return ExitCode::FAILURE;
        }
        key.trim().to_owned()
    } else {
        let key = dataapi::auth::generate_key();
        println!("key (give it to the client; it is not stored anywhere): {key}");
        key
    };
    let digest = hex::encode(dataapi::auth::digest(&key));
    println!("API_KEYS entry (comma-separate several): {role}:{digest}");
    ExitCode::SUCCESS
}

async fn serve() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("dataapi: {error}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log))
        // Colours only on a terminal: log collectors get plain lines.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();

    let app = match Application::build(&config).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!("{error}");
            eprintln!("dataapi: {error}");
            return ExitCode::FAILURE;
        }
    };
    if config.access.api_keys.is_empty() {
        tracing::warn!(
            "NO API KEYS ARE CONFIGURED: every caller is admin (read, write and erase). This is only \
             acceptable on a trusted machine; set API_KEYS (see `dataapi hash-key`) before exposing the service"
        );
    } else {
        tracing::info!(keys = config.access.api_keys.len(), "API keys configured");
    }
    tracing::info!(
        store = %app.service().store().describe(),
        buffer = %app.service().buffer().describe(),
        "DataAPI listening on {}; {}",
        app.local_addr(),
        if config.access.graphiql {
            format!("GraphiQL at http://{}/", app.local_addr())
        } else {
            "GraphiQL is off (GRAPHIQL=false)".to_owned()
        },
    );
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("server error: {error}");
            ExitCode::FAILURE
        }
    }
}
