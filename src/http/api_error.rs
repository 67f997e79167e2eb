//! Why an inference request was not answered, in the shapes the ecosystem's
//! clients read: OpenAI's error object on `/v1/*`
//! (`{"error": {"message", "type", "code", "param"}}`) and
//! text-embeddings-inference's on `/embed` (`{"error", "error_type"}`). The
//! status codes are what those clients retry on or not: 429 and 503 are worth
//! retrying, 401, 413 and 422 are not.

use harness_client::ServingError;
use hyper::header::{HeaderValue, ALLOW, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;

use super::{json_bytes, Body};

/// Which client family a route speaks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `/v1/*`: OpenAI's error object.
    OpenAi,
    /// `/embed`: text-embeddings-inference's.
    Tei,
}

/// What went wrong, which decides the status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No key, or the wrong one: 401.
    Unauthorized,
    /// No such route here (inference off, or another task): 404.
    NotFound,
    /// The route takes only this method: 405.
    MethodNotAllowed(&'static str),
    /// The body is over `HARNESS_MAX_MESSAGE_BYTES`: 413.
    TooLarge,
    /// The body did not arrive in time: 408.
    BodyTimeout,
    /// The request breaks a rule (JSON, types, limits): 422.
    BadInput,
    /// The queue is full: 429 with `Retry-After`.
    Overloaded,
    /// Not ready (downloading, loading, warming, draining): 503.
    NotReady,
    /// `HARNESS_HTTP_DEADLINE_MS` passed: 504.
    Deadline,
    /// The model failed, or the serving restarted under the request: 500.
    Internal,
}

/// An inference request's error: its kind and a message saying what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    /// A 422 saying `message`.
    pub fn bad_input(message: impl Into<String>) -> Self {
        ApiError::new(ErrorKind::BadInput, message)
    }

    pub fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::BadInput => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Deadline => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code`.
    fn openai_type_and_code(&self) -> (&'static str, &'static str) {
        match self.kind {
            ErrorKind::Unauthorized => ("authentication_error", "invalid_api_key"),
            ErrorKind::NotFound => ("not_found_error", "not_found"),
            ErrorKind::MethodNotAllowed(_) => ("invalid_request_error", "method_not_allowed"),
            ErrorKind::TooLarge => ("invalid_request_error", "request_too_large"),
            ErrorKind::BodyTimeout => ("invalid_request_error", "request_timeout"),
            ErrorKind::BadInput => ("invalid_request_error", "invalid_request"),
            ErrorKind::Overloaded => ("rate_limit_error", "overloaded"),
            ErrorKind::NotReady => ("service_unavailable", "not_ready"),
            ErrorKind::Deadline => ("timeout", "deadline_exceeded"),
            ErrorKind::Internal => ("server_error", "internal_error"),
        }
    }

    /// text-embeddings-inference's `error_type`.
    fn tei_error_type(&self) -> &'static str {
        match self.kind {
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed(_)
            | ErrorKind::TooLarge
            | ErrorKind::BodyTimeout
            | ErrorKind::BadInput => "validation",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::NotReady => "unhealthy",
            ErrorKind::Deadline => "timeout",
            ErrorKind::Internal => "backend",
        }
    }

    /// OpenAI's error object, as JSON bytes (also a stream's last event).
    pub fn openai_json(&self) -> Vec<u8> {
        let (kind, code) = self.openai_type_and_code();
        let body = OpenAiError {
            error: OpenAiErrorBody {
                message: &self.message,
                kind,
                code,
                param: None,
            },
        };
        serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// The answer to send for this error on a route of `dialect`.
    pub fn response(&self, dialect: Dialect) -> Response<Body> {
        let bytes = match dialect {
            Dialect::OpenAi => self.openai_json(),
            Dialect::Tei => serde_json::to_vec(&TeiError {
                error: &self.message,
                error_type: self.tei_error_type(),
            })
            .unwrap_or_else(|_| b"{}".to_vec()),
        };
        let mut response = json_bytes(self.status(), bytes);
        let headers = response.headers_mut();
        match self.kind {
            ErrorKind::Unauthorized => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ErrorKind::MethodNotAllowed(method) => {
                headers.insert(ALLOW, HeaderValue::from_static(method));
            }
            ErrorKind::Overloaded => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ErrorKind::NotReady => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("5"));
            }
            ErrorKind::Deadline => {
                // OpenAI's clients retry a 504 by default: the same request
                // would take as long again, so they are told not to.
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        response
    }
}

impl From<ServingError> for ApiError {
    fn from(err: ServingError) -> Self {
        let kind = match &err {
            ServingError::NotReady { .. } => ErrorKind::NotReady,
            ServingError::Overloaded { .. } => ErrorKind::Overloaded,
            ServingError::BadInput { .. } => ErrorKind::BadInput,
            ServingError::DeadlineExceeded { .. } => ErrorKind::Deadline,
            ServingError::Model { .. } | ServingError::Internal { .. } => ErrorKind::Internal,
        };
        ApiError::new(kind, err.to_string())
    }
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    error: OpenAiErrorBody<'a>,
}

#[derive(Serialize)]
struct OpenAiErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'static str,
    param: Option<&'static str>,
}

#[derive(Serialize)]
struct TeiError<'a> {
    error: &'a str,
    error_type: &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_serving_error_gets_the_status_its_clients_expect() {
        let cases = [
            (
                ServingError::NotReady {
                    phase: "downloading".into(),
                },
                503,
            ),
            (
                ServingError::Overloaded {
                    queued: 1,
                    capacity: 1,
                },
                429,
            ),
            (ServingError::BadInput { reason: "x".into() }, 422),
            (ServingError::DeadlineExceeded { waited_ms: 5 }, 504),
            (
                ServingError::Model {
                    message: "x".into(),
                },
                500,
            ),
            (
                ServingError::Internal {
                    message: "x".into(),
                },
                500,
            ),
        ];
        for (err, code) in cases {
            let message = err.to_string();
            let api = ApiError::from(err);
            assert_eq!(api.status().as_u16(), code, "{message}");
            assert_eq!(api.message, message);
        }
    }

    #[test]
    fn the_shapes_are_openais_and_teis() {
        let err = ApiError::new(ErrorKind::Overloaded, "full");
        let openai: serde_json::Value = serde_json::from_slice(&err.openai_json()).unwrap();
        assert_eq!(
            openai,
            serde_json::json!({"error": {"message": "full", "type": "rate_limit_error", "code": "overloaded", "param": null}})
        );
        let response = err.response(Dialect::Tei);
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[RETRY_AFTER], "1");
    }
}
