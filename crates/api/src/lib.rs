//! vireo's REST API: HTTP/1.1 with JSON bodies on a Unix socket, one VMM per socket.
//!
//! [`server::ApiServer`] serves a [`vireo_vmm::VmmHandle`]; [`client::Client`] talks to it
//! (`vireo ctl`). The routes are in [`ROUTES`], and `docs/api/openapi.json` describes them;
//! a test checks the two against each other and the server against the document.
//!
//! HTTP itself is hyper's (a maintained implementation, not hand-written parsing). The server
//! runs a tokio current-thread runtime on its own thread, which exists only while an API
//! socket is open; a `vireo run` without `--api-socket` starts no runtime at all.

pub mod client;
pub mod server;

/// The API's path prefix.
pub const PREFIX: &str = "/api/v1";

/// HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Info,
    Counters,
    Configure,
    Boot,
    Pause,
    Resume,
    Shutdown,
    PowerOff,
    Reboot,
    Snapshot,
    Restore,
    Migrate,
    ReceiveMigration,
    MigrationStatus,
    Exit,
    OpenApi,
}

/// One route: method, path (after [`PREFIX`]), action, whether it takes a JSON body.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
    pub action: Action,
    pub body: bool,
}

/// Every route the server answers.
pub const ROUTES: &[Route] = &[
    Route {
        method: Method::Get,
        path: "/vm",
        action: Action::Info,
        body: false,
    },
    Route {
        method: Method::Get,
        path: "/vm/counters",
        action: Action::Counters,
        body: false,
    },
    Route {
        method: Method::Put,
        path: "/vm/config",
        action: Action::Configure,
        body: true,
    },
    Route {
        method: Method::Put,
        path: "/vm/boot",
        action: Action::Boot,
        body: false,
    },
    Route {
        method: Method::Put,
        path: "/vm/pause",
        action: Action::Pause,
        body: false,
    },
    Route {
        method: Method::Put,
        path: "/vm/resume",
        action: Action::Resume,
        body: false,
    },
    Route {
        method: Method::Put,
        path: "/vm/shutdown",
        action: Action::Shutdown,
        body: false,
    },
    Route {
        method: Method::Put,
        path: "/vm/power-off",
        action: Action::PowerOff,
        body: false,
    },
    Route {
        method: Method::Put,
        path: "/vm/reboot",
        action: Action::Reboot,
        body: false,
    },
    Route {
        method: Method::Put,
        path: "/vm/snapshot",
        action: Action::Snapshot,
        body: true,
    },
    Route {
        method: Method::Put,
        path: "/vm/restore",
        action: Action::Restore,
        body: true,
    },
    Route {
        method: Method::Put,
        path: "/vm/migrate",
        action: Action::Migrate,
        body: true,
    },
    Route {
        method: Method::Put,
        path: "/vm/receive-migration",
        action: Action::ReceiveMigration,
        body: true,
    },
    Route {
        method: Method::Get,
        path: "/vm/migration",
        action: Action::MigrationStatus,
        body: false,
    },
    Route {
        method: Method::Put,
        path: "/vmm/exit",
        action: Action::Exit,
        body: false,
    },
    Route {
        method: Method::Get,
        path: "/openapi.json",
        action: Action::OpenApi,
        body: false,
    },
];

/// The OpenAPI document (OpenAPI 3.0), served at `GET /api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../../docs/api/openapi.json");

/// Body of `PUT /vm/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory to write the snapshot into (created if missing).
    pub destination: std::path::PathBuf,
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests;
