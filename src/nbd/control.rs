//! The control socket (`--control PATH`): JSON lines, one request and one reply per line,
//! as `format-spec/CONTROL.md` specifies. `cowimg ctl` is its client.
//!
//! The socket is made under a temporary name, given mode 0600 and only then renamed into
//! place, so it is never reachable by other users; a client whose uid is neither ours nor
//! root's is also refused by its credentials. Requests are bounded: a line longer than
//! [`MAX_LINE`] ends the connection, at most [`MAX_CLIENTS`] are served at once, and a
//! client that sends nothing for [`IDLE`] is dropped.
use super::export::{validate_export_name, Export};
use super::server::Shared;
use crate::error::Error;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest request line accepted, in bytes.
pub const MAX_LINE: usize = 64 * 1024;
/// Control clients served at once.
const MAX_CLIENTS: usize = 16;
/// A control client that sends nothing for this long is disconnected.
const IDLE: Duration = Duration::from_secs(60);
/// How long `remove --force` waits for the export's clients to go.
const REMOVE_GRACE: Duration = Duration::from_secs(10);

/// The running control socket; dropping it stops it and removes the socket file.
pub(crate) struct Control {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)?;
    let made = std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| {
            // A live control socket at PATH belongs to another server: do not take it.
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another server listens there",
                ));
            }
            std::fs::rename(&temporary, path)
        });
    if let Err(e) = made {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(listener)
}

pub(crate) fn start(shared: &Arc<Shared>, path: &Path) -> crate::Result<Control> {
    let listener = bind_private(path).map_err(|source| Error::File {
        path: path.into(),
        op: "listening for control commands",
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| Error::File {
            path: path.into(),
            op: "listening for control commands",
            source,
        })?;
    eprintln!("cowimg: control socket on {}", path.display());
    let stop = Arc::new(AtomicBool::new(false));
    let (s, flag) = (Arc::clone(shared), Arc::clone(&stop));
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || accept_loop(&s, &listener, &flag))
        .map_err(|source| Error::File {
            path: path.into(),
            op: "starting the control thread",
            source,
        })?;
    Ok(Control {
        path: path.into(),
        stop,
        thread: Some(thread),
    })
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, stop: &AtomicBool) {
    let clients = Arc::new(AtomicUsize::new(0));
    // SAFETY: geteuid takes no arguments, cannot fail and touches no memory of ours.
    let our_uid = unsafe { libc::geteuid() };
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(e) => {
                eprintln!("cowimg: control socket: accepting failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        use nix::sys::socket::{getsockopt, sockopt};
        let uid = getsockopt(&stream, sockopt::PeerCredentials).map(|c| c.uid());
        if !matches!(uid, Ok(u) if u == our_uid || u == 0) {
            eprintln!("cowimg: control socket: refused a client with uid {uid:?}");
            continue;
        }
        if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            let mut s = stream;
            let _ = writeln!(s, "{}", refusal("too many control clients"));
            continue;
        }
        let (s, n) = (Arc::clone(shared), Arc::clone(&clients));
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                serve_client(&s, stream);
                n.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn refusal(message: &str) -> Value {
    json!({"ok": false, "error": message})
}

fn serve_client(shared: &Shared, stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(IDLE));
    let _ = stream.set_write_timeout(Some(IDLE));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut input = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        // One byte over the limit tells a line that is too long from one that fits.
        match (&mut input)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_LINE {
            let reply = refusal(&format!("request longer than {MAX_LINE} bytes"));
            let _ = writeln!(out, "{reply}");
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match serde_json::from_slice::<Value>(&line) {
            Ok(request) => match run(shared, &request) {
                Ok(mut v) => {
                    v["ok"] = json!(true);
                    v
                }
                Err(e) => refusal(&e),
            },
            Err(e) => refusal(&format!("request is not JSON: {e}")),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

type Reply = Result<Value, String>;

fn string_field<'a>(request: &'a Value, key: &str) -> Result<&'a str, String> {
    request
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("\"{key}\" (a string) is required"))
}

fn bool_field(request: &Value, key: &str) -> Result<bool, String> {
    match request.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("\"{key}\" must be true or false")),
    }
}

fn export_named(shared: &Shared, request: &Value) -> Result<Arc<Export>, String> {
    let name = string_field(request, "export")?;
    shared
        .exports
        .get(name)
        .ok_or_else(|| format!("no export named \"{}\"", name.escape_debug()))
}

fn run(shared: &Shared, request: &Value) -> Reply {
    let command = string_field(request, "command")?;
    match command {
        "list" => Ok(
            json!({"exports": shared.exports.all().iter().map(|e| describe(e)).collect::<Vec<_>>()}),
        ),
        "stats" => {
            let exports = match request.get("export") {
                None | Some(Value::Null) => shared.exports.all(),
                Some(_) => vec![export_named(shared, request)?],
            };
            Ok(json!({"exports": exports.iter().map(|e| stats(e)).collect::<Vec<_>>()}))
        }
        "add" => {
            let name = string_field(request, "export")?;
            validate_export_name(name)?;
            let image = string_field(request, "image")?;
            let read_only = bool_field(request, "read_only")?;
            let export = shared
                .exports
                .add(name, Path::new(image), read_only, None)
                .map_err(|e| e.to_string())?;
            eprintln!("cowimg: control: added export \"{name}\" ({image})");
            Ok(json!({"export": describe(&export)}))
        }
        "remove" => remove(shared, request),
        "flush" => {
            let exports = match request.get("export") {
                None | Some(Value::Null) => shared.exports.all(),
                Some(_) => vec![export_named(shared, request)?],
            };
            for e in &exports {
                e.image().flush().map_err(|err| err.to_string())?;
            }
            Ok(json!({"flushed": exports.iter().map(|e| e.name.clone()).collect::<Vec<_>>()}))
        }
        "snapshot" => {
            let export = export_named(shared, request)?;
            let new_top = PathBuf::from(string_field(request, "image")?);
            let old_top = shared
                .exports
                .snapshot(&export, &new_top)
                .map_err(|e| e.to_string())?;
            eprintln!(
                "cowimg: control: export \"{}\" now writes to {} over {}",
                export.name,
                new_top.display(),
                old_top.display()
            );
            Ok(json!({"export": describe(&export), "old_top": old_top.to_string_lossy()}))
        }
        "commit" => Err(
            "commit while serving is not supported: see format-spec/CONTROL.md, \"commit\"".into(),
        ),
        other => Err(format!(
            "unknown command \"{}\" (list, stats, add, remove, flush, snapshot)",
            other.escape_debug()
        )),
    }
}

fn describe(e: &Export) -> Value {
    let image = e.image();
    json!({
        "name": e.name,
        "image": image.path().to_string_lossy(),
        "read_only": e.read_only,
        "size": image.virtual_size(),
        "clients": e.stats.clients.load(Ordering::Relaxed),
    })
}

fn stats(e: &Export) -> Value {
    let mut v = describe(e);
    let s = &e.stats;
    let path = e.image().path().to_path_buf();
    let meta = std::fs::metadata(&path).ok();
    v["requests"] = json!(s.requests.load(Ordering::Relaxed));
    v["bytes_read"] = json!(s.bytes_read.load(Ordering::Relaxed));
    v["bytes_written"] = json!(s.bytes_written.load(Ordering::Relaxed));
    v["errors"] = json!(s.errors.load(Ordering::Relaxed));
    v["allocated_bytes"] = json!(meta.as_ref().map(|m| m.blocks() * 512));
    v["file_size"] = json!(meta.as_ref().map(|m| m.len()));
    v
}

fn remove(shared: &Shared, request: &Value) -> Reply {
    let name = string_field(request, "export")?;
    let force = bool_field(request, "force")?;
    let export = shared
        .exports
        .take(name)
        .ok_or_else(|| format!("no export named \"{}\"", name.escape_debug()))?;
    // Taken out first, counted after: a client entering now sees `removed` and leaves.
    let clients = export.stats.clients.load(Ordering::SeqCst);
    if clients > 0 && !force {
        shared.exports.put_back(export);
        return Err(format!(
            "export \"{name}\" has {clients} clients; disconnect them or use --force"
        ));
    }
    // Flushed before anyone is disconnected, so a client's completed writes are durable
    // whatever it does next.
    let flushed = export.image().flush();
    if clients > 0 {
        let live = super::server::lock(&shared.live);
        for l in live.values() {
            if l.export.as_ref().is_some_and(|e| Arc::ptr_eq(e, &export)) {
                l.socket.shutdown(Shutdown::Both);
            }
        }
    }
    let deadline = Instant::now() + REMOVE_GRACE;
    while export.stats.clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    flushed.map_err(|e| e.to_string())?;
    eprintln!("cowimg: control: removed export \"{name}\" ({clients} clients disconnected)");
    Ok(json!({"removed": name, "disconnected": clients}))
}
