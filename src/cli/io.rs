//! `cowimg io`: scripted I/O with qemu-io's command syntax and output.
use super::size::{io_size, parse_size};
use super::source::{self, ImageFormat};
use crate::image::{Image, OpenOptions};
use anyhow::bail;
use clap::Args;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Reads and writes move through a buffer of at most this size, so that a request's
/// length never sizes an allocation.
const CHUNK: usize = 1 << 20;

/// qemu-io's default write pattern.
const DEFAULT_PATTERN: u8 = 0xcd;

#[derive(Args, Debug)]
#[command(
    after_help = "Commands (as in qemu-io; offsets and lengths take K, M, G, T suffixes):\n  \
    read [-P BYTE] [-q] OFF LEN     read; with -P verify that every byte is BYTE\n  \
    write [-P BYTE] [-q] OFF LEN    write BYTE (default 0xcd)\n  \
    write -z [-q] OFF LEN           write zeroes\n  \
    discard [-q] OFF LEN            discard: frees the space, reads as zeros (alias: trim)\n  \
    flush                           make every earlier write durable\n\
    Without -c, commands are read from stdin, one per line, and each runs as it arrives."
)]
pub struct IoArgs {
    /// Format of IMAGE: only cowimg images can be opened (probed when not given).
    #[arg(short = 'f', value_name = "FMT", value_parser = source::parse_image_format)]
    pub format: Option<ImageFormat>,
    /// Open the image read-only.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Do not take the shared lock (read-only only), as qemu-io -U.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// A command to run; repeat for a script. Commands run in order.
    #[arg(short = 'c', long = "cmd", value_name = "CMD")]
    pub commands: Vec<String>,
    /// The cowimg image (its backing chain is opened read-only).
    pub image: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Read { pattern: Option<u8> },
    Write { pattern: u8 },
    WriteZeroes,
    Discard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoCommand {
    Ranged {
        request: Request,
        offset: u64,
        length: u64,
        quiet: bool,
    },
    Flush,
}

pub fn run(args: IoArgs) -> anyhow::Result<ExitCode> {
    if args.force_share && !args.read_only {
        bail!("-U (force share) needs -r: a writer always takes the lock");
    }
    let detected = source::detect(&args.image, args.format)?;
    let image = if args.read_only {
        source::open_read_only_image(&args.image, detected, args.force_share)?
    } else {
        source::require_cowimg(
            &args.image,
            detected,
            "io without -r",
            "open it with -r to read it, or use qemu-io -f raw to write it",
        )?;
        Image::open(&args.image, &OpenOptions::default())?
    };
    // Commands from stdin run as they arrive, as in qemu-io: a script driving cowimg io
    // through a pipe sees each answer before it sends the next command.
    let commands: Box<dyn Iterator<Item = std::io::Result<String>>> = if args.commands.is_empty() {
        Box::new(std::io::stdin().lock().lines())
    } else {
        Box::new(args.commands.into_iter().map(Ok))
    };
    let mut out = std::io::stdout().lock();
    let mut failed = false;
    for line in commands {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let command = match parse_command(&line) {
            Ok(command) => command,
            Err(message) => {
                out.flush()?;
                eprintln!("{message}");
                failed = true;
                continue;
            }
        };
        if let Err(message) = execute(&image, command, &mut out)? {
            out.flush()?;
            eprintln!("{message}");
            failed = true;
        }
    }
    out.flush()?;
    // Every write the script made is durable when it ends.
    if let Err(e) = image.flush() {
        eprintln!("flush failed: {e}");
        failed = true;
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Parses one command line: a name, options, then OFFSET and LENGTH.
fn parse_command(line: &str) -> Result<IoCommand, String> {
    let mut words = line.split_whitespace();
    let name = words.next().unwrap_or_default();
    let (kind, usage) = match name {
        "read" | "r" => ("read", "read [-P BYTE] [-q] OFF LEN"),
        "write" | "w" => ("write", "write [-P BYTE | -z] [-q] OFF LEN"),
        "discard" | "d" | "trim" => ("discard", "discard [-q] OFF LEN"),
        "flush" | "f" => ("flush", "flush"),
        _ => return Err(format!("command \"{name}\" not found")),
    };
    let bad = |why: String| format!("{name}: {why} (usage: {usage})");
    let mut pattern = None;
    let mut zeroes = false;
    let mut quiet = false;
    let mut positional = Vec::new();
    while let Some(word) = words.next() {
        match word {
            "-q" if kind != "flush" => quiet = true,
            "-z" if kind == "write" => zeroes = true,
            _ if word.starts_with("-P") && matches!(kind, "read" | "write") => {
                let value = match &word[2..] {
                    "" => words
                        .next()
                        .ok_or_else(|| bad("-P needs a pattern byte".into()))?,
                    attached => attached,
                };
                pattern = Some(
                    parse_pattern(value)
                        .ok_or_else(|| format!("{value} is not a valid pattern byte"))?,
                );
            }
            _ if word.starts_with('-') && word.len() > 1 => {
                return Err(bad(format!("unknown option {word}")));
            }
            _ => positional.push(word),
        }
    }
    if kind == "flush" {
        return match positional.as_slice() {
            [] => Ok(IoCommand::Flush),
            _ => Err(bad("takes no arguments".into())),
        };
    }
    let [offset, length] = positional.as_slice() else {
        return Err(bad(format!(
            "expected OFF LEN, got {} arguments",
            positional.len()
        )));
    };
    let offset = parse_size(offset).map_err(&bad)?;
    let length = parse_size(length).map_err(&bad)?;
    let request = match (kind, pattern, zeroes) {
        ("read", pattern, _) => Request::Read { pattern },
        ("write", Some(_), true) => return Err(bad("-P and -z exclude each other".into())),
        ("write", None, true) => Request::WriteZeroes,
        ("write", pattern, false) => Request::Write {
            pattern: pattern.unwrap_or(DEFAULT_PATTERN),
        },
        _ => Request::Discard,
    };
    Ok(IoCommand::Ranged {
        request,
        offset,
        length,
        quiet,
    })
}

/// A pattern byte as C's strtol with base 0 reads it: `0x` hex, leading-`0` octal, decimal.
fn parse_pattern(text: &str) -> Option<u8> {
    let value = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()?
    } else if text.len() > 1 && text.starts_with('0') {
        u64::from_str_radix(&text[1..], 8).ok()?
    } else {
        text.parse().ok()?
    };
    u8::try_from(value).ok()
}

/// Runs one command. The outer error is for stdout; the inner one is the command's failure,
/// which the script reports and goes on from, as qemu-io does.
fn execute(
    image: &Image,
    command: IoCommand,
    out: &mut impl Write,
) -> std::io::Result<Result<(), String>> {
    let IoCommand::Ranged {
        request,
        offset,
        length,
        quiet,
    } = command
    else {
        return Ok(image.flush().map_err(|e| format!("flush failed: {e}")));
    };
    let (verb, done) = match request {
        Request::Read { .. } => ("read", "read"),
        Request::Write { .. } | Request::WriteZeroes => ("write", "wrote"),
        Request::Discard => ("discard", "discard"),
    };
    let started = Instant::now();
    let mut mismatch = None;
    let result = match request {
        Request::Read { pattern } => read(image, offset, length, pattern, &mut mismatch),
        Request::Write { pattern } => write(image, offset, length, pattern),
        Request::WriteZeroes => image.write_zeroes(offset, length),
        Request::Discard => image.discard(offset, length),
    };
    let elapsed = started.elapsed();
    if let Err(e) = result {
        return Ok(Err(format!("{verb} failed: {e}")));
    }
    if !quiet {
        writeln!(out, "{done} {length}/{length} bytes at offset {offset}")?;
        writeln!(out, "{}", timing_line(length, elapsed))?;
    }
    Ok(match mismatch {
        Some((at, expected, found)) => Err(format!(
            "Pattern verification failed at offset {at} (expected 0x{expected:02x}, found \
             0x{found:02x}) in the {length} bytes read at offset {offset}"
        )),
        None => Ok(()),
    })
}

/// Reads `[offset, offset + length)`; with a pattern, records the first byte that differs.
fn read(
    image: &Image,
    offset: u64,
    length: u64,
    pattern: Option<u8>,
    mismatch: &mut Option<(u64, u8, u8)>,
) -> crate::Result<()> {
    check_range(image, offset, length)?;
    let mut buf = vec![0u8; chunk_len(length)];
    let mut pos = 0;
    while pos < length {
        let n = chunk_len(length - pos);
        image.read_at(&mut buf[..n], offset + pos)?;
        if let (Some(expected), None) = (pattern, *mismatch) {
            if let Some(i) = buf[..n].iter().position(|&b| b != expected) {
                *mismatch = Some((offset + pos + i as u64, expected, buf[i]));
            }
        }
        pos += n as u64;
    }
    Ok(())
}

fn write(image: &Image, offset: u64, length: u64, pattern: u8) -> crate::Result<()> {
    check_range(image, offset, length)?;
    let buf = vec![pattern; chunk_len(length)];
    let mut pos = 0;
    while pos < length {
        let n = chunk_len(length - pos);
        image.write_at(&buf[..n], offset + pos)?;
        pos += n as u64;
    }
    Ok(())
}

fn chunk_len(remaining: u64) -> usize {
    remaining.min(CHUNK as u64) as usize
}

/// Refuses a request past the end before any chunk of it runs, so that a failed request
/// changes nothing.
fn check_range(image: &Image, offset: u64, length: u64) -> crate::Result<()> {
    let size = image.virtual_size();
    match offset.checked_add(length) {
        Some(end) if end <= size => Ok(()),
        _ => Err(crate::Error::OutOfRange {
            path: image.path().into(),
            offset,
            length,
            size,
        }),
    }
}

/// qemu-io's second line: `4 KiB, 1 ops; 00.00 sec (2.204 MiB/sec and 564.2341 ops/sec)`.
fn timing_line(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    format!(
        "{}, 1 ops; {:02}.{:02} sec ({}/sec and {:.4} ops/sec)",
        io_size(bytes as f64),
        elapsed.as_secs(),
        elapsed.subsec_millis() / 10,
        io_size(bytes as f64 / secs),
        1.0 / secs
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranged(request: Request, offset: u64, length: u64) -> IoCommand {
        IoCommand::Ranged {
            request,
            offset,
            length,
            quiet: false,
        }
    }

    #[test]
    fn commands_parse_like_qemu_io() {
        assert_eq!(
            parse_command("write 0 4k"),
            Ok(ranged(Request::Write { pattern: 0xcd }, 0, 4096))
        );
        assert_eq!(
            parse_command("write -P 0xab 1000 3"),
            Ok(ranged(Request::Write { pattern: 0xab }, 1000, 3))
        );
        assert_eq!(
            parse_command("w -P7 1 2"),
            Ok(ranged(Request::Write { pattern: 7 }, 1, 2))
        );
        assert_eq!(
            parse_command("write -z 1.5k 64K"),
            Ok(ranged(Request::WriteZeroes, 1536, 65536))
        );
        assert_eq!(
            parse_command("read -P 0 0x1000 512"),
            Ok(ranged(Request::Read { pattern: Some(0) }, 4096, 512))
        );
        assert_eq!(
            parse_command("trim 0 1M"),
            Ok(ranged(Request::Discard, 0, 1 << 20))
        );
        assert_eq!(
            parse_command("discard 0 1M"),
            Ok(ranged(Request::Discard, 0, 1 << 20))
        );
        assert_eq!(parse_command("flush"), Ok(IoCommand::Flush));
        assert_eq!(parse_pattern("010"), Some(8));
    }

    #[test]
    fn malformed_commands_are_refused() {
        for bad in [
            "bogus 0 1",
            "read 0",
            "read 0 1 2",
            "write -P 0x1ff 0 1",
            "write -P 1 -z 0 1",
            "write -x 0 1",
            "discard -P 1 0 1",
            "read 0 12Q",
            "flush 0",
            "write -P",
        ] {
            assert!(parse_command(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
