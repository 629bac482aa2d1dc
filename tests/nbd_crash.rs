//! Crash safety through the server: kill -9 during a write workload with periodic flushes
//! (sent on a second connection, which CAN_MULTI_CONN promises is enough), reopen, and
//! everything flushed must be there, untorn, with the metadata intact.
mod nbd_support;

use cowimg::image::{Image, OpenOptions};
use nbd_support::*;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::io::{self, Read, Write};

use std::time::Duration;

const BLOCK: usize = 4096;
const BLOCKS: u64 = 4096; // 16 MiB
const BATCH: usize = 16;

/// The contents of `block` written in generation `gen`: a header naming both, then a
/// pattern, so a torn or misplaced block cannot pass for a valid one.
fn block_data(block: u64, gen: u32) -> Vec<u8> {
    let mut d = pattern(BLOCK, block * BLOCK as u64, gen as u8);
    d[..8].copy_from_slice(&block.to_be_bytes());
    d[8..12].copy_from_slice(&gen.to_be_bytes());
    d
}

fn send_request(
    s: &mut Stream,
    command: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    data: &[u8],
) -> io::Result<()> {
    let mut m = Vec::with_capacity(28 + data.len());
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&command.to_be_bytes());
    m.extend_from_slice(&cookie.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m)
}

/// Reads a simple reply: (error, cookie).
fn read_reply(s: &mut Stream) -> io::Result<(u32, u64)> {
    let mut b = [0u8; 16];
    s.read_exact(&mut b)?;
    assert_eq!(
        u32::from_be_bytes(b[..4].try_into().unwrap()),
        SIMPLE_REPLY_MAGIC
    );
    Ok((
        u32::from_be_bytes(b[4..8].try_into().unwrap()),
        u64::from_be_bytes(b[8..].try_into().unwrap()),
    ))
}

/// What the test knows about each block.
#[derive(Default)]
struct Model {
    /// The generation the last completed flush (or FUA write) made durable.
    durable: HashMap<u64, u32>,
    /// Generations sent since then: any of them may or may not have reached the disk.
    maybe: HashMap<u64, Vec<u32>>,
}

impl Model {
    fn allowed(&self, block: u64) -> Vec<Option<u32>> {
        let mut v = vec![self.durable.get(&block).copied()];
        v.extend(
            self.maybe
                .get(&block)
                .into_iter()
                .flatten()
                .map(|&g| Some(g)),
        );
        v
    }
}

/// Runs writes until the server dies; returns how many flushes completed.
fn workload(
    writer: &mut Stream,
    flusher: &mut Stream,
    model: &mut Model,
    rng: &mut rand::rngs::StdRng,
    gen: &mut u32,
) -> u32 {
    let mut flushes = 0;
    for batch in 0u64.. {
        *gen += 1;
        let mut blocks: Vec<u64> = Vec::with_capacity(BATCH);
        while blocks.len() < BATCH {
            let b = rng.gen_range(0..BLOCKS);
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        let fua: Vec<bool> = blocks.iter().map(|_| rng.gen_ratio(1, 20)).collect();
        for (i, &b) in blocks.iter().enumerate() {
            model.maybe.entry(b).or_default().push(*gen);
            let flags = if fua[i] { FLAG_FUA } else { 0 };
            if send_request(
                writer,
                CMD_WRITE,
                flags,
                i as u64,
                b * BLOCK as u64,
                &block_data(b, *gen),
            )
            .is_err()
            {
                return flushes;
            }
        }
        for _ in 0..BATCH {
            match read_reply(writer) {
                Ok((0, cookie)) => {
                    let i = cookie as usize;
                    if fua[i] {
                        // Durable now, and the newest generation of that block.
                        model.durable.insert(blocks[i], *gen);
                        model.maybe.remove(&blocks[i]);
                    }
                }
                Ok((err, _)) => panic!("write failed with error {err}"),
                Err(_) => return flushes,
            }
        }
        if batch % 4 == 3 {
            // Every write sent so far has been answered: the flush covers all of them.
            if send_request(flusher, CMD_FLUSH, 0, 99, 0, &[]).is_err() {
                return flushes;
            }
            match read_reply(flusher) {
                Ok((0, _)) => {
                    for (b, gens) in model.maybe.drain() {
                        model.durable.insert(b, *gens.last().expect("a generation"));
                    }
                    flushes += 1;
                }
                Ok((err, _)) => panic!("flush failed with error {err}"),
                Err(_) => return flushes,
            }
        }
    }
    unreachable!()
}

#[test]
fn flushed_writes_survive_kill_9_during_a_write_workload() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.cow");
    create_image(&img, BLOCKS * BLOCK as u64);
    let mut model = Model::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut gen = 0u32;
    for cycle in 0..4u64 {
        let server = Server::start(dir.path(), &img, &[]);
        let mut w = RawClient::connect(&server.socket);
        w.go(false, &[]);
        let mut f = RawClient::connect(&server.socket);
        f.go(false, &[]);
        let pid = server.pid() as i32;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300 + 200 * cycle));
            // SAFETY: kill(2) of the server child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        let flushes = workload(&mut w.s, &mut f.s, &mut model, &mut rng, &mut gen);
        killer.join().unwrap();
        drop(server);
        assert!(
            flushes > 0,
            "cycle {cycle}: no flush completed before the kill"
        );

        let report = cowimg::image::ops::check(&img, false).expect("check runs");
        assert!(
            report.corruptions.is_empty(),
            "cycle {cycle}: corrupt after kill -9: {report:?}"
        );
        if report.leaks > 0 {
            eprintln!(
                "cycle {cycle}: {} leaked clusters after kill -9 (unflushed writes)",
                report.leaks
            );
        }
        let image = Image::open(
            &img,
            &OpenOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut buf = vec![0u8; BLOCK];
        let mut checked = 0;
        for block in 0..BLOCKS {
            image.read_at(&mut buf, block * BLOCK as u64).unwrap();
            let found = if buf.iter().all(|&b| b == 0) {
                None
            } else {
                Some(u32::from_be_bytes(buf[8..12].try_into().unwrap()))
            };
            let allowed = model.allowed(block);
            assert!(allowed.contains(&found), "cycle {cycle}: block {block} holds generation {found:?}, expected one of {allowed:?}");
            if let Some(g) = found {
                assert!(
                    buf == block_data(block, g),
                    "cycle {cycle}: block {block} is torn or misplaced"
                );
            }
            // What is on disk now is the durable state for the next cycle.
            match found {
                Some(g) => model.durable.insert(block, g),
                None => model.durable.remove(&block),
            };
            checked += model.durable.contains_key(&block) as u32;
        }
        model.maybe.clear();
        eprintln!("cycle {cycle}: {flushes} flushes, {checked} blocks verified");
    }
    // The leaks the crashes left (clusters of writes never flushed) are repairable.
    cowimg::image::ops::check(&img, true).unwrap();
    assert_check_clean(&img);
}
