//! Retrying a request: counting failed attempts, waiting between them (the
//! server's `Retry-After`, else backoff), and the error when they run out.

use super::hub::Attempt;
use super::{FetchError, FetchOptions};

/// The failed attempts at one request.
pub struct Retries<'a> {
    options: &'a FetchOptions,
    url: String,
    /// What is being attempted, for the log line.
    what: String,
    failures: u32,
}

impl<'a> Retries<'a> {
    pub fn new(options: &'a FetchOptions, url: String, what: String) -> Self {
        Retries {
            options,
            url,
            what,
            failures: 0,
        }
    }

    /// The last attempt moved forward: a slow, flaky link still finishes, while a
    /// dead one gives up.
    pub fn progressed(&mut self) {
        self.failures = 0;
    }

    /// After a failed attempt: waits and returns `Ok` to try again, or the error
    /// when it is final or the attempts have run out.
    pub async fn after(&mut self, failure: Attempt) -> Result<(), FetchError> {
        let (reason, after, status) = match failure {
            Attempt::Fatal(err) => return Err(err),
            Attempt::Retry {
                reason,
                after,
                status,
            } => (reason, after, status),
        };
        self.failures += 1;
        if self.failures >= self.options.max_attempts {
            let (url, attempts) = (self.url.clone(), self.failures);
            return Err(match status {
                Some(status) => FetchError::Http {
                    url,
                    status,
                    attempts,
                },
                None => FetchError::Unreachable {
                    url,
                    message: reason,
                    attempts,
                },
            });
        }
        let delay = self.options.delay(self.failures, after);
        tracing::warn!(
            attempt = self.failures,
            "{}: {reason}; retrying in {delay:?}",
            self.what
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }
}
