//! DataAPI collects chatbot dialogs only with the customer's consent and serves them over GraphQL (and the
//! REST routes of the system it replaces).
//!
//! The library holds the whole service; `main.rs` only reads the configuration and runs [`app::Application`],
//! which tests and benchmarks build the same way.

pub mod admission;
pub mod app;
pub mod auth;
pub mod buffer;
pub mod changes;
pub mod clock;
pub mod config;
pub mod connections;
pub mod cors;
pub mod error;
pub mod execution;
pub mod expansion;
pub mod export;
pub mod hosts;
pub mod http;
pub mod live;
pub mod metrics;
pub mod model;
pub mod paging;
pub mod probe;
pub mod rest;
pub mod schema;
pub mod service;
pub mod stats;
pub mod store;
pub mod variables;
pub mod websocket;
