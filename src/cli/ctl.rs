//! `cowimg ctl SOCKET COMMAND`: the client of a server's control socket
//! (`format-spec/CONTROL.md`).
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The server's --control socket.
    pub socket: PathBuf,
    /// Print the server's JSON reply as it came.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// The exports, their images and how many clients each has.
    List,
    /// Per export: clients, requests, bytes read and written, errors, allocated and file size.
    Stats { export: Option<String> },
    /// Open IMAGE and export it as NAME.
    Add {
        name: String,
        image: PathBuf,
        #[arg(long)]
        read_only: bool,
    },
    /// Stop exporting NAME; refused while clients are connected unless --force, which
    /// flushes and then disconnects them.
    Remove {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Make every completed write of EXPORT (of all exports when omitted) durable.
    Flush { export: Option<String> },
    /// Flush EXPORT, make its image a read-only layer and write to a new overlay NEW
    /// from now on, without disconnecting anyone.
    Snapshot { export: String, new: PathBuf },
}

fn request(command: &CtlCommand) -> anyhow::Result<Value> {
    let absolute = |p: &PathBuf| -> anyhow::Result<String> {
        // The server resolves paths from its own directory; send ours.
        let p = std::path::absolute(p).with_context(|| format!("{}", p.display()))?;
        Ok(p.to_string_lossy().into_owned())
    };
    Ok(match command {
        CtlCommand::List => json!({"command": "list"}),
        CtlCommand::Stats { export } => json!({"command": "stats", "export": export}),
        CtlCommand::Add {
            name,
            image,
            read_only,
        } => {
            json!({"command": "add", "export": name, "image": absolute(image)?, "read_only": read_only})
        }
        CtlCommand::Remove { name, force } => {
            json!({"command": "remove", "export": name, "force": force})
        }
        CtlCommand::Flush { export } => json!({"command": "flush", "export": export}),
        CtlCommand::Snapshot { export, new } => {
            json!({"command": "snapshot", "export": export, "image": absolute(new)?})
        }
    })
}

pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let req = request(&args.command)?;
    let mut stream = UnixStream::connect(&args.socket).with_context(|| {
        format!(
            "{}: connecting to the control socket",
            args.socket.display()
        )
    })?;
    // Snapshots and forced removals wait for requests in flight; a minute is generous.
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    writeln!(stream, "{req}")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .take_line(&mut line)
        .with_context(|| format!("{}: reading the reply", args.socket.display()))?;
    let reply: Value = serde_json::from_str(&line)
        .with_context(|| format!("{}: the reply is not JSON", args.socket.display()))?;
    if reply["ok"] != json!(true) {
        bail!(
            "{}: {}",
            args.socket.display(),
            reply["error"].as_str().unwrap_or("the server refused")
        );
    }
    if args.json {
        println!("{reply}");
        return Ok(ExitCode::SUCCESS);
    }
    match &args.command {
        CtlCommand::List => {
            for e in reply["exports"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}{} clients",
                    e["name"].as_str().unwrap_or(""),
                    e["image"].as_str().unwrap_or(""),
                    if e["read_only"] == json!(true) {
                        "read-only\t"
                    } else {
                        ""
                    },
                    e["clients"]
                );
            }
        }
        CtlCommand::Stats { .. } => {
            println!("export\tclients\trequests\tread\twritten\terrors\tallocated\tfile size");
            for e in reply["exports"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    e["name"].as_str().unwrap_or(""),
                    e["clients"],
                    e["requests"],
                    e["bytes_read"],
                    e["bytes_written"],
                    e["errors"],
                    e["allocated_bytes"],
                    e["file_size"]
                );
            }
        }
        CtlCommand::Snapshot { export, new } => println!(
            "{export}: writes go to {}; {} is now a read-only layer",
            new.display(),
            reply["old_top"].as_str().unwrap_or("the old image")
        ),
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads one line, refusing to buffer an endless one.
trait TakeLine {
    fn take_line(self, line: &mut String) -> std::io::Result<()>;
}

impl<R: BufRead> TakeLine for R {
    fn take_line(self, line: &mut String) -> std::io::Result<()> {
        let n = self.take(64 << 20).read_line(line)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        Ok(())
    }
}
