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

/// Like `for_each_store!`, and on the Redis buffer too: standalone with either store, and a Redis Cluster
/// with MongoDB (the production setup).
macro_rules! for_each_setup {
    (with $config:expr; $($test:ident),* $(,)?) => {
        for_each_setup!(@mod sqlite, Sqlite, Memory, $config; $($test),*);
        for_each_setup!(@mod mongodb, Mongo, Memory, $config; $($test),*);
        for_each_setup!(@mod sqlite_redis, Sqlite, Redis, $config; $($test),*);
        for_each_setup!(@mod mongodb_redis, Mongo, Redis, $config; $($test),*);
        for_each_setup!(@mod mongodb_redis_cluster, Mongo, RedisCluster, $config; $($test),*);
    };
    (@mod $name:ident, $store:ident, $buffer:ident, $config:expr; $($test:ident),*) => {
        mod $name {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::helpers::run_setup(
                        crate::helpers::Backend::$store,
                        crate::helpers::BufferKind::$buffer,
                        $config,
                        super::$test,
                    )
                    .await;
                }
            )*
        }
    };
    ($($test:ident),* $(,)?) => {
        for_each_setup!(with crate::helpers::test_config(); $($test),*);
    };
}

mod attacks;
mod behaviour;
mod changes;
mod documents;
mod erasure;
mod examples;
mod export;
mod faults;
mod graphiql;
mod helpers;
mod live;
mod load;
mod protection;
mod reading;
mod redis_access;
mod redis_support;
mod replicas;
mod rest;
mod roundtrips;
mod scale_out;
mod security;
mod service;
