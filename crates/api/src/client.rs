//! A blocking client for the API (what `vireo ctl` uses): one request per connection, on a
//! throwaway current-thread runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::{Method, PREFIX};

/// Errors talking to the API (not HTTP error statuses: those are in [`Response`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the API socket {path}: {source} (is vireo running with --api-socket {path}?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the API: {0}")]
    Http(String),
    #[error("no answer from the API within {0:?}")]
    Timeout(Duration),
}

/// A response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// A client for the API socket at a path.
pub struct Client {
    path: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(path: &Path) -> Self {
        Client {
            path: path.to_path_buf(),
            timeout: Duration::from_secs(600),
        }
    }

    /// Give up on requests after `t`.
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// `method` on `path` (after the `/api/v1` prefix) with an optional JSON body.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, ClientError> {
        self.raw(method.as_str(), &format!("{PREFIX}{path}"), body)
    }

    /// Any method on any full path (for tests of the server's refusals).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let timeout = self.timeout;
        rt.block_on(async {
            tokio::time::timeout(timeout, self.send(method, path, body))
                .await
                .map_err(|_| ClientError::Timeout(timeout))?
        })
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<Response, ClientError> {
        let stream =
            UnixStream::connect(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or("").to_string())))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        Ok(Response {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
