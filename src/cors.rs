//! Cross-origin requests from browser dashboards served from another origin: an explicit allowlist
//! (`CORS_ALLOWED_ORIGINS`), none by default. Without it, a browser lets no page of another origin read an
//! answer or send the JSON requests (their preflight gets no permission).

use axum::http::{HeaderName, HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long a browser may reuse a preflight's answer.
const PREFLIGHT_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// Origins (`scheme://host[:port]`, exactly as browsers send them) allowed to call `/graphql` and the REST
/// routes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowedOrigins(Vec<HeaderValue>);

impl AllowedOrigins {
    /// Parses a comma-separated list. Refused: `*` (every web page could then use a key a dashboard
    /// holds), anything but `http`/`https`, and a path, query or trailing slash (an `Origin` header never has
    /// one, so such an entry would silently match nothing).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut origins = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry.contains('*') {
                return Err(format!(
                    "{entry:?}: wildcards are not allowed; list each dashboard's origin, e.g. https://dash.example.com"
                ));
            }
            let uri: axum::http::Uri = entry.parse().map_err(|_| {
                format!("{entry:?} is not an origin such as https://dash.example.com")
            })?;
            let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
            let bare = uri.authority().is_some()
                && uri.query().is_none()
                && uri.path() == "/"
                && !entry.ends_with('/');
            if !scheme_ok || !bare {
                return Err(format!(
                    "{entry:?} is not an origin: write scheme://host[:port] with http or https, without a path \
                     or trailing slash, e.g. https://dash.example.com"
                ));
            }
            let origin = HeaderValue::from_str(&entry.to_ascii_lowercase())
                .map_err(|_| format!("{entry:?} is not a valid header value"))?;
            if !origins.contains(&origin) {
                origins.push(origin);
            }
        }
        Ok(Self(origins))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `origin` (a request's `Origin` header) is one of these.
    pub fn allows(&self, origin: &HeaderValue) -> bool {
        origin.to_str().is_ok_and(|origin| {
            self.0
                .iter()
                .any(|allowed| allowed == origin.to_ascii_lowercase().as_str())
        })
    }

    /// The layer answering preflights and marking answers for the allowed origins; `None` when none are
    /// allowed (then nothing is added to any request's path).
    pub fn layer(&self) -> Option<CorsLayer> {
        (!self.is_empty()).then(|| {
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(self.0.clone()))
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    HeaderName::from_static("idempotency-key"),
                ])
                // A page reads the REST listing's next page and a refusal's wait from these.
                .expose_headers([header::LINK, header::RETRY_AFTER])
                .max_age(PREFLIGHT_MAX_AGE)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_http_origins_are_accepted() {
        let parsed =
            AllowedOrigins::parse(" https://Dash.example.com, http://127.0.0.1:3000 ,").unwrap();
        assert_eq!(
            parsed.0,
            [
                HeaderValue::from_static("https://dash.example.com"),
                HeaderValue::from_static("http://127.0.0.1:3000")
            ]
        );
        assert!(AllowedOrigins::parse("").unwrap().layer().is_none());
        for bad in [
            "*",
            "https://*.example.com",
            "https://dash.example.com/",
            "https://dash.example.com/app",
            "https://dash.example.com?x=1",
            "ftp://dash.example.com",
            "dash.example.com",
            "null",
            "https://",
        ] {
            assert!(AllowedOrigins::parse(bad).is_err(), "{bad}");
        }
    }
}
