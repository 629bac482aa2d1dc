//! A minimal NBD load generator for the one workload fio 3.33 cannot drive: 4 KiB random
//! writes at queue depth 16 with a FLUSH after every 32 writes.
//!
//! fio's nbd engine does turn `fsync=N` into `NBD_CMD_FLUSH`, but fio before 3.36 decides
//! "the last I/O was a sync" when a sync *completes*, not when it is issued, so with an
//! asynchronous engine and iodepth > 1 it keeps issuing flushes while the first one is in
//! flight (against `nbdkit memory` with iodepth 16 and fsync=32 it sent 49,650 flushes for
//! 108,352 writes). This client issues exactly one FLUSH per `--flush-every` writes, queued
//! behind the writes like any other request (it takes one of the `--iodepth` slots), which
//! is what newer fio and a guest's block layer do.
//!
//! It speaks the fixed-newstyle handshake with NBD_OPT_GO and simple replies only (no
//! structured replies are requested), over one Unix-socket connection, as fio does.
//!
//! Usage (`cargo bench --bench nbd_load -- ARGS`, or the built executable):
//!   nbd_load --socket PATH [--rw randwrite|randread] [--bs 4096] [--iodepth 16]
//!            [--flush-every 32] [--runtime 8] [--ramp 2] [--seed N]
//! Prints one JSON object: iops, bytes_per_sec, ops, flushes, seconds.
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const NBD_OPT_GO: u32 = 7;
const NBD_REP_ACK: u32 = 1;
const NBD_REP_INFO: u32 = 3;
const NBD_INFO_EXPORT: u16 = 0;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

type Res<T> = Result<T, String>;

struct Args {
    socket: String,
    write: bool,
    bs: u32,
    iodepth: usize,
    flush_every: u64,
    runtime: Duration,
    ramp: Duration,
    seed: u64,
}

fn parse_args() -> Res<Args> {
    let mut a = Args {
        socket: String::new(),
        write: true,
        bs: 4096,
        iodepth: 16,
        flush_every: 32,
        runtime: Duration::from_secs(8),
        ramp: Duration::from_secs(2),
        seed: 0x2545_f491_4f6c_dd1d,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // `cargo bench` appends `--bench` to every bench binary's arguments.
        if flag == "--bench" {
            continue;
        }
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num =
            |v: &str| -> Res<u64> { v.parse().map_err(|_| format!("{flag}: bad number {v:?}")) };
        match flag.as_str() {
            "--socket" => a.socket = value,
            "--rw" => {
                a.write = match value.as_str() {
                    "randwrite" => true,
                    "randread" => false,
                    other => return Err(format!("--rw: unknown workload {other:?}")),
                }
            }
            "--bs" => a.bs = num(&value)? as u32,
            "--iodepth" => a.iodepth = num(&value)?.max(1) as usize,
            "--flush-every" => a.flush_every = num(&value)?,
            "--runtime" => {
                a.runtime = Duration::from_secs_f64(value.parse().map_err(|_| "bad --runtime")?)
            }
            "--ramp" => a.ramp = Duration::from_secs_f64(value.parse().map_err(|_| "bad --ramp")?),
            "--seed" => a.seed = num(&value)?.max(1),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.socket.is_empty() {
        return Err("--socket PATH is required".into());
    }
    if a.bs == 0 || !a.bs.is_multiple_of(512) {
        return Err("--bs must be a non-zero multiple of 512".into());
    }
    Ok(a)
}

fn read_u16(r: &mut impl Read) -> Res<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b).map_err(|e| format!("reading: {e}"))?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(r: &mut impl Read) -> Res<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|e| format!("reading: {e}"))?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> Res<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(|e| format!("reading: {e}"))?;
    Ok(u64::from_be_bytes(b))
}

/// Runs the handshake and returns the export size.
fn handshake(r: &mut impl Read, w: &mut impl Write) -> Res<u64> {
    if read_u64(r)? != NBDMAGIC || read_u64(r)? != IHAVEOPT {
        return Err("not a fixed-newstyle NBD server".into());
    }
    let server_flags = read_u16(r)?;
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("server lacks fixed newstyle".into());
    }
    let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    let mut msg = Vec::new();
    msg.extend_from_slice(&client_flags.to_be_bytes());
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    msg.extend_from_slice(&6u32.to_be_bytes()); // name length (4) + info count (2)
    msg.extend_from_slice(&0u32.to_be_bytes()); // default export ""
    msg.extend_from_slice(&0u16.to_be_bytes());
    w.write_all(&msg).map_err(|e| format!("writing: {e}"))?;
    w.flush().map_err(|e| format!("writing: {e}"))?;
    let mut size = None;
    loop {
        if read_u64(r)? != OPT_REPLY_MAGIC {
            return Err("bad option reply magic".into());
        }
        let _opt = read_u32(r)?;
        let kind = read_u32(r)?;
        let len = read_u32(r)?;
        if len > 1 << 20 {
            return Err(format!("option reply of {len} bytes"));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)
            .map_err(|e| format!("reading: {e}"))?;
        match kind {
            NBD_REP_ACK => break,
            NBD_REP_INFO
                if data.len() >= 12
                    && u16::from_be_bytes([data[0], data[1]]) == NBD_INFO_EXPORT =>
            {
                let mut b = [0u8; 8];
                b.copy_from_slice(&data[2..10]);
                size = Some(u64::from_be_bytes(b));
            }
            NBD_REP_INFO => {}
            k if k & 0x8000_0000 != 0 => {
                return Err(format!(
                    "NBD_OPT_GO refused (reply {k:#x}): {}",
                    String::from_utf8_lossy(&data)
                ))
            }
            k => return Err(format!("unexpected option reply {k}")),
        }
    }
    size.ok_or_else(|| "server sent no NBD_INFO_EXPORT".into())
}

fn request(
    w: &mut impl Write,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
    payload: Option<&[u8]>,
) -> Res<()> {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    w.write_all(&h).map_err(|e| format!("writing: {e}"))?;
    if let Some(p) = payload {
        w.write_all(p).map_err(|e| format!("writing: {e}"))?;
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Data,
    Flush,
}

fn run(a: &Args) -> Res<String> {
    let stream = UnixStream::connect(&a.socket).map_err(|e| format!("{}: {e}", a.socket))?;
    let mut r = BufReader::with_capacity(1 << 20, stream.try_clone().map_err(|e| e.to_string())?);
    let mut w = BufWriter::with_capacity(1 << 20, stream);
    let size = handshake(&mut r, &mut w)?;
    let blocks = size / u64::from(a.bs);
    if blocks == 0 {
        return Err("export smaller than one block".into());
    }
    let mut payload = vec![0u8; a.bs as usize];
    let mut rng = a.seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for chunk in payload.chunks_mut(8) {
        let v = next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let mut readbuf = vec![0u8; a.bs as usize];
    // Cookie = slot index; the kind of request in flight on each slot.
    let mut slots: Vec<Option<Kind>> = vec![None; a.iodepth];
    let mut free: Vec<usize> = (0..a.iodepth).rev().collect();
    let mut writes_since_flush = 0u64;
    let start = Instant::now();
    let measure_from = start + a.ramp;
    let end = measure_from + a.runtime;
    let (mut ops, mut flushes) = (0u64, 0u64);
    let mut measuring = false;
    loop {
        let now = Instant::now();
        let stopping = now >= end;
        if !measuring && now >= measure_from {
            measuring = true;
        }
        // Fill every free slot (unless the run is over), then wait for one reply.
        if !stopping {
            while let Some(slot) = free.pop() {
                let cookie = slot as u64;
                if a.write && a.flush_every > 0 && writes_since_flush >= a.flush_every {
                    request(&mut w, CMD_FLUSH, cookie, 0, 0, None)?;
                    slots[slot] = Some(Kind::Flush);
                    writes_since_flush = 0;
                    continue;
                }
                let offset = (next() % blocks) * u64::from(a.bs);
                if a.write {
                    request(&mut w, CMD_WRITE, cookie, offset, a.bs, Some(&payload))?;
                    writes_since_flush += 1;
                } else {
                    request(&mut w, CMD_READ, cookie, offset, a.bs, None)?;
                }
                slots[slot] = Some(Kind::Data);
            }
        }
        w.flush().map_err(|e| format!("writing: {e}"))?;
        if free.len() == a.iodepth {
            break;
        }
        if read_u32(&mut r)? != SIMPLE_REPLY_MAGIC {
            return Err("bad reply magic (structured reply?)".into());
        }
        let error = read_u32(&mut r)?;
        let cookie = read_u64(&mut r)?;
        let slot = usize::try_from(cookie)
            .ok()
            .filter(|&s| s < a.iodepth)
            .ok_or("unknown cookie")?;
        let kind = slots[slot].take().ok_or("reply for an idle cookie")?;
        if error != 0 {
            return Err(format!("server returned error {error}"));
        }
        if kind == Kind::Data && !a.write {
            r.read_exact(&mut readbuf)
                .map_err(|e| format!("reading: {e}"))?;
        }
        free.push(slot);
        if measuring && !stopping {
            match kind {
                Kind::Data => ops += 1,
                Kind::Flush => flushes += 1,
            }
        }
    }
    let seconds = a.runtime.as_secs_f64();
    request(&mut w, CMD_DISC, 0, 0, 0, None)?;
    w.flush().map_err(|e| format!("writing: {e}"))?;
    Ok(format!(
        "{{\"iops\": {:.1}, \"bytes_per_sec\": {:.1}, \"ops\": {ops}, \"flushes\": {flushes}, \"seconds\": {seconds:.3}}}",
        ops as f64 / seconds,
        (ops * u64::from(a.bs)) as f64 / seconds
    ))
}

fn main() {
    let result = parse_args().and_then(|a| run(&a));
    match result {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("nbd_load: {e}");
            std::process::exit(1);
        }
    }
}
