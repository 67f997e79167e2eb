//! An inference request's body: at most `HARNESS_MAX_MESSAGE_BYTES`, whole
//! within [`BODY_TIMEOUT`] of its headers and before the request's deadline
//! (a client that trickles it cannot hold a connection), counted against one
//! budget for all the bodies being read and parsed at once, then parsed as
//! JSON into the route's request type off the async workers when it is large.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::Request;
use serde::de::DeserializeOwned;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::api_error::{ApiError, ErrorKind};

/// How long a body may take to arrive after its headers.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bodies up to this size are parsed where they arrive; larger ones on the
/// blocking pool, so parsing megabytes never stalls the health checks and the
/// mesh that share the async workers.
const PARSE_INLINE_BYTES: usize = 64 * 1024;
/// The bytes of bodies being read or parsed at once, over all requests, at
/// least: their parsed form takes about as much again.
const BUDGET_BYTES: u64 = 256 << 20;

/// The budget of bodies in memory at once: `BUDGET_BYTES`, or one body of the
/// largest size if that is larger. Counted in KiB.
#[derive(Debug)]
pub struct BodyBudget {
    kib: Arc<Semaphore>,
    total_kib: u32,
}

impl BodyBudget {
    pub fn new(max_body_bytes: u64) -> Self {
        let total_kib = (BUDGET_BYTES.max(max_body_bytes) / 1024).min(u64::from(u32::MAX)) as u32;
        BodyBudget {
            kib: Arc::new(Semaphore::new(total_kib as usize)),
            total_kib,
        }
    }

    /// A place for `bytes` more, or 429 if the budget is spent.
    fn take(&self, bytes: u64) -> Result<OwnedSemaphorePermit, ApiError> {
        let kib = (bytes.div_ceil(1024).max(1)).min(u64::from(self.total_kib)) as u32;
        self.kib.clone().try_acquire_many_owned(kib).map_err(|_| {
            ApiError::new(
                ErrorKind::Overloaded,
                format!(
                    "the node is reading {} MiB of request bodies already; retry shortly",
                    self.total_kib / 1024
                ),
            )
        })
    }
}

/// A body read whole, with its place in the budget (given back once it is
/// parsed).
pub struct ReadBody {
    pub bytes: Bytes,
    place: OwnedSemaphorePermit,
}

/// The body of `req`, refused when over `limit` bytes (by its
/// `Content-Length` before a byte is read, or as it arrives), when the budget
/// is spent (429), or when slower than [`BODY_TIMEOUT`] or `deadline`.
pub async fn read(
    req: Request<Incoming>,
    limit: u64,
    budget: &BodyBudget,
    deadline: Instant,
) -> Result<ReadBody, ApiError> {
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
    // A chunked body may be as large as the limit.
    let place = budget.take(announced.unwrap_or(limit))?;
    let within = BODY_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
    let body = Limited::new(
        req.into_body(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    );
    match tokio::time::timeout(within, body.collect()).await {
        Err(_) if within < BODY_TIMEOUT => Err(ApiError::new(
            ErrorKind::Deadline,
            "the request's deadline passed while its body arrived (HARNESS_HTTP_DEADLINE_MS)",
        )),
        Err(_) => Err(ApiError::new(
            ErrorKind::BodyTimeout,
            format!(
                "the request body did not arrive within {} s of its headers",
                BODY_TIMEOUT.as_secs()
            ),
        )),
        Ok(Ok(collected)) => Ok(ReadBody {
            bytes: collected.to_bytes(),
            place,
        }),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(err)) => Err(ApiError::bad_input(format!(
            "the request body could not be read: {err}"
        ))),
    }
}

/// `body` as JSON of `T` (on the blocking pool when large); a 422 naming what
/// is wrong and where. The body's place in the budget is given back after.
pub async fn parse<T: DeserializeOwned + Send + 'static>(body: ReadBody) -> Result<T, ApiError> {
    let ReadBody { bytes, place } = body;
    let parsed = if bytes.len() <= PARSE_INLINE_BYTES {
        parse_now(&bytes)
    } else {
        tokio::task::spawn_blocking(move || parse_now(&bytes))
            .await
            .unwrap_or_else(|err| {
                Err(ApiError::new(
                    ErrorKind::Internal,
                    format!("parsing the request body failed: {err}"),
                ))
            })
    };
    drop(place);
    parsed
}

fn parse_now<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|err| ApiError::bad_input(format!("the request body is not valid: {err}")))
}
