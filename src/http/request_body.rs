//! An inference request's body: at most `HARNESS_MAX_MESSAGE_BYTES`, whole
//! within [`BODY_TIMEOUT`] of its headers (a client that trickles it cannot
//! hold a connection), then JSON into the route's request type.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::Request;
use serde::de::DeserializeOwned;

use super::api_error::{ApiError, ErrorKind};

/// How long a body may take to arrive after its headers.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of `req`, refused when over `limit` bytes (by its
/// `Content-Length` before a byte is read, or as it arrives) or slower than
/// [`BODY_TIMEOUT`].
pub async fn read(req: Request<Incoming>, limit: u64) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::TooLarge,
            format!("the request body is over {limit} bytes (HARNESS_MAX_MESSAGE_BYTES on the node); send less at a time"),
        )
    };
    let announced = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let body = Limited::new(
        req.into_body(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    );
    match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => Err(ApiError::new(
            ErrorKind::BodyTimeout,
            format!(
                "the request body did not arrive within {} s of its headers",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(err)) => Err(ApiError::bad_input(format!(
            "the request body could not be read: {err}"
        ))),
    }
}

/// `bytes` as JSON of `T`; a 422 naming what is wrong and where.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|err| ApiError::bad_input(format!("the request body is not valid: {err}")))
}
