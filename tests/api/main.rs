//! The integration suite, in one test binary: the service over real HTTP against real databases.
//! `scripts/test` runs it with a MongoDB-compatible server; see README.

/// Instantiates each named `async fn(TestApp)` of the calling module as a test against each store;
/// `with CONFIG;` first starts the services with those settings (written as seen from a child module).
macro_rules! for_each_store {
    (with $config:expr; $($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::helpers::run_with(crate::helpers::Backend::Sqlite, $config, super::$test).await;
                }
            )*
        }
        mod mongodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::helpers::run_with(crate::helpers::Backend::Mongo, $config, super::$test).await;
                }
            )*
        }
    };
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::helpers::run(crate::helpers::Backend::Sqlite, super::$test).await;
                }
            )*
        }
        mod mongodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::helpers::run(crate::helpers::Backend::Mongo, super::$test).await;
                }
            )*
        }
    };
}

mod behaviour;
mod documents;
mod faults;
mod graphiql;
mod helpers;
mod load;
mod protection;
mod roundtrips;
mod security;
mod service;
