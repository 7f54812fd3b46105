//! The server against its OpenAPI document: every route is documented and every documented
//! operation is served; every endpoint is called in the states where it fits (and every
//! answer's body matches the documented schema for its status) and in those where it does
//! not (409); malformed and unknown bodies get 400 naming the field.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use vireo_vmm::Vmm;

use crate::client::{Client, Response};
use crate::server::ApiServer;
use crate::{Method, OPENAPI, PREFIX, ROUTES};

fn doc() -> Value {
    serde_json::from_str(OPENAPI).expect("docs/api/openapi.json is JSON")
}

/// Check `v` against `schema` (the subset of OpenAPI 3.0 schemas the document uses: type,
/// properties, required, additionalProperties, items, enum, nullable, oneOf, allOf, $ref,
/// minimum, maximum, maxLength). Returns the first mismatch.
fn check(doc: &Value, schema: &Value, v: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        let s = &doc["components"]["schemas"][name];
        if s.is_null() {
            return Err(format!("{at}: unknown $ref {r}"));
        }
        return check(doc, s, v, at);
    }
    if v.is_null() && schema.get("nullable") == Some(&Value::Bool(true)) {
        return Ok(());
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            check(doc, s, v, at)?;
        }
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let n = one.iter().filter(|s| check(doc, s, v, at).is_ok()).count();
        if n != 1 {
            return Err(format!("{at}: {v} matches {n} of oneOf"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{at}: {v} not in {e:?}"));
        }
    }
    let Some(t) = schema.get("type").and_then(Value::as_str) else {
        return Ok(());
    };
    let ok = match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => return Err(format!("{at}: unknown type {t}")),
    };
    if !ok {
        return Err(format!("{at}: {v} is not a {t}"));
    }
    if let (Some(min), Some(x)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < min {
            return Err(format!("{at}: {x} < {min}"));
        }
    }
    if let (Some(max), Some(x)) = (schema.get("maximum").and_then(Value::as_f64), v.as_f64()) {
        if x > max {
            return Err(format!("{at}: {x} > {max}"));
        }
    }
    if let (Some(max), Some(s)) = (schema.get("maxLength").and_then(Value::as_u64), v.as_str()) {
        if s.len() as u64 > max {
            return Err(format!("{at}: longer than {max}"));
        }
    }
    if let Some(items) = schema.get("items") {
        for (i, x) in v.as_array().into_iter().flatten().enumerate() {
            check(doc, items, x, &format!("{at}[{i}]"))?;
        }
    }
    if let Some(obj) = v.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !obj.contains_key(r) {
                return Err(format!("{at}: missing required {r}"));
            }
        }
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, x, &format!("{at}.{k}"))?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return Err(format!("{at}: undocumented property {k}"))
                    }
                    Some(s) if s.is_object() => check(doc, s, x, &format!("{at}.{k}"))?,
                    _ => {}
                },
            }
        }
    }
    Ok(())
}

#[test]
fn every_route_is_documented_and_every_documented_operation_is_served() {
    let d = doc();
    let documented: BTreeSet<(String, String)> = d["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(p, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), p.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_string(), format!("{PREFIX}{}", r.path)))
        .collect();
    assert_eq!(documented, served);
    // Every operation documents 404, 405 and its success; every PUT also 400, 409, 500.
    for (m, p) in &documented {
        let op = &d["paths"][p][m.to_lowercase()];
        let codes: Vec<&String> = op["responses"].as_object().unwrap().keys().collect();
        for c in ["404", "405"] {
            assert!(codes.iter().any(|x| *x == c), "{m} {p}: no {c}");
        }
        if m == "PUT" {
            for c in ["400", "409", "500"] {
                assert!(codes.iter().any(|x| *x == c), "{m} {p}: no {c}");
            }
        }
        // Request bodies: exactly the routes that take one.
        let route = ROUTES
            .iter()
            .find(|r| format!("{PREFIX}{}", r.path) == *p && r.method.as_str() == m)
            .unwrap();
        assert_eq!(op.get("requestBody").is_some(), route.body, "{m} {p}");
    }
}

#[test]
fn schema_checker_catches_mismatches() {
    let d = doc();
    let s = serde_json::json!({"$ref": "#/components/schemas/CommandReply"});
    assert!(check(
        &d,
        &s,
        &serde_json::json!({"state":"running","micros":3}),
        "r"
    )
    .is_ok());
    for bad in [
        serde_json::json!({"state":"running"}),
        serde_json::json!({"state":"sleeping","micros":3}),
        serde_json::json!({"state":"running","micros":-1}),
        serde_json::json!({"state":"running","micros":3,"extra":1}),
    ] {
        assert!(check(&d, &s, &bad, "r").is_err(), "{bad}");
    }
}

/// A VMM waiting for commands behind an API socket, run on a thread.
struct Fixture {
    dir: PathBuf,
    socket: PathBuf,
    client: Client,
    _server: ApiServer,
    vmm: Option<std::thread::JoinHandle<()>>,
    doc: Value,
}

impl Fixture {
    fn new(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("vireo-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let vmm = Vmm::waiting(Box::new(std::io::sink()));
        let server = ApiServer::start(&socket, vmm.handle()).unwrap();
        let t = std::thread::spawn(move || {
            let _ = vmm.run();
        });
        Fixture {
            client: Client::new(&socket).with_timeout(Duration::from_secs(60)),
            dir,
            socket,
            _server: server,
            vmm: Some(t),
            doc: doc(),
        }
    }

    /// A request whose answer must have `status` and a body matching the document.
    fn call(&self, method: Method, path: &str, body: Option<&str>, status: u16) -> Value {
        let r = self.client.request(method, path, body).unwrap();
        self.conforms(method.as_str(), path, &r);
        assert_eq!(
            r.status,
            status,
            "{} {path} {body:?}: {}",
            method.as_str(),
            r.body
        );
        serde_json::from_str(&r.body).unwrap()
    }

    fn conforms(&self, method: &str, path: &str, r: &Response) {
        let op = &self.doc["paths"][format!("{PREFIX}{path}")][method.to_lowercase()];
        let resp = &op["responses"][r.status.to_string()];
        assert!(
            !resp.is_null(),
            "{method} {path}: status {} is not documented ({})",
            r.status,
            r.body
        );
        let schema = &resp["content"]["application/json"]["schema"];
        let v: Value = serde_json::from_str(&r.body).unwrap();
        if let Err(e) = check(&self.doc, schema, &v, "body") {
            panic!("{method} {path} {}: {e}\n{}", r.status, r.body);
        }
    }

    fn state(&self) -> String {
        self.call(Method::Get, "/vm", None, 200)["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn put(&self, path: &str, status: u16) -> Value {
        self.call(Method::Put, path, None, status)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.client.request(Method::Put, "/vmm/exit", None);
        // (A second exit after the test's own is refused: fine.)
        if let Some(t) = self.vmm.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn probe_config(dir: &Path) -> String {
    let kernel = dir.join("counter.elf");
    std::fs::write(
        &kernel,
        vireo_guests::probe::build(&vireo_guests::probe::Probe::Counter),
    )
    .unwrap();
    serde_json::json!({
        "kernel": kernel,
        "cmdline": "console=ttyS0",
        "memory": "64M",
        "accel": "emu",
    })
    .to_string()
}

#[test]
fn lifecycle_over_every_endpoint_with_refusals_in_every_state() {
    let f = Fixture::new("lifecycle");
    let cfg = probe_config(&f.dir);
    let snap = f.dir.join("snap");
    let snap_body = serde_json::json!({ "destination": snap }).to_string();
    let restore_body = serde_json::json!({ "snapshot": snap }).to_string();
    // Everything that needs a VM, in not-configured.
    assert_eq!(f.state(), "not-configured");
    let counters = f.call(Method::Get, "/vm/counters", None, 200);
    assert_eq!(counters["vcpus"], Value::Array(vec![]));
    for p in [
        "/vm/boot",
        "/vm/pause",
        "/vm/resume",
        "/vm/shutdown",
        "/vm/power-off",
        "/vm/reboot",
    ] {
        let e = f.put(p, 409);
        assert!(
            e["error"].as_str().unwrap().contains("not-configured"),
            "{p}: {e}"
        );
    }
    f.call(Method::Put, "/vm/snapshot", Some(&snap_body), 409);
    // created: configure (twice is fine), then only boot/config/restore fit.
    f.call(Method::Put, "/vm/config", Some(&cfg), 200);
    assert_eq!(
        f.call(Method::Put, "/vm/config", Some(&cfg), 200)["state"],
        "created"
    );
    for p in [
        "/vm/pause",
        "/vm/resume",
        "/vm/shutdown",
        "/vm/power-off",
        "/vm/reboot",
    ] {
        f.put(p, 409);
    }
    // running
    assert_eq!(f.put("/vm/boot", 200)["state"], "running");
    for p in ["/vm/boot", "/vm/resume"] {
        assert!(f.put(p, 409)["error"].as_str().unwrap().contains("running"));
    }
    f.call(Method::Put, "/vm/config", Some(&cfg), 409);
    f.call(Method::Put, "/vm/restore", Some(&restore_body), 409);
    let e = f.call(Method::Put, "/vm/snapshot", Some(&snap_body), 409);
    assert!(
        e["error"].as_str().unwrap().contains("pause it first"),
        "{e}"
    );
    assert_eq!(f.put("/vm/shutdown", 202)["state"], "running");
    let info = f.call(Method::Get, "/vm", None, 200);
    assert_eq!(info["backend"], "emu");
    assert!(info["devices"].as_array().unwrap().len() >= 6, "{info}");
    // The probe prints: serial output shows up in the counters.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let c = f.call(Method::Get, "/vm/counters", None, 200);
        let serial = c["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "serial")
            .unwrap()["counters"]["output_bytes"]
            .as_u64()
            .unwrap();
        if serial > 20 {
            assert!(c["vcpus"][0]["pio_write"].as_u64().unwrap() > 20, "{c}");
            break;
        }
        assert!(Instant::now() < deadline, "no serial output: {c}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // paused
    assert_eq!(f.put("/vm/pause", 200)["state"], "paused");
    for p in ["/vm/boot", "/vm/pause", "/vm/shutdown"] {
        assert!(f.put(p, 409)["error"].as_str().unwrap().contains("paused"));
    }
    let s = f.call(Method::Put, "/vm/snapshot", Some(&snap_body), 200);
    assert_eq!(s["state"], "paused");
    assert_eq!(s["memory"]["ram"], 64u64 << 20);
    assert!(snap.join("state").exists() && snap.join("memory").exists());
    assert_eq!(f.put("/vm/resume", 200)["state"], "running");
    assert_eq!(f.put("/vm/reboot", 200)["state"], "running");
    assert_eq!(f.call(Method::Get, "/vm", None, 200)["boots"], 2);
    f.put("/vm/pause", 200);
    assert_eq!(f.put("/vm/reboot", 200)["state"], "running");
    // stopped: only config and restore fit; restore brings the snapshot back.
    assert_eq!(f.put("/vm/power-off", 200)["state"], "stopped");
    for p in [
        "/vm/boot",
        "/vm/pause",
        "/vm/resume",
        "/vm/shutdown",
        "/vm/power-off",
        "/vm/reboot",
    ] {
        assert!(
            f.put(p, 409)["error"].as_str().unwrap().contains("stopped"),
            "{p}"
        );
    }
    f.call(Method::Put, "/vm/snapshot", Some(&snap_body), 409);
    let paused = serde_json::json!({ "snapshot": snap, "paused": true }).to_string();
    assert_eq!(
        f.call(Method::Put, "/vm/restore", Some(&paused), 200)["state"],
        "paused"
    );
    assert_eq!(f.put("/vm/resume", 200)["state"], "running");
    f.put("/vm/power-off", 200);
    assert_eq!(
        f.call(Method::Put, "/vm/config", Some(&cfg), 200)["state"],
        "created"
    );
    assert_eq!(f.put("/vm/boot", 200)["state"], "running");
    // The document itself.
    let d = f.call(Method::Get, "/openapi.json", None, 200);
    assert_eq!(d["openapi"], "3.0.3");
    // exit: the VMM's run returns; commands are refused from then on.
    f.put("/vmm/exit", 200);
    let e = f.put("/vm/pause", 409);
    assert!(e["error"].as_str().unwrap().contains("exiting"), "{e}");
}

#[test]
fn malformed_bodies_unknown_fields_and_routes_are_refused() {
    let f = Fixture::new("bad");
    let cases: &[(&str, &str, &str)] = &[
        ("/vm/config", "{", "EOF"),
        ("/vm/config", "[1,2]", "invalid type"),
        (
            "/vm/config",
            r#"{"kernel":"/k","cpu":2}"#,
            "unknown field `cpu`",
        ),
        ("/vm/config", r#"{"cpus":2}"#, "missing field `kernel`"),
        (
            "/vm/config",
            r#"{"kernel":"/k","cpus":"two"}"#,
            "invalid type",
        ),
        (
            "/vm/config",
            r#"{"kernel":"/k","memory":"12X"}"#,
            "invalid size",
        ),
        (
            "/vm/config",
            r#"{"kernel":"/k","disks":[{"path":"/d","cache":"none"}]}"#,
            "unknown field `cache`",
        ),
        (
            "/vm/config",
            r#"{"kernel":"/nonexistent/vmlinux"}"#,
            "nonexistent",
        ),
        ("/vm/config", "", "needs a JSON body"),
        ("/vm/snapshot", r#"{"dest":"/x"}"#, "unknown field `dest`"),
        (
            "/vm/restore",
            r#"{"snapshot":"/x","pause":true}"#,
            "unknown field `pause`",
        ),
        (
            "/vm/restore",
            r#"{"snapshot":"/nonexistent-snapshot"}"#,
            "nonexistent-snapshot",
        ),
        ("/vm/boot", r#"{"now":true}"#, "takes no request body"),
    ];
    for (path, body, want) in cases {
        let e = f.call(Method::Put, path, Some(body), 400);
        let msg = e["error"].as_str().unwrap();
        assert!(msg.contains(want), "{path} {body}: {msg}");
    }
    // An empty object is an empty body.
    f.call(Method::Put, "/vm/boot", Some("{}"), 409);
    // Unknown resources and methods.
    let r = f.client.raw("GET", "/api/v1/nothing", None).unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    let r = f.client.raw("GET", "/elsewhere", None).unwrap();
    assert_eq!(r.status, 404);
    let r = f.client.raw("DELETE", "/api/v1/vm", None).unwrap();
    assert_eq!(r.status, 405);
    assert!(r.body.contains("GET"), "{}", r.body);
    f.conforms("GET", "/vm", &r);
    let r = f.client.raw("GET", "/api/v1/vm/boot", None).unwrap();
    assert_eq!(r.status, 405);
    assert!(r.body.contains("PUT"));
    // Still alive and unchanged.
    assert_eq!(f.state(), "not-configured");
}

#[test]
fn reads_answer_while_a_command_is_running() {
    // A restore of a missing snapshot fails fast; a boot of the probe takes a moment: reads
    // made meanwhile are answered at once.
    let f = Fixture::new("reads");
    let cfg = probe_config(&f.dir);
    f.call(Method::Put, "/vm/config", Some(&cfg), 200);
    let client = Client::new(&f.socket);
    let t = std::thread::spawn(move || client.request(Method::Put, "/vm/boot", None));
    for _ in 0..20 {
        let start = Instant::now();
        f.call(Method::Get, "/vm/counters", None, 200);
        assert!(start.elapsed() < Duration::from_secs(1));
    }
    assert_eq!(t.join().unwrap().unwrap().status, 200);
}
