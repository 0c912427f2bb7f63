//! What the router checks before a handler runs, and what it answers when no handler fits: a
//! declared body over the limit (413 at once, before any of it is read), the API key (401 with
//! `WWW-Authenticate: Bearer`), an unknown route (404) and a known route's wrong method (405),
//! each with an OpenAI-style error body.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::openai::ApiError;

/// Refuses with 413, before reading any of it, a body whose `Content-Length` exceeds `limit`,
/// and closes the connection after the answer so the body is never read. (Bodies without a
/// length are cut at the limit as they arrive, by axum's `DefaultBodyLimit`.)
pub async fn refuse_declared_oversize(
    State(limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    match declared_length(request.headers()) {
        Some(length) if length > limit as u64 => {
            let message =
                format!("the request body of {length} bytes exceeds the limit of {limit} bytes");
            ApiError::invalid("", message).closing(StatusCode::PAYLOAD_TOO_LARGE)
        }
        _ => next.run(request).await,
    }
}

/// The `Content-Length` a request declares, when it declares one that parses.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Refuses a request that does not carry `key` as `Authorization: Bearer <key>` with 401. The
/// scheme is matched without regard to case, as RFC 9110 has it (`bearer`, `BEARER`).
pub async fn require_api_key(
    State(key): State<Option<String>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = key.as_deref() else {
        return next.run(request).await;
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match presented.is_some_and(|presented| same_secret(presented, key)) {
        true => next.run(request).await,
        false => ApiError::unauthorized().into_response(),
    }
}

/// The token of an `Authorization` value of the Bearer scheme (any case).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(presented: &str, key: &str) -> bool {
    let (a, b) = (presented.as_bytes(), key.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// 404 for a path the server does not serve (worded as OpenAI words it).
pub async fn no_such_route(method: Method, uri: Uri) -> Response {
    ApiError::invalid("", format!("Invalid URL ({method} {})", uri.path()))
        .with_status(StatusCode::NOT_FOUND)
        .into_response()
}

/// 405 for a served path asked with a method it does not take (axum adds the `Allow` header).
pub async fn wrong_method(method: Method, uri: Uri) -> Response {
    ApiError::invalid("", format!("{} does not take {method}", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        assert_eq!(bearer_token("Bearer k3y"), Some("k3y"));
        assert_eq!(bearer_token("bearer k3y"), Some("k3y"));
        assert_eq!(bearer_token("BEARER  k3y"), Some("k3y"));
        assert_eq!(bearer_token("Basic k3y"), None);
        assert_eq!(bearer_token("k3y"), None);
    }

    #[test]
    fn secrets_compare_by_every_byte() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
    }

    #[test]
    fn only_a_parsable_content_length_is_declared() {
        let mut headers = HeaderMap::new();
        assert_eq!(declared_length(&headers), None);
        headers.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from_static("99999999999999"),
        );
        assert_eq!(declared_length(&headers), Some(99_999_999_999_999));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("lots"));
        assert_eq!(declared_length(&headers), None);
    }
}
