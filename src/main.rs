//! The `dataapi` binary: `dataapi` (or `dataapi serve`) runs the service; `dataapi print-schema` prints the
//! GraphQL schema that `schema.graphql` holds.

use std::process::ExitCode;

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
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command.unwrap_or(Command::Serve) {
        Command::PrintSchema => {
            print!("{}", dataapi::schema::sdl());
            ExitCode::SUCCESS
        }
        Command::Serve => serve().await,
    }
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
    tracing::info!(
        store = %app.service().store().describe(),
        buffer = "in-process (unconsented messages live in memory only)",
        graphiql = %format!("http://{}/", app.local_addr()),
        "DataAPI listening on {}; GraphiQL at http://{}/",
        app.local_addr(),
        app.local_addr(),
    );
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("server error: {error}");
            ExitCode::FAILURE
        }
    }
}
