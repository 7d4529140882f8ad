//! The integration suite, in one test binary: the service over real HTTP against real databases.
//! `scripts/test` runs it with a MongoDB-compatible server; see README.

mod behaviour;
mod faults;
mod graphiql;
mod helpers;
mod roundtrips;
mod service;
