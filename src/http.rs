//! The HTTP shell around the schema: `POST /graphql` (single and batch requests), GraphiQL at `GET /` and
//! `GET /graphql`, and `GET /health`. GraphiQL's scripts and styles are compiled into the binary and served
//! from `/graphiql/`, so the page works without internet access.

use std::sync::Arc;

use async_graphql::{BatchRequest, BatchResponse};
use async_graphql_axum::{GraphQLBatchRequest, GraphQLResponse, rejection::GraphQLRejection};
use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::schema::{self, DataApiSchema, Limits};
use crate::service::DialogService;

#[derive(Clone)]
pub struct AppState {
    pub schema: DataApiSchema,
    pub service: Arc<DialogService>,
    pub limits: Limits,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(graphiql))
        .route("/graphql", get(graphiql).post(graphql))
        .route("/graphiql/{file}", get(graphiql_asset))
        .route("/health", get(health))
        .with_state(state)
}

async fn graphql(
    State(state): State<AppState>,
    request: Result<GraphQLBatchRequest, GraphQLRejection>,
) -> Response {
    let request = match request {
        Ok(request) => request.into_inner(),
        Err(rejection) => return bad_request(&rejection.0.to_string()),
    };
    let with_loader = |mut operation: async_graphql::Request| {
        operation
            .data
            .insert(schema::request_loader(state.service.clone(), state.limits));
        operation
    };
    let response = match request {
        BatchRequest::Single(operation) => {
            BatchResponse::Single(state.schema.execute(with_loader(operation)).await)
        }
        BatchRequest::Batch(operations) if operations.is_empty() => {
            return bad_request("the batch holds no operation");
        }
        // In order, one after another (async-graphql would run them concurrently): a batch that pushes
        // messages and then gives consent must see its own pushes.
        BatchRequest::Batch(operations) => {
            let mut responses = Vec::with_capacity(operations.len());
            for operation in operations {
                responses.push(state.schema.execute(with_loader(operation)).await);
            }
            BatchResponse::Batch(responses)
        }
    };
    GraphQLResponse::from(response).into_response()
}

/// A request that is not GraphQL at all (bad JSON, wrong content type) still gets a GraphQL-shaped error.
fn bad_request(reason: &str) -> Response {
    let body = json!({
        "errors": [{
            "message": format!(
                "the request is not a valid GraphQL request ({reason}): send POST /graphql with \
                 Content-Type: application/json and a body like {{\"query\": \"{{ __typename }}\"}}"
            ),
            "extensions": { "code": "BAD_REQUEST" },
        }]
    });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

async fn health() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

const GRAPHIQL_PAGE: &str = include_str!("graphiql.html");

async fn graphiql() -> Html<&'static str> {
    Html(GRAPHIQL_PAGE)
}

/// The vendored GraphiQL build (see `assets/graphiql/` and `scripts/vendor-graphiql`).
const GRAPHIQL_ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "react.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/react.production.min.js"),
    ),
    (
        "react-dom.production.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/react-dom.production.min.js"),
    ),
    (
        "graphiql.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/graphiql.min.js"),
    ),
    (
        "graphiql.min.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/graphiql/dist/graphiql.min.css"),
    ),
];

async fn graphiql_asset(Path(file): Path<String>) -> Response {
    match GRAPHIQL_ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=86400"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such GraphiQL asset").into_response(),
    }
}
