//! The API server: accepts connections on a Unix socket and answers each request from the
//! [`VmmHandle`]. Reads (`GET`) are answered on the spot from shared state; commands are
//! handed to the VMM's main thread on a blocking-task thread, so a slow command (a
//! snapshot) never holds up the reads.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::watch;
use vireo_vmm::config::VmConfig;
use vireo_vmm::{
    Command, CommandErrorKind, MigrateRequest, ReceiveRequest, RestoreRequest, VmmHandle,
};

use crate::{Action, ErrorBody, Method, SnapshotRequest, OPENAPI, PREFIX, ROUTES};

/// The largest request body accepted.
const MAX_BODY: usize = 1 << 20;
/// How long a stopping server lets requests in progress finish.
const DRAIN: Duration = Duration::from_secs(2);

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API socket {0}: something is already listening there")]
    InUse(PathBuf),
    #[error("starting the API thread: {0}")]
    Thread(std::io::Error),
}

/// A running API server; dropping it (or [`ApiServer::stop`]) closes the socket.
pub struct ApiServer {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The socket file to remove when stopping (none for a listener bound elsewhere).
    path: Option<PathBuf>,
}

impl ApiServer {
    /// Listen on `path` (a stale socket file is replaced; a live one is refused) and serve
    /// `handle` on a thread of its own.
    pub fn start(path: &Path, handle: VmmHandle) -> Result<ApiServer, ServerError> {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.to_path_buf()));
        }
        let _ = std::fs::remove_file(path);
        let std_listener =
            std::os::unix::net::UnixListener::bind(path).map_err(|source| ServerError::Socket {
                path: path.to_path_buf(),
                source,
            })?;
        let mut server = Self::from_listener(std_listener, handle).map_err(|e| match e {
            ServerError::Socket { source, .. } => ServerError::Socket {
                path: path.to_path_buf(),
                source,
            },
            e => e,
        })?;
        server.path = Some(path.to_path_buf());
        Ok(server)
    }

    /// Serve `handle` on a socket already bound and listening (for a jailed VMM: bound
    /// outside the jail, whose owner removes the file). In a VMM with seccomp filters
    /// enabled the API thread installs the `api` filter first.
    pub fn from_listener(
        listener: std::os::unix::net::UnixListener,
        handle: VmmHandle,
    ) -> Result<ApiServer, ServerError> {
        listener
            .set_nonblocking(true)
            .map_err(|source| ServerError::Socket {
                path: PathBuf::new(),
                source,
            })?;
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                use vireo_vmm::seccomp::{apply, ThreadKind};
                if let Err(e) = apply(ThreadKind::Api) {
                    tracing::error!("API: {e}; not serving");
                    return;
                }
                serve(listener, handle, stopped)
            })
            .map_err(ServerError::Thread)?;
        Ok(ApiServer {
            stop,
            thread: Some(thread),
            path: None,
        })
    }

    /// Stop accepting, let requests in progress finish (briefly), remove the socket.
    pub fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    listener: std::os::unix::net::UnixListener,
    handle: VmmHandle,
    mut stopped: watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("API: cannot start its runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("API: {e}");
                return;
            }
        };
        let handle = Arc::new(handle);
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = stopped.changed() => break,
                r = listener.accept() => match r {
                    Ok((stream, _)) => {
                        let handle = handle.clone();
                        let mut stop = stopped.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| {
                                let handle = handle.clone();
                                async move { Ok::<_, Infallible>(respond(&handle, req).await) }
                            });
                            let conn = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), svc);
                            tokio::pin!(conn);
                            tokio::select! {
                                r = conn.as_mut() => {
                                    if let Err(e) = r {
                                        tracing::debug!("API connection: {e}");
                                    }
                                }
                                _ = stop.changed() => {
                                    conn.as_mut().graceful_shutdown();
                                    let _ = tokio::time::timeout(DRAIN, conn).await;
                                }
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("API: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        let _ =
            tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} }).await;
    });
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let body = serde_json::to_string(&ErrorBody {
        error: message.into(),
    })
    .unwrap_or_else(|_| "{\"error\":\"\"}".into());
    json_response(status, body)
}

fn ok<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_string(v) {
        Ok(b) => json_response(status, b),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Parse a JSON body into `T`; the error names the offending field (serde's message:
/// "unknown field `cpu`, expected one of ...", "missing field `kernel`", "invalid type ...
/// at line 1 column 9").
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Box<Response<Full<Bytes>>>> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("bad request body: {e}"),
        ))
    })
}

async fn respond(handle: &VmmHandle, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = match *req.method() {
        hyper::Method::GET => Some(Method::Get),
        hyper::Method::PUT => Some(Method::Put),
        _ => None,
    };
    let path = req.uri().path().to_string();
    let Some(sub) = path.strip_prefix(PREFIX) else {
        return error(StatusCode::NOT_FOUND, format!("no such resource: {path}"));
    };
    let candidates: Vec<_> = ROUTES.iter().filter(|r| r.path == sub).collect();
    if candidates.is_empty() {
        return error(StatusCode::NOT_FOUND, format!("no such resource: {path}"));
    }
    let Some(route) = candidates.iter().find(|r| Some(r.method) == method) else {
        let allowed: Vec<_> = candidates.iter().map(|r| r.method.as_str()).collect();
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{} {path}: use {}", req.method(), allowed.join(", ")),
        );
        if let Ok(v) = hyper::header::HeaderValue::from_str(&allowed.join(", ")) {
            r.headers_mut().insert(hyper::header::ALLOW, v);
        }
        return r;
    };
    let (action, takes_body) = (route.action, route.body);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body (at most {MAX_BODY} bytes): {e}"),
            )
        }
    };
    let empty = body.iter().all(u8::is_ascii_whitespace);
    if !takes_body
        && !empty
        && serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body)
            .map_or(true, |m| !m.is_empty())
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{path} takes no request body (or an empty object)"),
        );
    }
    if takes_body && empty {
        return error(StatusCode::BAD_REQUEST, format!("{path} needs a JSON body"));
    }
    let cmd = match action {
        Action::Info => return ok(StatusCode::OK, &handle.info()),
        Action::Counters => return ok(StatusCode::OK, &handle.counters()),
        Action::OpenApi => return json_response(StatusCode::OK, OPENAPI.to_string()),
        Action::Configure => match parse::<VmConfig>(&body) {
            Ok(c) => Command::Configure(Box::new(c)),
            Err(r) => return *r,
        },
        Action::Snapshot => match parse::<SnapshotRequest>(&body) {
            Ok(s) => Command::Snapshot(s.destination),
            Err(r) => return *r,
        },
        Action::Restore => match parse::<RestoreRequest>(&body) {
            Ok(r) => Command::Restore(r),
            Err(r) => return *r,
        },
        Action::Migrate => match parse::<MigrateRequest>(&body) {
            Ok(r) => Command::Migrate(r),
            Err(r) => return *r,
        },
        Action::ReceiveMigration => match parse::<ReceiveRequest>(&body) {
            Ok(r) => Command::ReceiveMigration(r),
            Err(r) => return *r,
        },
        Action::MigrationStatus => {
            return match handle.migration() {
                Some(p) => ok(StatusCode::OK, &p),
                None => error(StatusCode::NOT_FOUND, "no migration has run in this vireo"),
            }
        }
        Action::Boot => Command::Boot,
        Action::Pause => Command::Pause,
        Action::Resume => Command::Resume,
        Action::Shutdown => Command::Shutdown,
        Action::PowerOff => Command::PowerOff,
        Action::Reboot => Command::Reboot,
        Action::Exit => Command::Exit,
    };
    let accepted = matches!(action, Action::Shutdown);
    let h = handle.clone();
    let r = tokio::task::spawn_blocking(move || h.command(cmd)).await;
    match r {
        Ok(Ok(reply)) => ok(
            if accepted {
                StatusCode::ACCEPTED
            } else {
                StatusCode::OK
            },
            &reply,
        ),
        Ok(Err(e)) => error(
            match e.kind {
                CommandErrorKind::Conflict => StatusCode::CONFLICT,
                CommandErrorKind::BadRequest => StatusCode::BAD_REQUEST,
                CommandErrorKind::Failed => StatusCode::INTERNAL_SERVER_ERROR,
            },
            e.message,
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
