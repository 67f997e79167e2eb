//! The Hub's HTTP protocol: `HEAD` on `resolve` for a file's metadata, `GET` (with
//! `Range`) for its bytes, and what each status means.

use std::error::Error as _;
use std::time::Duration;

use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use super::{FetchError, FetchOptions, Secret};

/// What the Hub says about one file at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    pub file: String,
    /// The commit the revision resolved to (`X-Repo-Commit`).
    pub commit: String,
    /// The blob's name: the sha256 of the content for LFS files, the git blob id otherwise.
    pub etag: String,
    pub size: u64,
    /// Where the bytes are: the CDN for LFS files, else the resolve URL.
    pub download_url: String,
}

impl FileMeta {
    /// LFS files are named by the sha256 of their content, which we check.
    pub fn sha256(&self) -> Option<&str> {
        (self.etag.len() == 64 && self.etag.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(&self.etag)
    }
}

/// A failed attempt: either worth retrying (after a delay) or final.
#[derive(Debug)]
pub enum Attempt {
    Retry {
        reason: String,
        /// The server's `Retry-After`, if it sent one.
        after: Option<Duration>,
        /// An HTTP status, when the failure was one.
        status: Option<u16>,
    },
    Fatal(FetchError),
}

impl From<FetchError> for Attempt {
    fn from(err: FetchError) -> Self {
        Attempt::Fatal(err)
    }
}

/// One repo on one Hub.
pub struct Hub {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    token: Option<Secret>,
    pub repo: String,
    pub revision: String,
}

impl Hub {
    pub fn new(
        endpoint: &str,
        token: Option<Secret>,
        repo: &str,
        revision: &str,
        options: &FetchOptions,
    ) -> Result<Self, FetchError> {
        let endpoint = reqwest::Url::parse(endpoint.trim_end_matches('/')).map_err(|e| {
            FetchError::Config(format!("HF_ENDPOINT {endpoint:?} is not a URL: {e}"))
        })?;
        let client = reqwest::Client::builder()
            // Redirects are ours to follow: the Hub answers LFS files with a redirect
            // to its CDN that carries the metadata, and renamed repos with a relative one.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(options.connect_timeout)
            // A stall: no byte for this long, on any read, headers or body.
            .read_timeout(options.stall_timeout)
            .user_agent(concat!("harness/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Hub {
            client,
            endpoint,
            token,
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// `{endpoint}/{repo}/resolve/{revision}/{file}`, the revision URL-encoded as the
    /// Hub wants (`refs/pr/1` → `refs%2Fpr%2F1`).
    pub fn resolve_url(&self, revision: &str, file: &str) -> String {
        // (hf-hub builds this only with its own HTTP clients compiled in.)
        let endpoint = self.endpoint.as_str().trim_end_matches('/');
        format!(
            "{endpoint}/{}/resolve/{}/{}",
            self.repo,
            revision.replace('/', "%2F"),
            encode_path(file)
        )
    }

    /// The repo's files at `revision` and the commit it resolves to, from the
    /// Hub's model API (`GET /api/models/{repo}/revision/{revision}`, its `sha`
    /// and `siblings`), as Python's `snapshot_download` asks.
    pub async fn list_files(&self, revision: &str) -> Result<(String, Vec<String>), Attempt> {
        #[derive(serde::Deserialize)]
        struct Info {
            sha: String,
            siblings: Vec<Sibling>,
        }
        #[derive(serde::Deserialize)]
        struct Sibling {
            rfilename: String,
        }
        let endpoint = self.endpoint.as_str().trim_end_matches('/');
        let url = format!(
            "{endpoint}/api/models/{}/revision/{}",
            self.repo,
            revision.replace('/', "%2F")
        );
        let response = self
            .request(Method::GET, &url)
            .send()
            .await
            .map_err(|e| self.transport(&url, e))?;
        if !response.status().is_success() {
            return Err(self.status_failure(&url, None, &response));
        }
        let body =
            limited_body(response, MAX_LISTING_BYTES)
                .await
                .map_err(|failure| match failure {
                    Some(e) => self.transport(&url, e),
                    None => Attempt::Fatal(protocol(&url, "a model info under 32 MiB")),
                })?;
        let info: Info = serde_json::from_slice(&body)
            .map_err(|_| protocol(&url, "the model's info as JSON with sha and siblings"))?;
        let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
        Ok((info.sha, files))
    }

    /// Whether `url` is on the Hub itself (not its CDN).
    pub fn is_own(&self, url: &str) -> bool {
        reqwest::Url::parse(url).is_ok_and(|u| u.origin() == self.endpoint.origin())
    }

    /// A request, with the token only where the Hub itself is asked: a CDN URL is
    /// signed and must not see it.
    pub fn request(&self, method: Method, url: &str) -> RequestBuilder {
        let mut req = self
            .client
            .request(method, url)
            .header(header::ACCEPT_ENCODING, "identity");
        if let (Some(token), Ok(target)) = (&self.token, reqwest::Url::parse(url)) {
            if target.origin() == self.endpoint.origin() {
                req = req.bearer_auth(token.expose());
            }
        }
        req
    }

    /// One `HEAD` for a file's metadata at `revision`, following relative redirects
    /// (a renamed repo) and stopping at an absolute one (the CDN: its headers carry
    /// what we need). `known`, the cached copy's etag and size, asks for a 304 when
    /// the file is unchanged; a 304 need not repeat the size (nor the etag), which
    /// are then the cached copy's.
    pub async fn head(
        &self,
        revision: &str,
        file: &str,
        known: Option<(&str, u64)>,
    ) -> Result<FileMeta, Attempt> {
        let mut url = self.resolve_url(revision, file);
        for _ in 0..5 {
            let mut req = self.request(Method::HEAD, &url);
            if let Some((etag, _)) = known {
                req = req.header(header::IF_NONE_MATCH, format!("\"{etag}\""));
            }
            let response = req.send().await.map_err(|e| self.transport(&url, e))?;
            let status = response.status();
            let headers = response.headers();
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                let location = header_str(headers, header::LOCATION.as_str())
                    .ok_or_else(|| protocol(&url, "a Location on its redirect"))?;
                let next = reqwest::Url::parse(&url)
                    .and_then(|base| base.join(location))
                    .map_err(|_| protocol(&url, "a valid Location"))?;
                if location.starts_with('/') || header_str(headers, "x-linked-etag").is_none() {
                    // A relative redirect: the repo moved; ask again there.
                    url = next.to_string();
                    continue;
                }
                return self.meta_from(file, &url, headers, next.to_string(), None);
            }
            if status == StatusCode::NOT_MODIFIED {
                return self.meta_from(file, &url, headers, url.clone(), known);
            }
            if status.is_success() {
                return self.meta_from(file, &url, headers, url.clone(), None);
            }
            return Err(self.status_failure(&url, Some(file), &response));
        }
        Err(protocol(&url, "an end to its redirects").into())
    }

    /// The metadata in `headers`; `unchanged` (a 304's) stands in for an etag or
    /// size the answer leaves out.
    fn meta_from(
        &self,
        file: &str,
        url: &str,
        headers: &HeaderMap,
        download_url: String,
        unchanged: Option<(&str, u64)>,
    ) -> Result<FileMeta, Attempt> {
        let commit = header_str(headers, "x-repo-commit")
            .ok_or_else(|| protocol(url, "X-Repo-Commit"))?
            .to_string();
        let etag = header_str(headers, "x-linked-etag")
            .or_else(|| header_str(headers, header::ETAG.as_str()))
            .map(normalize_etag)
            .filter(|e| !e.is_empty())
            .or_else(|| unchanged.map(|(etag, _)| etag.to_string()))
            .ok_or_else(|| protocol(url, "an ETag"))?;
        let size = header_str(headers, "x-linked-size")
            .or_else(|| header_str(headers, header::CONTENT_LENGTH.as_str()))
            .and_then(|s| s.parse::<u64>().ok())
            .or_else(|| unchanged.map(|(_, size)| size))
            .ok_or_else(|| protocol(url, "the file's size (X-Linked-Size or Content-Length)"))?;
        if etag.contains('/') || etag.starts_with('.') {
            return Err(protocol(url, "an ETag that is a plain name").into());
        }
        Ok(FileMeta {
            file: file.to_string(),
            commit,
            etag,
            size,
            download_url,
        })
    }

    /// What a non-success status means for this request.
    pub fn status_failure(&self, url: &str, file: Option<&str>, response: &Response) -> Attempt {
        let status = response.status();
        let code = status.as_u16();
        let error_code = header_str(response.headers(), "x-error-code");
        match status {
            // The Hub answers a repo that does not exist, asked without a token, with
            // 401 (so as not to tell it from a private one): its error code says so.
            StatusCode::UNAUTHORIZED if error_code == Some("RepoNotFound") => {
                Attempt::Fatal(FetchError::NotFound {
                    repo: self.repo.clone(),
                    revision: self.revision.clone(),
                    file: file.map(str::to_string),
                    code: error_code.map(str::to_string),
                })
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Attempt::Fatal(FetchError::Unauthorized {
                    repo: self.repo.clone(),
                    url: url.to_string(),
                    status: code,
                    token_sent: self.token.is_some(),
                })
            }
            StatusCode::NOT_FOUND => Attempt::Fatal(FetchError::NotFound {
                repo: self.repo.clone(),
                revision: self.revision.clone(),
                file: file.map(str::to_string),
                code: error_code.map(str::to_string),
            }),
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => Attempt::Retry {
                reason: format!("the Hub answered {code}"),
                after: retry_after(response.headers()),
                status: Some(code),
            },
            s if s.is_server_error() => Attempt::Retry {
                reason: format!("the Hub answered {code}"),
                after: retry_after(response.headers()),
                status: Some(code),
            },
            _ => Attempt::Fatal(FetchError::Http {
                url: url.to_string(),
                status: code,
                attempts: 1,
            }),
        }
    }

    /// A transport failure (refused, reset, timed out): always worth a retry.
    pub fn transport(&self, url: &str, err: reqwest::Error) -> Attempt {
        let kind = if err.is_timeout() {
            "timed out"
        } else if err.is_connect() {
            "could not connect"
        } else {
            "transfer failed"
        };
        // reqwest's own message repeats the URL; its causes hold the useful part.
        let cause = err
            .source()
            .map(error_chain)
            .unwrap_or_else(|| err.to_string());
        tracing::debug!(url, "{kind}: {cause}");
        Attempt::Retry {
            reason: format!("{kind}: {cause}"),
            after: None,
            status: None,
        }
    }
}

/// The largest model info read: a repo of tens of thousands of files lists in
/// a few MiB; more is a broken or hostile server, not a repo.
const MAX_LISTING_BYTES: usize = 32 << 20;

/// A response's body, at most `limit` bytes (`Err(None)` past it).
async fn limited_body(response: Response, limit: usize) -> Result<Vec<u8>, Option<reqwest::Error>> {
    use futures_util::StreamExt;
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(Some)?;
        if body.len() + chunk.len() > limit {
            return Err(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A repo path for a URL: each byte outside the unreserved set and `/`
/// percent-encoded, as the Hub's clients quote it (`my file.json` →
/// `my%20file.json`).
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for byte in path.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `reqwest`'s error with its causes, which hold the useful part ("connection refused").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

fn protocol(url: &str, what: &str) -> FetchError {
    FetchError::Protocol {
        url: url.to_string(),
        what: what.to_string(),
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
}

/// `W/"abc"` → `abc`.
fn normalize_etag(raw: &str) -> String {
    raw.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

/// `Retry-After` in seconds (the Hub's form); an HTTP date is treated as absent.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    header_str(headers, header::RETRY_AFTER.as_str())?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_paths_are_quoted_for_urls() {
        assert_eq!(encode_path("onnx/model.onnx"), "onnx/model.onnx");
        assert_eq!(encode_path("a b#?%.json"), "a%20b%23%3F%25.json");
    }

    #[test]
    fn etags_lose_their_quotes_and_weakness() {
        assert_eq!(normalize_etag("\"abc\""), "abc");
        assert_eq!(normalize_etag("W/\"abc\""), "abc");
    }

    #[test]
    fn revisions_are_url_encoded() {
        let hub = Hub::new(
            "http://hub.test/",
            None,
            "org/name",
            "refs/pr/1",
            &FetchOptions::default(),
        )
        .unwrap();
        assert_eq!(
            hub.resolve_url("refs/pr/1", "model.pt"),
            "http://hub.test/org/name/resolve/refs%2Fpr%2F1/model.pt"
        );
    }
}
