//! `cowimg attach` and `cowimg detach`: an image (or an NBD export) as a block device in one
//! command, as `qemu-nbd -c` does.
//!
//! `attach` serves the image with a `cowimg serve` of its own on a private Unix socket (or
//! uses the export a URI names), then attaches it with the kernel's NBD client when the
//! kernel has the nbd module, and with nbdfuse plus a loop device otherwise. What it started
//! is written to a state file named after the device, which `detach` reads to undo it in
//! reverse: flush the device, detach it, stop nbdfuse, stop the server (which flushes the
//! image on SIGTERM).
use anyhow::{anyhow, bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// How long the server, nbdfuse or the device may take to come up or go away.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The server flushes the image before it exits; a large dirty map can take a while.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// The NBD device to use (/dev/nbdN); by default the first free one, or a loop device
    /// over nbdfuse when the kernel has no nbd module.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<PathBuf>,
    /// Attach read-only.
    #[arg(short = 'r', long)]
    pub read_only: bool,
    /// An image file to serve, or the URI of an export to attach (nbd://HOST[:PORT]/NAME or
    /// nbd+unix:///NAME?socket=PATH).
    pub image: String,
}

#[derive(Args, Debug)]
pub struct DetachArgs {
    /// The device `cowimg attach` printed.
    pub device: PathBuf,
}

/// What `attach` started, kept until `detach` undoes it.
#[derive(Serialize, Deserialize, Debug)]
struct Attachment {
    device: PathBuf,
    /// "nbd-client" or "nbdfuse".
    method: String,
    image: String,
    uri: String,
    /// The `cowimg serve` that attach started (none when attached to a URI).
    server_pid: Option<u32>,
    /// The directory holding the server's socket and log, and nbdfuse's mount point.
    work_dir: PathBuf,
    nbdfuse_pid: Option<u32>,
}

/// Where attachments are recorded: `COWIMG_RUN_DIR`, or /run/cowimg.
fn run_dir() -> PathBuf {
    std::env::var_os("COWIMG_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/cowimg"))
}

fn state_file(device: &Path) -> PathBuf {
    let name = device
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    run_dir().join("attached").join(format!("{name}.json"))
}

pub fn attach(args: AttachArgs) -> anyhow::Result<ExitCode> {
    let attached = run_dir().join("attached");
    std::fs::create_dir_all(&attached)
        .with_context(|| format!("creating {}", attached.display()))?;
    let work_dir = new_work_dir()?;
    let mut started = Started::default();
    match attach_in(&args, &work_dir, &mut started) {
        Ok(a) => {
            let text = serde_json::to_string_pretty(&a)?;
            std::fs::write(state_file(&a.device), text)
                .with_context(|| format!("recording the attachment in {}", attached.display()))?;
            println!("{}", a.device.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            started.undo();
            let _ = std::fs::remove_dir_all(&work_dir);
            Err(e)
        }
    }
}

/// What a failed attach has to undo.
#[derive(Default)]
struct Started {
    server: Option<u32>,
    nbdfuse: Option<(u32, PathBuf)>,
}

impl Started {
    fn undo(&mut self) {
        if let Some((pid, dir)) = self.nbdfuse.take() {
            let _ = unmount_fuse(&dir, pid);
        }
        if let Some(pid) = self.server.take() {
            let _ = stop_process(pid, "the server");
        }
    }
}

/// A directory of this attachment's own under the run directory.
fn new_work_dir() -> anyhow::Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let dir = run_dir().join(format!("attach-{}-{stamp}", std::process::id()));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn attach_in(
    args: &AttachArgs,
    work_dir: &Path,
    started: &mut Started,
) -> anyhow::Result<Attachment> {
    let (uri, server_pid) = if is_uri(&args.image) {
        (args.image.clone(), None)
    } else {
        let (uri, pid) = start_server(&args.image, args.read_only, work_dir)?;
        started.server = Some(pid);
        (uri, Some(pid))
    };
    let nbd_device = match &args.device {
        Some(d) => Some(d.clone()),
        None => free_nbd_device(),
    };
    let mut attachment = Attachment {
        device: PathBuf::new(),
        method: String::new(),
        image: args.image.clone(),
        uri: uri.clone(),
        server_pid,
        work_dir: work_dir.to_path_buf(),
        nbdfuse_pid: None,
    };
    if let Some(device) = nbd_device {
        attach_nbd_client(&uri, &device, args.read_only)?;
        eprintln!(
            "cowimg: {} attached as {} with the kernel's NBD client",
            args.image,
            device.display()
        );
        attachment.device = device;
        attachment.method = "nbd-client".into();
    } else {
        let (pid, device) = attach_nbdfuse(&uri, work_dir, args.read_only, started)?;
        eprintln!(
            "cowimg: {} attached as {} through nbdfuse and a loop device (the kernel has no nbd module)",
            args.image,
            device.display()
        );
        attachment.device = device;
        attachment.method = "nbdfuse".into();
        attachment.nbdfuse_pid = Some(pid);
    }
    Ok(attachment)
}

fn is_uri(s: &str) -> bool {
    s.starts_with("nbd://") || s.starts_with("nbd+unix://")
}

/// Starts `cowimg serve` on a socket in `work_dir`, in a session of its own so that it
/// outlives this command; returns the export's URI and the server's pid.
fn start_server(image: &str, read_only: bool, work_dir: &Path) -> anyhow::Result<(String, u32)> {
    if !Path::new(image).exists() {
        bail!("{image}: no such image");
    }
    let socket = work_dir.join("nbd.sock");
    let log_path = work_dir.join("serve.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the cowimg executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve").arg("--socket").arg(&socket);
    if read_only {
        cmd.arg("--read-only");
    }
    let mut child = cmd
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting cowimg serve")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("cowimg: serving") {
            break;
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the server exited ({status}): {}",
                log.trim().lines().last().unwrap_or("no message")
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the server did not start within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((
        format!("nbd+unix:///?socket={}", socket.display()),
        child.id(),
    ))
}

/// The first /dev/nbdN that no client uses, after loading the nbd module; none when the
/// kernel has no nbd devices.
fn free_nbd_device() -> Option<PathBuf> {
    let _ = Command::new("modprobe")
        .arg("nbd")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    (0..64)
        .map(|n| PathBuf::from(format!("/dev/nbd{n}")))
        .take_while(|d| d.exists())
        .find(|d| {
            let name = d.file_name().unwrap().to_string_lossy().into_owned();
            // A device in use has a pid file in sysfs.
            !Path::new(&format!("/sys/block/{name}/pid")).exists()
        })
}

/// The parts of an NBD URI that nbd-client takes.
enum Target {
    Unix {
        socket: String,
        export: String,
    },
    Tcp {
        host: String,
        port: String,
        export: String,
    },
}

fn parse_uri(uri: &str) -> anyhow::Result<Target> {
    if let Some(rest) = uri.strip_prefix("nbd+unix://") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let export = path.trim_start_matches('/').to_string();
        let socket = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .ok_or_else(|| anyhow!("{uri}: an nbd+unix URI needs ?socket=PATH"))?;
        return Ok(Target::Unix {
            socket: socket.to_string(),
            export,
        });
    }
    if let Some(rest) = uri.strip_prefix("nbd://") {
        let (authority, export) = rest.split_once('/').unwrap_or((rest, ""));
        // An IPv6 address is in brackets: [::1]:10809.
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| anyhow!("{uri}: unclosed [ in the address"))?;
                (host, after.strip_prefix(':').unwrap_or("10809"))
            }
            None => authority.split_once(':').unwrap_or((authority, "10809")),
        };
        return Ok(Target::Tcp {
            host: host.to_string(),
            port: port.to_string(),
            export: export.to_string(),
        });
    }
    bail!("{uri}: not an nbd:// or nbd+unix:// URI")
}

fn run_tool(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn attach_nbd_client(uri: &str, device: &Path, read_only: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("nbd-client");
    match parse_uri(uri)? {
        Target::Unix { socket, export } => {
            cmd.arg("-unix").arg(socket).arg(device);
            if !export.is_empty() {
                cmd.arg("-name").arg(export);
            }
        }
        Target::Tcp { host, port, export } => {
            cmd.arg(host).arg(port).arg(device);
            if !export.is_empty() {
                cmd.arg("-name").arg(export);
            }
        }
    }
    cmd.args(["-block-size", "4096", "-timeout", "60"]);
    if read_only {
        cmd.arg("-readonly");
    }
    run_tool(&mut cmd, "nbd-client").map(|_| ())
}

/// Mounts the export as the file `DIR/fuse/nbd` with nbdfuse and puts a loop device on it.
fn attach_nbdfuse(
    uri: &str,
    work_dir: &Path,
    read_only: bool,
    started: &mut Started,
) -> anyhow::Result<(u32, PathBuf)> {
    let mount = work_dir.join("fuse");
    std::fs::create_dir_all(&mount)?;
    let pid_file = work_dir.join("nbdfuse.pid");
    let log = std::fs::File::create(work_dir.join("nbdfuse.log"))?;
    let mut cmd = Command::new("nbdfuse");
    if read_only {
        cmd.arg("-r");
    }
    let mut child = cmd
        .arg("-P")
        .arg(&pid_file)
        .arg(&mount)
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting nbdfuse (package libnbd-bin)")?;
    let file = mount.join("nbd");
    let deadline = Instant::now() + START_TIMEOUT;
    while !(pid_file.exists() && file.exists()) {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(work_dir.join("nbdfuse.log")).unwrap_or_default();
            bail!("nbdfuse exited ({status}): {}", log.trim());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("nbdfuse did not come up within {START_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    started.nbdfuse = Some((child.id(), mount.clone()));
    let mut losetup = Command::new("losetup");
    if read_only {
        losetup.arg("-r");
    }
    let device = run_tool(losetup.args(["-f", "--show"]).arg(&file), "losetup")?;
    Ok((child.id(), PathBuf::from(device.trim())))
}

pub fn detach(args: DetachArgs) -> anyhow::Result<ExitCode> {
    let state = state_file(&args.device);
    let text = std::fs::read_to_string(&state).map_err(|_| {
        anyhow!(
            "{}: not attached by cowimg attach (no {})",
            args.device.display(),
            state.display()
        )
    })?;
    let a: Attachment = serde_json::from_str(&text)
        .with_context(|| format!("{}: unreadable attachment record", state.display()))?;
    if let Some(point) = mount_point_of(&a.device) {
        bail!(
            "{} is mounted at {point}: unmount it first",
            a.device.display()
        );
    }
    flush_device(&a.device)?;
    match a.method.as_str() {
        "nbd-client" => {
            run_tool(
                Command::new("nbd-client").arg("-d").arg(&a.device),
                "nbd-client -d",
            )?;
        }
        _ => {
            run_tool(
                Command::new("losetup").arg("-d").arg(&a.device),
                "losetup -d",
            )?;
            wait_for_loop_release(&a.device);
            if let Some(pid) = a.nbdfuse_pid {
                unmount_fuse(&a.work_dir.join("fuse"), pid)?;
            }
        }
    }
    if let Some(pid) = a.server_pid {
        stop_process(pid, "the server")?;
    }
    let _ = std::fs::remove_file(&state);
    let _ = std::fs::remove_dir_all(&a.work_dir);
    eprintln!("cowimg: {} detached from {}", a.image, a.device.display());
    Ok(ExitCode::SUCCESS)
}

/// Where the device is mounted, if it is (a device mounted cannot be detached safely).
fn mount_point_of(device: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let dev = std::fs::canonicalize(device).ok()?;
    mounts.lines().find_map(|l| {
        let mut fields = l.split(' ');
        let source = fields.next()?;
        let point = fields.next()?;
        (Path::new(source) == dev).then(|| point.to_string())
    })
}

/// Writes the device's cache to the export and makes the export flush it.
fn flush_device(device: &Path) -> anyhow::Result<()> {
    let f = std::fs::File::open(device).with_context(|| format!("opening {}", device.display()))?;
    f.sync_all()
        .with_context(|| format!("flushing {}", device.display()))
}

/// `losetup -d` only marks a device that something still has open (udev probing it, say)
/// for release on its last close; the loop keeps nbdfuse's file open until then.
fn wait_for_loop_release(device: &Path) {
    let Some(name) = device.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let backing = PathBuf::from(format!("/sys/block/{name}/loop/backing_file"));
    let deadline = Instant::now() + START_TIMEOUT;
    while backing.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Unmounts nbdfuse's mount point, which makes it exit, and waits for it. The mount can be
/// busy for a moment after the loop device let go of it, so this tries for a while.
fn unmount_fuse(mount: &Path, pid: u32) -> anyhow::Result<()> {
    let try_unmount = || {
        ["fusermount3", "fusermount", "umount"].iter().any(|tool| {
            let mut cmd = Command::new(tool);
            if *tool != "umount" {
                cmd.arg("-u");
            }
            cmd.arg(mount)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
    };
    let deadline = Instant::now() + START_TIMEOUT;
    while !try_unmount() {
        if Instant::now() > deadline {
            bail!(
                "{}: could not unmount nbdfuse (still busy after {START_TIMEOUT:?})",
                mount.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_exit(pid, START_TIMEOUT)
        .then_some(())
        .ok_or_else(|| anyhow!("nbdfuse (pid {pid}) did not exit after its unmount"))
}

/// SIGTERM, then waits for the process to go (the server flushes on SIGTERM).
fn stop_process(pid: u32, what: &str) -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    let pid_t = nix::unistd::Pid::from_raw(pid as i32);
    if kill(pid_t, Signal::SIGTERM).is_err() {
        return Ok(()); // already gone
    }
    if wait_for_exit(pid, STOP_TIMEOUT) {
        Ok(())
    } else {
        bail!("{what} (pid {pid}) did not exit within {STOP_TIMEOUT:?} of SIGTERM")
    }
}

/// Polls until `pid` no longer exists (it is not our child, so it cannot be waited for).
fn wait_for_exit(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            // A zombie has exited; its parent has not reaped it yet.
            .is_ok_and(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            });
        if !alive {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_give_nbd_client_its_arguments() {
        match parse_uri("nbd+unix:///disk?socket=/run/x.sock").unwrap() {
            Target::Unix { socket, export } => {
                assert_eq!((socket.as_str(), export.as_str()), ("/run/x.sock", "disk"))
            }
            Target::Tcp { .. } => panic!("a unix URI"),
        }
        match parse_uri("nbd://example.org:10810/vm1").unwrap() {
            Target::Tcp { host, port, export } => assert_eq!(
                (host.as_str(), port.as_str(), export.as_str()),
                ("example.org", "10810", "vm1")
            ),
            Target::Unix { .. } => panic!("a tcp URI"),
        }
        match parse_uri("nbd://[::1]").unwrap() {
            Target::Tcp { host, port, .. } => {
                assert_eq!((host.as_str(), port.as_str()), ("::1", "10809"))
            }
            Target::Unix { .. } => panic!("a tcp URI"),
        }
        assert!(parse_uri("nbd+unix:///disk").is_err());
        assert!(parse_uri("http://x").is_err());
    }
}
