//! The HTTP answers shared by every listener: the body type ([`Body`], [`Resp`], [`full`]),
//! JSON and text answers, 405 with `Allow`, the answer on a shed connection, and reading a
//! whole request body within its cap and deadline ([`read_body`], which marks the request
//! as being handled once its body is complete). Owns that framing; must not route paths or
//! decide what a body means.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Response;
use hyper::StatusCode;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::http::request::Parts;

use super::BODY_TIMEOUT;
use super::shed::BodyArrival;
use crate::callback::Answer;

/// An answer's body: whole (`full`) or streamed (the admin socket's `/v2`).
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, std::convert::Infallible>;
pub type Resp = Response<Body>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    Full::new(bytes.into()).boxed_unsync()
}

/// Reads a whole request body, at most `limit` bytes, within [`BODY_TIMEOUT`] (or
/// [`CROWDED_BODY_TIMEOUT`](super::CROWDED_BODY_TIMEOUT): the deadline `serve` put in the
/// request's extensions). On failure returns the answer to send (413 without reading the
/// rest, 408, 400, 503 if the connection was shed meanwhile).
///
/// While the body arrives the connection may be shed (nothing has been done with the
/// request yet); once it is complete the request is in its handler and never shed.
pub async fn read_body(parts: &Parts, body: Incoming, limit: usize) -> Result<Bytes, Resp> {
    let too_large = || {
        let mut r = answer(Answer::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {limit} bytes"),
        ));
        // The rest of the body is never read, so the connection cannot be reused.
        r.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
        r
    };
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let arrival = parts.extensions.get::<BodyArrival>();
    let deadline = arrival.map_or(BODY_TIMEOUT, |a| a.timeout);
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => {
            if arrival.is_some_and(|a| !a.complete()) {
                return Err(shed_answer());
            }
            Ok(collected.to_bytes())
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(answer(Answer::error(
            StatusCode::BAD_REQUEST,
            format!("could not read the body: {e}"),
        ))),
        Err(_) => {
            let mut r = answer(Answer::error(
                StatusCode::REQUEST_TIMEOUT,
                "body not received in time",
            ));
            r.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            Err(r)
        }
    }
}

/// The answer on a connection shed a moment ago (it is being closed; usually never sent).
pub(super) fn shed_answer() -> Resp {
    let mut r = answer(Answer::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many connections; try again",
    ));
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    r
}

pub fn answer(a: Answer) -> Resp {
    let mut r = Response::new(full(a.body));
    *r.status_mut() = a.status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn text(status: StatusCode, body: &'static str) -> Resp {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(super) fn method_not_allowed(allow: &'static str) -> Resp {
    let mut r = answer(Answer::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed",
    ));
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}
