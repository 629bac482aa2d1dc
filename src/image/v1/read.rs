//! Reads of the merged chain: this image's units, zeros, or the backing file.

use super::{lock, shared, ImageV1};
use crate::error::Result;
use crate::image::Source;

impl ImageV1 {
    pub(super) fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Bytes past this image's own size are never visible; the backing file may be larger.
        match &self.backing {
            Some(b) => b.read_at(buf, offset),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_runs(&self, buf: &mut [u8], offset: u64, runs: &[(u64, u64, Source)]) -> Result<()> {
        for &(start, length, src) in runs {
            let b = &mut buf[(start - offset) as usize..(start - offset + length) as usize];
            match src {
                Source::Host(h) => self
                    .storage
                    .read_at(b, h)
                    .map_err(|e| self.io_err("reading", h, e))?,
                Source::Zero => b.fill(0),
                Source::Backing => self.read_backing(b, start)?,
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of the merged chain.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let _io = shared(&self.gate);
        let mut runs = Vec::new();
        {
            let st = lock(&self.state);
            self.for_each_run(&st, offset, buf.len() as u64, |s, l, src| {
                runs.push((s, l, src))
            });
        }
        self.read_runs(buf, offset, &runs)
    }
}
